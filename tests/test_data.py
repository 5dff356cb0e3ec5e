"""Data loaders on tiny files in the real formats, written here; plus the embedded digits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stablemorph.experiment import data as data_module
from stablemorph.experiment.data import (
    Dataset,
    DatasetNotFoundError,
    balanced_prefix,
    default_dataset_name,
    load_dataset,
    read_idx,
)

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_images(n: int, seed: int, h: int = 4, w: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_mnist(root: Path, compress: bool, n_train: int = 30, n_test: int = 20) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train": make_images(n_train, 1), "test": make_images(n_test, 2)}
    for split, (images_stem, labels_stem) in MNIST_FILES.items():
        images, labels = arrays[split]
        suffix = ".gz" if compress else ""
        write_idx(root / f"{images_stem}{suffix}", images, compress)
        write_idx(root / f"{labels_stem}{suffix}", labels, compress)
    return arrays


def standardise(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return torch.from_numpy((x.astype(np.float64) - mean) / std).float()


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images, labels = make_images(7, 0)
    write_idx(tmp_path / "images", images, compress)
    write_idx(tmp_path / "labels", labels, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), labels)


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    values = (np.arange(6).reshape(2, 3) * 1000).astype(">i4")
    header = struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3)
    (tmp_path / "ints").write_bytes(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), values.astype(np.int32))


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_values_round_trip(tmp_path: Path, compress: bool) -> None:
    arrays = write_mnist(tmp_path, compress)
    ds = load_dataset("mnist", root=tmp_path)
    images, labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    mean, std = images.astype(np.float64).mean(), images.astype(np.float64).std()
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 4, 5)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train, standardise(images[:, None], mean, std))
    torch.testing.assert_close(ds.x_test, standardise(test_images[:, None], mean, std))
    torch.testing.assert_close(ds.y_train, torch.from_numpy(labels.astype(np.int64)))
    torch.testing.assert_close(ds.y_test, torch.from_numpy(test_labels.astype(np.int64)))
    assert ds.mean == pytest.approx((mean,)) and ds.std == pytest.approx((std,))
    assert str(tmp_path) in ds.source


def test_fashion_mnist_reads_a_user_root(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, compress=True)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion-mnist" and ds.num_train == 30 and ds.num_test == 20
    torch.testing.assert_close(ds.y_test, torch.from_numpy(arrays["test"][1].astype(np.int64)))


def write_cifar(root: Path, n_per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    all_data, all_labels = [], []
    for k, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(n_per_batch)]
        with (root / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        all_data.append(data)
        all_labels.append(np.array(labels))
    return np.concatenate(all_data), np.concatenate(all_labels)


@pytest.mark.parametrize("subdir", [False, True])
def test_cifar10_values_round_trip(tmp_path: Path, subdir: bool) -> None:
    data, labels = write_cifar(tmp_path / "cifar-10-batches-py" if subdir else tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    train = data[:20].reshape(20, 3, 32, 32).astype(np.float64)
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    expected = (train - mean[None, :, None, None]) / std[None, :, None, None]
    assert ds.input_shape == (3, 32, 32) and ds.num_train == 20 and ds.num_test == 4
    torch.testing.assert_close(ds.x_train, torch.from_numpy(expected).float())
    # Pixel (channel 1, row 2, column 3) of image 0 is byte 1024 + 2 * 32 + 3 of its row.
    raw = float(data[0, 1024 + 2 * 32 + 3])
    assert ds.x_train[0, 1, 2, 3].item() == pytest.approx((raw - mean[1]) / std[1], rel=1e-5)
    torch.testing.assert_close(ds.y_train, torch.from_numpy(labels[:20]).long())
    torch.testing.assert_close(ds.y_test, torch.from_numpy(labels[20:]).long())


def test_digits_split_is_fixed_and_normalised() -> None:
    ds = load_dataset("digits")
    again = load_dataset("digits")
    assert (ds.num_train, ds.num_test, ds.input_shape) == (1437, 360, (1, 8, 8))
    torch.testing.assert_close(ds.x_train, again.x_train, rtol=0, atol=0)
    torch.testing.assert_close(ds.y_test, again.y_test, rtol=0, atol=0)
    torch.testing.assert_close(ds.x_train.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(ds.x_train.std(correction=0), torch.tensor(1.0), rtol=0, atol=1e-5)
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    # train and test are disjoint parts of the 1,797 digits
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()[:, None]
    restored = torch.cat([ds.x_train, ds.x_test]) * ds.std[0] + ds.mean[0]
    key = lambda t: sorted(map(tuple, t.round().flatten(1).tolist()))  # noqa: E731
    assert key(restored) == key(raw)


def test_limits_keep_a_balanced_deterministic_subset(tmp_path: Path) -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 6)  # sorted by class, like some dumps
    np.testing.assert_array_equal(balanced_prefix(labels, 7), [0, 1, 2, 6, 7, 9, 10])
    np.testing.assert_array_equal(balanced_prefix(labels, None), np.arange(15))
    np.testing.assert_array_equal(balanced_prefix(labels, 99), np.arange(15))
    with pytest.raises(ValueError, match=r"limit must be a positive int or None, got 0"):
        balanced_prefix(labels, 0)

    write_mnist(tmp_path, compress=True)
    ds = load_dataset("mnist", root=tmp_path, limit_train=12, limit_test=5)
    assert ds.num_train == 12 and ds.num_test == 5
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [2, 2] + [1] * 8
    torch.testing.assert_close(ds.x_train.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)


def test_missing_data_sets_say_what_and_how(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"MNIST not found \(no directory given\)"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*--data-root DIR"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1.*test_batch.*--data-root"):
        load_dataset("cifar10", root=tmp_path)
    monkeypatch.setattr(data_module, "FASHION_MNIST_ROOT", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    assert default_dataset_name() == "digits"
    write_mnist(tmp_path / "nowhere", compress=True)
    assert default_dataset_name() == "fashion-mnist"


def test_only_half_the_files_is_still_missing(tmp_path: Path) -> None:
    write_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"MNIST not found in {tmp_path}"):
        load_dataset("mnist", root=tmp_path)


def test_corrupt_idx_files_name_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, compress=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(b"\x08\x03" + good[2:])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: not an IDX file \(bad magic"):
        load_dataset("mnist", root=tmp_path)
    labels.write_bytes(good[:-3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: IDX header.*truncated"):
        load_dataset("mnist", root=tmp_path)
    labels.write_bytes(good)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.unlink()
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(make_images(20, 2)[0]))[:-10])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt gzip"):
        load_dataset("mnist", root=tmp_path)


def test_mismatched_label_count_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, np.uint8), compress=False)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: expected 30 labels"):
        load_dataset("mnist", root=tmp_path)


def test_corrupt_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable CIFAR-10 pickle"):
        load_dataset("cifar10", root=tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3: expected uint8 data \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)


def test_unknown_name_and_aliases(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'"):
        load_dataset("imagenet")
    write_mnist(tmp_path, compress=True)
    assert load_dataset("Fashion_MNIST", root=tmp_path).name == "fashion-mnist"


def test_dataset_repr_is_short() -> None:
    ds = load_dataset("digits", limit_train=20, limit_test=10)
    assert isinstance(ds, Dataset)
    assert "tensor" not in repr(ds) and "digits" in repr(ds)


class _WritesMarker:
    """A pickled object whose loading would run ``pathlib.Path(marker).write_text``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path, protocol: int) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "marker"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
             b"evil": _WritesMarker(marker)}
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    with pytest.raises(ValueError, match=r"data_batch_2: not a readable CIFAR-10 pickle "
                                         r"\(refused to load [\w.]+"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()
    with (tmp_path / "data_batch_2").open("wb") as f:  # os.system by name: refused as well
        f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(ValueError, match=r"data_batch_2: .*refused to load os\.system"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar_pickles_of_every_protocol_and_numpy_scalars_load(tmp_path: Path) -> None:
    data, labels = write_cifar(tmp_path)
    for protocol in (2, 4, 5):
        with (tmp_path / "test_batch").open("wb") as f:
            pickle.dump({b"data": data[-4:], b"labels": [np.int64(v) for v in labels[-4:]],
                         "filenames": [b"a.png", "b.png"]}, f, protocol=protocol)
        ds = load_dataset("cifar10", root=tmp_path)
        torch.testing.assert_close(ds.y_test, torch.from_numpy(labels[20:]).long())
