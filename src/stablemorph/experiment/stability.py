"""The experiment that matters (DESIGN.md section 5): does a morphed network keep improving
when training resumes, scheme against scheme?

Per seed: a parent is trained; the same child architecture is built from it by each scheme;
every arm (each scheme's child, the parent trained on, the child architecture from scratch)
then trains with the same optimiser, batches, learning-rate regime and optimiser-state
handling, and is evaluated at step 0 (must equal the parent), densely through the first
steps, then sparser. Everything is written under one output folder; finished runs are kept,
so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablemorph.activations import PAct, clamp_pact_
from stablemorph.equation import sparsity
from stablemorph.experiment.data import Dataset, load_dataset
from stablemorph.experiment.train import (
    TrainConfig,
    eval_schedule,
    evaluate,
    make_optimizer,
    seed_everything,
    train,
)
from stablemorph.morphs import apply as apply_morph
from stablemorph.optim import transfer_optimizer
from stablemorph.record import history
from stablemorph.zoo import build_model

SCHEMES = ("stable", "netmorph", "net2net")
BASELINES = ("parent", "scratch")


class ExperimentError(RuntimeError):
    """The experiment cannot go on: a child that does not start at its parent's accuracy,
    or an output folder holding a different experiment."""


@dataclass
class ExperimentConfig:
    """Everything that defines one experiment; saved as ``config.json`` in the output folder.

    ``lr_regimes`` maps a regime name to its learning rate after the morph: ``"same"`` is the
    parent's final rate, ``"raised"`` its initial one (the parent decays ``lr`` tenfold at
    2/3 of its steps). ``targets`` are the layers morphed, in order (default: every conv).
    """

    dataset: str = "digits"
    data_root: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    morph: str = "deepen"
    targets: list[str] | None = None
    morph_kwargs: dict[str, Any] = field(default_factory=lambda: {"kernel_size": 3})
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    seeds: int = 3
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    parent_steps: int = 600
    child_steps: int = 400
    regimes: list[str] = field(default_factory=lambda: ["same", "raised"])
    dense_until: int = 200
    dense_every: int = 10
    every: int = 50
    drop_window: int = 200
    threads: int = 2
    nproc: int = 1

    def lr_after(self, regime: str) -> float:
        if regime == "same":
            return self.lr / 10
        if regime == "raised":
            return self.lr
        raise ExperimentError(f"unknown learning-rate regime {regime!r}; use 'same' or 'raised'")

    def train_config(self, lr: float, seed: int) -> TrainConfig:
        return TrainConfig(
            optimizer=self.optimizer,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            schedule="constant",
            seed=seed,
        )


@dataclass
class Arm:
    """One training curve: ``records`` are the train loop's evaluation dicts."""

    seed: int
    regime: str
    arm: str
    records: list[dict[str, Any]]
    parent_acc: float
    parent_loss: float
    zero_fraction: float | None
    seconds: float


def load_data(cfg: ExperimentConfig) -> Dataset:
    return load_dataset(
        cfg.dataset, root=cfg.data_root, limit_train=cfg.limit_train, limit_test=cfg.limit_test
    )


def model_kwargs(cfg: ExperimentConfig, data: Dataset) -> dict[str, Any]:
    """The model's constructor arguments, completed from the data set's shape."""
    kwargs = dict(cfg.model_kwargs)
    c, h = data.input_shape[0], data.input_shape[-1]
    kwargs.setdefault("num_classes", data.num_classes)
    if cfg.model in ("cnn", "vgg", "resnet", "depthwise"):
        kwargs.setdefault("in_channels", c)
    if cfg.model == "cnn":
        kwargs.setdefault("image_size", h)
    if cfg.model == "mlp":
        kwargs.setdefault("in_features", int(math.prod(data.input_shape)))
    return kwargs


