"""Dataset readers against tiny fixtures written in the real on-disk formats, plus real MNIST."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dfkd.data import DATASETS, ImageDataset, default_root, fit_to_input, load_dataset
from dfkd.data import download as download_module
from dfkd.data.idx import CLASSES as IDX_CLASSES
from dfkd.errors import DfkdError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"no real MNIST in {MNIST_DIR}")

rng = np.random.default_rng(0)


def assert_one_line(exc: pytest.ExceptionInfo[DfkdError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_idx_split(folder: Path, prefix: str, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path: Path, gz: bool, name: str) -> None:
    images, labels = write_idx_split(tmp_path, "t10k", 6, gz)
    ds = load_dataset(name, "test", root=tmp_path, download=False)
    assert isinstance(ds, ImageDataset)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.images.shape == (6, 1, 28, 28) and ds.shape == (1, 28, 28) and len(ds) == 6
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes == IDX_CLASSES[name] and ds.num_classes == 10
    assert len(ds.mean) == len(ds.std) == 1


def test_fashion_mnist_class_names(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "train", 3, gz=True)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path, download=False)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)


def test_idx_gzip_detected_by_magic_not_suffix(tmp_path: Path) -> None:
    images, _ = write_idx_split(tmp_path, "train", 4, gz=True)
    for path in tmp_path.glob("*.gz"):  # gzipped content under the uncompressed name
        path.rename(path.with_suffix(""))
    ds = load_dataset("mnist", "train", root=tmp_path, download=False)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))


@pytest.mark.parametrize("layout", ["mnist/raw", "MNIST/raw"])
def test_idx_torchvision_layouts(tmp_path: Path, layout: str) -> None:
    write_idx_split(tmp_path / layout, "train", 5, gz=False)
    assert len(load_dataset("mnist", "train", root=tmp_path, download=False)) == 5


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "t10k", 4, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28), np.uint8), 2049, gz=True)  # label magic on images
    with pytest.raises(DfkdError) as exc:
        load_dataset("mnist", "test", root=tmp_path, download=False)
    message = assert_one_line(exc)
    assert "magic" in message and "t10k-images-idx3-ubyte.gz" in message


def test_idx_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "t10k", 4, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DfkdError, match="truncated or corrupt"):
        load_dataset("mnist", "test", root=tmp_path, download=False)
    path.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)
    with pytest.raises(DfkdError, match="corrupt gzip"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "train", 4, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), 2049, gz=False)
    with pytest.raises(DfkdError, match="4 images but .* 3 labels"):
        load_dataset("mnist", "train", root=tmp_path, download=False)


@needs_mnist
def test_real_mnist_test_split() -> None:
    ds = load_dataset("mnist", "test", root=MNIST_DIR, download=False)
    assert ds.images.shape == (10_000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (10_000,) and ds.labels.dtype == torch.int64
    assert set(ds.labels.tolist()) == set(range(10))
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert ds.images.max() == 255 and ds.images.min() == 0


@needs_mnist
def test_real_mnist_train_split_is_fast() -> None:
    start = time.perf_counter()
    ds = load_dataset("mnist", "train", root=MNIST_DIR, download=False)
    elapsed = time.perf_counter() - start
    assert len(ds) == 17_435 and ds.shape == (1, 28, 28)
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9
    assert torch.bincount(ds.labels, minlength=10).min() > 0
    assert elapsed < 2.0  # ~0.1 s in practice; generous for a loaded machine


# ---------------------------------------------------------------- CIFAR


def cifar_images(n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def dump(path: Path, obj: dict) -> None:
    # Bytes keys, protocol 2 and numpy 1.x module paths, like the official python-2 pickles.
    data = pickle.dumps(obj, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(data)


def write_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for i, batch in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        images = cifar_images(2)
        labels = [i % 10, (i + 3) % 10]
        dump(folder / batch, {b"batch_label": batch.encode(), b"labels": labels,
                              b"data": images.reshape(2, -1), b"filenames": [b"a.png", b"b.png"]})
        batches[batch] = (images, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2})
    return batches


def write_cifar100(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for split, n in (("train", 4), ("test", 3)):
        images = cifar_images(n)
        fine = [(7 * k + 95) % 100 for k in range(n)]
        dump(folder / split, {b"data": images.reshape(n, -1), b"fine_labels": fine,
                              b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n})
        batches[split] = (images, fine)
    dump(folder / "meta", {b"fine_label_names": [f"class{k}".encode() for k in range(100)],
                           b"coarse_label_names": [f"super{k}".encode() for k in range(20)]})
    return batches


def make_archive(root: Path, folder: Path, archive: str) -> None:
    with tarfile.open(root / archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@pytest.mark.parametrize("where", ["parent", "folder", "archive"])
def test_cifar10_round_trip(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "src" / "cifar-10-batches-py"
    batches = write_cifar10(folder)
    root = {"parent": tmp_path / "src", "folder": folder, "archive": tmp_path / "arc"}[where]
    if where == "archive":
        root.mkdir()
        make_archive(root, folder, "cifar-10-python.tar.gz")
    train = load_dataset("cifar10", "train", root=root, download=False)
    expected = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.mean == (0.4914, 0.4822, 0.4465)
    test = load_dataset("cifar10", "test", root=root, download=False)
    assert torch.equal(test.images, torch.from_numpy(batches["test_batch"][0]))
    assert test.labels.tolist() == batches["test_batch"][1]


@pytest.mark.parametrize("archived", [False, True])
def test_cifar100_round_trip(tmp_path: Path, archived: bool) -> None:
    batches = write_cifar100(tmp_path / "cifar-100-python")
    root = tmp_path
    if archived:
        root = tmp_path / "arc"
        root.mkdir()
        make_archive(root, tmp_path / "cifar-100-python", "cifar-100-python.tar.gz")
    for split, (images, labels) in batches.items():
        ds = load_dataset("cifar100", split, root=root, download=False)
        assert torch.equal(ds.images, torch.from_numpy(images))
        assert ds.labels.tolist() == labels
        assert ds.num_classes == 100 and ds.classes[99] == "class99"
        assert ds.std == (0.2673, 0.2564, 0.2762)


def test_cifar_refuses_hostile_pickle(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(tmp_path / "pwned"),))

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}))
    with pytest.raises(DfkdError, match="refusing"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert not (tmp_path / "pwned").exists()


def test_cifar_archive_without_members(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("README")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DfkdError) as exc:
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert "test_batch" in assert_one_line(exc)


# ---------------------------------------------------------------- SVHN


def test_svhn_round_trip(tmp_path: Path) -> None:
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
    ds = load_dataset("svhn", "train", root=tmp_path, download=False)
    assert ds.images.shape == (5, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 1, 9, 0, 5]
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.mean == (0.4377, 0.4438, 0.4728)


def test_svhn_not_a_mat_file(tmp_path: Path) -> None:
    (tmp_path / "test_32x32.mat").write_bytes(b"definitely not matlab")
    with pytest.raises(DfkdError) as exc:
        load_dataset("svhn", "test", root=tmp_path, download=False)
    assert "test_32x32.mat" in assert_one_line(exc)


# ---------------------------------------------------------------- image folder


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_rgb_resizes_to_first_image(tmp_path: Path) -> None:
    first = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # H=6, W=5
    save(tmp_path / "cat" / "a.png", first)
    save(tmp_path / "cat" / "b.PNG", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    save(tmp_path / "dog" / "c.png", rng.integers(0, 256, (6, 5), dtype=np.uint8))  # grayscale
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", "train", root=tmp_path)
    assert ds.images.shape == (3, 3, 6, 5) and ds.images.dtype == torch.uint8
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert torch.equal(ds.images[0], torch.from_numpy(first).permute(2, 0, 1))
    gray = ds.images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    expected_mean = ds.images.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(ds.mean, expected_mean.numpy())
    # Same folder serves both splits when there is no train/ + test/ layout.
    assert torch.equal(load_dataset("folder", "test", root=tmp_path).images, ds.images)


def test_folder_grayscale_and_train_test_layout(tmp_path: Path) -> None:
    images = {}
    for split in ("train", "val"):
        for k, cls in enumerate(("one", "two")):
            images[split, cls] = rng.integers(0, 256, (4, 4), dtype=np.uint8)
            save(tmp_path / split / cls / f"{k}.png", images[split, cls])
    train = load_dataset("folder", "train", root=tmp_path)
    test = load_dataset("folder", "test", root=tmp_path)
    assert train.shape == test.shape == (1, 4, 4)
    assert test.classes == ["one", "two"] and test.labels.tolist() == [0, 1]
    assert torch.equal(test.images[1, 0], torch.from_numpy(images["val", "two"]))
    assert test.mean == train.mean and len(train.std) == 1  # both from the training images


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DfkdError) as exc:
        load_dataset("folder", "train")
    assert "root" in assert_one_line(exc)
    with pytest.raises(DfkdError) as exc:
        load_dataset("folder", "train", root=tmp_path / "nope")
    assert_one_line(exc)
    with pytest.raises(DfkdError) as exc:
        load_dataset("folder", "train", root=tmp_path)
    assert "no class sub-folders" in assert_one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError) as exc:
        load_dataset("folder", "train", root=tmp_path)
    assert "no images" in assert_one_line(exc)


# ---------------------------------------------------------------- digits


def test_digits_split() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.shape == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert train.mean == test.mean and 0 < train.mean[0] < 1
    # No overlap: the two splits together are exactly the full dataset, each sample once.
    full = load_digits()
    pixels = np.rint(full.images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    expected = sorted(p.tobytes() + bytes([t]) for p, t in zip(pixels, full.target, strict=True))
    both = torch.cat([train.images, test.images]).reshape(1797, -1).numpy()
    labels = torch.cat([train.labels, test.labels]).tolist()
    assert sorted(p.tobytes() + bytes([t]) for p, t in zip(both, labels, strict=True)) == expected


# ---------------------------------------------------------------- fit_to_input


def test_fit_to_input_pads_centred() -> None:
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = fit_to_input(images, (1, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, :, 2:30, 2:30], images.float() / 255)
    border = out.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().sum() == 0


def test_fit_to_input_resizes_down() -> None:
    images = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    out = fit_to_input(images, (3, 28, 28))
    assert out.shape == (3, 3, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-6)
    assert 0 <= out.min() and out.max() <= 1


def test_fit_to_input_channel_mismatch() -> None:
    with pytest.raises(DfkdError) as exc:
        fit_to_input(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), (3, 32, 32), name="mnist")
    assert assert_one_line(exc) == (
        "dataset 'mnist' has 1 channel(s) but the model expects 3 (input shape 3x32x32)")


# ---------------------------------------------------------------- missing files and download


def test_missing_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(DfkdError) as exc:
        load_dataset("mnist", "train", root=tmp_path, download=False)
    message = assert_one_line(exc)
    for part in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(tmp_path),
                 "https://ossci-datasets.s3.amazonaws.com/mnist/", "--data-root"):
        assert part in message


@pytest.mark.parametrize(("name", "expected"), [
    ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    ("svhn", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"),
    ("fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
])
def test_offline_download_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            name: str, expected: str) -> None:
    def offline(url: str, timeout: float) -> None:
        raise URLError("Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(download_module, "urlopen", offline)
    with pytest.raises(DfkdError) as exc:
        load_dataset(name, "test", root=tmp_path, download=True)
    message = assert_one_line(exc)
    assert expected in message and "offline?" in message
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_writes_into_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mirror"
    images, labels = write_idx_split(source, "t10k", 3, gz=True)
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(download_module, "urlopen", fake_urlopen)
    root = tmp_path / "data"
    ds = load_dataset("mnist", "test", root=root, download=True)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert requested == ["https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
                         "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz"]
    assert sorted(p.name for p in root.iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                      "t10k-labels-idx1-ubyte.gz"]


# ---------------------------------------------------------------- names, splits, roots


def test_unknown_name_and_split() -> None:
    with pytest.raises(DfkdError) as exc:
        load_dataset("imagenet")
    message = assert_one_line(exc)
    assert all(name in message for name in DATASETS)
    with pytest.raises(DfkdError) as exc:
        load_dataset("digits", "validation")
    assert "train" in assert_one_line(exc) and "test" in str(exc.value)


def test_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFKD_DATA", str(tmp_path))
    assert default_root("mnist") == tmp_path / "mnist"
    write_idx_split(tmp_path / "mnist", "t10k", 2, gz=True)
    assert len(load_dataset("mnist", "test", download=False)) == 2
    monkeypatch.delenv("DFKD_DATA")
    assert default_root("svhn") == Path("~/.cache/dfkd/data/svhn").expanduser()
