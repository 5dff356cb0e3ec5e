"""Check that a child computes the same function as its parent, on a probe batch, in eval
mode and in train mode (BatchNorm on batch statistics), without side effects on either.

Probes (:class:`Probe`): what the model's forward accepts: one tensor, a sequence of
positional tensors, or a dict of keyword arguments (a tokenizer's output: ``model(**inputs)``,
integer token ids and attention masks included).

Outputs: every tensor in any output structure is compared: tensors, dicts (``OrderedDict`` and
Hugging Face ``ModelOutput`` included), dataclasses, named tuples, lists, tuples and other
objects' attributes. Parent and child must return the same structure (same types, keys,
non-tensor values and shapes); an output with no tensor is refused, as is an empty probe.

Deviation measures, per output tensor, worst over tensors:

- ``max_abs``: the largest ``|child - parent|`` element;
- ``max_rel``: ``max |child - parent| / max |parent|`` (relative to the tensor's scale rather
  than element-wise, so outputs that happen to be near zero do not blow it up).

The noise floor: float arithmetic makes the parent deviate from its own exact function. For a
model below float64, :func:`verify` also runs a float64 copy of the parent on the same probe
(one extra forward per mode) and measures ``noise_abs``, the largest ``|parent - parent64|``
per tensor. :meth:`VerifyReport.ok` accepts a tensor when ``max_rel <= tol`` (the one
:func:`default_tolerance` table) *or* when ``max_abs <= NOISE_FACTOR * noise_abs`` (the child is
as exact as the parent's own arithmetic allows: e.g. near-zero outputs, BatchNorm batch
statistics on 1x1 maps). An explicit ``tol`` passed to ``ok(tol, noise=False)`` judges by
``max_rel`` alone.

Both models are restored afterwards: module train/eval flags and every buffer (BatchNorm
running statistics and batch counters) are exactly as before the call. In train mode,
``nn.Dropout`` modules are kept in eval mode and the global RNG is re-seeded identically
before each forward (inside ``torch.random.fork_rng``: the caller's RNG streams do not move),
so stochastic layers do not count as deviation. The child's outputs are remembered
(:mod:`stablemorph.probe_outputs`): when it is the parent of the next check on the same
probe, unchanged, :func:`reference` does not run it again (its float64 noise floor still
runs). Given the parent, :func:`compare` answers the child's module calls that are provably
the parent's (the same module and input, :mod:`stablemorph.replay`) from the parent's recorded
run instead of computing them again: the output compared is still the child's whole output.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph import probe_outputs, replay

MODES = ("eval", "train")

#: The largest accepted ``max_rel`` per parameter dtype (the one table every check uses).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}
#: A child is also exact when its deviation is at most this many times the parent's own
#: float noise (the parent in its dtype vs a float64 copy, on the same probe).
NOISE_FACTOR = 16.0

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PLAIN = (int, bool, str, bytes, type(None))


class VerifyError(ValueError):
    """The check could not be made. ``who`` is ``"parent"``, ``"child"`` or ``"probe"``:
    which side failed (a parent failing on the probe means the probe does not fit the model)."""

    def __init__(self, message: str, who: str) -> None:
        super().__init__(message)
        self.who = who


def default_tolerance(dtype: torch.dtype) -> float:
    """The largest ``max_rel`` a morph accepts for a model of this dtype (:data:`TOLERANCE`;
    float32's for other dtypes)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------------------------
# probes


class Probe(tuple):
    """Positional inputs (the tuple itself) plus keyword inputs (``kwargs``): the model is
    called as ``model(*probe, **probe.kwargs)`` (:meth:`run`)."""

    kwargs: dict[str, Any]

    def __new__(cls, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                ) -> Probe:
        self = super().__new__(cls, tuple(args))
        self.kwargs = dict(kwargs or {})
        return self

    @classmethod
    def of(cls, inputs: Any) -> Probe:
        """A probe from what a caller passes as ``inputs``: a :class:`Probe`, a tensor, a
        mapping of keyword arguments (``model(**inputs)``; a tokenizer's ``BatchEncoding``
        too) or a sequence of positional inputs."""
        if isinstance(inputs, Probe):
            return inputs
        if isinstance(inputs, Tensor):
            return cls((inputs,))
        if isinstance(inputs, Mapping):
            bad = [k for k in inputs if not isinstance(k, str)]
            if bad:
                raise VerifyError(f"probe dict keys must be argument names (str), got {bad[0]!r}",
                                  "probe")
            return cls((), dict(inputs))
        if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
            return cls(tuple(inputs))
        raise VerifyError(
            f"inputs must be a tensor, a sequence of positional inputs or a dict of keyword "
            f"inputs, got {type(inputs).__name__}", "probe")

    def tensors(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) for every tensor in the probe (nested containers walked)."""
        named = [(f"input {k}", v) for k, v in enumerate(self)]
        named += [(f"input {k!r}", v) for k, v in self.kwargs.items()]
        return [(f"{name}{path}", t) for name, value in named for path, t in _leaves(value)]

    def map(self, fn: Any) -> Probe:
        """A probe with ``fn`` applied to every tensor."""
        return Probe(tuple(_map(v, fn) for v in self),
                     {k: _map(v, fn) for k, v in self.kwargs.items()})

    def run(self, model: nn.Module) -> Any:
        return model(*self, **self.kwargs)

    def check(self) -> None:
        """Refuse a probe with no tensor, an empty batch, or non-finite floats."""
        tensors = self.tensors()
        if not tensors:
            raise VerifyError("the probe holds no tensor: nothing would be compared", "probe")
        for name, t in tensors:
            if t.device.type == "meta":
                raise VerifyError(f"{name} is on the meta device (no values)", "probe")
            if t.numel() == 0:
                raise VerifyError(f"the probe is empty: {name} has shape {tuple(t.shape)}; "
                                  f"pass a batch of at least one sample", "probe")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise VerifyError(f"the probe holds NaN or inf: {name} (a probe must be finite "
                                  f"for a deviation to mean anything)", "probe")

    def cuda_devices(self) -> list[int]:
        return sorted({t.device.index or 0 for _, t in self.tensors() if t.is_cuda})


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)({k: _map(v, fn) for k, v in value.items()}) \
            if type(value) is dict else {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_map(v, fn) for v in value)
    return value


def _to_float64(t: Tensor) -> Tensor:
    return t.double() if t.is_floating_point() else t


# ----------------------------------------------------------------------------------------------
# output structures


def _leaves(out: Any, path: str = "") -> list[tuple[str, Tensor]]:
    """(path, tensor) for every tensor in ``out``."""
    leaves: list[tuple[str, Tensor]] = []
    _walk(out, path, leaves, [])
    return leaves


def _walk(out: Any, path: str, leaves: list[tuple[str, Tensor]], shape: list[str]) -> None:
    """Collect tensors into ``leaves`` and a description of the structure into ``shape``."""
    if isinstance(out, Tensor):
        leaves.append((path, out))
        shape.append(f"{path}: tensor of shape {tuple(out.shape)}")
    elif isinstance(out, float):
        leaves.append((path, torch.tensor(out, dtype=torch.float64)))
        shape.append(f"{path}: float")
    elif isinstance(out, _PLAIN):
        shape.append(f"{path}: {out!r}")
    elif isinstance(out, Mapping):
        shape.append(f"{path}: {type(out).__name__} keys {sorted(map(str, out))}")
        for key in sorted(out, key=str):
            _walk(out[key], f"{path}[{key!r}]", leaves, shape)
    elif isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        shape.append(f"{path}: {type(out).__name__}")
        for name, value in zip(out._fields, out, strict=True):
            _walk(value, f"{path}.{name}", leaves, shape)
    elif isinstance(out, list | tuple):
        shape.append(f"{path}: {type(out).__name__} of {len(out)}")
        for k, value in enumerate(out):
            _walk(value, f"{path}[{k}]", leaves, shape)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        shape.append(f"{path}: {type(out).__name__}")
        for f in dataclasses.fields(out):
            _walk(getattr(out, f.name), f"{path}.{f.name}", leaves, shape)
    elif hasattr(out, "__dict__") and not isinstance(out, nn.Module | type):
        shape.append(f"{path}: {type(out).__name__}")
        for name, value in sorted(vars(out).items()):
            if not name.startswith("_") and not callable(value):
                _walk(value, f"{path}.{name}", leaves, shape)
    else:
        shape.append(f"{path}: {type(out).__name__}")


def _structure(out: Any) -> tuple[list[tuple[str, Tensor]], list[str]]:
    leaves: list[tuple[str, Tensor]] = []
    shape: list[str] = []
    _walk(out, "output", leaves, shape)
    return leaves, shape


# ----------------------------------------------------------------------------------------------
# running models


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s module modes and buffers (BN running statistics) on exit."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def capture_inputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Inside the block: the first positional input each of ``modules`` (name -> module)
    receives in eval mode, by name (a detached copy: later in-place writes of the forward do
    not reach it); a module never called in eval mode is absent. Lets a morph measure on its
    verification's own forward instead of running the model again; hooks removed on exit."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():
        def keep(module: nn.Module, args: tuple[Any, ...], _out: Any, name: str = name
                 ) -> None:
            if not module.training and name not in seen and args and \
                    isinstance(args[0], Tensor):
                seen[name] = args[0].detach().clone()
        handles.append(module.register_forward_hook(keep))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _set_mode(model: nn.Module, mode: str) -> None:
    model.train(mode == "train")
    if mode == "train":
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.eval()


def refuse_meta(model: nn.Module, who: str = "model") -> None:
    """Refuse a model with parameters or buffers on the meta device (they hold no values)."""
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if t.device.type == "meta":
                raise VerifyError(
                    f"the {who}'s {kind} {name!r} is on the meta device (shapes only, no "
                    f"values): materialise the model first (model.to_empty(device=...) and load "
                    f"its weights)", who)


def _run(model: nn.Module, probe: Probe, mode: str, seed: int, who: str) -> Any:
    _set_mode(model, mode)
    with torch.random.fork_rng(devices=probe.cuda_devices()):  # the caller's RNG stays put
        torch.manual_seed(seed)
        try:
            return probe.run(model)
        except Exception as err:
            hint = ""
            if who == "parent":
                hint = ("; the probe does not fit the model's forward: pass inputs= as the "
                        "model takes them (a tensor, a tuple of positional inputs, or a dict "
                        "of keyword inputs such as a tokenizer's output)")
            elif isinstance(err, AttributeError):
                hint = "; does forward read the replaced layer's attributes directly?"
            if isinstance(err, torch.OutOfMemoryError | MemoryError) or \
                    "allocate" in str(err).lower():
                hint = "; out of memory"
            raise VerifyError(f"running the {who} on the probe batch failed in {mode} mode "
                              f"({type(err).__name__}: {err}){hint}", who) from err


@dataclass
class Reference:
    """The parent's outputs on a probe, per mode: tensors by path, the structure, and the
    float noise floor per tensor (``None`` when not measured)."""

    probe: Probe
    outputs: dict[str, list[tuple[str, Tensor]]]
    structure: dict[str, list[str]]
    noise: dict[str, list[float] | None]
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def reference(parent: nn.Module, inputs: Any, modes: Sequence[str] = MODES, *,
              noise_floor: bool = True) -> Reference:
    """Run ``parent`` on ``inputs`` in each mode (state restored) and, when ``noise_floor``
    and the model is below float64, a float64 copy of it: the parent's own float noise.

    Raises:
        VerifyError: a bad probe (empty, NaN, no tensor), a meta-device model, the parent
            failing on the probe, an output with no tensor, or NaN/inf in the parent's output.
    """
    probe = Probe.of(inputs)
    probe.check()
    refuse_meta(parent, "parent")
    outputs: dict[str, list[tuple[str, Tensor]]] = {}
    structure: dict[str, list[str]] = {}
    noise: dict[str, list[float] | None] = {}
    notes: list[str] = []
    recorder = replay.Recorder(parent)  # its calls, for a child's check to replay
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        known = probe_outputs.lookup(parent, probe, mode)  # it was the last checked child
        if known is not None:
            outputs[mode], structure[mode] = known
            continue
        with preserved_state(parent), recorder.mode(mode):
            out = _run(parent, probe, mode, 0, "parent")
        leaves, shape = _structure(out)
        if not leaves:
            raise VerifyError(f"the parent's output holds no tensor ({type(out).__name__}): "
                              f"nothing to compare", "parent")
        for path, t in leaves:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise VerifyError(f"the parent's {path} holds NaN or inf on this probe "
                                  f"({mode} mode): no deviation can be measured", "parent")
        outputs[mode], structure[mode] = [(p, t.detach().clone()) for p, t in leaves], shape
    if recorder.calls:
        recorder.keep(probe)
    dtypes = {p.dtype for p in parent.parameters() if p.is_floating_point()}
    if not noise_floor or not dtypes or dtypes == {torch.float64}:
        return Reference(probe, outputs, structure, dict.fromkeys(outputs), notes)
    try:
        base = getattr(parent, "_orig_mod", parent)  # a torch.compile'd model: its module
        double = copy.deepcopy(base).double()
    except Exception as err:  # an uncopyable model: no floor, the fixed tolerance only
        notes.append(f"no float64 noise floor (copying the parent failed: {err})")
        return Reference(probe, outputs, structure, dict.fromkeys(outputs), notes)
    probe64 = probe.map(_to_float64)
    for mode in modes:
        try:
            leaves64, _ = _structure(_run(double, probe64, mode, 0, "parent"))
        except VerifyError as err:
            notes.append(f"no float64 noise floor in {mode} mode ({err})")
            noise[mode] = None
            continue
        if [p for p, _ in leaves64] != [p for p, _ in outputs[mode]]:
            noise[mode] = None
            continue
        noise[mode] = [_max_abs(t, t64) for (_, t), (_, t64) in
                       zip(outputs[mode], leaves64, strict=True)]
    return Reference(probe, outputs, structure, noise, notes)


def _max_abs(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class TensorDeviation:
    """One output tensor in one mode: ``path`` (e.g. ``output['logits']``), the child's
    deviation and the parent's float noise (``None``: not measured)."""

    mode: str
    path: str
    max_abs: float
    max_rel: float
    noise_abs: float | None = None
    noise_rel: float | None = None

    def ok(self, tol: float, noise: bool = True) -> bool:
        if self.max_abs != self.max_abs:  # NaN
            return False
        if self.max_rel <= tol:
            return True
        return noise and self.noise_abs is not None and \
            self.max_abs <= NOISE_FACTOR * self.noise_abs


@dataclass
class VerifyReport:
    """Deviation of ``child`` from ``parent``; ``per_mode`` maps ``"eval"``/``"train"`` to
    ``(max_abs, max_rel)``; ``tensors`` holds every compared tensor's deviation and noise;
    ``noise_abs`` / ``noise_rel``: the parent's own float noise (worst over tensors; ``None``
    when not measured: float64 models, or a float64 copy that could not run); ``replayed``:
    the child's module calls answered from the parent's run (:mod:`stablemorph.replay`)."""

    max_abs: float
    max_rel: float
    per_mode: dict[str, tuple[float, float]] = field(default_factory=dict)
    tensors: list[TensorDeviation] = field(default_factory=list)
    noise_abs: float | None = None
    noise_rel: float | None = None
    notes: list[str] = field(default_factory=list)
    replayed: int = 0

    def ok(self, tol: float, noise: bool = True) -> bool:
        """True when every tensor has ``max_rel <= tol`` or (with ``noise``) a deviation
        within :data:`NOISE_FACTOR` times the parent's float noise; NaN is never ok."""
        if self.max_rel != self.max_rel:
            return False
        if not self.tensors:
            return self.max_rel <= tol
        return all(t.ok(tol, noise) for t in self.tensors)

    def describe(self) -> str:
        """One line: the deviation per mode and the noise floor."""
        modes = ", ".join(f"{m}: max_abs={a:.2e} max_rel={r:.2e}"
                          for m, (a, r) in self.per_mode.items())
        if self.noise_abs is None:
            return f"{modes}; noise floor not measured"
        return (f"{modes}; parent's float noise floor (vs float64): max_abs="
                f"{self.noise_abs:.2e} max_rel={self.noise_rel:.2e} (accepted up to "
                f"{NOISE_FACTOR:g}x)")


@torch.no_grad()
def compare(ref: Reference, child: nn.Module, parent: nn.Module | None = None) -> VerifyReport:
    """Run ``child`` on ``ref``'s probe in ``ref``'s modes and measure its deviation.
    ``parent``: the model ``ref`` was taken from; the child's calls that are provably the
    parent's (:mod:`stablemorph.replay`) are answered from its recorded run.

    Raises:
        VerifyError: the child failed on the probe, or returns another output structure
            (different types, keys or shapes; the message gives both).
    """
    refuse_meta(child, "child")
    per_mode: dict[str, tuple[float, float]] = {}
    devs: list[TensorDeviation] = []
    seen: dict[str, tuple[list[tuple[str, Tensor]], list[str]]] = {}
    plan = None if parent is None else replay.Plan(parent, child, ref.probe)
    recorder = replay.Recorder(child)
    for mode, want in ref.outputs.items():
        with preserved_state(child), recorder.mode(mode), \
                plan.mode(mode) if plan is not None else contextlib.nullcontext():
            got, shape = _structure(_run(child, ref.probe, mode, 0, "child"))
        seen[mode] = ([(p, t.detach()) for p, t in got], shape)
        if shape != ref.structure[mode]:
            raise VerifyError(_structure_difference(ref.structure[mode], shape), "child")
        noise = ref.noise.get(mode)
        worst_abs = worst_rel = 0.0
        for k, ((path, w), (_, g)) in enumerate(zip(want, got, strict=True)):
            if w.numel() == 0:
                continue
            diff_abs = _max_abs(g, w)
            scale = float(w.double().abs().max())
            rel = diff_abs / scale if scale > 0 else diff_abs
            n_abs = None if noise is None else noise[k]
            n_rel = None if n_abs is None else (n_abs / scale if scale > 0 else n_abs)
            if diff_abs != diff_abs:  # NaN anywhere: report it, never hide it behind max()
                rel = float("nan")
            devs.append(TensorDeviation(mode, path, diff_abs, rel, n_abs, n_rel))
            worst_abs, worst_rel = (max(worst_abs, diff_abs, key=_nan_first),
                                    max(worst_rel, rel, key=_nan_first))
        per_mode[mode] = (worst_abs, worst_rel)
    if not devs:
        raise VerifyError("every output tensor is empty: nothing was compared", "parent")
    probe_outputs.record(child, ref.probe, seen)
    recorder.keep(ref.probe, plan)
    replayed = 0 if plan is None else plan.replayed
    notes = list(ref.notes) + ([f"{replayed} module calls of the child answered from the "
                                f"parent's run (the same module, parameters and input)"]
                               if replayed else [])
    values = list(per_mode.values())
    noises = [(t.noise_abs, t.noise_rel) for t in devs if t.noise_abs is not None]
    return VerifyReport(
        max_abs=max((v[0] for v in values), default=0.0, key=_nan_first),
        max_rel=max((v[1] for v in values), default=0.0, key=_nan_first),
        per_mode=per_mode,
        tensors=devs,
        noise_abs=max((a for a, _ in noises), default=None),
        noise_rel=max((r for _, r in noises), default=None),
        notes=notes,
        replayed=replayed,
    )


def verify(
    parent: nn.Module,
    child: nn.Module,
    inputs: Any,
    modes: Sequence[str] = MODES,
    *,
    noise_floor: bool = True,
) -> VerifyReport:
    """Run ``parent`` and ``child`` on ``inputs`` in each of ``modes`` and measure how far the
    child's outputs are from the parent's (module docstring).

    Args:
        parent, child: the models; left exactly as they were (modes and buffers).
        inputs: one tensor, a sequence of positional inputs, or a dict of keyword inputs
            (``model(**inputs)``); a train-mode check with BatchNorm needs a batch of at
            least 2.
        modes: any of ``"eval"`` and ``"train"``.
        noise_floor: also measure the parent's float noise with a float64 copy of it.

    Raises:
        VerifyError (a ``ValueError``): an empty probe, NaN/inf in the probe or in the
            parent's output, a meta-device model, an output with no tensor, parent or child
            failing on the probe (``err.who`` says which), or outputs that differ in
            structure or shape (the message gives both).
    """
    return compare(reference(parent, inputs, modes, noise_floor=noise_floor), child, parent)


def _structure_difference(parent: list[str], child: list[str]) -> str:
    """The first difference between two structure descriptions, in words."""
    for a, b in zip(parent, child, strict=False):
        if a == b:
            continue
        path, _, what = a.partition(": ")
        other_path, _, other = b.partition(": ")
        shape = "tensor of shape "
        if path == other_path and what.startswith(shape) and other.startswith(shape):
            return (f"{path}: parent shape {what[len(shape):]} != child shape "
                    f"{other[len(shape):]}")
        return f"the child's output differs in structure from the parent's: parent {a}; child {b}"
    return (f"the child's output differs in structure from the parent's: {len(parent)} "
            f"entries in the parent's, {len(child)} in the child's")


def _nan_first(x: float) -> float:
    return float("inf") if x != x else x
