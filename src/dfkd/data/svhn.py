"""SVHN (cropped digits) from the official MATLAB files train_32x32.mat / test_32x32.mat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from dfkd.data.dataset import ImageDataset
from dfkd.data.download import fetch
from dfkd.errors import DfkdError

CLASSES = [str(d) for d in range(10)]
MEAN = (0.4377, 0.4438, 0.4728)
STD = (0.198, 0.201, 0.197)


def load_svhn(split: str, root: Path, download: bool) -> ImageDataset:
    """Read one split from ``root``; SVHN's label 10 (the digit 0) becomes class 0."""
    path = root / f"{split}_32x32.mat"
    if not path.is_file():
        fetch("svhn", [path.name], root, download)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy reports corrupt files as any of a dozen exception types
        raise DfkdError(f"{path}: not a readable SVHN .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise DfkdError(f"{path}: expected variables X and y, found {sorted(mat)}")
    x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise DfkdError(f"{path}: expected uint8 X of shape (H, W, 3, {len(y)}), got {x.dtype} "
                        f"{x.shape}")
    y[y == 10] = 0
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DfkdError(f"{path}: labels outside 1..10")
    return ImageDataset(
        name="svhn",
        images=torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))),
        labels=torch.from_numpy(y),
        classes=list(CLASSES),
        mean=MEAN,
        std=STD,
    )
