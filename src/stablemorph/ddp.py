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

Training, per rank: :func:`train_ddp` is :func:`stablemorph.experiment.train.train` for DDP:
the global batch of step ``s`` is the same as in a single-process run (a pure function of
``(seed, s)``) and rank ``r`` of ``W`` runs the ``r``-th of ``W`` equal slices of it, so DDP's
gradient average equals the single-process gradient of the global batch. BatchNorm layers
see only their rank's slice (convert them with ``nn.SyncBatchNorm`` where that matters).

Launching: under ``torchrun --nproc-per-node N``, call ``dist.init_process_group("gloo")``
(it reads the environment torchrun sets), then run the per-rank code. For ``stablemorph
experiment --nproc N`` without torchrun, :func:`launch` starts ``N`` local CPU processes
(gloo over the loopback interface, rendezvous through a private file: no port to pick),
runs ``fn(*args)`` on each and returns rank 0's result::

    def arm(cfg):                      # runs on every rank
        ddp = DDP(build_model(...))
        opt = make_optimizer(ddp.module, cfg)
        records = train_ddp(ddp, data, opt, steps=k, seed=cfg.seed, batch_size=128)
        ddp, opt = morph_ddp(ddp, "deepen", "features.conv2", optimizer=opt)
        records += train_ddp(ddp, data, opt, steps=n, start_step=k, ...)
        return records                 # rank 0's records are returned by launch

    records = launch(arm, nproc, cfg)
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel as DDP

from stablemorph.morphs import apply
from stablemorph.optim import transfer_optimizer
from stablemorph.record import history

if TYPE_CHECKING:  # the experiment stack is imported only by train_ddp (import hygiene)
    from stablemorph.experiment.data import Dataset
    from stablemorph.experiment.train import Record

_MB = 1024 * 1024
# Imported once by the fork server (a missing one is skipped): DDP's constructor imports
# torch._dynamo, the slowest of them.
_PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo",
            "stablemorph.ddp", "stablemorph.morphs")


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


