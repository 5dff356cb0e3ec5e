"""Tracing a model with ``torch.fx`` for analysis, and saying why when fx cannot.

- Every module whose type has a handler (:mod:`stablemorph.handlers`) is one node; so is any
  sub-module fx cannot trace (a Hugging Face attention unpacking shapes, a loop over a
  tensor): it is kept whole, as an opaque node, and tracing is retried, so that the analysis
  works wherever the widened units do not reach it (``gm.meta["opaque"]`` says why each was
  kept whole).
- A root ``forward`` that takes ``*args``/``**kwargs`` through a decorator (Hugging Face's do;
  fx alone fails with "co_varnames is too small") is traced through a stand-in with its
  explicit parameters, the ones the probe does not pass kept at their default values.
- A failure is a :class:`GraphError` that says what fx's error means (fx's messages blame
  "control flow" for a dtype check), names the line of the model's code and keeps fx's own
  words.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from types import ModuleType

import torch.fx as fx
from torch import nn


class GraphError(ValueError):
    """The model cannot be analysed, or a layer name / channel group is unsupported."""


def handlers_module() -> ModuleType:  # late: the handlers import stablemorph.graph
    from stablemorph import handlers

    return handlers


class MorphTracer(fx.Tracer):
    """The default tracer; every module whose type has a handler (and keeps its handler's
    ``forward``) is one leaf node, so is every module named in ``opaque``; the module being
    traced is remembered so that a failure can name it. A root ``forward`` that takes
    ``*args``/``**kwargs`` (directly or through a decorator, as Hugging Face's do) is traced
    through a stand-in with its explicit parameters only (fx cannot patch such code:
    "co_varnames is too small")."""

    def __init__(self, opaque: Sequence[str] = (), inputs: int | None = None) -> None:
        super().__init__()
        self.path: list[str] = []
        self.opaque = set(opaque)
        self.inputs = inputs

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.opaque or handlers_module().is_leaf(m)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return out

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore
        inner = inspect.unwrap(root_fn)
        varstuff = inner.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
        if is_module and concrete_args is None and (varstuff or inner is not root_fn):
            root_fn = _explicit_parameters(root_fn, inner, self.inputs)
        elif is_module and concrete_args is None and self.inputs is not None:
            concrete_args = _unfilled_defaults(inner, self.inputs) or None
        return super().create_args_for_root(root_fn, is_module, concrete_args)


def _unfilled_defaults(fn: Callable[..., object], inputs: int) -> dict[str, object]:
    """The parameters of ``fn`` (an unbound ``forward``: ``self`` first) after its first
    ``inputs`` that have defaults, with them: the probe leaves them at their defaults, so the
    graph is traced with those values (``if mask is None`` sees ``None``, as the probe's call
    does) instead of as inputs fx cannot know."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params[inputs:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def _explicit_parameters(fn: Callable[..., object], inner: Callable[..., object],
                         inputs: int | None) -> Callable[..., object]:
    """A stand-in for ``fn`` (a bound-to-be ``forward``) whose graph inputs are ``inner``'s
    first positional parameters: the required ones, or the first ``inputs`` when more; the
    other parameters keep their defaults as Python values (so that a check such as ``if
    mask is not None`` sees ``None``, as in the probe's call), passed by keyword (decorators
    may add keywords of their own)."""
    params = [p for p in inspect.signature(inner).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in params)
    kept = max(required, 1 + (inputs or 0))
    defaults = [p.default for p in params]
    decl = ", ".join(p.name if p.default is p.empty else f"{p.name}=_defaults[{k}]"
                     for k, p in enumerate(params[:kept]))
    call = ", ".join(
        (p.name if k < kept else f"_defaults[{k}]") if k == 0 or p.kind == p.POSITIONAL_ONLY
        else f"{p.name}={p.name if k < kept else f'_defaults[{k}]'}"
        for k, p in enumerate(params))
    scope: dict[str, object] = {"_fn": fn, "_defaults": defaults}
    exec(f"def forward({decl}):\n    return _fn({call})\n", scope)
    return scope["forward"]  # type: ignore[return-value]


