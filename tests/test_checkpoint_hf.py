"""Hugging Face models built from a config (never from a hub) save and load exactly: the base
is rebuilt as ``Cls(config)`` on the meta device and a grown layer from the file."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from stablemorph.activations import PAct
from stablemorph.checkpoint import load_checkpoint, save

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


def deepened(layer: nn.Linear) -> nn.Sequential:
    """``layer`` as two layers with an identity PAct between them, as deepen builds it."""
    first = nn.Linear(layer.in_features, layer.in_features, bias=False)
    second = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(torch.eye(layer.in_features))
        second.weight.copy_(layer.weight)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    act = PAct("relu", channels=layer.in_features, channel_dim=-1)
    return nn.Sequential(OrderedDict(first=first, act=act, second=second))


def test_tiny_llama_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    model.model.layers[1].mlp.down_proj = deepened(model.model.layers[1].mlp.down_proj)
    model.model.layers[0].self_attn.q_proj.to(torch.float64).requires_grad_(False)
    save(model, tmp_path / "llama.pt")
    ckpt = load_checkpoint(tmp_path / "llama.pt")
    loaded = ckpt.model
    assert type(loaded) is type(model) and ckpt.recipe["base"]["hf"].endswith(
        ":LlamaForCausalLM")
    assert loaded.config._attn_implementation == "eager"
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    assert not loaded.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # restore the float32 layer on both, then compare the logits bit for bit
    for m in (model, loaded):
        m.model.layers[0].self_attn.q_proj.to(torch.float32)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_gpt2_with_tied_embeddings_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    save(model, tmp_path / "gpt2.pt")
    loaded = load_checkpoint(tmp_path / "gpt2.pt").model
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