def rank_slice(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s equal, contiguous slice of a global batch's ``indices`` ``(B,)``;
    ``B`` must be a multiple of ``world_size``."""
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} examples does not split evenly over "
                         f"{world_size} ranks: use a batch size that is a multiple of it")
    size = len(indices) // world_size
    return indices[rank * size:(rank + 1) * size]


def train_ddp(
    ddp_model: DDP,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_steps: Iterable[int] = (),
    after_step: Callable[[nn.Module], None] | None = None,
    on_eval: Callable[[Record], None] | None = None,
) -> list[Record]:
    """:func:`stablemorph.experiment.train.train` on every rank of a DDP run.

    Same arguments and determinism contract; ``batch_size`` is the *global* batch, a multiple
    of the world size. Each step, rank ``r`` computes the cross-entropy of its slice of the
    global batch :func:`~stablemorph.experiment.train.batch_indices` ``(n, batch_size, seed,
    step)`` (see :func:`rank_slice`); DDP averages the gradients, so the step equals the
    single-process step on the global batch (up to float summation order). ``after_step``
    receives the unwrapped module. Evaluation (on the test set, at the same steps as
    ``train``) runs on rank 0 on the unwrapped module; every rank returns the same records,
    whose ``train_loss`` is the mean over the global batches.
    """
    from stablemorph.experiment.train import batch_indices, evaluate

    if not 0 <= start_step <= steps:
        raise ValueError(f"need 0 <= start_step <= steps, got start_step={start_step}, {steps=}")
    n = len(data.y_train)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need training examples and batch_size >= 1, got {n}, {batch_size}")
    if scheduler is not None:
        if scheduler.optimizer is not optimizer:
            raise ValueError("scheduler drives a different optimizer than the one given")
        if scheduler.last_epoch != start_step:
            raise ValueError(f"scheduler is at step {scheduler.last_epoch} but training starts "
                             f"at step {start_step}")
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    group = ddp_model.process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    module = ddp_model.module
    device = next(module.parameters()).device
    todo = sorted({s for s in eval_steps if start_step < s <= steps or s == start_step == 0})
    records: list[Record] = []
    losses: list[Tensor] = []
    seconds = 0.0

    def record(step: int) -> None:
        loss = torch.stack(losses).mean().item() if losses else None
        losses.clear()
        box: list[Record | None] = [None]
        if rank == 0:
            acc, test_loss = evaluate(module, data.x_test, data.y_test)
            box[0] = {"step": step, "test_acc": acc, "test_loss": test_loss,
                      "train_loss": loss, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": seconds}
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        rec = box[0]
        assert rec is not None
        records.append(rec)
        if on_eval is not None:
            on_eval(rec)

    ddp_model.train()
    pending = iter(todo)
    next_eval = next(pending, None)
    for step in range(start_step, steps + 1):
        if step == next_eval:
            record(step)
            next_eval = next(pending, None)
        if step == steps:
            break
        started = time.perf_counter()
        idx = rank_slice(batch_indices(n, batch_size, seed, step), rank, world)
        xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp_model(xb), yb)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(module)
        if scheduler is not None:
            scheduler.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=group)
        losses.append(mean / world)
        seconds += time.perf_counter() - started
    return records


def launch(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float = 600.0,
           backend: str = "gloo") -> Any:
    """Run ``fn(*args)`` on ``nproc`` new local processes forming one process group; return
    rank 0's result.

    Each process initialises ``torch.distributed`` (``backend``, rendezvous through a file in
    a private temporary directory, gloo bound to the loopback interface unless
    ``GLOO_SOCKET_IFNAME`` is set), uses ``cpu_count // nproc`` threads, runs ``fn`` and tears
    the group down. ``fn`` and ``args`` must be picklable (a module-level function); rank 0's
    result is pickled back. As with any non-fork start method, a script calling ``launch``
    needs the ``if __name__ == "__main__":`` guard. Tensors in ``args`` (a model's
    parameters too) reach every rank as the *same* shared-memory storage: a rank that trains
    a model it was handed must deep-copy it first, or all ranks' steps add up in one tensor.

    Processes are forked from multiprocessing's fork server (``spawn`` where there is none),
    which imports torch, DDP's dependencies and the morphs once: a launch then starts in well
    under a second instead of paying every rank's imports (measured on 2 cores: 4 s for the
    first launch, 0.1 s for the next, against 11-12 s each with ``spawn``). This sets the
    fork server's preload list if the fork server is not running yet.

    Raises:
        ValueError: ``nproc < 1``.
        RuntimeError: a rank raised (the message holds its traceback); the others are stopped.
        TimeoutError: not finished after ``timeout`` seconds; every process is killed.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.set_forkserver_preload(list(_PRELOAD))
    workdir = Path(tempfile.mkdtemp(prefix="stablemorph-ddp-"))
    try:
        context = mp.start_processes(
            _run_rank, args=(nproc, str(workdir), backend, timeout, fn, args), nprocs=nproc,
            join=False, start_method=method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"launch: {nproc} processes did not finish within "
                                       f"{timeout:g} s")
        except ProcessException as err:
            raise RuntimeError(_failure(workdir, err)) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        with open(workdir / "result.pkl", "rb") as f:
            return pickle.load(f)  # written by our own rank 0 in our private directory
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _failure(workdir: Path, err: ProcessException) -> str:
    """Which rank failed first and how: the other ranks usually fail after it, in a
    collective whose peer went away, and may be the ones the process context reports."""
    failures = []
    for path in workdir.glob("error-*.txt"):
        when, _, trace = path.read_text().partition("\n")
        failures.append((float(when), int(path.stem.removeprefix("error-")), trace))
    if not failures:
        return f"launch: rank {err.error_index} failed: {err}"
    failures.sort()
    _, rank, trace = failures[0]
    later = [r for _, r, _ in failures[1:]]
    after = f" (then rank(s) {later} failed too)" if later else ""
    return f"launch: rank {rank} raised{after}:\n{trace}"


def _loopback() -> str:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return "lo"


def _run_rank(rank: int, world_size: int, workdir: str, backend: str, timeout: float,
              fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=f"file://{workdir}/store", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = fn(*args)
        if rank == 0:
            with open(Path(workdir) / "result.pkl", "wb") as f:
                pickle.dump(result, f)
    except BaseException:
        (Path(workdir) / f"error-{rank}.txt").write_text(f"{time.time()!r}\n"
                                                         f"{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
