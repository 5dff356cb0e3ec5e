"""Character data from standard-library sources: vocabulary, file split, windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stablemorph.transformer.text import (
    UNKNOWN,
    VOCAB_SIZE,
    decode,
    encode,
    fixed_windows,
    load_stdlib_corpus,
    random_windows,
    stdlib_files,
)


def test_encode_decode_round_trip_and_unknowns() -> None:
    text = "def f(x):\n    return x ~ {1}\n"
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert decode(ids) == text
    assert VOCAB_SIZE == 97
    assert encode("\té").tolist() == [UNKNOWN, UNKNOWN]
    assert decode(encode("a\tb")) == "a?b"


def write_files(root: Path, n: int, size: int) -> None:
    for i in range(n):
        (root / f"m{i:02d}.py").write_text(chr(ord("a") + i) * size)
    (root / "notes.txt").write_text("ignored")


def test_corpus_splits_by_file_and_respects_the_budget(tmp_path: Path) -> None:
    write_files(tmp_path, 10, 100)
    corpus = load_stdlib_corpus(max_chars=650, val_fraction=0.2, root=tmp_path)
    assert corpus.val_files == ("m04.py", "m09.py")
    assert corpus.train_files == ("m00.py", "m01.py", "m02.py", "m03.py", "m05.py", "m06.py")
    assert (len(corpus.train), len(corpus.val)) == (520, 130)
    assert decode(corpus.val) == "e" * 100 + "j" * 30
    assert set(decode(corpus.train)) == set("abcdfg")


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \*.py files in"):
        stdlib_files(tmp_path)
    write_files(tmp_path, 3, 100)
    with pytest.raises(ValueError, match="no validation file: every 10th file is one, and only 3"):
        load_stdlib_corpus(max_chars=150, root=tmp_path)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        load_stdlib_corpus(val_fraction=1.0, root=tmp_path)


def test_real_stdlib_corpus() -> None:
    corpus = load_stdlib_corpus(max_chars=300_000)
    assert (len(corpus.train), len(corpus.val)) == (270_000, 30_000)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert (corpus.train == UNKNOWN).float().mean() < 0.01


def test_windows_are_next_character_pairs() -> None:
    tokens = torch.arange(100)
    x, y = random_windows(tokens, 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    torch.testing.assert_close(y, x + 1)
    fx, fy = fixed_windows(tokens, 4, 8)
    torch.testing.assert_close(fx[:, 0], torch.tensor([0, 30, 60, 91]))
    torch.testing.assert_close(fy, fx + 1)
