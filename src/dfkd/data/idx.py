"""MNIST and Fashion-MNIST from their IDX files (gzipped or not), parsed with numpy alone."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from dfkd.data.dataset import ImageDataset
from dfkd.data.download import fetch
from dfkd.errors import DfkdError

IMAGES_MAGIC = 2051  # unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # unsigned byte, 1 dimension

CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
# Folder names torchvision uses, so an existing torchvision download is found as is.
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
PREFIX = {"train": "train", "test": "t10k"}


def load_idx(name: str, split: str, root: Path, download: bool) -> ImageDataset:
    """Read one split of ``name`` ("mnist" or "fashion-mnist") from ``root``."""
    stems = [f"{PREFIX[split]}-images-idx3-ubyte", f"{PREFIX[split]}-labels-idx1-ubyte"]
    dirs = [root, root / name / "raw", root / TORCHVISION_DIRS[name] / "raw"]
    paths = [_find(stem, dirs) for stem in stems]
    missing = [stem + ".gz" for stem, path in zip(stems, paths, strict=True) if path is None]
    if missing:
        fetch(name, missing, root, download)
        paths = [_find(stem, dirs) for stem in stems]
    image_path, label_path = paths
    images = read_idx(image_path, IMAGES_MAGIC)
    labels = read_idx(label_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DfkdError(f"{name}: {image_path} has {len(images)} images but {label_path} has "
                        f"{len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES[name]):
        raise DfkdError(f"{name}: {label_path} has label {labels.max()}, expected 0..9")
    mean, std = NORMALIZATION[name]
    return ImageDataset(
        name=name,
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(CLASSES[name]),
        mean=mean,
        std=std,
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking its magic number and declared size."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; the file name is not trusted to say so
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DfkdError(
                f"{path}: corrupt gzip file ({exc}); delete it and fetch it again"
            ) from exc
    found = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or found != magic:  # the length check matters: b"\x08\x03" reads as 2051
        raise DfkdError(f"{path}: bad IDX magic number {found} (expected {magic}); the file is "
                        "corrupt or not what its name says")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DfkdError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - offset != int(np.prod(dims)):
        raise DfkdError(f"{path}: IDX header declares shape {dims} ({int(np.prod(dims))} bytes) "
                        f"but the file holds {len(raw) - offset} bytes; it is truncated or corrupt")
    # Copy so torch gets a writable array rather than a view of immutable bytes.
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims).copy()


def _find(stem: str, dirs: list[Path]) -> Path | None:
    """The first of ``stem`` or ``stem.gz`` present in ``dirs``, in order."""
    for folder in dirs:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None