def _fx_cause(err: Exception) -> str:
    """What an fx failure means, in words (fx's own messages often blame control flow), and
    the line of the model's code where it happened."""
    text = str(err)
    if "co_varnames" in text:
        what = ("its forward takes *args/**kwargs through a decorator, which torch.fx cannot "
                "turn into graph inputs")
    elif "cannot be iterated" in text:
        what = ("its forward iterates over or unpacks a traced tensor (a loop over a tensor, "
                "a tuple-unpacked shape, or a tensor passed as *args/**kwargs)")
    elif "control flow" in text or "__bool__" in text:
        what = ("its forward branches on a traced tensor's value or attribute (e.g. `if "
                "x.dtype != ...`, `if mask.any()`): fx records no Python branch")
    else:
        what = "torch.fx cannot record one of its operations"
    where = ""
    tb = err.__traceback__
    while tb is not None:  # the last frame outside torch: the model's own line
        name = tb.tb_frame.f_code.co_filename
        if "/torch/" not in name and "stablemorph" not in name:
            where = f" at {name.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return what + where


OPAQUE_LIMIT = 64  # sub-modules kept whole before tracing gives up


def trace_graph(model: nn.Module, inputs: int | None = None, whole: Sequence[str] = ()
                ) -> tuple[fx.Graph, dict[str, str]]:
    """The ``torch.fx`` graph of ``model``, and the sub-modules kept whole because fx cannot
    trace them (name -> why).

    A sub-module whose forward torch.fx cannot trace (a Hugging Face attention unpacking
    shapes, ...) is kept whole, as one opaque node, and tracing is retried: the analysis then
    works wherever the widened units do not reach it. ``inputs``: how many positional inputs
    the probe passes (see :class:`MorphTracer`); ``whole``: modules to keep as single nodes.

    Raises:
        GraphError: the model's own forward cannot be traced; the message says what fx's
            error means, and gives fx's own error.
    """
    opaque: dict[str, str] = {}
    while True:
        tracer = MorphTracer([*opaque, *whole], inputs)
        try:
            return tracer.trace(model), opaque
        except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
            cause = (f"{_fx_cause(err)} ({type(err).__name__}: "
                     f"{str(err).splitlines()[0][:160]})")
            where = tracer.path[-1] if tracer.path else ""
            if where and where not in opaque and len(opaque) < OPAQUE_LIMIT:
                opaque[where] = cause
                continue
            raise GraphError(
                f"torch.fx cannot trace {type(model).__name__}: it failed in its own forward: "
                f"{cause}. Widen inside a traceable sub-module (e.g. one block's MLP, passing "
                f"that sub-module to widen), or grow a whole Hugging Face model with sm.grow"
            ) from err


def trace(model: nn.Module, inputs: int | None = None, whole: Sequence[str] = ()
          ) -> fx.GraphModule:
    """:func:`trace_graph` as a GraphModule sharing ``model``'s submodules;
    ``gm.meta["opaque"]`` holds the modules kept whole and why."""
    graph, opaque = trace_graph(model, inputs, whole)
    gm = fx.GraphModule(model, graph)
    gm.meta["opaque"] = opaque
    return gm


def opaque_note(gm: fx.GraphModule, name: str) -> str:
    """Why fx could not look inside module ``name`` or a module containing it ("" if it
    could)."""
    for path, cause in gm.meta.get("opaque", {}).items():
        if name == path or name.startswith(path + "."):
            return f"; torch.fx cannot trace {path!r}: {cause}"
    return ""


__all__ = ["OPAQUE_LIMIT", "GraphError", "MorphTracer", "handlers_module", "opaque_note",
           "trace", "trace_graph"]
