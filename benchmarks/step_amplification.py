"""Why a morphed child's first steps can hurt: how much each factorisation amplifies the first
optimiser step, in function space, relative to the parent's own step.

A deepen replaces a layer ``W`` by ``F2 (*) F1``. One step on the factors changes the block's
output on the layer's real input ``x`` (from a probe batch) by ``J dF``; the parent's step on
``W`` changes it by ``dW``. For random output gradients ``delta``
(:func:`stablemorph.morphs.first_step.step_amplification`):

- SGD: ``<delta, J dF> / <delta, dW>`` (``dF = -lr J^T delta``, ``dW = -lr delta x^T``);
- Adam-like: ``||J sign(g_F)|| / ||sign(g_W)||``: fresh parameters step by ``lr sign(g)``.

The column "random" is the same SGD ratio for i.i.d. random kernel gradients instead of the
data (:func:`~stablemorph.experiment.rules.amplification`). Schemes: ``stable+raw`` (the
published factorisation: He-balanced factors), ``stable`` with its rule's re-factoring
(an orthogonal second factor for pointwise pairs), ``netmorph``, ``net2net``. The rule's
learning-rate multiplier is ``1 / amplification`` for each pair.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/step_amplification.py

Trains a digits CNN (widths 16, 32; deepen with ``kernel_size`` 3 and 1) and a digits MLP
(64, 64) parent first, 300 SGD steps each (seconds).
"""

from __future__ import annotations

import torch

from stablemorph.experiment import rules
from stablemorph.experiment.data import load_dataset
from stablemorph.experiment.stability import ExperimentConfig, grow
from stablemorph.experiment.train import TrainConfig, make_optimizer, train
from stablemorph.morphs.first_step import block_input, step_amplification
from stablemorph.zoo import build_model

ARMS = ("stable+raw", "stable+raw+orth2", "netmorph", "net2net")


def parent(kind: str, data) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    if kind == "cnn":
        model = build_model("cnn", widths=[16, 32], image_size=8, in_channels=1,
                            num_classes=10)
    else:
        model = build_model("mlp", hidden=[64, 64], in_features=64, num_classes=10)
    opt = make_optimizer(model, TrainConfig(lr=0.05, weight_decay=5e-4))
    train(model, data, opt, steps=300, seed=0, batch_size=64)
    return model, opt


def main() -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    probe = data.x_train[:32]
    print("| parent | deepen kernel_size | layer | arm | SGD (data) | Adam (data) | SGD (random) |")
    print("|---|---|---|---|---|---|---|")
    for kind, k2s in (("cnn", (3, 1)), ("mlp", (None,))):
        model, opt = parent(kind, data)
        for k2 in k2s:
            cfg = ExperimentConfig(model=kind, morph_kwargs={} if k2 is None else
                                   {"kernel_size": k2})
            for arm in ARMS:
                child, _, _ = grow(model, opt, cfg, arm, 0, probe)
                modules = dict(child.named_modules())
                for pair in rules.factor_pairs(child):
                    x = block_input(child, modules[pair.first], probe)
                    block = modules[pair.target]
                    sgd = step_amplification(block, x, pair.kernel, adaptive=False)
                    adam = step_amplification(block, x, pair.kernel, adaptive=True)
                    rnd = rules.amplification(child, pair, "sgd")
                    print(f"| {kind} | {k2 or '-'} | {pair.target} | {arm} | {sgd:.2f} | "
                          f"{adam:.2f} | {rnd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
