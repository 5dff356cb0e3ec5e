"""sm.grow beyond Llama: GPT-2 (Conv1D, fused c_attn, learned positions, tied head after a
LayerNorm), ViT (patch convolution, class token), Mistral, and the project's own GPT."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import stablemorph as sm
from stablemorph.transformer import GPT, GPTConfig
from tests.hf_cases import _trained_like, assert_same_state, bert, gpt2, snapshot, vit

SCHEMES = ["stable", "net2net", "netmorph"]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("growth", [{"mlp": 160}, {"layers": 3}, {"heads": 8},
                                    {"layers": 4, "hidden": 64, "mlp": 256},
                                    {"hidden": 64, "heads": 4}, {"hidden": 96, "heads": 8}],
                         ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_gpt2(growth: dict[str, int], scheme: str) -> None:
    parent = gpt2()
    before = snapshot(parent)
    child = sm.grow(parent, scheme=scheme, **growth)
    c = child.config
    if "heads" not in growth:  # head_dim kept: heads follow hidden
        assert c.n_embd // c.n_head == 8
    elif "hidden" not in growth:  # hidden follows heads
        assert (c.n_head, c.n_embd) == (8, 64)
    else:  # both given: the heads widen (head_dim = hidden / heads grows)
        assert (c.n_head, c.n_embd) == (growth["heads"], growth["hidden"])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(child(ids).logits, parent(ids).logits)
    assert child.lm_head.weight is child.transformer.wte.weight
    if scheme == "stable":
        assert sm.last_report(child).zero_fraction == 0.0
    assert_same_state(parent, before)


def test_gpt2_generate_and_train_mode_dropout() -> None:
    parent = gpt2().train()  # dropout 0.1 everywhere: the check runs with dropout off
    child = sm.grow(parent, layers=4, hidden=64, mlp=256)
    assert child.training and parent.training
    parent.eval()
    child.eval()
    ids = torch.tensor([[1, 2, 3]])
    a = parent.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = child.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("growth", [{"mlp": 96}, {"heads": 6}, {"layers": 3}, {"hidden": 64},
                                    {"layers": 4, "hidden": 64, "heads": 8, "mlp": 128}],
                         ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_vit(growth: dict[str, int], scheme: str) -> None:
    parent = vit()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    child = sm.grow(parent, scheme=scheme, inputs={"pixel_values": pixels}, **growth)
    with torch.no_grad():
        close(child(pixels).logits, parent(pixels).logits)
    assert child.config.head_dim == 8
    if scheme == "stable":
        assert sm.last_report(child).zero_fraction == 0.0


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_stable_hidden_at_any_width(qkv_bias: bool) -> None:
    parent = vit(qkv_bias=qkv_bias)  # without q/k/v biases the LayerNorm bias re-encodes alone
    child = sm.grow(parent, hidden=40)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        close(child(pixels).logits, parent(pixels).logits)
    assert sm.last_report(child).zero_fraction == 0.0
    with pytest.raises(sm.MorphError, match=r"netmorph's zero or copied coordinates keep a "
                                            r"LayerNorm's mean and variance only at multiples"):
        sm.grow(parent, hidden=40, scheme="netmorph")


@pytest.mark.parametrize("kind", ["Mistral", "Qwen3"])
def test_mistral_and_qwen3(kind: str) -> None:
    import transformers as tf

    config = getattr(tf, f"{kind}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, head_dim=8)
    parent = _trained_like(getattr(tf, f"{kind}ForCausalLM")(config))
    child = sm.grow(parent, layers=3, hidden=48, heads=6, mlp=80)
    assert sm.last_report(child).zero_fraction == 0.0
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        close(child(ids).logits, parent(ids).logits)


def test_project_gpt_delegates_to_its_growths() -> None:
    torch.manual_seed(0)
    parent = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                   n_head=2))
    child = sm.grow(parent, layers=4, hidden=32, heads=4, mlp=96)
    assert (child.config.n_layer, child.config.d_model) == (4, 32)
    assert child.config.blocks[0].n_head == 4 and child.config.blocks[0].d_mlp == 96
    ids = torch.randint(0, 29, (2, 8))
    with torch.no_grad():
        close(child(ids), parent(ids))
    with pytest.raises(sm.MorphError, match="kv_heads must equal heads"):
        sm.grow(parent, heads=4, kv_heads=2)
    with pytest.raises(sm.MorphError, match="n_layer=1 is not larger than the current 2"):
        sm.grow(parent, layers=1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bert_sequence_classification(scheme: str) -> None:
    parent = bert()
    before = snapshot(parent)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    probe = {"input_ids": ids, "token_type_ids": types}
    child = sm.grow(parent, hidden=96, heads=8, mlp=128, scheme=scheme, inputs=probe)
    assert (child.config.hidden_size, child.config.num_attention_heads) == (96, 8)
    with torch.no_grad():
        close(child(**probe).logits, parent(**probe).logits)
    if scheme == "stable":  # the only zeros: copies of the parent's padding embedding row
        rep = sm.last_report(child)
        named = dict(child.named_parameters())
        zeros = sum(int((named[n] == 0).sum()) for n in rep.changed)
        assert zeros == int((named["bert.embeddings.word_embeddings.weight"] == 0).sum()) > 0
        assert int((parent.bert.embeddings.word_embeddings.weight == 0).sum()) * 3 == zeros
    assert_same_state(parent, before)


def test_bert_model_outputs_and_refusals() -> None:
    parent = bert("BertModel")
    child = sm.grow(parent, heads=8, mlp=80)
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        a, b = parent(ids), child(ids)
    close(b.last_hidden_state[..., ::2], a.last_hidden_state)
    close(b.pooler_output[..., ::2], a.pooler_output)
    with pytest.raises(sm.MorphError, match=r"hidden=48: in a post-LayerNorm model .*multiples "
                                            r"of 32\); nearest: \[64\]"):
        sm.grow(parent, hidden=48, heads=6)
    with pytest.raises(sm.MorphError, match=r"no exact identity layer exists in a "
                                            r"post-LayerNorm model"):
        sm.grow(parent, layers=3)


@pytest.mark.parametrize(("make", "growth", "auto"), [
    (vit, {"hidden": 64, "heads": 8, "layers": 3}, "AutoModelForImageClassification"),
    (gpt2, {"hidden": 64, "layers": 3}, "AutoModelForCausalLM"),
    (bert, {"hidden": 64, "mlp": 96}, "AutoModelForSequenceClassification"),
], ids=["vit", "gpt2", "bert"])
def test_save_pretrained_round_trip(make: object, growth: dict[str, int], auto: str,
                                    tmp_path: object) -> None:
    import transformers as tf

    parent = make()
    sm.grow(parent, **growth).save_pretrained(tmp_path)
    loaded = getattr(tf, auto).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(parent)
    x = torch.randn(2, 3, 16, 16) if make is vit else torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        close(loaded(x).logits, parent(x).logits)
