"""Progressive growth against training the large model from scratch (issue 12).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/progressive.py \
        [--layers 2 4 8] [--stages 0.15 0.3] [--budget-steps 1200] [--seeds 3] [--threads 1]

The same run as ``stablemorph progressive`` (see :mod:`stablemorph.experiment.progressive`),
written to ``benchmarks/results/progressive/``: ``progressive.md`` (table, settings, machine,
command), ``progressive.png`` (validation loss against FLOPs and against seconds),
``progressive.json`` (every evaluation of every arm; a rerun resumes from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stablemorph.experiment.progressive import add_arguments, run_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(out=Path(__file__).parent / "results" / "progressive")
    sys.exit(run_from_args(parser.parse_args()))
