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
from stablemorph.experiment.growth import GrowthError, morph_steps
from stablemorph.experiment.release import attach_release, release_lr_scales
from stablemorph.experiment.rules import (
    ADAPTIVE,
    factor_pairs,
    growth_lr_scales,
    isometric_gauge_,
    lr_scales,
    regauge_,
    scale_new_fan_out_,
    scale_new_units_,
    shrink_first_bias_,
    tensor_lr_scales,
    with_lr_scales,
)
from stablemorph.experiment.train import (
    TrainConfig,
    eval_schedule,
    evaluate,
    make_optimizer,
    seed_everything,
    train,
)
from stablemorph.morphs import MorphError
from stablemorph.optim import RULE, TransferRule, group_sources, transfer_optimizer
from stablemorph.record import history
from stablemorph.step_rule import adaptive_step_ratio
from stablemorph.zoo import build_model

SCHEMES = ("stable", "netmorph", "net2net")
BASELINES = ("parent", "scratch")
REGIMES = ("same", "raised", "warmup")
# Options an arm may add to its scheme, "scheme+option+..." (each is a hypothesis of the
# stability research, recorded with its numbers in benchmarks/results/stability_research.md).
# For every deepen / subnet factor pair; these four and adamn are the library's step rule
# (stablemorph.step_rule: the morph's step_rule option, then transfer_optimizer's TransferRule):
#   orth2   pointwise pairs re-factored with an orthogonal second factor (stable's solve)
#   dlr     learning-rate multiplier 1 / first-step amplification measured on the probe
#   state   the parent layer's optimiser state mapped onto the factors
#   adamr   under Adam, the multiplier also times the parent layer's own typical step
#           (mean |m_hat| / sqrt(v_hat)): fresh factors step by lr sign(g) at first
# and, applied after the morph (experiment/rules.py):
#   raw     the stable scheme without its default rule (STABLE_RULE): the published solve
#   lr      the multiplier measured on random kernel gradients (instead of dlr's)
#   slope   dlr's multiplier measured and applied with the activation's slope too
#   freeze  the activation's slope frozen (multiplier 0)
#   gauge   middle channels rebalanced to the smallest random-gradient amplification
#   iso1, iso3  middle channels rebalanced so F2's columns have 1x / 3x the He norm
#   b1s     the first factor's bias shrunk 100x (moved into the second's)
#   zout    (widen) the fresh units' outgoing weights scaled by 0.1 (the pairs still cancel)
#   wsc     (widen) every entry of the fresh units (incoming, bias, norm affine, outgoing)
#           scaled by 0.1
#   adamn   (every morph; the stable scheme's morphs mark their new entries) under an
#           adaptive optimiser, fresh parameters without multipliers and new units step at
#           their stand-in's typical step (lr x r; new units' v / r^2)
#   wlr     (widen) under SGD, the widened group's parameters get the learning-rate
#           multiplier 1 / first-step amplification measured on the probe
#           (stablemorph.morphs.new_units; ParamOrigin.width_advice); (GPT depth / width
#           growth) every parameter gets 1 / the whole model's first-step amplification at
#           the logits (stablemorph.transformer.sgd_rule; the same record)
#   relm    the multipliers released (ramped back to 1, stablemorph.experiment.release) over the
#           optimiser's own memory 1 / (1 - beta): Adam's beta2, SGD's momentum
#   relw    the multipliers released over the configured warm-up length (warmup_steps)
#   relt    the multipliers released over the whole training run after the morph
#           (child_steps)
#           (relm, relw, relt: measured, not adopted: benchmarks/results/ramp.md)
#   glr     (GPT growth research, issue 9) under SGD, every parameter of the child gets
#           1 / first-step amplification of the whole model measured at its output
#   nlr     the same multiplier on the growth's new and changed parameters only
#   tlr     each new or changed tensor's first-step energy at the output matched to its
#           source's (stand-in's) in the parent
#           (glr adopted as the GPT growths' library rule, nlr and tlr not:
#           benchmarks/results/gptsgd.md)
ARM_OPTIONS = ("raw", "gauge", "lr", "slope", "dlr", "freeze", "iso1", "iso3", "state", "b1s",
               "orth2", "adamr", "zout", "adamn", "wlr", "wsc", "relm", "relw", "relt", "glr",
               "nlr", "tlr")
