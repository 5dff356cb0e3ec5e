"""The command line, used as a user would."""

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import stablemorph as sm
from stablemorph.cli import main


def test_decompose_command_prints_each_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decompose", "--c-in", "8", "--c-out", "8", "--kernel-sizes", "3", "1"]) == 0
    out = capsys.readouterr().out
    assert "C_mid=8" in out
    assert "stable    solve-F1" in out and "zeros 0.0%" in out
    assert "net2net   identity" in out


def test_experiment_command_writes_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "experiment",
            "--dataset",
            "digits",
            "--model-kwargs",
            '{"widths": [4, 8]}',
            "--seeds",
            "1",
            "--parent-steps",
            "20",
            "--steps",
            "6",
            "--dense-until",
            "6",
            "--dense-every",
            "3",
            "--every",
            "6",
            "--drop-window",
            "6",
            "--threads",
            "1",
            "--no-progress",
            "--schemes",
            "stable",
            "net2net",
            "--baselines",
            "parent",
            "--lr-after",
            "raised",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    assert "| raised | stable |" in printed and "| raised | net2net |" in printed
    assert (out / "curves.png").exists() and (out / "curves.csv").exists()


def test_missing_dataset_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "experiment",
            "--dataset",
            "mnist",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "stablemorph experiment: error:" in err and "--data-root" in err


def test_bad_json_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "--model-kwargs", "{widths: 3}"])
    assert exc.value.code == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_morph_command_grows_a_saved_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = sm.build_model("cnn", widths=[4, 8], image_size=8).eval()
    parent_path, child_path = tmp_path / "parent.pt", tmp_path / "child.pt"
    sm.save(model, parent_path)
    code = main(
        [
            "morph",
            "--checkpoint",
            str(parent_path),
            "--op",
            "deepen",
            "--at",
            "features.conv2",
            "--scheme",
            "stable",
            "--input-shape",
            "1",
            "8",
            "8",
            "--out",
            str(child_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "deepen('features.conv2', scheme='stable')" in printed and "zeros=0.0%" in printed
    child = sm.load(child_path).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert_close(child(x), model(x), rtol=1e-5, atol=1e-5)


def test_morph_command_unknown_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = sm.build_model("cnn", widths=[4, 8], image_size=8)
    path = tmp_path / "parent.pt"
    sm.save(model, path)
    code = main(
        [
            "morph",
            "--checkpoint",
            str(path),
            "--op",
            "widen",
            "--at",
            "features.conv9",
            "--kwargs",
            '{"width": 12}',
            "--input-shape",
            "1",
            "8",
            "8",
            "--out",
            str(tmp_path / "child.pt"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "features.conv9" in err
    assert not (tmp_path / "child.pt").exists()
