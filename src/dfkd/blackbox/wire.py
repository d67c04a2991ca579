"""The black-box API's wire format, shared by `dfkd serve` and the client.

    GET  /v1/info     {"input_shape": [C, H, W], "num_classes": K, "access": ..., "topk": k,
                       "max_batch": N, "dataset": name or null}
    POST /v1/predict  body: a .npy float32 array (N, C, H, W) of pixels in [0, 1]
                      (numpy's own format: any client writes it, nobody unpickles it)
                      answer, by the server's access level:
                        soft  {"probs": [[K floats], ...]}
                        topk  {"classes": [[k ints], ...], "probs": [[k floats], ...]}
                        top1  {"classes": [int, ...]}
    errors            4xx with {"error": "one line that names the problem"}

Access levels are what vendors expose: the full distribution, the k most likely classes with
their probabilities, or the decision only.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from dfkd.hooks import eval_mode

ACCESS = ("soft", "topk", "top1")
NPY = "application/x-npy"


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def encode_inputs(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_inputs(body: bytes, shape: tuple[int, ...], max_batch: int) -> torch.Tensor:
    """The request's images, or BadRequest naming what is wrong with them."""
    if not body.startswith(b"\x93NUMPY"):
        raise BadRequest(400, "the body is not a .npy array (numpy.save's format)")
    try:
        a = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadRequest(400, f"the body is not a readable .npy array "
                         f"({str(e).splitlines()[0][:120]})") from None
    if a.dtype != np.float32:
        raise BadRequest(422, f"dtype {a.dtype}; send float32 pixels in [0, 1]")
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != tuple(shape):
        expected = "x".join(map(str, ("N", *shape)))
        raise BadRequest(422, f"shape {'x'.join(map(str, a.shape))}; expected {expected}")
    if len(a) == 0:
        raise BadRequest(422, "an empty batch")
    if len(a) > max_batch:
        raise BadRequest(413, f"{len(a)} images in one request; at most {max_batch}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise BadRequest(422, "pixels must be finite and in [0, 1]")
    return torch.from_numpy(a)


def api_info(model, access: str, topk: int, max_batch: int) -> dict:
    """The answer to GET /v1/info for `model` served at this access level."""
    return {"input_shape": list(model.spec.shape), "num_classes": model.spec.num_classes,
            "access": access, "topk": topk if access == "topk" else None,
            "max_batch": max_batch, "dataset": model.spec.dataset}


@torch.no_grad()
def model_answer(model, x: torch.Tensor, access: str, topk: int) -> dict:
    """What the API answers for images x: the model's probabilities (eval mode), revealed at
    this access level."""
    with eval_mode(model):
        probs = model(x.to(model.mean.device)).float().softmax(1).cpu()
    return answer(probs, access, topk)


def answer(probs: torch.Tensor, access: str, topk: int) -> dict:
    """What the API reveals of the model's probabilities (N, K) at this access level."""
    if access == "soft":
        return {"probs": probs.tolist()}
    if access == "top1":
        return {"classes": probs.argmax(1).tolist()}
    p, c = probs.topk(min(topk, probs.shape[1]), dim=1)
    return {"classes": c.tolist(), "probs": p.tolist()}


def answer_probs(ans: dict, access: str, num_classes: int, n: int) -> torch.Tensor:
    """The (n, K) probabilities an answer stands for: exact (soft); the top k and the rest of the
    mass spread evenly over the other classes (topk); one-hot (top1). A malformed answer is a
    ValueError."""
    if access == "soft":
        p = torch.tensor(ans["probs"], dtype=torch.float32)
        if p.shape != (n, num_classes):
            raise ValueError(f"probs of shape {tuple(p.shape)}, expected {(n, num_classes)}")
        return p
    classes = torch.tensor(ans["classes"], dtype=torch.long)
    in_range = bool(((classes >= 0) & (classes < num_classes)).all())
    if access == "top1":
        if classes.shape != (n,) or not in_range:
            raise ValueError(f"{len(classes)} class indices for {n} images or out of range")
        return torch.nn.functional.one_hot(classes, num_classes).float()
    top = torch.tensor(ans["probs"], dtype=torch.float32)
    k = top.shape[1] if top.ndim == 2 else 0
    if classes.shape != (n, k) or top.shape != (n, k) or not in_range:
        raise ValueError(f"top-k classes {tuple(classes.shape)} and probs {tuple(top.shape)} "
                         f"for {n} images")
    rest = (1 - top.sum(1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
    p = rest.expand(n, num_classes).clone()
    p.scatter_(1, classes, top)
    return p
