"""Dataset readers: every supported dataset, read offline from its official on-disk format.

``load_dataset`` returns an :class:`ImageDataset` (uint8 images, int64 labels, class names and
normalization constants); ``fit_to_input`` adapts its images to a model's input shape.
"""

from __future__ import annotations

import os
from pathlib import Path

from dfkd.data.cifar import load_cifar
from dfkd.data.dataset import ImageDataset
from dfkd.data.digits import load_digits_split
from dfkd.data.folder import load_folder
from dfkd.data.idx import load_idx
from dfkd.data.svhn import load_svhn
from dfkd.data.transforms import fit_to_input
from dfkd.errors import DfkdError, require_one_of

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "default_root", "fit_to_input", "load_dataset"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "folder")
SPLITS = ("train", "test")


def default_root(name: str) -> Path:
    """Where ``name`` lives when no root is given: ``$DFKD_DATA/<name>``."""
    base = os.environ.get("DFKD_DATA") or "~/.cache/dfkd/data"
    return Path(base).expanduser() / name


def load_dataset(name: str, split: str = "train", root: str | Path | None = None,
                 download: bool = True) -> ImageDataset:
    """Load one split of a dataset into memory.

    ``root=None`` means :func:`default_root`; "digits" is bundled with scikit-learn and ignores
    it, "folder" requires it. Missing files are downloaded from the official mirror when
    ``download`` is true; otherwise, or when offline, a one-line DfkdError says what to fetch.
    """
    require_one_of("dataset", name, DATASETS)
    require_one_of("split", split, SPLITS)
    if name == "digits":
        return load_digits_split(split)
    if name == "folder":
        if root is None:
            raise DfkdError("dataset 'folder' needs a root: pass --data-root DIR with one "
                            "sub-folder of images per class")
        return load_folder(split, Path(root).expanduser())
    path = default_root(name) if root is None else Path(root).expanduser()
    if name in ("mnist", "fashion-mnist"):
        return load_idx(name, split, path, download)
    if name == "svhn":
        return load_svhn(split, path, download)
    return load_cifar(name, split, path, download)
