"""Morphing and training inside a ``torch.distributed`` DistributedDataParallel (DDP) run.

A DDP wrapper keeps references to its module's parameters (gradient buckets, hooks): a morph
that replaces parameters must happen on the unwrapped module, on every rank, and the child
must be wrapped again. :func:`morph_ddp` does all of it in one call, on every rank:

1. unwraps ``ddp_model.module`` and applies the morph (:func:`stablemorph.morphs.apply`) with
   the same arguments on every rank (the morphs are seeded, so every rank builds the same
   child); one ``all_gather_object`` then checks that no rank failed and that all ranks ran
   the same morph (op, target, kwargs), and raises on every rank otherwise, so a failure on
   one rank cannot leave the others waiting in a collective;
2. carries the optimiser over (:func:`stablemorph.optim.transfer_optimizer`; ranks hold
   identical optimiser state, so they stay identical);
3. wraps the child in a new DDP with the constructor arguments recovered from the old wrapper
   (device ids, output device, dim, process group, buffer sync, bucket size, unused-parameter
   search, gradient views, static graph; override any with ``ddp_kwargs``). DDP's
   constructor checks parameter shapes across ranks and broadcasts rank 0's parameters and
   buffers, so the ranks start bit-identical. Communication hooks are not carried over
   (register them again); a wrapper with DDP ``mixed_precision`` is refused.

The caller's wrapper, module and optimiser are left as they were; drop them afterwards.
A scheduler follows with :func:`stablemorph.optim.transfer_scheduler`.

Training and launching are the experiment's business: :func:`stablemorph.experiment.train.train`
accepts a DDP-wrapped model (one loop for one process and for DDP), and
:func:`stablemorph.experiment.launch.launch` starts ``N`` local ranks without torchrun. Under
``torchrun --nproc-per-node N``, call ``dist.init_process_group("gloo")`` and run the
per-rank code::

    ddp = DDP(build_model(...))
    opt = torch.optim.SGD(ddp.module.parameters(), lr=0.05)
    ...                                  # train
    ddp, opt = morph_ddp(ddp, "deepen", "features.conv2", optimizer=opt)
    ...                                  # train on
"""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from stablemorph.morphs import apply
from stablemorph.optim import transfer_optimizer
from stablemorph.record import history

_MB = 1024 * 1024


def morph_ddp(
    ddp_model: DDP,
    op: str,
    target: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    ddp_kwargs: dict[str, Any] | None = None,
    **morph_kwargs: Any,
) -> tuple[DDP, torch.optim.Optimizer | None]:
    """Morph the module of ``ddp_model`` on every rank and wrap the child in DDP again.

    Call it on every rank with the same arguments (a collective, like a DDP forward).

    Args:
        ddp_model: the DDP-wrapped parent. Not modified.
        op: the morph, a key of :data:`stablemorph.morphs.MORPHS` (``"deepen"``,
            ``"widen"``, ``"enlarge_kernel"``, ``"insert_subnet"``, and the transformer
            growths ``"grow_mlp"``, ``"grow_heads"``, ``"grow_d_model"``, ``"insert_block"``).
        target: the layer to morph, as named inside ``ddp_model.module``.
        optimizer: an optimiser over the module's parameters, carried over to the child's
            (not modified); ``None``: no optimiser returned.
        ddp_kwargs: DDP constructor arguments overriding the recovered ones.
        **morph_kwargs: the morph's options (``width=``, ``scheme=``, ``seed=``,
            ``input_shape=`` ...).

    Returns:
        ``(new_ddp_model, new_optimizer)``; ``new_optimizer`` is ``None`` without
        ``optimizer``.

    Raises:
        TypeError: ``ddp_model`` is not a DistributedDataParallel.
        ValueError: DDP mixed precision (not supported).
        stablemorph.morphs.MorphError or the morph's own error: on the rank where the morph
            failed; RuntimeError on the other ranks (naming the failed ranks), or on every
            rank when the ranks asked for different morphs.
    """
    if not isinstance(ddp_model, DDP):
        raise TypeError(f"morph_ddp expects a DistributedDataParallel model, got "
                        f"{type(ddp_model).__name__}; morph a plain model directly")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("morph_ddp does not support DDP mixed_precision: its hooks are bound "
                         "to the old module")
    group = ddp_model.process_group
    parent = ddp_model.module
    child: nn.Module | None = None
    error: BaseException | None = None
    try:
        child = apply(op, parent, target, **morph_kwargs)
        last = history(child)[-1]
        status = {"error": None, "morph": json.dumps([last.op, last.target, last.kwargs])}
    except Exception as err:
        error = err
        status = {"error": f"{type(err).__name__}: {err}", "morph": None}
    statuses: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(statuses, status, group=group)
    failed = [f"rank {r}: {s['error']}" for r, s in enumerate(statuses) if s["error"] is not None]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"morph_ddp: {op} {target!r} failed on " + "; ".join(failed))
    if len({s["morph"] for s in statuses}) != 1:
        raise RuntimeError(
            "morph_ddp: the ranks ran different morphs (call morph_ddp with the same "
            f"arguments, seed included, on every rank): {[s['morph'] for s in statuses]}"
        )
    assert child is not None
    new_optimizer = None if optimizer is None else transfer_optimizer(optimizer, parent, child)
    if getattr(ddp_model, "_comm_hooks", None):
        warnings.warn("morph_ddp: the old DDP's communication hooks are not carried over; "
                      "register them on the new model", stacklevel=2)
    kwargs = {**ddp_constructor_kwargs(ddp_model), **(ddp_kwargs or {})}
    return DDP(child, **kwargs), new_optimizer


def ddp_constructor_kwargs(ddp_model: DDP) -> dict[str, Any]:
    """The DDP constructor arguments that rebuild a wrapper like ``ddp_model`` (those the
    wrapper records and this torch's constructor accepts)."""
    recovered: dict[str, Any] = {
        "device_ids": ddp_model.device_ids,
        "output_device": ddp_model.output_device,
        "dim": ddp_model.dim,
        "process_group": ddp_model.process_group,
        "find_unused_parameters": ddp_model.find_unused_parameters,
        "gradient_as_bucket_view": ddp_model.gradient_as_bucket_view,
        "static_graph": ddp_model.static_graph,
    }
    if hasattr(ddp_model, "bucket_bytes_cap"):
        recovered["bucket_cap_mb"] = ddp_model.bucket_bytes_cap / _MB
    for name in ("forward_sync_buffers", "skip_all_reduce_unused_params", "batched_grad_copy"):
        if hasattr(ddp_model, name):
            recovered[name] = getattr(ddp_model, name)
    if not hasattr(ddp_model, "forward_sync_buffers"):  # older torch
        recovered["broadcast_buffers"] = ddp_model.broadcast_buffers
    accepted = inspect.signature(DDP.__init__).parameters
    return {k: v for k, v in recovered.items() if k in accepted}
