"""How much memory a morph needs, checked before any work.

:func:`estimate` gives a lower bound on the bytes a morph allocates: the child (a copy of the
parent plus the new parameters), the float64 copy the verification runs, the solver's float64
workspace on the new parameters, and the probe's activations at the new width.
:func:`check` compares it with the memory available on the model's device (``MemAvailable``
of ``/proc/meminfo`` on Linux, ``os.sysconf`` elsewhere; ``torch.cuda.mem_get_info`` on
CUDA) and refuses up front, with both numbers, instead of an allocator error minutes later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

GIB = 1024**3


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (``None`` when it cannot be read)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _geometry(layer: nn.Module) -> tuple[int, int, int, int] | None:
    """(in, out, groups, spatial dims) of a Linear/Conv, else None."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, 1, 0
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return layer.in_channels, layer.out_channels, layer.groups, len(layer.kernel_size)
    return None


def new_elements(op: str, layer: nn.Module | None, kwargs: dict[str, Any]) -> tuple[int, float]:
    """(new parameter elements, activation growth factor of the layer's output) for ``op``
    with ``kwargs`` on ``layer``; a lower bound (consumers of widened channels not counted)."""
    geom = _geometry(layer)
    if geom is None:
        return 0, 1.0
    c_in, c_out, groups, nd = geom
    width = kwargs.get("width")
    if op == "widen" and isinstance(width, int):
        k = math.prod(getattr(layer, "kernel_size", ()) or (1,))
        fan_in = c_in // groups * k
        return max(width - c_out, 0) * (2 * fan_in + 1), width / max(c_out, 1)
    if op in ("deepen", "insert_subnet", "enlarge_kernel") and isinstance(width, int):
        k1, k2 = (kwargs.get("kernel_sizes") or (kwargs.get("first_kernel_size")
                                                 or kwargs.get("kernel_size") or 1,
                                                 kwargs.get("kernel_size") or 1))
        if op == "enlarge_kernel":
            k1, k2 = kwargs.get("kernel_size") or 1, 1
        n = width * (c_in // groups * int(k1) ** nd + c_out // groups * int(k2) ** nd + 2)
        return n, 1.0 + width / max(c_out, 1)
    if op == "enlarge_kernel":
        return c_out * c_in // groups * int(kwargs.get("kernel_size") or 1) ** nd, 1.0
    return 0, 1.0


def estimate(model: nn.Module, op: str, layer: nn.Module | None, kwargs: dict[str, Any],
             output_numel: int, dtype: torch.dtype) -> int:
    """A lower bound on the bytes ``op`` allocates (module docstring)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    parent = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers())
    elems, act = new_elements(op, layer, kwargs)
    return (parent * itemsize * (1 + 2)  # the child's copy; the float64 copy for the floor
            + elems * (itemsize + 8 * 2)  # the new parameters; a float64 solver workspace
            + int(output_numel * act) * (itemsize + 8) * 2)  # activations, both precisions


def check(model: nn.Module, op: str, target: str, layer: nn.Module | None, kwargs: dict[str, Any],
          output_shapes: Sequence[Sequence[int]], dtype: torch.dtype,
          device: torch.device) -> str:
    """Refuse (``MemoryError`` naming the layer, the estimate and what is available) when the
    estimate exceeds the free memory; else a note with both numbers."""
    numel = sum(math.prod(s) for s in output_shapes)
    need = estimate(model, op, layer, kwargs, numel, dtype)
    free = available_bytes(device)
    if free is not None and need > free:
        opts = ", ".join(f"{k}={kwargs[k]}" for k in ("width", "kernel_size") if k in kwargs)
        raise MemoryError(
            f"{op} {target!r} ({opts}) needs at least {need / GIB:.1f} GiB (the child's "
            f"parameters, a float64 solver workspace and the probe's activations, estimated) "
            f"but {free / GIB:.1f} GiB is available on {device}; choose a smaller size")
    where = "unknown" if free is None else f"{free / GIB:.1f} GiB"
    return f"memory: estimated >= {need / GIB:.3f} GiB, available {where} on {device}"
