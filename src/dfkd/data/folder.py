"""Any labelled image collection laid out as ``root/<class>/<image>``.

Splits: when ``root`` has a ``train/`` sub-folder and a ``test/`` (or ``val/``) one, those are
the splits and the class list comes from ``train/``. Otherwise ``root`` itself holds the classes
and the SAME images serve as both "train" and "test" (fine for a teacher-only sanity check, not
for an honest held-out score).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfkd.data.dataset import ImageDataset, channel_stats
from dfkd.errors import DfkdError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA"}


def load_folder(split: str, root: Path) -> ImageDataset:
    """Read one split; images become grayscale only if every training image is grayscale.

    Every image is resized to the size of the first training image (in sorted order), and
    mean/std always come from the training images so both splits normalize alike.
    """
    if not root.is_dir():
        raise DfkdError(f"folder: {root} is not a directory; pass --data-root DIR with one "
                        "sub-folder of images per class")
    train_dir, test_dir = _split_dirs(root)
    classes = _class_names(train_dir)
    train_files, train_labels = _list_images(train_dir, classes, require_all=True)
    mode, size = _mode_and_size(train_files)
    train_images = _read_images(train_files, mode, size)
    mean, std = channel_stats(train_images)
    if split == "train" or test_dir == train_dir:
        images, labels = train_images, train_labels
    else:
        test_files, labels = _list_images(test_dir, classes, require_all=False)
        images = _read_images(test_files, mode, size)
    return ImageDataset(name="folder", images=images, labels=labels, classes=classes,
                        mean=mean, std=std)


def _split_dirs(root: Path) -> tuple[Path, Path]:
    """(train folder, test folder): ``train/`` with ``test/`` or ``val/``, else root twice."""
    for test_name in ("test", "val"):
        if (root / "train").is_dir() and (root / test_name).is_dir():
            return root / "train", root / test_name
    return root, root


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(folder: Path) -> list[str]:
    classes = _subdirs(folder)
    if not classes:
        raise DfkdError(f"folder: no class sub-folders in {folder}; expected "
                        f"{folder}/<class>/<image>.png")
    return classes


def _list_images(folder: Path, classes: list[str],
                 require_all: bool) -> tuple[list[Path], torch.Tensor]:
    """Image paths in sorted order with their class indices.

    The training folder must have images for every class, since it defines the classes; a test
    folder may lack some but must not add any.
    """
    unknown = sorted(set(_subdirs(folder)) - set(classes))
    if unknown:
        raise DfkdError(f"folder: {folder} has classes {', '.join(unknown)} that the training "
                        f"folder lacks (classes: {', '.join(classes)})")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        images = sorted(p for p in class_dir.iterdir() if p.is_file()
                        and p.suffix.lower() in EXTENSIONS) if class_dir.is_dir() else []
        if require_all and not images:
            raise DfkdError(f"folder: no images in {class_dir} (looked for "
                            f"{', '.join(sorted(EXTENSIONS))})")
        files += images
        labels += [index] * len(images)
    if not files:
        raise DfkdError(f"folder: no images in {folder}/<class>/")
    return files, torch.tensor(labels, dtype=torch.int64)


def _mode_and_size(files: list[Path]) -> tuple[str, tuple[int, int]]:
    """'L' if all images are grayscale else 'RGB', and the first image's (width, height).

    Only headers are read here; PIL decodes pixels lazily.
    """
    modes = set()
    size = (0, 0)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                if i == 0:
                    size = image.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DfkdError(f"folder: cannot read image {path} ({exc})") from exc
    return ("L" if modes <= GRAY_MODES else "RGB"), size


def _read_images(files: list[Path], mode: str, size: tuple[int, int]) -> torch.Tensor:
    """Decode ``files`` as uint8 (N, C, H, W) in ``mode``, resizing any that differ from size."""
    stacked = np.stack([_decode(path, mode, size) for path in files])
    stacked = stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
    except (UnidentifiedImageError, OSError) as exc:
        raise DfkdError(f"folder: cannot read image {path} ({exc})") from exc
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8)
