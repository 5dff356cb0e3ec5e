"""Import hygiene: the library does not pull in the experiment stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_import_stablemorph_leaves_the_experiment_stack_alone() -> None:
    code = (
        "import sys, stablemorph, stablemorph.transformer\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('stablemorph.experiment', "
        "'stablemorph.transformer.experiment', 'stablemorph.transformer.train', "
        "'stablemorph.transformer.text')))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
        "assert 'grow_mlp' in stablemorph.MORPHS\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
