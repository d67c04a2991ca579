"""Making a dataset's images fit a model's input shape (e.g. 28x28 MNIST into a 32x32 net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError


def fit_to_input(images: torch.Tensor, shape: tuple[int, int, int],
                 name: str | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, *shape) in [0, 1].

    When the target is at least as large in both height and width the images are zero-padded
    centred (pixels are kept exactly, as for the usual MNIST-in-32x32 setup); otherwise they
    are resized bilinearly with antialiasing. Channels are never invented or dropped: a
    mismatch is the user's configuration error. ``name`` labels the dataset in that message.
    """
    c, h, w = shape
    if images.ndim != 4:
        raise DfkdError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] != c:
        what = f"dataset '{name}'" if name else "the data"
        raise DfkdError(f"{what} has {images.shape[1]} channel(s) but the model expects {c} "
                        f"(input shape {c}x{h}x{w})")
    x = images.to(torch.float32) / 255.0
    in_h, in_w = x.shape[2:]
    if h >= in_h and w >= in_w:
        top, left = (h - in_h) // 2, (w - in_w) // 2
        return F.pad(x, (left, w - in_w - left, top, h - in_h - top))
    resized = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)
