"""Progressive growth against training the large model from scratch (issue 12).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/progressive.py [--task gpt|llama|cnn] \
        [--layers 2 4 8] [--widths 1 1 2] [--stages 0.15 0.3] [--budget-steps 1200] \
        [--lr-schedule constant|cosine] [--seeds 3] [--threads 1] [--out DIR]

The same run as ``stablemorph progressive`` (see :mod:`stablemorph.experiment.progressive`;
the cells in :mod:`stablemorph.experiment.progressive_tasks`), written to
``benchmarks/results/progressive/`` unless ``--out`` says otherwise: ``progressive.md``
(table, settings, machine, load, commit, command), ``progressive.png`` (loss against FLOPs and
against seconds, accuracy against FLOPs), ``progressive.json`` (every evaluation of every arm;
a rerun resumes from it).

The cells reported in ``benchmarks/results/progressive/`` (one folder each):

    # Fashion-MNIST CNN, grown in depth (2 -> 4 convolutions) then width (x2)
    python benchmarks/progressive.py --task cnn --layers 2 4 4 --widths 1 1 2 \
        --batch-size 32 --budget-steps 600 --eval-every 40 --limit-test 1000 --timing \
        --lr-schedule cosine --out benchmarks/results/progressive/cnn
    # HF LlamaForCausalLM, 2 -> 4 -> 8 layers
    python benchmarks/progressive.py --task llama --lr-schedule cosine --timing \
        --out benchmarks/results/progressive/llama
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
