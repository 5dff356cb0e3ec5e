"""sm.grow's refusals: unsupported models, shrinking, heads that do not divide, widths no exact
re-encoding reaches, bad probes (naming whether the parent or the child failed); the parent
is untouched every time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import stablemorph as sm
from tests.hf_cases import assert_same_state, gpt2, llama, snapshot


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mlp": 32}, "mlp=32 would shrink LlamaForCausalLM \\(it has 64\\); sm.grow only grows"),
    ({"layers": 1}, "layers=1 would shrink"),
    ({"hidden": 32, "mlp": 64}, "nothing to grow; LlamaForCausalLM has layers=2, hidden=32"),
    ({"heads": 5}, "kv_heads=2 does not divide heads=5 .*nearest: heads in \\[4, 6\\] with "
                   "kv_heads=2, or kv_heads in \\[5\\] with heads=5"),
    ({"mlp": 80.5}, "mlp=80.5 is not an integer"),
    ({"mlp": 80, "scheme": "copy"}, "unknown scheme 'copy'"),
    ({"mlp": 80, "out_scale": 0.0}, "out_scale=0.0 must be a finite number > 0"),
    ({"mlp": 80, "seed": 1.5}, "seed=1.5 is not an integer"),
    ({"hidden": 40, "scheme": "net2net"}, "hidden=40: net2net .* nearest: 64"),
])
def test_llama_refusals_leave_parent_untouched(kwargs: dict, message: str) -> None:
    parent = llama()
    before = snapshot(parent)
    with pytest.raises(sm.MorphError, match=message):
        sm.grow(parent, **kwargs)
    assert_same_state(parent, before)


def test_llama_heads_must_divide_hidden() -> None:
    parent = llama()
    before = snapshot(parent)
    with pytest.raises(sm.MorphError, match=r"LlamaConfig refuses the child's config .*not a "
                                            r"multiple.*nearest: heads in \[4, 8\] with "
                                            r"hidden=32, or hidden in \[36\] with heads=6"):
        sm.grow(parent, heads=6)
    assert_same_state(parent, before)


def test_kv_groups_that_cannot_hold_the_old_ones() -> None:
    parent = llama(kv=2, heads=6, hidden=48)
    with pytest.raises(sm.MorphError, match=r"kv_heads=3 with heads=6 splits each group of 3 "
                                            r".* valid kv_heads for heads=6: \[2, 6\]"):
        sm.grow(parent, kv_heads=3)
    child = sm.grow(parent, kv_heads=6)
    assert child.config.num_key_value_heads == 6


def test_gpt2_heads_and_hidden_move_together() -> None:
    parent = gpt2()
    before = snapshot(parent)
    with pytest.raises(sm.MorphError, match=r"head_dim = hidden / heads, which cannot shrink "
                                            r"below 8 nor be fractional: heads=8 needs hidden "
                                            r"in 64, 72, ...; hidden=48 takes heads <= 6"):
        sm.grow(parent, heads=8, hidden=48)
    with pytest.raises(sm.MorphError, match=r"hidden=42 is neither a multiple of 8 \(heads "
                                            r"follow\) nor of heads=4 \(heads widen\); "
                                            r"nearest: hidden in \[40, 44, 48\]"):
        sm.grow(parent, hidden=42)
    # hidden 48 would keep head_dim, but a tied head after a LayerNorm needs copies
    with pytest.raises(sm.MorphError, match=r"tied to the embedding.*multiples of 32.*nearest: "
                                            r"64"):
        sm.grow(parent, heads=6)
    with pytest.raises(sm.MorphError, match=r"kv_heads must equal heads=8"):
        sm.grow(parent, heads=8, kv_heads=4)
    assert_same_state(parent, before)


def test_stable_identity_block_needs_two_heads() -> None:
    parent = llama(kv=1, heads=1, head_dim=32)
    with pytest.raises(sm.MorphError, match=r"needs >= 2 heads and >= 2 MLP units .* it would "
                                            r"have 1 and 64; .*netmorph"):
        sm.grow(parent, layers=3)
    sm.grow(parent, layers=3, scheme="netmorph")


def test_unsupported_architecture() -> None:
    import transformers as tf

    model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             vocab_size=50))
    with pytest.raises(sm.MorphError, match=r"does not support BertForMaskedLM \(model_type "
                                            r"'bert'\); supported: .*LlamaForCausalLM"):
        sm.grow(model, layers=2)
    with pytest.raises(sm.MorphError, match=r"does not support Sequential; supported"):
        sm.grow(nn.Sequential(nn.Linear(2, 2)), layers=2)


def test_bad_probes_say_who_failed() -> None:
    parent = llama()
    before = snapshot(parent)
    with pytest.raises(sm.MorphError, match=r"LlamaForCausalLM.forward takes no 'pixel_values'"):
        sm.grow(parent, mlp=80, inputs={"pixel_values": torch.zeros(1, 3, 4, 4)})
    with pytest.raises(sm.MorphError, match=r"the parent LlamaForCausalLM failed on the probe "
                                            r"\(IndexError"):
        sm.grow(parent, mlp=80, inputs=torch.tensor([[5, 1000]]))
    with pytest.raises(sm.MorphError, match=r"a float tensor of shape \(2, 3\) cannot feed"):
        sm.grow(parent, mlp=80, inputs=torch.zeros(2, 3))
    with pytest.raises(sm.MorphError, match=r"inputs\['input_ids'\]: expected a tensor, got "
                                            r"list \(use return_tensors='pt'\)"):
        sm.grow(parent, mlp=80, inputs={"input_ids": [[1, 2]]})
    assert_same_state(parent, before)


def test_non_finite_parent_refused() -> None:
    parent = llama()
    with torch.no_grad():
        parent.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(sm.MorphError, match=r"model.layers.0.mlp.up_proj.*non-finite"):
        sm.grow(parent, mlp=80)


def test_child_failures_are_reported_as_the_childs(monkeypatch: pytest.MonkeyPatch) -> None:
    import stablemorph.hf.growth as hf_grow

    real_write = hf_grow.write

    def failing(*args: object) -> torch.nn.Module:
        child = real_write(*args)

        def forward(**kwargs: object) -> None:
            raise RuntimeError("boom")

        child.forward = forward
        return child

    def inexact(*args: object) -> torch.nn.Module:
        child = real_write(*args)
        with torch.no_grad():
            child.model.layers[0].mlp.down_proj.weight.mul_(1.01)
        return child

    parent = llama()
    before = snapshot(parent)
    monkeypatch.setattr(hf_grow, "write", failing)
    with pytest.raises(sm.MorphError, match=r"the child LlamaForCausalLM failed on the probe "
                                            r".*RuntimeError: boom"):
        sm.grow(parent, mlp=80)
    monkeypatch.setattr(hf_grow, "write", inexact)
    with pytest.raises(sm.MorphError, match=r"does not preserve the logits: eval: max_abs="
                                            r".*noise floor.*tolerance max_rel 1.0e-05"):
        sm.grow(parent, mlp=80)
    assert_same_state(parent, before)
