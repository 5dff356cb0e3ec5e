"""Handlers of the layers with weights per unit: Linear, Conv1d/2d/3d (dense, grouped,
depthwise), Embedding and Hugging Face's ``Conv1D`` (GPT-2's transposed Linear)."""

from __future__ import annotations

import torch
from torch import nn

from stablemorph.graph import Remap
from stablemorph.handlers.base import (
    Dense,
    Origins,
    WidenPlan,
    _bank,
    _set_param,
    channel_index,
    gather,
)
from stablemorph.handlers.registry import register_handler
from stablemorph.record import ParamOrigin

LINEAR = Dense([("weight", 0), ("bias", 0)], [("weight", 1)], ["out_features"],
               ["in_features"], dim=-1)
EMBEDDING = Dense([("weight", 1)], (), ["embedding_dim"], (), dim=-1)
# transformers.pytorch_utils.Conv1D: y = x @ weight + bias, weight (in, out)
HF_CONV1D = Dense([("weight", 1), ("bias", 0)], [("weight", 0)], ["nf"], ["nx"], dim=-1)


def is_depthwise(m: nn.Module) -> bool:
    """A conv that maps each input channel to exactly one output channel of its own."""
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels  # type: ignore


class Conv(Dense):
    """``nn.Conv1d/2d/3d``: dense (``groups == 1``) convs grow like Linear layers on dim 1;
    a depthwise conv is channel-wise (its width follows its input); other grouped convs are
    refused on both sides (a new channel would have to join one group)."""

    def __init__(self) -> None:
        super().__init__([("weight", 0), ("bias", 0)], [("weight", 1)], ["out_channels"],
                         ["in_channels"], dim=1)

    def role(self, m: nn.Module) -> str:
        return "channelwise" if is_depthwise(m) else "dense"

    def refusal(self, m: nn.Module, side: str) -> str | None:
        if m.groups > 1 and not is_depthwise(m):  # type: ignore[operator]
            return (f"a grouped conv (groups={m.groups}): widening into grouped convs other "
                    f"than depthwise is not supported")
        return None

    def params_per_unit(self, m: nn.Module, side: str) -> int:
        if is_depthwise(m):
            return sum(p.numel() for p in m.parameters()) // m.out_channels  # type: ignore
        return super().params_per_unit(m, side)

    def grow_channels(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                      gen: torch.Generator, origins: Origins) -> None:
        """Depthwise: copied units copy their filter; fresh ones (no source, no template)
        get a random filter per incoming id (pair members share it) or, with no id (zero
        incoming weights), a zero filter."""
        index, j = channel_index(remap, plan)
        fresh = index < 0
        ids = plan.fresh_in[j.clamp(min=0)]
        ids = torch.where(fresh & (j >= 0), ids, -1)
        draw = ids >= 0
        fan_in = m.weight[0].numel()  # type: ignore[index]
        for path in ("weight", "bias"):
            p = getattr(m, path)
            if p is None:
                continue
            t = gather(p.detach(), index, 0.0)
            if bool(draw.any()) and (path == "weight" or plan.random_bias):
                bank = _bank(int(ids.max()) + 1, p.shape[1:], p, fan_in, gen)
                t[draw.to(t.device)] = bank[ids[draw].to(t.device)]
            _set_param(m, path, t, p)
            origins[f"{name}.{path}"] = ParamOrigin(f"{name}.{path}", dim=0, index=index)
        m.in_channels = m.out_channels = m.groups = index.numel()


CONV = Conv()

register_handler(nn.Linear, LINEAR)
register_handler(nn.Conv1d, CONV)
register_handler(nn.Conv2d, CONV)
register_handler(nn.Conv3d, CONV)
register_handler(nn.Embedding, EMBEDDING)
register_handler("transformers.pytorch_utils.Conv1D", HF_CONV1D)

__all__ = ["CONV", "EMBEDDING", "HF_CONV1D", "LINEAR", "Conv", "is_depthwise"]
