"""sm.grow on Hugging Face base models without a head (what ``AutoModel`` returns): the
output is the last hidden state, so layers, heads and mlp grow exactly and hidden is refused
with the reason."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import stablemorph as sm
from tests.hf_cases import assert_same_state, gpt2, llama, snapshot, vit


def test_llama_base_model_grows_in_layers_heads_and_mlp() -> None:
    parent = llama().model  # LlamaModel: the trunk of the causal LM
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    child = sm.grow(parent, layers=4, heads=8, mlp=96)
    assert type(child).__name__ == "LlamaModel"
    assert (child.config.num_hidden_layers, child.config.num_attention_heads) == (4, 8)
    with torch.no_grad():
        torch.testing.assert_close(child(ids).last_hidden_state,
                                   parent(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert sm.last_report(child).max_rel < 1e-5


def test_vit_base_model_keeps_hidden_state_and_pooler() -> None:
    parent = vit().vit  # ViTModel with its pooler
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    child = sm.grow(parent, layers=3, mlp=80)
    with torch.no_grad():
        old, new = parent(pixel_values=x), child(pixel_values=x)
    torch.testing.assert_close(new.last_hidden_state, old.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.pooler_output, old.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    (lambda: llama().model, {"hidden": 64},
     r"LlamaModel has no head, so its output is the hidden state itself: hidden=64 would "
     r"change the output's width \(it is 32\); grow layers, mlp, heads here"),
    (lambda: gpt2().transformer, {"heads": 8},
     r"GPT2Model has no head.*GPT-2 heads take hidden along\); grow layers, mlp here"),
])
def test_hidden_growth_of_a_base_model_is_refused(make, kwargs: dict, message: str) -> None:
    parent = make()
    before = snapshot(parent)
    with pytest.raises(sm.MorphError, match=message):
        sm.grow(parent, **kwargs)
    assert_same_state(parent, before)
