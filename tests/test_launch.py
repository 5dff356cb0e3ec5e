"""Interrupting a launch (the experiment's --nproc): SIGTERM to the launcher removes its
temporary folder and stops the ranks; after SIGKILL (no clean-up possible in the launcher)
the ranks notice that it is gone and exit within seconds instead of waiting out the
rendezvous timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from stablemorph.experiment.launch import launch

    def hang(folder):
        Path(folder, f"rank-{os.getpid()}").write_text("")
        time.sleep(600)

    if __name__ == "__main__":
        launch(hang, 2, sys.argv[1], timeout=600)
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_launch_leaves_no_rank_behind(tmp_path: Path, sig: int) -> None:
    script, pids, tmp = tmp_path / "run.py", tmp_path / "pids", tmp_path / "tmp"
    script.write_text(SCRIPT)
    pids.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(pids)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = [int(p.name.removeprefix("rank-")) for p in pids.iterdir()]
        assert len(ranks) == 2, "the ranks did not start within 120 s"
        assert list(tmp.glob("stablemorph-ddp-*"))
        proc.send_signal(sig)
        if sig == signal.SIGTERM:
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
            assert not list(tmp.glob("stablemorph-ddp-*"))
        else:
            proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in ranks)
    finally:
        if proc.poll() is None:
            proc.kill()
