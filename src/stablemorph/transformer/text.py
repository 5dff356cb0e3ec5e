"""Character-level text from the Python standard library's own source files.

Every Python installation has them, so nothing is downloaded: the files are read at run time
from ``sysconfig.get_paths()["stdlib"]`` (top-level ``*.py`` files, sorted by name, so the
corpus is the same on every machine with the same Python version).

Vocabulary: fixed, not data-dependent: newline, the 95 printable ASCII characters, and one
unknown id for everything else (tabs, non-ASCII) -> ``VOCAB_SIZE = 97``.
Split: by file (every ``round(1 / val_fraction)``-th file is validation), so validation text
is never seen in training.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stablemorph.experiment.data import Dataset

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1
_LOOKUP = torch.full((128,), UNKNOWN, dtype=torch.int64)
_LOOKUP[[ord(c) for c in CHARS]] = torch.arange(len(CHARS))


def encode(text: str) -> Tensor:
    """``str`` -> int64 ids ``(len(text),)``."""
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.int64)
    return _LOOKUP[codes]


def decode(ids: Tensor) -> str:
    return "".join(CHARS[i] if i < UNKNOWN else "?" for i in ids.tolist())


@dataclass(frozen=True)
class CharCorpus:
    """Token ids of the training and validation text, and the files they came from."""

    train: Tensor
    val: Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (or of ``root``), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}: cannot build the text corpus")
    return files


def load_stdlib_corpus(
    max_chars: int = 2_000_000, val_fraction: float = 0.1, root: Path | None = None
) -> CharCorpus:
    """About ``max_chars`` characters, ``val_fraction`` of them for validation: files are read
    in order into their split until that split's budget is full (the last one cut short)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    every = max(2, round(1 / val_fraction))
    val_budget = max(1, round(max_chars * val_fraction))
    budget = {"val": val_budget, "train": max(1, max_chars - val_budget)}
    parts: dict[str, list[str]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    got = {"train": 0, "val": 0}
    files = stdlib_files(root)
    for i, path in enumerate(files):
        split = "val" if i % every == every - 1 else "train"
        if got[split] >= budget[split]:
            if all(got[s] >= budget[s] for s in got):
                break
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: budget[split] - got[split]]
        parts[split].append(text)
        names[split].append(path.name)
        got[split] += len(text)
    if not parts["val"]:
        raise ValueError(
            f"no validation file: every {every}th file is one, and only {len(files)} were found"
        )
    return CharCorpus(
        train=encode("".join(parts["train"])),
        val=encode("".join(parts["val"])),
        train_files=tuple(names["train"]),
        val_files=tuple(names["val"]),
    )


def random_windows(tokens: Tensor, batch_size: int, length: int,
                   gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs and next-character targets, each
    ``(batch_size, length)``."""
    starts = torch.randint(0, len(tokens) - length, (batch_size,), generator=gen)
    return _windows(tokens, starts, length)


def fixed_windows(tokens: Tensor, count: int, length: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows (a fixed evaluation set)."""
    starts = torch.linspace(0, len(tokens) - length - 1, count).long()
    return _windows(tokens, starts, length)


def _windows(tokens: Tensor, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
    offsets = starts[:, None] + torch.arange(length + 1)
    chunk = tokens[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def text_dataset(max_chars: int = 1_000_000, block_size: int = 64, val_windows: int = 256,
                 root: Path | None = None) -> Dataset:
    """The corpus as a :class:`~stablemorph.experiment.data.Dataset` for the one training
    loop: ``x_train`` ``(N, block_size)`` consecutive non-overlapping windows of the training
    text, ``y_train`` their next-character targets (same shape); ``x_test``/``y_test``
    ``val_windows`` evenly spaced windows of the validation files. ``num_classes`` is
    :data:`VOCAB_SIZE`; ``input_shape`` is ``(block_size,)``."""
    from stablemorph.experiment.data import Dataset

    if block_size < 1 or val_windows < 1:
        raise ValueError(f"need block_size >= 1 and val_windows >= 1, got {block_size}, "
                         f"{val_windows}")
    corpus = load_stdlib_corpus(max_chars, root=root)
    n = (len(corpus.train) - 1) // block_size
    if n < 1 or len(corpus.val) <= block_size + 1:
        raise ValueError(f"max_chars={max_chars} is too small for windows of {block_size}")
    x, y = _windows(corpus.train, torch.arange(n) * block_size, block_size)
    xv, yv = fixed_windows(corpus.val, val_windows, block_size)
    return Dataset(x_train=x, y_train=y, x_test=xv, y_test=yv, name="text",
                   num_classes=VOCAB_SIZE, input_shape=(block_size,),
                   source=f"Python {sysconfig.get_python_version()} standard library "
                          f"({len(corpus.train_files)} training / {len(corpus.val_files)} "
                          f"validation files, {len(corpus.train) + len(corpus.val)} chars)")
