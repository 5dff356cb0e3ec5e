"""What is transformer-specific in a GPT growth; the contract itself is
:func:`stablemorph.morphs.contract.run_morph`, as for every morph.

A growth takes :class:`Options` (checked once) and either edits the deep copy itself
(:mod:`~stablemorph.transformer.mlp_width`: ``sm.widen`` of each block's ``mlp.fc``, through
:func:`run_morph_on_gpt`) or only works out the child's :class:`GPTConfig` and parameter
values (:mod:`~stablemorph.transformer.heads`, :mod:`~.stream`, :mod:`~.depth`: a
:class:`ChildParams`, float64, each value with its :class:`~stablemorph.record.ParamOrigin`
and the parent parameter it stands in for). :func:`run_growth` hands that to ``run_morph``,
which deep-copies the parent, verifies the child on a probe batch of token ids in eval and
train mode against the one tolerance table (:func:`stablemorph.verify.default_tolerance`),
counts zeros and records the morph; here the copy is rebuilt from the new config
(:func:`rebuild`) with the parent's device, dtype, train/eval mode, per-parameter
``requires_grad`` and submodule hooks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from stablemorph.morphs.contract import (
    SCHEMES,
    MorphError,
    Surgery,
    check_scheme,
    model_device,
    model_dtype,
    refuse_wrapped,
    run_morph,
)
from stablemorph.record import ParamOrigin
from stablemorph.schemes import step_rule_on
from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.sgd_rule import with_growth_advice

__all__ = ["SCHEMES", "GrowthOptions", "GrowthVerificationError", "Options"]

PROBE_BATCH = 4
PROBE_LEN = 16
#: ``stable``'s default scale of new outgoing weights (:mod:`~.units` says why 0.1).
DEFAULT_OUT_SCALE = 0.1

#: A growth that does not preserve the logits fails like every morph (kept as an alias).
GrowthVerificationError = MorphError


def check_parent(op: str, model: nn.Module) -> None:
    """Refuse DDP wrappers (pointing to ``morph_ddp``); raise ``TypeError`` for a model that
    is not a :class:`GPT`."""
    refuse_wrapped(model)
    if not isinstance(model, GPT):
        raise TypeError(f"{op}: expects a stablemorph.transformer.GPT, got {type(model).__name__}")


class GrowthOptions(TypedDict, total=False):
    """The keyword options every growth takes (:class:`Options` holds their defaults)."""

    scheme: str
    seed: int
    probe: Tensor | None
    tol: float | None
    out_scale: float
    step_rule: bool | None


@dataclass(frozen=True)
class Options:
    """A growth's options: ``scheme`` (``"stable"``, ``"netmorph"``, ``"net2net"``);
    ``seed`` (every random choice); ``probe``: token ids ``(B, T)`` for the self-check
    (default: a fixed random batch); ``tol``: the largest relative logit deviation accepted
    (default by dtype, :func:`stablemorph.verify.default_tolerance`); ``out_scale``
    (``stable``): the rms of new outgoing weights relative to the existing ones';
    ``step_rule``: record the SGD multiplier of :mod:`~stablemorph.transformer.sgd_rule`
    (``None``: the scheme's default, on for ``stable`` only; ``True`` offers it to a
    baseline)."""

    scheme: str = "stable"
    seed: int = 0
    probe: Tensor | None = None
    tol: float | None = None
    out_scale: float = DEFAULT_OUT_SCALE
    step_rule: bool | None = None

    @classmethod
    def check(cls, op: str, model: nn.Module, options: Mapping[str, Any]) -> Options:
        """The options of growth ``op`` of ``model``, checked (the model first: a DDP wrapper
        or a non-GPT is refused before anything else)."""
        check_parent(op, model)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{op}() got unexpected keyword arguments {unknown}")
        opts = cls(**options)
        check_scheme(opts.scheme)
        if not (isinstance(opts.out_scale, int | float) and 0 < opts.out_scale < float("inf")):
            raise MorphError(f"{op}: out_scale must be a positive finite number, got "
                             f"{opts.out_scale!r}")
        if opts.step_rule is not None and not isinstance(opts.step_rule, bool):
            raise MorphError(f"{op}: step_rule must be True, False or None (the scheme's "
                             f"default), got {opts.step_rule!r}")
        return opts

    def recipe(self, **sizes: Any) -> dict[str, Any]:
        """The JSON-able kwargs the growth's record keeps (``sizes`` first; ``step_rule``
        only when given)."""
        rule = {} if self.step_rule is None else {"step_rule": self.step_rule}
        return {**sizes, "scheme": self.scheme, "seed": self.seed, "out_scale": self.out_scale,
                **rule}


def check_blocks(op: str, model: GPT, blocks: Sequence[int] | None, size: str, new: int,
                 describe: Callable[[int], str]) -> list[int]:
    """The block indices to act on (all when ``None``), each checked to exist and to have its
    :class:`BlockSpec` field ``size`` smaller than ``new`` (``describe(current)`` words the
    current value in the error)."""
    n = model.config.n_layer
    for b in range(n) if blocks is None else blocks:
        if not isinstance(b, int) or not 0 <= b < n:
            raise MorphError(f"{op}: unknown block index {b!r}; the model has blocks 0..{n - 1}")
        current = getattr(model.config.blocks[b], size)
        if new <= current:
            raise MorphError(f"{op}: {size}={new} is not larger than block {b}'s "
                             f"{describe(current)}")
    return list(range(n)) if blocks is None else sorted(set(blocks))


def blocks_of(op: str, target: str, part: str) -> list[int] | None:
    """Block indices named by a morph target: ``"blocks.0.mlp,blocks.2.mlp"`` (``.{part}``
    optional) -> ``[0, 2]``; ``""`` or ``"blocks"``: every block (``None``)."""
    if target in ("", "blocks"):
        return None
    pattern = re.compile(rf"blocks\.(\d+)(\.{part})?")
    found = [pattern.fullmatch(t.strip()) for t in target.split(",")]
    if not all(found):
        raise MorphError(f"{op}: target {target!r} names no blocks; use e.g. "
                         f"'blocks.0.{part},blocks.1.{part}', or 'blocks' for every block")
    return [int(m.group(1)) for m in found if m]


def blocks_target(blocks: Sequence[int], part: str) -> str:
    return ",".join(f"blocks.{b}.{part}" for b in blocks)


def rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


@dataclass
class ChildParams:
    """The child's parameters under construction, by child parameter name.

    ``values`` are float64 tensors; ``origins`` say how each came from the parent;
    ``analogue`` names the parent parameter each child parameter stands in for (its
    ``requires_grad``, and a fresh parameter's ``stand_in`` for optimisers); ``new`` names
    parameters of new modules (a copy there counts as new). :meth:`from_parent` starts with
    every parameter unchanged.
    """

    values: dict[str, Tensor]
    origins: dict[str, ParamOrigin]
    analogue: dict[str, str]
    new: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_parent(cls, model: GPT) -> ChildParams:
        named = dict(model.named_parameters())
        return cls(
            values={n: p.detach().to(torch.float64, copy=True) for n, p in named.items()},
            origins={n: ParamOrigin(n) for n in named},
            analogue={n: n for n in named},
        )

    def set(self, name: str, value: Tensor, origin: ParamOrigin, analogue: str) -> None:
        self.values[name] = value
        self.origins[name] = origin
        self.analogue[name] = analogue

    def changed(self) -> list[str]:
        """Names of new parameters and of those whose values differ from their source."""
        return [
            n for n, o in self.origins.items()
            if o.source is None or o.index is not None or n in self.new
        ]

    def recorded_origins(self) -> dict[str, ParamOrigin]:
        """The origins, fresh ones with their analogue as ``stand_in``."""
        return {n: ParamOrigin(None, stand_in=self.analogue[n], lr_scale=o.lr_scale)
                if o.source is None and o.stand_in is None else o
                for n, o in self.origins.items()}


def dup_origin(source: str, dim: int, index: Tensor, scale: Tensor | None = None) -> ParamOrigin:
    return ParamOrigin(source, dim=dim, index=index.long(), scale=scale)


def token_probe(model: GPT, shape: Sequence[int] | None = None) -> Tensor:
    """A fixed batch of random token ids (default ``(4, min(16, block_size))``) on the model's
    device."""
    cfg = model.config
    shape = (PROBE_BATCH, min(PROBE_LEN, cfg.block_size)) if shape is None else tuple(shape)
    ids = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(1234))
    return ids.to(model_device(model))


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
          "_backward_pre_hooks")


def rebuild(child: GPT, config: GPTConfig, params: ChildParams,
            rename: Callable[[str], str] = lambda name: name) -> None:
    """Rebuild ``child`` in place as ``GPT(config)`` holding ``params``' values, keeping its
    device, dtype, train/eval mode, (through each parameter's analogue) requires_grad, and
    the hooks registered on its submodules (moved to the submodule of the same name, after
    ``rename``; a note lists them)."""
    before = dict(child.named_parameters())
    hooked = {name: m for name, m in child.named_modules()
              if name and any(getattr(m, h) for h in _HOOKS)}
    with torch.random.fork_rng(devices=[]):  # GPT's initialisation draws from the global RNG
        fresh = GPT(config)
    fresh.to(device=model_device(child), dtype=model_dtype(child))
    named = dict(fresh.named_parameters())
    if set(named) != set(params.values):
        raise RuntimeError(f"internal: child parameters and plan disagree on "
                           f"{sorted(set(named) ^ set(params.values))}")
    with torch.no_grad():
        for name, p in named.items():
            value = params.values[name]
            if value.shape != p.shape:
                raise RuntimeError(f"internal: {name} planned {tuple(value.shape)}, built "
                                   f"{tuple(p.shape)}")
            p.copy_(value.to(p.dtype))
            p.requires_grad_(before[params.analogue[name]].requires_grad)
    fresh.train(child.training)
    modules = dict(fresh.named_modules())
    for name, old in hooked.items():
        for h in _HOOKS:  # whole dicts: hook ids and their kwargs/always-called flags agree
            setattr(modules[rename(name)], h, getattr(old, h))
    if hooked:
        params.notes.append(f"hooks carried over on {sorted(hooked)}")
    for name, module in fresh.named_children():
        setattr(child, name, module)
    child.config = config


def as_morph(op: str, growth: Callable[..., GPT],
             parse: Callable[[str], dict[str, Any]]) -> Callable[..., GPT]:
    """``growth`` as a morph, ``morph(model, target, **kwargs)`` (an entry of
    :data:`stablemorph.morphs.MORPHS`): ``parse(target)`` gives the growth's block arguments;
    ``inputs`` is the token-id probe, ``input_shape`` (what a record keeps) a random one."""

    def morph(model: GPT, target: str, *, inputs: Tensor | None = None,
              input_shape: Sequence[int] | None = None, **kwargs: Any) -> GPT:
        check_parent(op, model)
        if inputs is None and input_shape is not None:
            inputs = token_probe(model, input_shape)
        return growth(model, **parse(target), probe=inputs, **kwargs)

    morph.__name__ = morph.__qualname__ = op
    morph.__doc__ = f"``{growth.__name__}`` as a morph; ``target``: see its docstring."
    return morph


def run_morph_on_gpt(
    op: str,
    model: GPT,
    target: str,
    opts: Options,
    recipe: dict[str, Any],
    surgery: Callable[[GPT, tuple[Tensor, ...]], Surgery],
) -> GPT:
    """:func:`~stablemorph.morphs.contract.run_morph` for a GPT, verified on ``opts.probe``
    (default :func:`token_probe`); ``recipe``: the record's kwargs. With the step rule
    (``opts.step_rule``, default on for ``stable``) the surgery's origins get the SGD
    multiplier measured on the probe (:mod:`~stablemorph.transformer.sgd_rule`)."""
    probe = token_probe(model) if opts.probe is None else opts.probe

    def advised(child: GPT, probe_: tuple[Tensor, ...]) -> Surgery:
        done = surgery(child, probe_)
        if not step_rule_on(opts.scheme, opts.step_rule):
            return done
        return with_growth_advice(model, child, probe_, done)

    return run_morph(op, model, target, opts.scheme, recipe, advised,  # type: ignore[arg-type]
                     probe, None, opts.tol)


def run_growth(
    op: str,
    model: GPT,
    target: str,
    opts: Options,
    recipe: dict[str, Any],
    plan: Callable[[GPT], tuple[GPTConfig, ChildParams]],
    rename: Callable[[str], str] = lambda name: name,
) -> GPT:
    """A growth that plans the child's config and values: ``plan(copy)`` returns them,
    computed from the deep copy of ``model``, which is then :func:`rebuild` from them
    (``rename``: parent module name -> child module name)."""

    def surgery(child: GPT, _probe: tuple[Tensor, ...]) -> Surgery:
        config, params = plan(child)
        rebuild(child, config, params, rename)
        return Surgery(origins=params.recorded_origins(), notes=params.notes,
                       changed=params.changed())

    return run_morph_on_gpt(op, model, target, opts, recipe, surgery)
