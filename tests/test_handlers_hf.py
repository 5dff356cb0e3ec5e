"""Widen on Hugging Face sub-modules (Llama's SwiGLU MLP, GPT-2's Conv1D MLP), built from
configs (no hub), and the error on models torch.fx cannot trace."""

from __future__ import annotations

import pytest
import torch
from morph_cases import assert_same_function, assert_untouched, snapshot

from stablemorph.morphs import MorphError, widen
from stablemorph.record import last_report

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SCHEMES = ["stable", "netmorph", "net2net"]


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_llama_mlp_gate_and_up_grow_together(scheme: str) -> None:
    mlp = _llama().model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    snap = snapshot(mlp)
    child = widen(mlp, "gate_proj", 96, scheme=scheme, inputs=x)
    assert (child.gate_proj.out_features, child.up_proj.out_features,
            child.down_proj.in_features) == (96, 96, 96)
    assert_same_function(mlp, child, x)
    assert_untouched(mlp, snap)
    if scheme == "stable":
        assert last_report(child).zero_fraction == 0.0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpt2_conv1d_mlp(scheme: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100,
                                  n_positions=16, bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0)
    mlp = transformers.GPT2LMHeadModel(cfg).transformer.h[0].mlp.eval()
    x = torch.randn(2, 5, 32)
    child = widen(mlp, "c_fc", 160, scheme=scheme, inputs=x)
    assert (child.c_fc.nf, child.c_fc.weight.shape, child.c_proj.nx,
            child.c_proj.weight.shape) == (160, (32, 160), 160, (160, 32))
    assert_same_function(mlp, child, x)
    if scheme == "stable":  # HF initialises biases to 0: only the new parts can be dense
        new = (child.c_fc.weight[:, 128:], child.c_fc.bias[128:], child.c_proj.weight[128:])
        assert all(bool((t != 0).all()) for t in new)


def test_untraceable_hf_model_names_the_layer_and_the_real_cause() -> None:
    model = _llama()
    tokens = torch.randint(0, 100, (2, 5))
    with pytest.raises(MorphError) as err:
        widen(model, "model.layers.0.mlp.gate_proj", 96, inputs=tokens)
    text = str(err.value)
    assert "torch.fx cannot trace LlamaForCausalLM" in text
    assert "takes **kwargs" in text and "co_varnames is too small" in text
    assert "sm.grow" in text and "control flow" not in text


class Looping(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(row for row in x)


class Wrapper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.inner = Looping()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fc(x))


def test_untraceable_inner_module_is_named() -> None:
    with pytest.raises(MorphError, match=r"it failed in 'inner' \(Looping\): its forward "
                                         r"iterates over or unpacks a traced tensor"):
        widen(Wrapper(), "fc", 6, inputs=torch.randn(3, 4))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_llama_rmsnorm_replicates_every_unit(scheme: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), LlamaRMSNorm(6), torch.nn.Linear(6, 4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    child = widen(model, "0", 12, scheme=scheme, inputs=x)
    assert child[1].weight.shape == (12,)
    assert_same_function(model, child, x)
    with pytest.raises(MorphError, match="width must be a multiple of 6, got 9"):
        widen(model, "0", 9, scheme=scheme, inputs=x)
