"""Ordinary mistakes on the command line get one clean line on stderr and an exit code (2: the
command cannot run as given, 1: it ran and failed), never a traceback (issue 13.14, 13.10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stablemorph as sm
from stablemorph.cli import main
from stablemorph.record import history

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "parent.pt"
    sm.save(sm.build_model("cnn", widths=[4, 8], image_size=8).eval(), path)
    return path


def morph(saved: Path, out: Path, *extra: str, op: str = "deepen") -> list[str]:
    return ["morph", "--checkpoint", str(saved), "--op", op, "--at", "features.conv2",
            "--input-shape", "1", "8", "8", "--out", str(out), *extra]


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"stablemorph {command}: error: "), err
    return err


@pytest.mark.parametrize(
    ("extra", "op", "message"),
    [
        (["--kwargs", '{"widht": 12}'], "widen",
         r"--kwargs: unknown option\(s\) 'widht' for widen; it takes width, scheme"),
        ([], "widen", r"widen needs width: pass --kwargs '\{\"width\": ...\}'"),
        (["--scheme", "stable", "--kwargs", '{"scheme": "net2net"}'], "deepen",
         r"--scheme stable conflicts with \"scheme\": 'net2net' in --kwargs"),
        (["--kwargs", '{"input_shape": [2, 1, 8, 8]}'], "deepen",
         r"--input-shape and \"input_shape\" in --kwargs: give it once"),
    ],
)
def test_morph_option_mistakes_are_usage_errors(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
    op: str, message: str,
) -> None:
    import re

    assert main(morph(saved, tmp_path / "child.pt", *extra, op=op)) == 2
    assert re.search(message, one_error_line(capsys, "morph"))
    assert not (tmp_path / "child.pt").exists()


def test_morph_out_that_cannot_be_a_file_is_refused_before_any_work(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a_file").write_text("x")
    assert main(morph(saved, tmp_path / "a_file" / "child.pt")) == 2
    assert "a_file is a file, not a folder" in one_error_line(capsys, "morph")
    assert main(morph(saved, tmp_path)) == 2
    assert "is a folder; give the child's file name" in one_error_line(capsys, "morph")
    args = morph(saved, tmp_path / "child.pt")
    args[2] = str(tmp_path / "missing.pt")
    assert main(args) == 2
    assert "missing.pt: no such file" in one_error_line(capsys, "morph")


def test_morph_scheme_from_kwargs_or_option_is_used_for_every_op(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "child.pt"
    assert main(morph(saved, out, "--kwargs", '{"scheme": "net2net"}')) == 0
    assert history(sm.load(out))[-1].kwargs["scheme"] == "net2net"
    assert main(morph(saved, out, "--scheme", "netmorph", op="insert_subnet")) == 0
    assert history(sm.load(out))[-1].kwargs["scheme"] == "netmorph"
    assert "insert_subnet('features.conv2', scheme='netmorph')" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--c-in", "--c-out", "--kernel", "--mid"])
def test_decompose_refuses_non_positive_sizes(flag: str, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["decompose", flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: expected a positive integer, got 0" in capsys.readouterr().err


def test_decompose_exits_1_when_every_method_failed(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decompose", "--c-in", "4", "--c-out", "4", "--mid", "1", "--methods",
                 "stable", "net2net"])
    assert code == 1
    assert "every method failed (stable, net2net)" in one_error_line(capsys, "decompose")
