"""A tiny decoder-only transformer (GPT) whose architecture is a plain, growable recipe.

Shapes: token ids ``(B, T)`` with ``T <= block_size`` -> logits ``(B, T, vocab_size)``.

Architecture (pre-LayerNorm, GPT-2 style, every Linear with a bias)::

    x = wte(idx) + wpe(pos)                                  (B, T, d_model)
    for each block:  x = x + attn.proj(SDPA(q(ln1 x), k(ln1 x), v(ln1 x)))
                     x = x + mlp.proj(gelu(mlp.fc(ln2 x)))
    logits = head(ln_f x)                                    (B, T, vocab_size)

Unlike GPT-2, the attention width is ``n_head * head_dim`` and need not equal ``d_model``, and
each block has its own :class:`BlockSpec`: adding heads keeps every existing head's size (so
its attention pattern is unchanged), and one block can be grown without the others.

With ``tie_head=True`` the head's weight *is* the token embedding (one parameter, reported
under the name ``wte.weight``); the head keeps its own bias.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablemorph.zoo import BASE_ATTR

INIT_STD = 0.02


@dataclass(frozen=True)
class BlockSpec:
    """Sizes of one transformer block: ``n_head`` heads of ``head_dim`` each, MLP width
    ``d_mlp``."""

    n_head: int
    head_dim: int
    d_mlp: int

    def __post_init__(self) -> None:
        for name in ("n_head", "head_dim", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockSpec.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GPTConfig:
    """The whole architecture recipe: enough to rebuild the model (``GPT(config)``) and then
    load its state dict."""

    vocab_size: int
    block_size: int
    d_model: int
    blocks: tuple[BlockSpec, ...]
    tie_head: bool = False
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @classmethod
    def uniform(
        cls,
        *,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        head_dim: int | None = None,
        d_mlp: int | None = None,
        tie_head: bool = False,
    ) -> GPTConfig:
        """Every block the same. ``head_dim`` defaults to ``d_model // n_head`` (which must
        then divide), ``d_mlp`` to ``4 * d_model``."""
        if head_dim is None:
            if n_head < 1 or d_model % n_head:
                raise ValueError(
                    f"n_head={n_head} does not divide d_model={d_model}; give head_dim explicitly"
                )
            head_dim = d_model // n_head
        spec = BlockSpec(n_head=n_head, head_dim=head_dim, d_mlp=d_mlp or 4 * d_model)
        return cls(vocab_size, block_size, d_model, (spec,) * n_layer, tie_head)

    def to_dict(self) -> dict:
        """JSON-able form (``from_dict`` inverts it)."""
        return asdict(self) | {"blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        blocks = tuple(BlockSpec(**b) for b in data["blocks"])
        return cls(**{**data, "blocks": blocks})


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections.

    Head ``h`` owns rows ``h*head_dim : (h+1)*head_dim`` of ``q``, ``k``, ``v`` and the same
    columns of ``proj``.
    """

    def __init__(self, d_model: int, n_head: int, head_dim: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        inner = n_head * head_dim
        self.q = nn.Linear(d_model, inner)
        self.k = nn.Linear(d_model, inner)
        self.v = nn.Linear(d_model, inner)
        self.proj = nn.Linear(inner, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    """``proj(gelu(fc(x)))`` with ``d_mlp`` hidden units."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: attention then MLP."""

    def __init__(self, d_model: int, spec: BlockSpec, ln_eps: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=ln_eps)
        self.attn = CausalSelfAttention(d_model, spec.n_head, spec.head_dim)
        self.ln2 = nn.LayerNorm(d_model, eps=ln_eps)
        self.mlp = MLP(d_model, spec.d_mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer built from a :class:`GPTConfig` (kept as ``self.config``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.blocks = nn.ModuleList(Block(d, spec, config.ln_eps) for spec in config.blocks)
        self.ln_f = nn.LayerNorm(d, eps=config.ln_eps)
        self.head = nn.Linear(d, config.vocab_size)
        if config.tie_head:
            self.head.weight = self.wte.weight
        self.reset_parameters()
        # The recipe checkpoints rebuild the base from (stablemorph.zoo's "gpt").
        setattr(self, BASE_ATTR, {"name": "gpt", "kwargs": config.to_dict()})

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled
        by ``1/sqrt(2 n_layer)``."""
        proj_std = INIT_STD / math.sqrt(2 * max(1, self.config.n_layer))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = proj_std if name.endswith(".proj") else INIT_STD
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: int64 ``(B, T)`` token ids, ``T <= block_size`` -> ``(B, T, vocab)``."""
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (B, T), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