RELEASE_OPTIONS = ("relm", "relw", "relt")
TRANSFER_OPTIONS = ("dlr", "state", "adamr", "adamn", "wlr")  # applied by transfer_optimizer
REGAUGE_OPTIONS = ("gauge", "iso1", "iso3", "b1s")
# The default rule of the stable scheme (the library's step rule, issue 9): what "stable"
# means in an experiment unless "+raw" is given.
STABLE_RULE: tuple[str, ...] = ("orth2", "state", "dlr", "adamr", "adamn", "wlr")
# the morphs that take the step rule option (the GPT growths: transformer/sgd_rule.py)
RULE_MORPHS = ("deepen", "insert_subnet", "widen", "depth", "width")


def parse_arm(name: str) -> tuple[str, tuple[str, ...]]:
    """``"stable+lr"`` -> ``("stable", ("lr",))``; ExperimentError for an unknown scheme or
    option."""
    scheme, *options = name.split("+")
    if scheme not in SCHEMES or any(o not in ARM_OPTIONS for o in options):
        raise ExperimentError(
            f"unknown arm {name!r}: a scheme {SCHEMES} optionally followed by +option, "
            f"options {ARM_OPTIONS}"
        )
    return scheme, tuple(options)


@dataclass(frozen=True)
class ArmPlan:
    """How an arm grows its child: ``scheme``, all its ``options`` (the stable rule's
    included), the morphs' ``step_rule`` and ``transfer_optimizer``'s ``rule``."""

    scheme: str
    options: tuple[str, ...]
    step_rule: bool
    rule: TransferRule


def plan_arm(name: str, stable_rule: tuple[str, ...] | list[str] = STABLE_RULE) -> ArmPlan:
    """The plan of arm ``name`` (``stable`` arms get ``stable_rule`` unless ``+raw``).
    ExperimentError for an unknown arm or options the library path cannot express: the
    step rule's options without ``orth2`` on ``stable`` (its morphs record the rule only with
    their gauge), ``orth2`` on a baseline, re-gauging options after the step rule (they
    would invalidate the recorded multipliers and state)."""
    scheme, options = parse_arm(name)
    if scheme == "stable" and "raw" not in options:
        options = tuple(dict.fromkeys((*stable_rule, *options)))
    library = set(options) & set(TRANSFER_OPTIONS)
    if scheme == "stable":
        step_rule = "orth2" in options
        if library and not step_rule:
            raise ExperimentError(f"arm {name!r}: {sorted(library)} need the stable step "
                                  f"rule's gauge (orth2): drop +raw or add +orth2")
    else:
        if "orth2" in options:
            raise ExperimentError(f"arm {name!r}: orth2 is the stable scheme's gauge")
        step_rule = bool(library)
    if len(set(options) & set(RELEASE_OPTIONS)) > 1:
        raise ExperimentError(f"arm {name!r}: give one release of {RELEASE_OPTIONS}")
    if step_rule and set(options) & set(REGAUGE_OPTIONS):
        raise ExperimentError(f"arm {name!r}: {sorted(set(options) & set(REGAUGE_OPTIONS))} "
                              f"re-gauge after the morph: combine them with +raw only")
    rule = TransferRule(RULE.scaled, RULE.fresh_state,
                        lr_advice="dlr" in options and "slope" not in options,
                        adaptive_ratio="adamr" in options, factor_state="state" in options,
                        adaptive_new="adamn" in options, width_advice="wlr" in options)
    return ArmPlan(scheme, tuple(options), step_rule, rule)


class ExperimentError(RuntimeError):
    """The experiment cannot go on: a child that does not start at its parent's accuracy,
    or an output folder holding a different experiment."""


