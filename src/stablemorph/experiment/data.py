"""Image classification data sets, read offline from the standard file formats.

``load_dataset(name, root=None, limit_train=None, limit_test=None)`` returns a
:class:`Dataset` of whole-data-set tensors (float32 ``(N, C, H, W)`` normalised per channel to
mean 0 / std 1 with the returned training set's statistics; int64 labels). Nothing is ever
downloaded. Sources:

- ``"fashion-mnist"``: IDX files, by default from ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``).
- ``"mnist"``: IDX files (gzip or raw) under a directory the user gives.
- ``"cifar10"``: the CIFAR-10 python pickles (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``) under a directory the user gives (or its ``cifar-10-batches-py``).
  They are read with a restricted unpickler that builds only dicts, lists, strings, bytes,
  numbers and numpy arrays: a file that names any other callable is refused (nothing runs).
- ``"digits"``: scikit-learn's embedded 8x8 digits, always available, split 1,437 / 360
  by a fixed permutation.

A missing data set raises :class:`DatasetNotFoundError` saying where it looked and how to get
the files; a corrupt file raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "digits")

# IDX element-type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (images, labels) file stems of each split, as published for MNIST and Fashion-MNIST.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_TEST = "test_batch"
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """A requested data set's files are not where they were looked for."""


@dataclass
class Dataset:
    """A whole data set in memory.

    ``x_*``: float32 ``(N, *input_shape)``, normalised per channel with ``mean`` / ``std``
    (the raw training set's statistics, in raw pixel units). ``y_*``: int64 ``(N,)`` in
    ``[0, num_classes)``. ``source`` says where the data came from.
    """

    x_train: Tensor = field(repr=False)
    y_train: Tensor = field(repr=False)
    x_test: Tensor = field(repr=False)
    y_test: Tensor = field(repr=False)
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    source: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw; detected from its first bytes).

    Header: two zero bytes, an element-type code, the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes (so 8 bytes for a label file, 16 for an image file). Returns an
    array of those sizes in native byte order. Raises ``ValueError`` naming the file for a
    bad magic number, an unknown type code, or a size that does not match the data.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {dims} ({expected} data bytes) but the file "
            f"holds {len(raw) - header} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    """``root/stem`` in any of its usual spellings: ``.gz`` or raw, ``-idx`` or ``.idx``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (root / name).is_file():
            return root / name
    return None


def _idx_missing(label: str, root: Path | None, how: str) -> DatasetNotFoundError:
    files = ", ".join(f"{s}.gz" for pair in _IDX_FILES.values() for s in pair)
    where = f"in {root}" if root is not None else "(no directory given)"
    return DatasetNotFoundError(
        f"{label} not found {where}: looked for {files} (gzip or raw). {how}"
        f"or pass --data-root DIR (root=DIR) naming a directory that holds these files."
    )


def _load_idx_split(root: Path, split: str, label: str, how: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = _IDX_FILES[split]
    images_path, labels_path = _find_idx(root, images_stem), _find_idx(root, labels_stem)
    if images_path is None or labels_path is None:
        raise _idx_missing(label, root, how)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: expected {len(images)} labels to match {images_path.name}, "
            f"got shape {labels.shape}"
        )
    return images[:, None], labels


