"""``transfer_adam``: the name the transformer growths used for their Adam/AdamW state
transfer, kept for existing code. It is :func:`stablemorph.optim.transfer_optimizer` (one
rule for every morph and optimiser), restricted to Adam and AdamW."""

from __future__ import annotations

import torch
from torch import nn

from stablemorph.optim import transfer_optimizer


def transfer_adam(
    optimizer: torch.optim.Optimizer, parent: nn.Module, child: nn.Module
) -> torch.optim.Optimizer:
    """:func:`stablemorph.optim.transfer_optimizer` for an Adam or AdamW ``optimizer``
    (``TypeError`` otherwise); ``child`` may be several growths after ``parent``."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"transfer_adam handles Adam and AdamW, got {type(optimizer).__name__}")
    return transfer_optimizer(optimizer, parent, child)