@dataclass(frozen=True)
class Ramp:
    """``start`` at step 0, linearly to ``end`` at step ``steps``, then ``end`` (picklable,
    so DDP ranks receive it)."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step, self.steps) / self.steps


@dataclass
class ExperimentConfig:
    """Everything that defines one experiment; saved as ``config.json`` in the output folder.

    ``regimes`` are the learning-rate regimes after the morph: ``"same"`` is the parent's
    final rate, ``"raised"`` its initial one (the parent decays ``lr`` tenfold at 2/3 of its
    steps), ``"warmup"`` the raised one reached linearly over ``warmup_steps``. ``targets``
    are the layers morphed, in order (default: every conv). ``schemes`` are arms
    ``scheme[+option...]`` (:data:`ARM_OPTIONS`); ``stable_rule`` the options every
    ``stable`` arm gets unless it says ``+raw``.
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
    warmup_steps: int = 50
    stable_rule: list[str] = field(default_factory=lambda: list(STABLE_RULE))
    dense_until: int = 200
    dense_every: int = 10
    every: int = 50
    drop_window: int = 200
    threads: int = 2
    nproc: int = 1

    def lr_after(self, regime: str) -> float:
        """The rate the regime settles at after the morph."""
        if regime == "same":
            return self.lr / 10
        if regime in ("raised", "warmup"):
            return self.lr
        raise ExperimentError(f"unknown learning-rate regime {regime!r}; use one of {REGIMES}")

    def lr_at(self, regime: str) -> Callable[[int], float]:
        """The rate at child step ``s``: constant for ``same`` and ``raised``; for ``warmup``
        a linear ramp from the parent's final rate (``lr / 10``) at step 0 to ``lr`` at step
        ``warmup_steps``, then ``lr``."""
        end = self.lr_after(regime)
        if regime != "warmup":
            return Ramp(end, end, 1)
        return Ramp(self.lr / 10, end, max(1, self.warmup_steps))

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
    moved: float | None = None  # ||change|| / ||start|| of the morph's new parameters


GPT_DEFAULTS = {"d_model": 32, "n_layer": 2, "n_head": 4, "head_dim": 8, "d_mlp": 128,
                "block_size": 64}


def load_data(cfg: ExperimentConfig) -> Dataset:
    """The configured data set; ``"text"`` is the character corpus of the GPT experiment
    (``limit_train`` caps its characters, default 1,000,000; windows of the model's
    ``block_size``)."""
    if cfg.dataset == "text":
        from stablemorph.transformer.text import text_dataset

        block = int(cfg.model_kwargs.get("block_size", GPT_DEFAULTS["block_size"]))
        return text_dataset(cfg.limit_train or 1_000_000, block, cfg.limit_test or 256)
    return load_dataset(
        cfg.dataset, root=cfg.data_root, limit_train=cfg.limit_train, limit_test=cfg.limit_test
    )


def build(cfg: ExperimentConfig, data: Dataset) -> nn.Module:
    """The parent architecture, freshly initialised (``gpt``: the project's GPT, sizes from
    :data:`GPT_DEFAULTS` overridden by ``model_kwargs``; else a zoo model). Raises
    ExperimentError for an unknown model or constructor arguments it does not take."""
    try:
        if cfg.model == "gpt":
            from stablemorph.transformer.model import GPT, GPTConfig

            if data.name != "text":
                raise ExperimentError("--model gpt trains on --dataset text")
            sizes = {**GPT_DEFAULTS, **cfg.model_kwargs}
            sizes["block_size"] = data.input_shape[0]
            return GPT(GPTConfig.uniform(vocab_size=data.num_classes, **sizes))
        if data.name == "text":
            raise ExperimentError("--dataset text needs --model gpt")
        return build_model(cfg.model, **model_kwargs(cfg, data))
    except TypeError as err:
        raise ExperimentError(f"--model {cfg.model}: bad --model-kwargs "
                              f"{cfg.model_kwargs}: {err}") from None
    except ValueError as err:
        raise ExperimentError(f"--model {cfg.model}: {err}") from None


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
    """Every convolution (or every linear layer but the last, for an MLP; none for a GPT,
    whose growths take no target)."""
    if type(model).__name__ == "GPT":
        return []
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if convs:
        return convs
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[:-1]