def _load_idx(name: str, root: Path | None) -> tuple[np.ndarray, ...]:
    if name == "fashion-mnist":
        label, how = "Fashion-MNIST", "Install it with `apt-get install dataset-fashion-mnist`, "
        root = FASHION_MNIST_ROOT if root is None else root
    else:
        label, how = "MNIST", "No copy ships with this machine; "
        if root is None:
            raise _idx_missing(label, None, how)
    x_train, y_train = _load_idx_split(root, "train", label, how)
    x_test, y_test = _load_idx_split(root, "test", label, how)
    return x_train, y_train, x_test, y_test


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, restricted to latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 text"
        )
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The callables numpy's pickles of arrays and scalars name (numpy 1.x and 2.x paths)."""
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, str, bytes, numbers and numpy arrays; refuses every other
    global (so a ``__reduce__`` that names ``os.system`` or any other callable never runs)."""

    def find_class(self, module: str, name: str) -> object:
        found = _numpy_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                f"strings, bytes, numbers and numpy arrays"
            )
        return found


def _unpickle_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({err})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch)}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: missing 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path | None) -> tuple[np.ndarray, ...]:
    needed = (*_CIFAR_TRAIN, _CIFAR_TEST)
    candidates = [] if root is None else [root, root / "cifar-10-batches-py"]
    folder = next((d for d in candidates if all((d / f).is_file() for f in needed)), None)
    if folder is None:
        where = f"in {root} or {root / 'cifar-10-batches-py'}" if root else "(no directory given)"
        raise DatasetNotFoundError(
            f"CIFAR-10 not found {where}: looked for {', '.join(needed)} (the python version, "
            f"cifar-10-python.tar.gz, extracted). No copy ships with this machine; pass "
            f"--data-root DIR (root=DIR) naming a directory that holds these files."
        )
    train = [_unpickle_cifar(folder / f) for f in _CIFAR_TRAIN]
    x_test, y_test = _unpickle_cifar(folder / _CIFAR_TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = digits.target
    order = np.random.RandomState(_DIGITS_SPLIT_SEED).permutation(len(labels))
    train, test = order[:-_DIGITS_TEST_SIZE], order[-_DIGITS_TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


def balanced_prefix(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` examples, as even over classes as the data allow.

    Classes are visited round-robin, each in file order, so the result is deterministic and
    per-class counts differ by at most one while every class has examples left. Returned
    sorted (file order). ``limit=None`` keeps everything; a limit above ``len(labels)`` is
    capped.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    # Rank of each example within its class: round-robin order = sort by (rank, index).
    rank = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    order = np.lexsort((np.arange(n), rank))
    return np.sort(order[:limit])


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[Tensor, Tensor, tuple, tuple]:
    """Per-channel standardisation with the training set's statistics."""
    train = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
    dims = [d for d in range(train.dim()) if d != 1]
    std, mean = torch.std_mean(train, dim=dims, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays centred
    shape = (1, -1) + (1,) * (train.dim() - 2)
    m, s = mean.view(shape), std.view(shape)
    return (train - m) / s, (test - m) / s, tuple(mean.tolist()), tuple(std.tolist())


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> Tensor:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _canonical(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASET_NAMES)}")
    return key


def load_dataset(
    name: str,
    root: str | Path | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load data set ``name`` (one of ``DATASET_NAMES``) into memory.

    ``root``: the directory holding the files (``fashion-mnist`` defaults to
    ``/usr/share/datasets/fashion-mnist``; ``mnist`` and ``cifar10`` need one; ``digits``
    ignores it). ``limit_train`` / ``limit_test`` keep a deterministic, class-balanced
    subset (:func:`balanced_prefix`). Normalisation uses the kept training examples.

    Raises :class:`DatasetNotFoundError` when the files are missing, ``ValueError`` for an
    unknown name, a bad limit or a corrupt file (naming the file).
    """
    key = _canonical(name)
    root_path = None if root is None else Path(root).expanduser()
    if key in ("fashion-mnist", "mnist"):
        x_train, y_train, x_test, y_test = _load_idx(key, root_path)
        source = f"IDX files in {FASHION_MNIST_ROOT if root_path is None else root_path}"
    elif key == "cifar10":
        x_train, y_train, x_test, y_test = _load_cifar10(root_path)
        source = f"CIFAR-10 python pickles in {root_path}"
    else:
        x_train, y_train, x_test, y_test = _load_digits()
        source = (
            "sklearn.datasets.load_digits (8x8, values 0..16), fixed split "
            f"{len(y_train)}/{len(y_test)} by RandomState({_DIGITS_SPLIT_SEED}).permutation"
        )
    keep_train = balanced_prefix(y_train, limit_train)
    keep_test = balanced_prefix(y_test, limit_test)
    x_train, y_train = x_train[keep_train], y_train[keep_train]
    x_test, y_test = x_test[keep_test], y_test[keep_test]

    num_classes = 10
    labels_train = _check_labels(y_train, num_classes, f"{key} training labels ({source})")
    labels_test = _check_labels(y_test, num_classes, f"{key} test labels ({source})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{key}: training images {x_train.shape[1:]} and test images {x_test.shape[1:]} "
            f"differ in shape ({source})"
        )
    xt, xv, mean, std = _normalise(x_train, x_test)
    return Dataset(
        x_train=xt,
        y_train=labels_train,
        x_test=xv,
        y_test=labels_test,
        name=key,
        num_classes=num_classes,
        input_shape=tuple(xt.shape[1:]),
        source=source,
        mean=mean,
        std=std,
    )


def default_dataset_name() -> str:
    """``"fashion-mnist"`` when its files are installed at the default root, else ``"digits"``."""
    needed: Sequence[str] = [s for pair in _IDX_FILES.values() for s in pair]
    if all(_find_idx(FASHION_MNIST_ROOT, s) is not None for s in needed):
        return "fashion-mnist"
    return "digits"
