"""Start ``N`` local processes forming one ``torch.distributed`` group (the experiment's
``--nproc``), without torchrun.

Each process initialises ``torch.distributed`` (``backend``, rendezvous through a file in a
private temporary directory, gloo bound to the loopback interface unless
``GLOO_SOCKET_IFNAME`` is set), uses ``cpu_count // nproc`` threads, runs ``fn(*args)`` and
tears the group down; rank 0's result comes back. Interruption is clean: Ctrl-C or SIGTERM
during a launch stops every rank that started, removes the temporary directory and re-raises
(SIGTERM as ``SystemExit(143)``); and every rank watches its launcher, exiting within about a
second once the launcher is gone or its directory removed, so a rank started while the
launcher was being interrupted does not wait out the rendezvous timeout.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

# Imported once by the fork server (a missing one is skipped): DDP's constructor imports
# torch._dynamo, the slowest of them.
_PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo",
            "stablemorph.experiment.train", "stablemorph.morphs")


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread, so ``finally``
    clauses run (only when called from the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def launch(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float = 600.0,
           backend: str = "gloo") -> Any:
    """Run ``fn(*args)`` on ``nproc`` new local processes forming one process group; return
    rank 0's result (module docstring).

    ``fn`` and ``args`` must be picklable (a module-level function); rank 0's result is
    pickled back. As with any non-fork start method, a script calling ``launch`` needs the
    ``if __name__ == "__main__":`` guard. Tensors in ``args`` (a model's parameters too)
    reach every rank as the *same* shared-memory storage: a rank that trains a model it was
    handed must deep-copy it first, or all ranks' steps add up in one tensor.

    Processes are forked from multiprocessing's fork server (``spawn`` where there is none),
    which imports torch, DDP's dependencies and the morphs once: a launch then starts in well
    under a second instead of paying every rank's imports (measured on 2 cores: 4 s for the
    first launch, 0.1 s for the next, against 11-12 s each with ``spawn``).

    Raises:
        ValueError: ``nproc < 1``.
        RuntimeError: a rank raised (the message holds its traceback); the others are stopped.
        TimeoutError: not finished after ``timeout`` seconds; every process is killed.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.set_forkserver_preload(list(_PRELOAD))
    workdir = Path(tempfile.mkdtemp(prefix="stablemorph-ddp-"))
    context = None
    try:
        with _sigterm_as_exit():
            context = mp.start_processes(
                _run_rank,
                args=(nproc, str(workdir), backend, timeout, os.getpid(), fn, args),
                nprocs=nproc, join=False, start_method=method,
            )
            deadline = time.monotonic() + timeout
            try:
                while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"launch: {nproc} processes did not finish within "
                                           f"{timeout:g} s")
            except ProcessException as err:
                raise RuntimeError(_failure(workdir, err)) from None
            with open(workdir / "result.pkl", "rb") as f:
                return pickle.load(f)  # written by our own rank 0 in our private directory
    finally:
        # removing the directory first tells ranks not yet known here to exit (_watch)
        shutil.rmtree(workdir, ignore_errors=True)
        if context is not None:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(launcher: int, workdir: str, period: float = 0.5) -> None:
    """Exit this rank (hard: it may be blocked in a collective) once the launcher process is
    gone or has removed the rendezvous directory."""
    def loop() -> None:
        while True:
            time.sleep(period)
            if not _alive(launcher) or not os.path.isdir(workdir):
                os._exit(1)

    threading.Thread(target=loop, daemon=True, name="stablemorph-launcher-watch").start()


def _run_rank(rank: int, world_size: int, workdir: str, backend: str, timeout: float,
              launcher: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    _watch(launcher, workdir)
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
