"""``sm.grow``: grow a Hugging Face model (or the project's GPT) to target sizes, exactly.

Order: MLP width, heads, head width (GPT-2, BERT), hidden size, depth (new blocks are
shaped at the final sizes). The whole growth is one morph under the project's contract
(:mod:`stablemorph.morphs.contract`'s checks, :func:`stablemorph.verify.verify`, the
record): the parent is never modified; the child is checked on a probe in eval and train
mode (its logits, through :class:`stablemorph.hf.probe.Logits`); it gets one
:class:`~stablemorph.record.MorphRecord` whose ``param_map`` has a
:class:`~stablemorph.record.ParamOrigin` for every child parameter (so
:func:`stablemorph.transfer_optimizer` works). How each growth stays exact:
:mod:`stablemorph.hf.units` (MLP units, heads, head width), :mod:`stablemorph.hf.stream`
and :mod:`stablemorph.hf.postln` (hidden size), :func:`stablemorph.hf.net.grow_layers`
(identity blocks).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from stablemorph.equation import sparsity
from stablemorph.hf.families import (
    SUPPORTED,
    Family,
    UnsupportedModel,
    child_config,
    family_of,
    read,
    sizes,
    write,
)
from stablemorph.hf.net import (
    Net,
    grow_head_dim,
    grow_heads,
    grow_layers,
    grow_mlp,
    insertion_points,
    kv_copies,
)
from stablemorph.hf.postln import check_width as postln_width
from stablemorph.hf.postln import grow_hidden_postln
from stablemorph.hf.probe import Logits, make_probe, probe_shape
from stablemorph.hf.stream import StreamError, check_width, grow_hidden
from stablemorph.hf.units import UnitError
from stablemorph.morphs.contract import (
    SCHEMES,
    MorphError,
    check_model,
    model_dtype,
)
from stablemorph.record import (
    MorphRecord,
    MorphReport,
    ParamOrigin,
    append_record,
    history,
    mark_new_entries,
)
from stablemorph.schemes import step_rule_on
from stablemorph.verify import VerifyError, default_tolerance, preserved_state, verify

DEFAULT_OUT_SCALE = 0.1
_DIMS = ("layers", "hidden", "heads", "kv_heads", "mlp")


def grow(
    model: nn.Module,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    mlp: int | None = None,
    scheme: str = "stable",
    inputs: Any = None,
    seed: int = 0,
    tol: float | None = None,
    out_scale: float = DEFAULT_OUT_SCALE,
) -> nn.Module:
    """A new model of ``model``'s class, grown to the sizes given (``None``: keep), computing
    the same logits.

    Args:
        model: a supported Hugging Face model (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
            ``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``GPT2LMHeadModel``,
            ``ViTForImageClassification``, ``BertModel``,
            ``BertForSequenceClassification``), a base model without its head
            (``LlamaModel``, ``GPT2Model``, ``ViTModel`` ...: layers, heads and mlp only; the
            last hidden state is compared) or a :class:`stablemorph.transformer.GPT`.
            Never modified.
        layers: number of blocks; new identity blocks follow evenly spaced parent blocks
            (refused for post-LayerNorm BERT: no exact identity layer exists there).
        hidden: residual width (the stream is re-encoded: :mod:`stablemorph.hf.stream`,
            :mod:`stablemorph.hf.postln`).
        heads, kv_heads: query and key/value heads of every block; the head width stays
            (written into the config as ``head_dim`` where the class reads it). GPT-2 and
            BERT derive it from ``hidden / heads``: heads given alone take hidden along,
            hidden alone takes heads along when it is a multiple of the head width and
            otherwise widens the heads (:func:`stablemorph.hf.net.grow_head_dim`), both
            given widen the heads to ``hidden / heads``. Llama's config also wants heads to
            divide hidden. ``kv_heads`` defaults to the current
            count (grouped-query models) or ``heads`` (multi-head models).
        mlp: MLP width (``intermediate_size``; GPT-2's ``n_inner``).
        scheme: ``"stable"`` (dense: cancelling groups, dense re-encodings), ``"net2net"``
            (copies) or ``"netmorph"`` (zeros); a scheme that cannot be exact for a size is
            refused with the reason and the nearest size that works.
        inputs: the probe (:mod:`stablemorph.hf.probe`); default random tokens or pixels.
        seed: seeds every random choice.
        tol: ``max_rel`` limit of the logits; default: 1e-5 in float32, or a deviation
            within the parent's own float noise (:mod:`stablemorph.verify`).
        out_scale: ``stable``'s new output columns and random reads, relative to the
            existing ones' rms.

    Returns:
        The child; ``stablemorph.last_report(child)`` has its deviation and zero fraction.
        ``child.save_pretrained(d)`` loads back with plain ``transformers``.

    Raises:
        MorphError: an unsupported model (naming its class and what is supported), a size
            that shrinks or cannot be exact (with the nearest valid choice), an unknown
            scheme, a probe the parent or the child fails on, or a child outside ``tol``.
    """
    from stablemorph.transformer.model import GPT

    targets = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
               "mlp": mlp}
    if scheme not in SCHEMES:
        raise MorphError(f"grow: unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if not (isinstance(out_scale, int | float) and math.isfinite(out_scale) and out_scale > 0):
        raise MorphError(f"grow: out_scale={out_scale!r} must be a finite number > 0 (the "
                         f"scale of stable's new output weights; 0 would make them zeros)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MorphError(f"grow: seed={seed!r} is not an integer")
    if isinstance(model, GPT):
        return _grow_gpt(model, targets, scheme, inputs, seed, tol, out_scale)
    try:
        fam = family_of(model)
    except UnsupportedModel as err:
        raise MorphError(str(err)) from None
    started = time.perf_counter()
    check_model(model)
    net = read(model, fam)
    want = plan(model, fam, net, targets, scheme)
    n_layer = len(net.blocks)
    points = insertion_points(n_layer, want["layers"] - n_layer) if want["layers"] > n_layer \
        else []
    config = checked_config(model, fam, want, net.head_dim, points)
    probe = make_probe(model, fam.inputs, inputs, seed)
    try:
        with torch.no_grad(), preserved_state(model):
            Logits(model).eval()(**probe)
    except Exception as err:
        raise MorphError(f"grow: the parent {type(model).__name__} failed on the probe "
                         f"({type(err).__name__}: {err})") from err
    gen = torch.Generator().manual_seed(seed)
    try:
        if want["mlp"] != net.d_mlp:
            grow_mlp(net, want["mlp"], scheme, gen, out_scale)
        if (want["heads"], want["kv_heads"]) != (net.n_head, net.n_kv):
            grow_heads(net, want["heads"], want["kv_heads"], scheme, gen, out_scale)
        if fam.fixed_head_dim and want["hidden"] // want["heads"] != net.head_dim:
            grow_head_dim(net, want["hidden"] // want["heads"], scheme, gen, out_scale,
                          scaled=getattr(model.config, "scale_attn_weights", True))
        if want["hidden"] != net.d and net.norm == "post-ln":
            grow_hidden_postln(net, want["hidden"], scheme, gen)
        elif want["hidden"] != net.d:
            grow_hidden(net, want["hidden"], scheme, gen, out_scale)
        if want["layers"] != len(net.blocks):
            grow_layers(net, want["layers"], scheme, gen, out_scale)
    except (UnitError, StreamError) as err:
        raise MorphError(f"grow {type(model).__name__} (scheme {scheme!r}): {err}") from None
    child = write(model, fam, net, config)
    return _finish(model, child, fam, net, probe, want, scheme, seed, tol, out_scale, started)


def plan(model: nn.Module, fam: Family, net: Net, targets: dict[str, int | None],
         scheme: str) -> dict[str, int]:
    """The target sizes, checked (see :func:`grow`); raises :class:`MorphError` with the
    nearest valid choice."""
    name = type(model).__name__
    cur = sizes(model)
    for dim, value in targets.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise MorphError(f"grow: {dim}={value!r} is not an integer")
        if value < cur[dim]:
            raise MorphError(f"grow: {dim}={value} would shrink {name} (it has {cur[dim]}); "
                             f"sm.grow only grows: give {dim} >= {cur[dim]} or leave it out")
    if all(targets[d] in (None, cur[d]) for d in _DIMS):
        raise MorphError(f"grow: nothing to grow; {name} has "
                         + ", ".join(f"{d}={cur[d]}" for d in _DIMS)
                         + "; give a larger layers, hidden, heads, kv_heads or mlp")
    want = {d: cur[d] if targets[d] is None else targets[d] for d in _DIMS}
    hd = net.head_dim
    if fam.fixed_head_dim:
        _heads_follow_hidden(name, cur, targets, want, hd)
        if targets["kv_heads"] is not None and targets["kv_heads"] != want["heads"]:
            raise MorphError(f"grow: {name} has one key/value head per query head: "
                             f"kv_heads must equal heads={want['heads']}")
        want["kv_heads"] = want["heads"]
    elif cur["kv_heads"] == cur["heads"] and targets["kv_heads"] is None and not hasattr(
            model.config, "num_key_value_heads"):
        want["kv_heads"] = want["heads"]
    if fam.headless and want["hidden"] != cur["hidden"]:
        raise MorphError(
            f"grow: {name} has no head, so its output is the hidden state itself: "
            f"hidden={want['hidden']} would change the output's width (it is {cur['hidden']}"
            f"{'; GPT-2 heads take hidden along' if fam.fixed_head_dim else ''}); grow "
            f"layers, mlp{'' if fam.fixed_head_dim else ', heads'} here, or the model with "
            f"its head for hidden")
    h2, kv2 = want["heads"], want["kv_heads"]
    if h2 % kv2:
        lo = max(cur["heads"], (h2 // kv2) * kv2)
        near = sorted({lo, (h2 // kv2 + 1) * kv2} - {h2})
        divs = [k for k in range(cur["kv_heads"], h2 + 1) if h2 % k == 0]
        raise MorphError(
            f"grow: kv_heads={kv2} does not divide heads={h2} (each key/value head serves "
            f"an equal group of query heads); nearest: heads in {near} with kv_heads={kv2}, "
            f"or kv_heads in {divs} with heads={h2}")
    if (h2, kv2) != (cur["heads"], cur["kv_heads"]) and not kv_copies(
            cur["heads"], cur["kv_heads"], h2, kv2):
        ok = [k for k in range(cur["kv_heads"], h2 + 1)
              if h2 % k == 0 and kv_copies(cur["heads"], cur["kv_heads"], h2, k)]
        raise MorphError(
            f"grow: kv_heads={kv2} with heads={h2} splits each group of "
            f"{cur['heads'] // cur['kv_heads']} query heads sharing a key/value head over "
            f"groups of {h2 // kv2} that cannot hold it exactly; valid kv_heads for "
            f"heads={h2}: {ok}")
    if want["hidden"] != cur["hidden"]:
        try:
            if net.norm == "post-ln":
                postln_width(net, want["hidden"])
            else:
                check_width(net, want["hidden"], scheme)
        except StreamError as err:
            raise MorphError(f"grow {name}: {err}") from None
    if want["layers"] != cur["layers"] and net.norm == "post-ln":
        raise MorphError(
            f"grow {name}: no exact identity layer exists in a post-LayerNorm model: a new "
            f"layer ends in LayerNorm(a + mlp(a)) with a = LayerNorm(x + attn(x)), and for "
            f"a general weight and bias of the previous LayerNorm no choice of the new "
            f"layer gives back x (stablemorph.hf.postln explains); grow hidden, heads or mlp "
            f"instead, or keep layers={cur['layers']}")
    if want["layers"] != cur["layers"]:
        if scheme == "stable" and (h2 < 2 or want["mlp"] < 2):
            raise MorphError(
                f"grow {name}: a dense identity block needs >= 2 heads and >= 2 MLP units to "
                f"cancel in pairs, it would have {h2} and {want['mlp']}; grow heads/mlp too "
                f"or use scheme='netmorph'")
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise MorphError(
                f"grow {name}: scale_attn_by_inverse_layer_idx scales each block's attention "
                f"by its index, so inserting blocks changes the later ones; depth growth "
                f"needs it off")
    return want


def checked_config(model: nn.Module, fam: Family, want: dict[str, int], head_width: int,
                   points: list[int]) -> object:
    """The child's config, run through the config class's own validation (what
    ``from_pretrained`` will do): a refusal names the rule and the nearest sizes that pass."""
    config = child_config(model, fam, want, head_width, points)
    validate = getattr(config, "validate", None)
    if validate is None:
        return config
    try:
        validate()
    except Exception as err:  # huggingface_hub's validation error is no ValueError
        cause = getattr(err, "__cause__", None) or err
        h2, d2, kv2 = want["heads"], want["hidden"], want["kv_heads"]
        msg = f"grow: {type(config).__name__} refuses the child's config ({cause})"
        if d2 % h2:
            heads_ok = [h for h in range(sizes(model)["heads"], d2 + 1)
                        if d2 % h == 0 and h % kv2 == 0]
            near_h = sorted(sorted(heads_ok, key=lambda h: (abs(h - h2), h))[:2])
            near_d = sorted({(d2 // h2) * h2, (d2 // h2 + 1) * h2} - {d2})
            near_d = [d for d in near_d if d >= sizes(model)["hidden"]]
            msg += (f"; {type(model).__name__} needs heads to divide hidden: nearest: heads "
                    f"in {near_h} with hidden={d2}, or hidden in {near_d} with heads={h2}")
        raise MorphError(msg) from None
    return config


def _heads_follow_hidden(name: str, cur: dict[str, int], targets: dict[str, int | None],
                         want: dict[str, int], hd: int) -> None:
    """Families deriving ``head_dim = hidden / heads``: heads given alone take hidden along
    (``heads * head_dim``); hidden given alone takes heads along when it is a multiple of
    ``head_dim``, else the heads stay and widen (``hidden / heads``); both given must divide
    into a head width of at least the current one."""
    heads, hidden = targets["heads"], targets["hidden"]
    if heads is not None and hidden is None:
        want["hidden"] = heads * hd
    elif hidden is not None and heads is None:
        if hidden % hd == 0:
            want["heads"] = hidden // hd
        elif hidden % cur["heads"]:
            near = sorted({(hidden // hd) * hd, (hidden // hd + 1) * hd,
                           (hidden // cur["heads"]) * cur["heads"],
                           (hidden // cur["heads"] + 1) * cur["heads"]} - {hidden})
            raise MorphError(
                f"grow: {name} derives head_dim = hidden / heads (now {hd}); hidden={hidden} "
                f"is neither a multiple of {hd} (heads follow) nor of heads={cur['heads']} "
                f"(heads widen); nearest: hidden in "
                f"{[v for v in near if v > cur['hidden']]}")
    elif heads is not None and hidden is not None and (hidden % heads or hidden // heads < hd):
        raise MorphError(
            f"grow: {name} derives head_dim = hidden / heads, which cannot shrink below {hd} "
            f"nor be fractional: heads={heads} needs hidden in {heads * hd}, "
            f"{heads * (hd + 1)}, ...; hidden={hidden} takes heads <= {hidden // hd} "
            f"dividing it")


def _finish(model: nn.Module, child: nn.Module, fam: Family, net: Net, probe: dict,
            want: dict[str, int], scheme: str, seed: int, tol: float | None,
            out_scale: float, started: float) -> nn.Module:
    k = net.d // sizes(model)["hidden"]
    take = torch.arange(0, net.d, k) if net.norm == "post-ln" and k > 1 else None
    try:
        check = verify(Logits(model), Logits(child, take), probe)
    except VerifyError as err:
        who = "parent" if getattr(err, "who", None) == "parent" else "child"
        name = type(model if who == "parent" else child).__name__
        raise MorphError(f"grow: the {who} {name} failed on the probe ({err})") from err
    except Exception as err:
        raise MorphError(f"grow: the child {type(child).__name__} failed on the probe "
                         f"({type(err).__name__}: {err})") from err
    limit = default_tolerance(model_dtype(model)) if tol is None else tol
    if not check.ok(limit, noise=tol is None):
        raise MorphError(f"grow {type(model).__name__} (scheme {scheme!r}) does not preserve "
                         f"the logits: {check.describe()}; tolerance max_rel {limit:.1e}")
    param_map = origins(model, child, fam, net)
    if step_rule_on(scheme):
        mark_new_entries(param_map)  # the stable scheme's step rule (stablemorph.step_rule)
    _requires_grad(model, child, param_map)
    named = dict(child.named_parameters())
    changed = [n for n, o in param_map.items() if o.source is None or o.index is not None]
    zeros, near = sparsity(*(named[n] for n in changed)) if changed else (0.0, 0.0)
    notes = [*net.notes, f"{zeros:.1%} exact zeros, {near:.1%} near zeros in the "
                         f"{len(changed)} new or changed parameters"]
    report = MorphReport(
        op="grow", target=type(model).__name__, scheme=scheme, max_abs=check.max_abs,
        max_rel=check.max_rel, zero_fraction=zeros, near_zero_fraction=near, changed=changed,
        param_map=param_map, seconds=time.perf_counter() - started, notes=notes)
    kwargs = {**want, "scheme": scheme, "seed": seed, "out_scale": out_scale,
              "input_shape": probe_shape(probe)}
    for record in history(model):  # the child is a new object: carry the parent's history
        append_record(child, record)
    append_record(child, MorphRecord("grow", type(model).__name__, kwargs, report))
    return child


def origins(model: nn.Module, child: nn.Module, fam: Family, net: Net
            ) -> dict[str, ParamOrigin]:
    """A :class:`ParamOrigin` for every child parameter: the parent's parameter (the same
    block's, for blocks that moved) when unchanged; indexed when the parent's tensor is the
    child's leading slice along one dim (units appended); fresh otherwise, standing in for
    the parent parameter it was made from (a new block's: its neighbour's, the block before
    it)."""
    parent = dict(model.named_parameters())
    out: dict[str, ParamOrigin] = {}
    for name, p in child.named_parameters():
        src = name
        if name.startswith(fam.prefix):
            index, _, rest = name[len(fam.prefix):].partition(".")
            olds = [s for s in net.source[:int(index) + 1] if s is not None] or [0]
            src = f"{fam.prefix}{olds[-1]}.{rest}"
            if net.source[int(index)] is None:  # a new block: fresh, shaped after olds[-1]
                out[name] = ParamOrigin(None, stand_in=src if src in parent else None)
                continue
        q = parent.get(src)
        origin = None if q is None else _origin(src, q.detach(), p.detach())
        out[name] = origin if origin is not None else ParamOrigin(
            None, stand_in=src if q is not None else None)
    return out


def _requires_grad(model: nn.Module, child: nn.Module,
                   param_map: dict[str, ParamOrigin]) -> None:
    """A child parameter is trainable like its source or stand-in (anything else new: like
    any parent parameter)."""
    parent = dict(model.named_parameters())
    default = any(p.requires_grad for p in parent.values())
    for name, p in child.named_parameters():
        origin = param_map[name]
        ref = parent.get(origin.source or origin.stand_in or name)
        p.requires_grad_(ref.requires_grad if ref is not None else default)


def _origin(src: str, q: torch.Tensor, p: torch.Tensor) -> ParamOrigin | None:
    """Unchanged or indexed (see :func:`origins`), else ``None``."""
    if q.shape == p.shape:
        return ParamOrigin(src) if torch.equal(q, p) else None
    diff = [d for d in range(p.dim()) if q.dim() == p.dim() and q.shape[d] != p.shape[d]]
    if len(diff) == 1 and p.shape[diff[0]] > q.shape[diff[0]]:
        dim = diff[0]
        n = q.shape[dim]
        if torch.equal(p.narrow(dim, 0, n), q):
            index = torch.cat([torch.arange(n), torch.full((p.shape[dim] - n,), -1)])
            return ParamOrigin(src, dim=dim, index=index)
    return None


def _grow_gpt(model: nn.Module, targets: dict[str, int | None], scheme: str, inputs: Any,
              seed: int, tol: float | None, out_scale: float) -> nn.Module:
    """The project's GPT: its own growths (:func:`stablemorph.transformer.grow`)."""
    from stablemorph.transformer.grow import grow as grow_gpt

    c = model.config
    cur = {"layers": c.n_layer, "hidden": c.d_model, "heads": c.blocks[0].n_head,
           "mlp": c.blocks[0].d_mlp}
    if targets["kv_heads"] not in (None, targets["heads"] or cur["heads"]):
        raise MorphError("grow: stablemorph.transformer.GPT has one key/value head per query "
                         "head: kv_heads must equal heads")
    targets = {k: None if v == cur.get(k) else v for k, v in targets.items()}
    if inputs is not None and not isinstance(inputs, torch.Tensor):
        raise MorphError("grow: the project's GPT takes integer token ids as inputs")
    try:
        return grow_gpt(model, d_model=targets["hidden"], n_head=targets["heads"],
                        d_mlp=targets["mlp"], n_layer=targets["layers"], scheme=scheme,
                        seed=seed, probe=inputs, tol=tol, out_scale=out_scale)
    except ValueError as err:
        if isinstance(err, MorphError):
            raise
        raise MorphError(f"grow GPT: {err}") from None


__all__ = ["SUPPORTED", "grow"]
