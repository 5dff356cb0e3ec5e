"""Why a morphed child's first steps can hurt: the step amplification of each factorisation.

One SGD step on the two factors of ``W = F2 (*) F1`` changes the composite by
``dW = -lr J J^T g`` (``J``: the Jacobian of the composite in the factors, ``g``: the
gradient in ``W``); the parent's own step is ``-lr g``. The ratio ``<g, J J^T g> / <g, g>``
for random ``g`` on the parent kernel's support measures how much larger the child's first
steps are than the parent's at the same learning rate. This script prints it for every conv
of a trained parent, per scheme, with the factor sizes the experiment uses.

    .venv/bin/python benchmarks/step_amplification.py [--parent runs/fmnist-deepen/parents/seed0.pt]

Without ``--parent`` a small CNN is trained on the embedded digits first (about 10 s).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from stablemorph.bilinear import BilinearShape
from stablemorph.experiment.data import load_dataset
from stablemorph.experiment.train import TrainConfig, make_optimizer, train
from stablemorph.morphs.factor import Geometry, default_width
from stablemorph.solvers import decompose
from stablemorph.zoo import build_model


def amplification(G: torch.Tensor, width: int, method: str, samples: int = 8) -> float:
    co, ci, k, _ = G.shape
    F1, F2, _ = decompose(G.double(), width, (k, 3), method=method)
    shape = BilinearShape(ci, width, co, k, 3, 2)
    A, B = shape.f2_to_a(F2), shape.f1_to_b(F1)
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(samples):
        U = torch.zeros(1, co, ci, shape.kc, shape.kc, dtype=torch.float64)
        U[..., 1:-1, 1:-1] = torch.randn(1, co, ci, k, k, generator=gen, dtype=torch.float64)
        gA, gB = shape.adjoint(U, A, B)
        dW = shape.apply(gA, B) + shape.apply(A, gB)
        ratios.append(float((dW * U).sum() / U.pow(2).sum()))
    return sum(ratios) / len(ratios)


def digits_parent() -> nn.Module:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("cnn", widths=[16, 32], image_size=8)
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    train(model, data, opt, steps=300, seed=0, batch_size=64)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=Path, default=None,
                        help="a parent saved by the experiment (parents/seedN.pt) of the cnn "
                             "with --widths")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    if args.parent:
        model = build_model("cnn", widths=args.widths)
        model.load_state_dict(torch.load(args.parent, weights_only=True)["model"])
    else:
        model = digits_parent()
    print("| layer | C_in -> C_out | width | scheme | step amplification |")
    print("|---|---|---|---|---|")
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        G = m.weight.detach()
        width = default_width(Geometry.of(m, name, "deepen"), m.kernel_size[0], 3)
        for method in ("stable", "netmorph", "net2net"):
            amp = amplification(G, width, method)
            print(f"| {name} | {m.in_channels} -> {m.out_channels} | {width} | {method} | "
                  f"{amp:.2f} |")


if __name__ == "__main__":
    main()
