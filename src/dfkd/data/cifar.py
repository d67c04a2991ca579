"""CIFAR-10/100 from the official python pickles, extracted or straight from the .tar.gz."""

from __future__ import annotations

import codecs
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dfkd.data.dataset import ImageDataset
from dfkd.data.download import fetch
from dfkd.errors import DfkdError


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches and which keys hold labels and names."""

    folder: str
    archive: str
    batches: dict[str, tuple[str, ...]]
    meta: str
    label_key: str
    names_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        batches={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        batches={"train": ("train",), "test": ("test",)},
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}

# Everything a pickled dict of numpy arrays may reference, looked up from live objects so that
# both numpy 1.x ("numpy.core") and 2.x ("numpy._core") module paths resolve without importing
# the deprecated one. Anything else is refused, so a hostile file cannot run code.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_SCALAR = np.int64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how python 3 protocol-2 pickles store bytes
}
for _core in ("numpy.core", "numpy._core"):
    SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
    SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _SCALAR
    SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _FROMBUFFER


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def unpickle(stream: BinaryIO, origin: str) -> dict[str, Any]:
    """Load one CIFAR pickle (written by python 2) with string keys, allowing only numpy data."""
    try:
        obj = _ArrayUnpickler(stream, encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can fail with almost any exception type
        raise DfkdError(f"{origin}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DfkdError(f"{origin}: not a CIFAR python pickle (holds {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(name: str, split: str, root: Path, download: bool) -> ImageDataset:
    """Read one split of "cifar10" or "cifar100" from ``root``.

    ``root`` may hold the extracted folder, be that folder, or hold the official archive, which
    is then read in place rather than extracted.
    """
    layout = LAYOUTS[name]
    wanted = [*layout.batches[split], layout.meta]
    source = _locate(name, layout, root, download)
    files = _read_dir(source, wanted) if source.is_dir() else _read_tar(source, layout, wanted)

    meta = files[layout.meta]
    if layout.names_key not in meta:
        raise DfkdError(f"{source}: {layout.meta} has no '{layout.names_key}'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]]
    images, labels = [], []
    for batch in layout.batches[split]:
        data, batch_labels = _check_batch(files[batch], layout, f"{source}: {batch}")
        images.append(data)
        labels.append(batch_labels)
    label_array = np.concatenate(labels)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(classes)):
        raise DfkdError(f"{source}: labels outside 0..{len(classes) - 1}")
    return ImageDataset(
        name=name,
        images=torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32)),
        labels=torch.from_numpy(label_array),
        classes=classes,
        mean=layout.mean,
        std=layout.std,
    )


def _locate(name: str, layout: CifarLayout, root: Path, download: bool) -> Path:
    """The extracted folder if there is one, else the archive (downloaded if allowed)."""
    for folder in (root / layout.folder, root):
        if (folder / layout.meta).is_file():
            return folder
    archive = root / layout.archive
    if not archive.is_file():
        fetch(name, [layout.archive], root, download)
    return archive


def _read_dir(folder: Path, wanted: list[str]) -> dict[str, dict[str, Any]]:
    files = {}
    for member in wanted:
        path = folder / member
        if not path.is_file():
            raise DfkdError(f"{folder}: missing {member}; the extracted CIFAR folder is incomplete")
        with path.open("rb") as stream:
            files[member] = unpickle(stream, str(path))
    return files


def _read_tar(archive: Path, layout: CifarLayout, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """Unpickle the ``wanted`` members of the official archive in one pass over it."""
    files = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                parts = Path(info.name).parts
                if info.isfile() and parts[-2:-1] == (layout.folder,) and parts[-1] in wanted:
                    with tar.extractfile(info) as stream:  # a regular file always has data
                        files[parts[-1]] = unpickle(stream, f"{archive}:{info.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DfkdError(
            f"{archive}: unreadable archive ({exc}); delete it and fetch it again"
        ) from exc
    missing = [member for member in wanted if member not in files]
    if missing:
        raise DfkdError(f"{archive}: no {layout.folder}/{', '.join(missing)} inside; is this the "
                        f"official {layout.archive}?")
    return files


def _check_batch(batch: dict[str, Any], layout: CifarLayout,
                 origin: str) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 3072) uint8 pixels and int64 labels of one batch, after checking their shapes."""
    if "data" not in batch or layout.label_key not in batch:
        raise DfkdError(f"{origin}: missing 'data' or '{layout.label_key}'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DfkdError(f"{origin}: expected uint8 data of shape (N, 3072), got {data.dtype} "
                        f"{data.shape}")
    if len(labels) != len(data):
        raise DfkdError(f"{origin}: {len(data)} images but {len(labels)} labels")
    return data, labels
