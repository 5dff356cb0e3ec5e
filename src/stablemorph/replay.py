"""The parent's module calls replayed in the child's check, where they are provably the same.

A morph changes one part of a model; every module call of the child before that part gets the
same input as in the parent and, being the same module with the same parameters, computes the
same output. :func:`stablemorph.verify.compare` runs the child with such calls answered from
the parent's own run on the same probe (a copy of the recorded output), so the prefix of the
forward is not computed twice. What is compared is still the child's whole output.

A call is replayed only when all of this holds, checked at the time:

- the parent is unchanged since it was recorded (the same module objects and tensors at the
  same in-place versions, :mod:`stablemorph.probe_outputs`' fingerprint), on an equal probe,
  in the same mode;
- the child's module and the parent's at the same path are the same module: same class, equal
  plain attributes (numbers, strings, shapes, dtypes; any other attribute must be the same
  object), parameters and buffers equal element for element, the same for every submodule,
  and no hooks anywhere in it (a replayed module's submodules do not run) nor global ones;
- the call's positional inputs equal the recorded ones element for element (keyword inputs or
  non-tensor inputs: never replayed), the recorded tensors not modified in place since, the
  module not modifying its input in place, its output one tensor.

Not detected: a forward that reads state outside its module (globals, other modules by
reference) changed between the parent's run and the child's check (as for the remembered
outputs of :mod:`stablemorph.probe_outputs`, call ``probe_outputs.forget`` and
:func:`forget` after such a change), and random draws: a replayed call does not draw, so the
stream after it differs from the parent's, which makes the check miss, never pass where a full
run would miss; :func:`stablemorph.morphs.contract.run_morph` re-runs a replayed check that
misses its tolerance without replay before judging it.

The records (references to the activations of one run per mode: about the memory of one
forward's activations per mode) are kept per model, of its last check or reference run, at
most :data:`MAX_ELEMENTS` elements; they die with the model (weak references).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from stablemorph import probe_outputs

#: the most tensor elements (the distinct inputs and outputs of the recorded calls, all modes)
#: held for one model (ResNet-18 on a 4x3x32x32 probe: 16M): a run that reaches it lets go of
#: its records at once (the extra memory a check holds is bounded by it) and keeps nothing
MAX_ELEMENTS = 1 << 25

#: module attributes that are not compared: the containers compared one by one, the hooks
#: (which must be empty), and the train/eval flag (set alike for both runs by the check)
_STATE = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                    "training"})
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


@dataclass
class Call:
    """One recorded call: its positional inputs and output (references) with their in-place
    versions at the time."""

    inputs: tuple[Tensor, ...]
    versions: tuple[int, ...]
    output: Tensor
    version: int

    def matches(self, args: tuple[Any, ...]) -> bool:
        """Whether ``args`` equal the recorded inputs element for element, the recorded
        tensors still as they were."""
        if len(args) != len(self.inputs) or self.output._version != self.version:
            return False
        return all(isinstance(a, Tensor) and t._version == v and a.shape == t.shape
                   and a.dtype == t.dtype and a.device == t.device and torch.equal(a, t)
                   for a, t, v in zip(args, self.inputs, self.versions, strict=True))


#: mode -> module path -> its calls in order (``None``: a call that cannot be replayed)
Calls = dict[str, dict[str, list[Call | None]]]


@dataclass
class _Entry:
    fingerprint: Any
    probe: tuple[Tensor, ...]
    calls: Calls


_STORE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _tensors(args: tuple[Any, ...]) -> bool:
    return all(isinstance(a, Tensor) for a in args)


@dataclass
class Recorder:
    """Records every submodule call of ``model`` (:meth:`mode`), then keeps the records for
    the next check that has ``model`` as its parent (:meth:`keep`)."""

    model: nn.Module
    calls: Calls = field(default_factory=dict)
    elements: int = 0
    seen: set[int] = field(default_factory=set)  # ids of the tensors counted in elements
    full: bool = False  # over MAX_ELEMENTS: nothing recorded, nothing kept

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Inside the block, the submodules' calls are recorded as ``mode``'s."""
        calls: dict[str, list[Call | None]] = {}
        self.calls[mode] = calls
        stacks: dict[str, list[tuple[tuple[Tensor, ...], tuple[int, ...]] | None]] = {}
        handles = []
        for path, module in self.model.named_modules():
            if path:  # the root is never replayed
                handles.append(module.register_forward_pre_hook(
                    functools.partial(self._before, path, stacks), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    functools.partial(self._after, path, stacks, calls), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _before(self, path: str, stacks: dict, _module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> None:
        entry = None
        if not kwargs and not self.full and _tensors(args):
            with contextlib.suppress(RuntimeError):  # an inference tensor has no version
                entry = (args, tuple(a._version for a in args))
        stacks.setdefault(path, []).append(entry)

    def _after(self, path: str, stacks: dict, calls: dict, _module: nn.Module,
               args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        entry = stacks[path].pop() if stacks.get(path) else None
        if self.full:
            return
        call = None
        if entry is not None and isinstance(output, Tensor):
            inputs, versions = entry
            with contextlib.suppress(RuntimeError):
                if all(a._version == v for a, v in zip(inputs, versions, strict=True)):
                    call = Call(inputs, versions, output, output._version)
                    for t in (output, *inputs):
                        if id(t) not in self.seen:
                            self.seen.add(id(t))
                            self.elements += t.numel()
        if self.elements > MAX_ELEMENTS and not self.full:
            # over the limit: let go of every reference now (the forward then frees its
            # activations as it would without recording) and record nothing more
            self.full = True
            self.seen.clear()
            for by_path in self.calls.values():
                by_path.clear()
            return
        calls.setdefault(path, []).append(call)

    def keep(self, probe: Any, plan: Plan | None = None) -> None:
        """Keep the records for ``model`` on ``probe`` (call it once the model's state is
        restored); the submodules of a module replayed in every call take the parent's records
        (they did not run), those of one replayed only in some calls have none."""
        if self.full or not probe_outputs._plain(probe):
            _STORE.pop(self.model, None)
            return
        if plan is not None:
            plan.inherit(self.calls)
        _STORE[self.model] = _Entry(probe_outputs._fingerprint(self.model),
                                    tuple(t.detach() for t in probe), self.calls)


def _same_own(a: nn.Module, b: nn.Module) -> bool:
    """``a`` and ``b`` alike as modules, apart from their submodules and their tensors' values
    (:func:`_same_values`, checked only for a call about to be replayed)."""
    if type(a) is not type(b) or a._modules.keys() != b._modules.keys():
        return False
    for m in (a, b):
        if any(getattr(m, k) for k in vars(m) if k.endswith("hooks")):
            return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    for key, x in va.items():
        if key in _STATE or "hook" in key:  # the hooks themselves: empty, checked above
            continue
        y = vb[key]
        if x is not y and not (isinstance(x, _PLAIN) and type(x) is type(y) and x == y) \
                and not (isinstance(x, tuple | list) and type(x) is type(y)
                         and all(isinstance(e, _PLAIN) for e in x) and x == y):
            return False
    return _alike(a._parameters, b._parameters) and _alike(a._buffers, b._buffers)


def _alike(a: dict[str, Tensor | None], b: dict[str, Tensor | None]) -> bool:
    """The same names, each ``None`` in both or a tensor of one shape, dtype and device."""
    return a.keys() == b.keys() and all(
        (x is None) == (b[k] is None) and (x is None or (
            x.shape == b[k].shape and x.dtype == b[k].dtype and x.device == b[k].device))
        for k, x in a.items())


def _same_values(a: nn.Module, b: nn.Module) -> bool:
    """Every parameter and buffer of ``a`` (submodules included) equal to ``b``'s element for
    element (``a`` and ``b`` alike by :func:`_equal_modules`)."""
    pairs = zip(a.modules(), b.modules(), strict=True)
    return all(x is y or (x is None and y is None) or torch.equal(x, y)
               for m, n in pairs for store in ("_parameters", "_buffers")
               for x, y in zip(getattr(m, store).values(), getattr(n, store).values(),
                               strict=True))


def _equal_modules(child: nn.Module, parent: nn.Module, path: str, found: list[str]) -> bool:
    """Whether ``child`` and ``parent`` are the same module (module docstring); the paths of
    the largest equal submodules are collected in ``found``."""
    equal = _same_own(child, parent)
    for name, c in child._modules.items():
        p = parent._modules.get(name)
        if c is None or p is None:
            equal = equal and c is None and p is None
            continue
        equal = _equal_modules(c, p, f"{path}.{name}" if path else name, found) and equal
    if equal and path:
        found[:] = [f for f in found if not f.startswith(f"{path}.")]
        found.append(path)
    return equal


class Plan:
    """Which of ``child``'s modules answer from ``parent``'s records (module docstring), and
    the patching that does it (:meth:`mode`)."""

    def __init__(self, parent: nn.Module, child: nn.Module, probe: Any) -> None:
        self.child, self.parent = child, parent
        self.source: Calls = {}
        self.values: dict[str, bool] = {}  # path -> its tensors equal the parent's
        self.hits: set[str] = set()  # the paths replayed at least once
        self.paths: list[str] = []
        self.replayed = 0
        self.active: set[tuple[str, str]] = set()  # (mode, path) patched
        self.partial: set[tuple[str, str]] = set()  # (mode, path) that also ran
        entry = _STORE.get(parent)
        if entry is None or torch_module._global_forward_hooks or \
                torch_module._global_forward_pre_hooks or \
                not probe_outputs._same_probe(entry.probe, probe) or \
                entry.fingerprint != probe_outputs._fingerprint(parent):
            return
        self.source = entry.calls
        found: list[str] = []
        _equal_modules(child, parent, "", found)
        recorded = {p for calls in self.source.values() for p in calls}
        self.paths = [p for p in found if p in recorded]

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Inside the block, the planned modules of ``child`` answer ``mode``'s recorded calls
        (those that match) with a copy of the recorded output."""
        patched: list[tuple[nn.Module, Any]] = []
        calls = self.source.get(mode, {})
        try:
            for path in self.paths:
                if calls.get(path):
                    module = self.child.get_submodule(path)
                    patched.append((module, module.__dict__.get("forward")))
                    self.active.add((mode, path))
                    module.forward = self._replaying(mode, path, module.forward, calls[path])
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = own

    def _replaying(self, mode: str, path: str, forward: Any, calls: list[Call | None]) -> Any:
        count = 0

        def replay(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            call = calls[count] if count < len(calls) else None
            count += 1
            if call is not None and not kwargs and call.matches(args) and self._equal(path):
                self.replayed += 1
                self.hits.add(path)
                return call.output.clone()
            self.partial.add((mode, path))
            return forward(*args, **kwargs)

        return replay

    def _equal(self, path: str) -> bool:
        if path not in self.values:
            self.values[path] = _same_values(self.child.get_submodule(path),
                                             self.parent.get_submodule(path))
        return self.values[path]

    def inherit(self, calls: Calls) -> None:
        """Give the new records ``calls`` the parent's records of the submodules of every
        module replayed in all its calls; drop those of a module replayed in some only."""
        for mode, by_path in calls.items():
            source = self.source.get(mode, {})
            for path in [p for m, p in self.active if m == mode]:
                prefix = f"{path}."
                for name in [p for p in by_path if p.startswith(prefix)]:
                    del by_path[name]
                if (mode, path) not in self.partial:
                    by_path.update({p: c for p, c in source.items() if p.startswith(prefix)})


def forget(model: nn.Module | None = None) -> None:
    """Drop the records of ``model`` (of every model when None)."""
    if model is None:
        _STORE.clear()
    else:
        _STORE.pop(model, None)