def new_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters the morphs in ``model``'s history created or changed (the
    activations' slopes excluded)."""
    changed: set[str] = set()
    for rec in history(model):
        changed.update(rec.report.changed)
    params = dict(model.named_parameters())
    return sorted(n for n in changed if n in params and not n.endswith(".a"))


def _snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def moved(model: nn.Module, start: dict[str, torch.Tensor]) -> float | None:
    """``||theta - theta_0|| / ||theta_0||`` over the parameters in ``start`` (None if none)."""
    if not start:
        return None
    params = dict(model.named_parameters())
    num = sum(float((params[n].detach() - t).pow(2).sum()) for n, t in start.items())
    den = sum(float(t.pow(2).sum()) for t in start.values())
    return (num / den) ** 0.5 if den > 0 else None


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
    """Apply the configured morph to every target with the arm ``scheme`` (:func:`plan_arm`:
    the library's step rule through the morphs' ``step_rule`` and ``transfer_optimizer``'s
    rule, then the research options of experiment/rules.py), carrying the optimiser state
    across each step; every group gets its ``lr_scale`` (read by the training loop). Returns
    the child, its optimiser and the exact-zero fraction of the new and changed
    parameters."""
    plan = plan_arm(scheme, cfg.stable_rule)
    options = plan.options
    kwargs = dict(cfg.morph_kwargs)
    if cfg.morph in RULE_MORPHS:
        kwargs["step_rule"] = plan.step_rule
    child, opt = parent, optimizer
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    targets = cfg.targets or default_targets(parent)
    for j, step in enumerate(morph_steps(cfg.morph, parent, targets, kwargs)):
        nxt = step.run(child, plan.scheme, seed * 1000 + j, probe)
        if nxt is child:  # nothing left to grow at this target
            continue
        opt = transfer_optimizer(opt, child, nxt, rule=plan.rule)
        scales = [scales[gi] * s for gi, s in group_sources(opt)]
        child = nxt
    # the training loop sets each group's rate from its multiplier (experiment/train.py)
    for group, s in zip(opt.param_groups, scales, strict=True):
        group["lr_scale"] = s
    if "zout" in options:
        scale_new_fan_out_(child, 0.1)
    if "wsc" in options:
        scale_new_units_(child, 0.1)
    if "b1s" in options:
        shrink_first_bias_(child, 0.01)
    if "gauge" in options:
        regauge_(child)
    for kappa in (1, 3):
        if f"iso{kappa}" in options:
            isometric_gauge_(child, float(kappa))
    if ("lr" in options or "dlr" in options) and not plan.rule.lr_advice:
        scales_ = lr_scales(child, cfg.optimizer, slopes="slope" in options,
                            probe=probe if "dlr" in options else None)
        if "adamr" in options:
            pparams = dict(parent.named_parameters())
            for pair in factor_pairs(child):
                w = pparams.get(f"{pair.parent_layer}.weight")
                r = adaptive_step_ratio(optimizer, w) if w is not None else None
                for n in scales_:
                    if r is not None and n.startswith(f"{pair.target}."):
                        scales_[n] *= r
        with_lr_scales(opt, child, scales_)
    if ("glr" in options or "nlr" in options) and cfg.optimizer not in ADAPTIVE:
        names = new_parameters(child) if "nlr" in options else None
        with_lr_scales(opt, child, growth_lr_scales(parent, child, probe, names))
    if "tlr" in options and cfg.optimizer not in ADAPTIVE:
        with_lr_scales(opt, child, tensor_lr_scales(parent, child, probe))
    if "freeze" in options:
        with_lr_scales(opt, child, {f"{p.target}.act.a": 0.0 for p in factor_pairs(child)})
    params = dict(child.named_parameters())
    tensors = [params[n] for n in new_parameters(child)]
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


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a kill leaves the old file or the new one,
    never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def check_config(cfg: ExperimentConfig) -> None:
    """Refuse, with the option named, what cannot run; nothing is read or written."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ExperimentError(message)

    for name in ("seeds", "parent_steps", "child_steps", "batch_size", "nproc", "threads",
                 "dense_every", "every"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    need(cfg.batch_size % cfg.nproc == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of --nproc {cfg.nproc}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.warmup_steps >= 1, f"warmup_steps must be >= 1, got {cfg.warmup_steps}")
    need(bool(cfg.regimes) and all(r in REGIMES for r in cfg.regimes),
         f"--lr-after takes {REGIMES}, got {cfg.regimes}")
    need(bool(cfg.schemes), "--schemes: give at least one scheme")
    need(all(o in ARM_OPTIONS for o in cfg.stable_rule),
         f"stable_rule takes options of {ARM_OPTIONS}, got {cfg.stable_rule}")
    for arm in cfg.schemes:
        plan_arm(arm, cfg.stable_rule)
    need(all(b in BASELINES for b in cfg.baselines),
         f"--baselines takes {BASELINES}, got {cfg.baselines}")
    need(len(set(cfg.schemes + cfg.baselines)) == len(cfg.schemes) + len(cfg.baselines),
         f"arms repeat: {cfg.schemes + cfg.baselines}")
    try:
        TrainConfig(optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, batch_size=cfg.batch_size)
    except ValueError as err:
        raise ExperimentError(str(err)) from None


def validate(cfg: ExperimentConfig) -> Dataset:
    """Everything checked before anything is written or trained: the options
    (:func:`check_config`), the data set (loaded, and returned), the model and its kwargs,
    the morph, its options and targets (every arm's growth is tried once on an untrained
    parent). Raises ExperimentError (or the data set's own error) naming the problem."""
    check_config(cfg)
    data = load_data(cfg)
    seed_everything(0)
    model = build(cfg, data)
    opt = make_optimizer(model, cfg.train_config(cfg.lr, 0))
    probe = data.x_train[:8]
    for arm in cfg.schemes:
        try:
            grow(model, opt, cfg, arm, 0, probe)
        except GrowthError as err:
            raise ExperimentError(str(err)) from None
        except (MorphError, TypeError, ValueError) as err:
            raise ExperimentError(f"--morph {cfg.morph} with {cfg.morph_kwargs} "
                                  f"(targets {cfg.targets or 'default'}) fails for {arm}: "
                                  f"{type(err).__name__}: {err}") from None
    return data


class Experiment:
    """Runs (or resumes) the experiment in ``out``; ``run()`` returns every arm's curve.

    The constructor validates everything (:func:`validate`) before it writes ``config.json``
    (atomically); parents and runs are written atomically too, and a damaged file in the
    folder is reported by name."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out: Path,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.out, self.progress, self.log = cfg, Path(out), progress, log
        if self.out.exists() and not self.out.is_dir():
            raise ExperimentError(f"--out {self.out} is a file, not a folder")
        self._check_existing()
        self.data = validate(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.json"
        if not path.exists():
            _write_atomic(path, lambda t: t.write_text(json.dumps(asdict(self.cfg), indent=2)))

    def _check_existing(self) -> None:
        path = self.out / "config.json"
        if not path.exists():
            return
        mine = json.loads(json.dumps(asdict(self.cfg)))
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as err:
            raise ExperimentError(f"{path} is damaged ({err}); delete it (and the folder's "
                                  f"runs if they belong to another experiment)") from None
        # a field added to the config since the folder was written takes its default, except
        # the stable rule: a folder from before it existed ran the published stable scheme
        stored.setdefault("stable_rule", [])
        theirs = {**json.loads(json.dumps(asdict(ExperimentConfig()))), **stored}
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ExperimentError(
                f"{self.out} holds a different experiment (differs in {diff}); use a new "
                f"--out folder or delete it"
            )

    def _run_path(self, seed: int, regime: str, arm: str) -> Path:
        return self.out / "runs" / f"seed{seed}_{regime}_{arm}.json"

    def parent(self, data: Dataset, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The trained parent for ``seed`` (cached in ``parents/``, reloaded on resume)."""
        cfg = self.cfg
        seed_everything(seed)
        model = build(cfg, data)
        tcfg = cfg.train_config(cfg.lr, seed)
        opt = make_optimizer(model, tcfg)
        path = self.out / "parents" / f"seed{seed}.pt"
        if path.exists():
            try:
                state = torch.load(path, weights_only=True)
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
            except Exception as err:
                raise ExperimentError(f"{path} is damaged or not this experiment's parent "
                                      f"({type(err).__name__}: {err}); delete it to train the "
                                      f"parent again") from None
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
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        _write_atomic(path, lambda t: torch.save(state, t))
        return model, opt

    def run(self) -> list[Arm]:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        data = self.data
        self.log(f"data: {data.name} ({data.num_train} train / {data.num_test} test examples)")
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
                    try:
                        arms.append(Arm(**json.loads(path.read_text())))
                    except (ValueError, TypeError, OSError) as err:
                        raise ExperimentError(f"{path} is damaged ({err}); delete it to run "
                                              f"that arm again") from None
                    continue
                lr = cfg.lr_after(regime)
                zero = None
                # one deep copy of (model, optimiser) keeps the optimiser on the copy's
                # parameters; every scheme's optimiser went through the same surgery in grow()
                if arm in cfg.schemes:
                    child, child_opt, zero = children[arm]
                    model, opt = copy.deepcopy((child, child_opt))
                    release(opt, plan_arm(arm, cfg.stable_rule).options, cfg)
                elif arm == "parent":
                    model, opt = copy.deepcopy((parent, parent_opt))
                elif arm == "scratch":
                    model = scratch_copy(children[cfg.schemes[0]][0], seed)
                    opt = make_optimizer(model, cfg.train_config(lr, seed))
                else:
                    raise ExperimentError(f"unknown arm {arm!r}")
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
                before = _snapshot(model, new_parameters(model)) if arm in cfg.schemes else {}
                records = train_arm(model, data, opt, cfg, seed, evals, label, regime)
                result = Arm(
                    seed,
                    regime,
                    arm,
                    [dict(r) for r in records],
                    parent_acc,
                    parent_loss,
                    zero,
                    time.perf_counter() - start,
                    moved(model, before),
                )
                result.records[-1]["pact_a"] = _pact_slopes(model)
                _write_atomic(path, lambda t, r=result: t.write_text(json.dumps(asdict(r))))
                arms.append(result)
        return arms


def release(opt: torch.optim.Optimizer, options: tuple[str, ...], cfg: ExperimentConfig
            ) -> None:
    """The arm's release of its multipliers (:data:`RELEASE_OPTIONS`), if any, on ``opt``."""
    if "relm" in options:
        release_lr_scales(opt)
    elif "relw" in options:
        release_lr_scales(opt, cfg.warmup_steps)
    elif "relt" in options:
        release_lr_scales(opt, cfg.child_steps)


def train_arm(
    model: nn.Module,
    data: Dataset,
    opt: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    seed: int,
    evals: list[int],
    label: str | bool,
    regime: str,
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
        "lr_at": cfg.lr_at(regime),
    }
    if cfg.nproc <= 1:
        return [dict(r) for r in train(model, data, opt, progress=label, **kwargs)]
    from stablemorph.experiment.launch import launch

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

    model, opt = copy.deepcopy((model, opt))
    attach_release(opt)  # the copy keeps the release's state, not its hooks
    data = load_data(cfg)
    records = [dict(r) for r in train(DistributedDataParallel(model), data, opt, **kwargs)]
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
        "moved": arm.moved,
    }