def default_targets(model: nn.Module) -> list[str]:
    """Every convolution (or every linear layer but the last, for an MLP)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if convs:
        return convs
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[:-1]


def _pact_slopes(model: nn.Module) -> list[float]:
    return [float(m.a.detach().mean()) for m in model.modules() if isinstance(m, PAct)]


def grow(
    parent: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    scheme: str,
    seed: int,
    probe: torch.Tensor,
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """Apply the configured morph to every target with ``scheme``, carrying the optimiser
    state across each step the same way for every scheme; returns the child, its optimiser
    and the exact-zero fraction of the new and changed parameters."""
    child, opt = parent, optimizer
    targets = cfg.targets or default_targets(parent)
    for j, target in enumerate(targets):
        nxt = apply_morph(
            cfg.morph,
            child,
            target,
            scheme=scheme,
            seed=seed * 1000 + j,
            inputs=probe,
            **cfg.morph_kwargs,
        )
        opt = transfer_optimizer(opt, child, nxt)
        child = nxt
    changed: set[str] = set()
    for rec in history(child):
        changed.update(rec.report.changed)
    params = dict(child.named_parameters())
    tensors = [params[n] for n in changed if n in params and not n.endswith(".a")]
    return child, opt, sparsity(*tensors)[0] if tensors else 0.0


def scratch_copy(child: nn.Module, seed: int) -> nn.Module:
    """The child architecture freshly initialised: every layer reset, activations plain
    (``a = 0``)."""
    torch.manual_seed(seed + 7919)
    fresh = copy.deepcopy(child)
    for m in fresh.modules():
        if isinstance(m, PAct):
            with torch.no_grad():
                m.a.zero_()
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(fresh, "_stablemorph_history"):
        object.__delattr__(fresh, "_stablemorph_history")
    return fresh


class Experiment:
    """Runs (or resumes) the experiment in ``out``; ``run()`` returns every arm's curve."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out: Path,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.out, self.progress, self.log = cfg, Path(out), progress, log
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()

    def _check_config(self) -> None:
        path = self.out / "config.json"
        mine = asdict(self.cfg)
        if path.exists():
            # a field added to the config since the folder was written takes its default
            theirs = {
                **json.loads(json.dumps(asdict(ExperimentConfig()))),
                **json.loads(path.read_text()),
            }
            if theirs != json.loads(json.dumps(mine)):
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ExperimentError(
                    f"{self.out} holds a different experiment (differs in {diff}); use a new "
                    f"--out folder or delete it"
                )
        else:
            path.write_text(json.dumps(mine, indent=2))

    def _run_path(self, seed: int, regime: str, arm: str) -> Path:
        return self.out / "runs" / f"seed{seed}_{regime}_{arm}.json"

    def parent(self, data: Dataset, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The trained parent for ``seed`` (cached in ``parents/``, reloaded on resume)."""
        cfg = self.cfg
        seed_everything(seed)
        model = build_model(cfg.model, **model_kwargs(cfg, data))
        tcfg = cfg.train_config(cfg.lr, seed)
        opt = make_optimizer(model, tcfg)
        path = self.out / "parents" / f"seed{seed}.pt"
        if path.exists():
            state = torch.load(path, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            return model, opt
        milestone = (2 * cfg.parent_steps) // 3
        train(
            model,
            data,
            opt,
            steps=milestone,
            seed=seed,
            batch_size=cfg.batch_size,
            progress=f"parent seed {seed}" if self.progress else False,
        )
        for group in opt.param_groups:
            group["lr"] = cfg.lr / 10
        train(
            model,
            data,
            opt,
            steps=cfg.parent_steps,
            start_step=milestone,
            seed=seed,
            batch_size=cfg.batch_size,
            progress=f"parent seed {seed} (lr/10)" if self.progress else False,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        return model, opt

    def run(self) -> list[Arm]:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        data = load_data(cfg)
        self.log(f"data: {data.name} ({data.num_train} train / {data.num_test} test images)")
        arms: list[Arm] = []
        evals = eval_schedule(
            cfg.child_steps,
            dense_until=cfg.dense_until,
            dense_every=cfg.dense_every,
            every=cfg.every,
        )
        for seed in range(cfg.seeds):
            todo = [(r, a) for r in cfg.regimes for a in [*cfg.schemes, *cfg.baselines]]
            done = {
                ra: self._run_path(seed, *ra) for ra in todo if self._run_path(seed, *ra).exists()
            }
            if len(done) < len(todo):
                parent, parent_opt = self.parent(data, seed)
                parent_acc, parent_loss = evaluate(parent, data.x_test, data.y_test)
                self.log(
                    f"seed {seed}: parent test accuracy {parent_acc:.4f}, loss {parent_loss:.4f}"
                )
                probe = data.x_train[:32]
                children = {s: grow(parent, parent_opt, cfg, s, seed, probe) for s in cfg.schemes}
            for regime, arm in todo:
                path = self._run_path(seed, regime, arm)
                if path.exists():
                    arms.append(Arm(**json.loads(path.read_text())))
                    continue
                lr = cfg.lr_after(regime)
                zero = None
                # one deep copy of (model, optimiser) keeps the optimiser on the copy's
                # parameters; every scheme's optimiser went through the same surgery in grow()
                if arm in cfg.schemes:
                    child, child_opt, zero = children[arm]
                    model, opt = copy.deepcopy((child, child_opt))
                elif arm == "parent":
                    model, opt = copy.deepcopy((parent, parent_opt))
                elif arm == "scratch":
                    model = scratch_copy(children[cfg.schemes[0]][0], seed)
                    opt = make_optimizer(model, cfg.train_config(lr, seed))
                else:
                    raise ExperimentError(f"unknown arm {arm!r}")
                for group in opt.param_groups:
                    group["lr"] = lr
                if arm != "scratch":
                    acc0, loss0 = evaluate(model, data.x_test, data.y_test)
                    if abs(acc0 - parent_acc) > 1.0 / data.num_test + 1e-12 or abs(
                        loss0 - parent_loss
                    ) > 1e-4 * max(1.0, abs(parent_loss)):
                        raise ExperimentError(
                            f"seed {seed}, {arm}: the child starts at accuracy {acc0:.4f} / loss "
                            f"{loss0:.6f} but its parent has {parent_acc:.4f} / {parent_loss:.6f}"
                        )
                start = time.perf_counter()
                label = f"seed {seed} {regime:6s} {arm}" if self.progress else False
                records = train_arm(model, data, opt, cfg, seed, evals, label)
                result = Arm(
                    seed,
                    regime,
                    arm,
                    [dict(r) for r in records],
                    parent_acc,
                    parent_loss,
                    zero,
                    time.perf_counter() - start,
                )
                result.records[-1]["pact_a"] = _pact_slopes(model)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(asdict(result)))
                tmp.replace(path)
                arms.append(result)
        return arms


def train_arm(
    model: nn.Module,
    data: Dataset,
    opt: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    seed: int,
    evals: list[int],
    label: str | bool,
) -> list[dict[str, Any]]:
    """Train one arm after the morph: in this process, or with ``cfg.nproc`` DDP processes
    (gloo on the CPU; the global batches are the single-process ones, split across ranks).
    ``model`` ends trained either way."""
    kwargs = {
        "steps": cfg.child_steps,
        "seed": 10_000 + seed,
        "batch_size": cfg.batch_size,
        "eval_steps": evals,
        "after_step": clamp_pact_,
    }
    if cfg.nproc <= 1:
        return [dict(r) for r in train(model, data, opt, progress=label, **kwargs)]
    from stablemorph.ddp import launch

    records = launch(_ddp_arm, cfg.nproc, cfg, model, opt, kwargs)
    model.load_state_dict(records.pop()["state"])
    return records


def _ddp_arm(
    cfg: ExperimentConfig, model: nn.Module, opt: torch.optim.Optimizer, kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    """One rank of a DDP arm. ``model`` and ``opt`` arrive pickled together, so ``opt`` holds
    ``model``'s parameters; but torch.multiprocessing hands every rank the *same* shared-memory
    storage, so each rank first takes a private deep copy (else every rank's optimiser step
    lands on the one shared tensor)."""
    from torch.nn.parallel import DistributedDataParallel

    from stablemorph.ddp import train_ddp

    model, opt = copy.deepcopy((model, opt))
    data = load_data(cfg)
    records = [dict(r) for r in train_ddp(DistributedDataParallel(model), data, opt, **kwargs)]
    return [*records, {"state": model.state_dict()}]


# ---------------------------------------------------------------------------------------------
# the figures


def first_steps(records: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    return [r for r in records if r["step"] <= window]


def summarise(arm: Arm, window: int) -> dict[str, Any]:
    """Drop depth (parent accuracy minus the worst accuracy in the first ``window`` steps),
    steps until the parent's accuracy is regained after that worst point (0 without a drop,
    ``None`` if never), final accuracy and loss, loss rise over the window."""
    early = first_steps(arm.records, window)
    worst = min(early, key=lambda r: r["test_acc"])
    drop = arm.parent_acc - worst["test_acc"]
    recover: int | None = 0
    if drop > 0:
        recover = next(
            (
                r["step"]
                for r in arm.records
                if r["step"] > worst["step"] and r["test_acc"] >= arm.parent_acc
            ),
            None,
        )
    last = arm.records[-1]
    return {
        "drop": drop,
        "loss_rise": max(r["test_loss"] for r in early) - arm.parent_loss,
        "recover": recover,
        "final_acc": last["test_acc"],
        "final_loss": last["test_loss"],
        "seconds": arm.seconds,
        "zeros": arm.zero_fraction,
    }
