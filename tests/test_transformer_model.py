"""The tiny GPT: shapes, causality, tied head, config recipe, input errors."""

from __future__ import annotations

import pytest
import torch

from stablemorph.transformer.model import GPT, BlockSpec, GPTConfig

torch.set_num_threads(1)


def small(tie_head: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2, n_head=2,
                                 tie_head=tie_head))


def test_forward_shape_and_default_sizes() -> None:
    model = small()
    assert model.config.blocks == (BlockSpec(n_head=2, head_dim=8, d_mlp=64),) * 2
    logits = model(torch.randint(0, 29, (3, 11)))
    assert logits.shape == (3, 11, 29)
    assert logits.dtype == torch.float32


def test_attention_is_causal() -> None:
    model = small()
    x = torch.randint(0, 29, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 29
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_tied_head_shares_the_embedding() -> None:
    model = small(tie_head=True)
    assert model.head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and "wte.weight" in names and "head.bias" in names


def test_config_round_trip_rebuilds_the_same_model() -> None:
    model = small(tie_head=True)
    config = GPTConfig.from_dict(model.config.to_dict())
    assert config == model.config
    rebuilt = GPT(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, 29, (2, 8))
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_heterogeneous_blocks() -> None:
    config = GPTConfig(29, 16, 16, (BlockSpec(2, 8, 64), BlockSpec(3, 4, 10)))
    model = GPT(config)
    assert model.blocks[1].attn.q.weight.shape == (12, 16)
    assert model.blocks[1].mlp.fc.weight.shape == (10, 16)
    assert model(torch.randint(0, 29, (1, 5))).shape == (1, 5, 29)


def test_errors() -> None:
    with pytest.raises(ValueError, match="n_head=3 does not divide d_model=16"):
        GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2, n_head=3)
    with pytest.raises(ValueError, match=r"BlockSpec\.n_head must be >= 1, got 0"):
        BlockSpec(0, 8, 8)
    with pytest.raises(ValueError, match=r"GPTConfig\.d_model must be >= 1, got 0"):
        GPTConfig(29, 16, 0, ())
    model = small()
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids of shape \(B, T\), got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
