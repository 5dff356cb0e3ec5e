"""Handlers of the normalisation layers: BatchNorm (and every subclass), InstanceNorm (the
same table: per-channel affine parameters and optional statistics), LayerNorm over the
last dim (channels-first LayerNorms are traced into and found at their ``F.layer_norm``),
GroupNorm (grown by whole groups) and RMSNorm.

A norm over several units changes when a unit is added unless the statistics it computes
survive: LayerNorm and RMSNorm need every unit replicated the same number of times
(``norm_block`` 0); GroupNorm's groups are independent, so new units must come as whole new
groups (``norm_block`` = the group size), the existing ones keeping their members.
"""

from __future__ import annotations

import torch
from torch import nn

from stablemorph.graph import Remap
from stablemorph.handlers.base import Channelwise, Origins, WidenPlan
from stablemorph.handlers.registry import register_handler

BATCHNORM = Channelwise([("weight", 1.0), ("bias", 0.0)],
                        [("running_mean", 0.0), ("running_var", 1.0)], ["num_features"], dim=1)


class _LastDim(Channelwise):
    """LayerNorm / RMSNorm: normalises the last dim; every unit replicated equally."""

    def __init__(self, params: list[tuple[str, float]], zero: bool) -> None:
        super().__init__(params, size=["normalized_shape"], dim=-1, block=0, zero=zero)

    def refusal(self, m: nn.Module, side: str) -> str | None:
        shape = tuple(m.normalized_shape)  # type: ignore[arg-type]
        if len(shape) != 1:
            return (f"{type(m).__name__} normalises over {shape}; widening supports a norm "
                    f"over the widened (last) dim only")
        return None


LAYERNORM = _LastDim([("weight", 1.0), ("bias", 0.0)], zero=False)
RMSNORM = _LastDim([("weight", 1.0)], zero=True)
# Hugging Face's Llama/Qwen2 RMSNorms (weight (hidden,), normalised over the last dim) have
# no normalized_shape attribute.
HF_RMSNORM = Channelwise([("weight", 1.0)], dim=-1, block=0)


class GroupNorm(Channelwise):
    """``nn.GroupNorm``: new channels must form whole new groups appended after the old
    ones (the old groups keep their members and statistics)."""

    def __init__(self) -> None:
        super().__init__([("weight", 1.0), ("bias", 0.0)], size=["num_channels"], dim=1)

    def norm_block(self, m: nn.Module) -> int | None:
        return m.num_channels // m.num_groups  # type: ignore[operator]

    def grow_channels(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                      gen: torch.Generator, origins: Origins) -> None:
        old = int(m.num_channels)  # type: ignore[arg-type]
        size = remap.parent.numel()
        block = old // int(m.num_groups)  # type: ignore[arg-type]
        kept = bool((remap.parent[:old] == torch.arange(old)).all())
        if not kept or bool((remap.parent[old:] >= 0).any()) or (size - old) % block:
            raise ValueError(
                f"GroupNorm {name!r} would see the new channels between its old groups (e.g. "
                f"after a concatenation): they must form whole groups of {block} after the "
                f"old {old} channels"
            )
        super().grow_channels(name, m, remap, plan, gen, origins)
        m.num_groups = size // block


GROUPNORM = GroupNorm()

register_handler(nn.modules.batchnorm._BatchNorm, BATCHNORM)
register_handler(nn.modules.instancenorm._InstanceNorm, BATCHNORM)  # per channel and sample
register_handler(nn.LayerNorm, LAYERNORM)
register_handler(nn.GroupNorm, GROUPNORM)
register_handler(nn.RMSNorm, RMSNORM)
register_handler("transformers.models.llama.modeling_llama.LlamaRMSNorm", HF_RMSNORM)
register_handler("transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm", HF_RMSNORM)

__all__ = ["BATCHNORM", "GROUPNORM", "HF_RMSNORM", "LAYERNORM", "RMSNORM", "GroupNorm"]
