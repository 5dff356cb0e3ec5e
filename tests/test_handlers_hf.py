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


def test_hf_models_widen_where_fx_traces_the_units_path() -> None:
    """HF forwards take **kwargs through decorators (fx: "co_varnames is too small"): traced
    through their explicit parameters; attentions fx cannot trace stay whole."""
    torch.manual_seed(0)
    kw = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
          "intermediate_size": 64, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, **kw)).eval()
    tokens = torch.randint(0, 100, (2, 5))
    child = widen(bert, "encoder.layer.0.intermediate.dense", 80, inputs=tokens)
    assert child.encoder.layer[0].output.dense.in_features == 80
    torch.testing.assert_close(child(tokens).last_hidden_state,
                               bert(tokens).last_hidden_state, rtol=0, atol=1e-5)
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **kw))
    x = torch.randn(2, 5, 32)
    layer = vit.eval().layers[0]
    assert_same_function(layer, widen(layer, "mlp.fc1", 80, inputs=x), x)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0))
    block = gpt2.eval().h[0]
    assert_same_function(block, widen(block, "mlp.c_fc", 160, inputs=x), x)


def test_untraceable_hf_model_names_the_layer_and_the_real_cause() -> None:
    model = _llama()
    tokens = torch.randint(0, 100, (2, 5))
    with pytest.raises(MorphError) as err:
        widen(model, "model.layers.0.mlp.gate_proj", 96, inputs=tokens)
    text = str(err.value)
    assert "'model.layers.0.mlp.gate_proj' cannot be analysed; torch.fx cannot trace " \
           "'model'" in text
    assert "symbolically traced variables cannot be used as inputs to control flow" in text
    assert "sm.grow" in text and "co_varnames" not in text


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
    with pytest.raises(MorphError, match=r"'inner' \(Looping\), which has no handler .*; "
                                         r"torch\.fx cannot trace 'inner': its forward "
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


def _decorated(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return wrapper


class Decorated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 2)

    @_decorated
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if mask is not None:
            h = h * mask
        return self.head(h)


def test_decorated_forward_with_kwargs_is_traced() -> None:
    """fx alone: "co_varnames is too small"; the optional mask stays None as in the call."""
    model = Decorated()
    x = torch.randn(3, 4)
    assert_same_function(model, widen(model, "fc", 9, inputs=x), x)


class AddsOpaque(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.inner = Looping()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) + self.inner(x))


def test_a_tie_to_a_module_kept_whole_says_why() -> None:
    with pytest.raises(MorphError, match=r"ties the widened channels to 'inner', which comes "
                                         r"from no Conv/Linear layer .*; torch\.fx cannot "
                                         r"trace 'inner': its forward iterates"):
        widen(AddsOpaque(), "fc", 6, inputs=torch.randn(3, 4))


def test_vit_names_the_line_fx_fails_on() -> None:
    """HF ViT: fx's "control flow" is a dtype check, not data: the line is named."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_labels=3, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64)
    model = transformers.ViTForImageClassification(cfg)
    with pytest.raises(MorphError, match=r"torch\.fx cannot trace 'vit': its forward branches "
                                         r"on a traced tensor's value or attribute .* at "
                                         r"modeling_vit\.py:\d+"):
        widen(model, "vit.layers.0.mlp.fc1", 80, inputs=torch.randn(2, 3, 16, 16))


def test_llama_decoder_layer_widens_with_its_rotary_inputs() -> None:
    """The whole decoder layer: its forward (**kwargs through a decorator) traced through its
    explicit parameters, the attention kept whole, the probe passing RoPE's (cos, sin)."""
    model = _llama().eval()
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    pos = torch.arange(5)[None].expand(2, 5)
    rope = model.model.rotary_emb(x, pos)
    probe = (x, None, pos, None, False, rope)
    child = widen(layer, "mlp.gate_proj", 96, inputs=probe)
    assert child.mlp.up_proj.out_features == 96
    with torch.no_grad():
        torch.testing.assert_close(child(x, position_embeddings=rope),
                                   layer(x, position_embeddings=rope), rtol=0, atol=1e-5)
