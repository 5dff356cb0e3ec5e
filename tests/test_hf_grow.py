"""sm.grow on Llama and Qwen2 (RMSNorm, RoPE, SwiGLU, grouped-query attention, tied and untied
heads, q/k/v biases): every dimension under every scheme, exact logits and generated tokens,
density under ``stable``, a plain-transformers round trip, optimiser transfer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import stablemorph as sm
from tests.hf_cases import assert_same_state, llama, qwen2, snapshot

GROWTHS = [
    {"mlp": 96},
    {"mlp": 65},  # one new unit: stable splits an old one
    {"heads": 8},  # kv heads stay (groups of 2 -> 4)
    {"heads": 6, "hidden": 48},  # kv heads stay (groups of 2 -> 3)
    {"heads": 8, "kv_heads": 4},
    {"heads": 8, "kv_heads": 8},  # groups shrink: each old kv head is copied
    {"hidden": 64},
    {"hidden": 48},  # not a multiple
    {"layers": 3},
    {"layers": 4, "hidden": 64, "heads": 8, "kv_heads": 4, "mlp": 128},
]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def config_sizes(model: torch.nn.Module) -> dict[str, int]:
    c = model.config
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "mlp": c.intermediate_size}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", ["stable", "net2net", "netmorph"])
@pytest.mark.parametrize("growth", GROWTHS, ids=lambda g: "-".join(f"{k}{v}" for k, v in
                                                                   g.items()))
def test_llama_every_dimension(growth: dict[str, int], scheme: str, tied: bool) -> None:
    parent = llama(tied=tied)
    before = snapshot(parent)
    if scheme == "net2net" and growth.get("hidden") == 48:
        with pytest.raises(sm.MorphError, match="only multiples of 32 allow; nearest: 64"):
            sm.grow(parent, scheme=scheme, **growth)
        assert_same_state(parent, before)
        return
    child = sm.grow(parent, scheme=scheme, **growth)
    assert type(child) is type(parent)
    want = {**config_sizes(parent), **growth}
    assert config_sizes(child) == want
    assert child.config.head_dim == 8
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(child, ids), logits(parent, ids), rtol=0,
                               atol=1e-5 * logits(parent, ids).abs().max().item())
    rep = sm.last_report(child)
    assert rep.max_rel <= 1e-5
    assert rep.scheme == scheme and rep.op == "grow"
    if scheme == "stable":
        assert rep.zero_fraction == 0.0
        for name in rep.changed:
            assert int((dict(child.named_parameters())[name] == 0).sum()) == 0, name
    assert_same_state(parent, before)
    if tied:
        assert child.lm_head.weight is child.model.embed_tokens.weight


def test_qwen2_biases_and_generate() -> None:
    parent = qwen2(tied=True)
    child = sm.grow(parent, layers=4, hidden=48, heads=8, kv_heads=4, mlp=96)
    assert child.model.layers[3].self_attn.q_proj.bias.shape == (64,)
    assert sm.last_report(child).zero_fraction == 0.0
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    a = parent.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = child.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()


def test_save_pretrained_round_trip_without_stablemorph(tmp_path: object) -> None:
    parent = qwen2(tied=False)
    child = sm.grow(parent, layers=3, hidden=40, heads=6, mlp=80)
    child.save_pretrained(tmp_path)
    ids = [[3, 14, 15, 92, 65, 35]]
    code = (
        "import json, sys, torch, transformers as tf\n"
        f"m = tf.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'stablemorph' not in sys.modules\n"
        f"print(json.dumps(m(torch.tensor({ids})).logits.flatten()[:50].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    loaded = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    want = logits(child, torch.tensor(ids)).flatten()[:50]
    torch.testing.assert_close(loaded, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(parent, torch.tensor(ids)).flatten()[:50], want,
                               rtol=0, atol=1e-5 * want.abs().max().item())


def test_optimizer_transfer_and_origins() -> None:
    parent = llama()
    opt = torch.optim.AdamW(parent.parameters(), lr=1e-3)
    parent(torch.randint(0, 100, (2, 6))).logits.square().mean().backward()
    opt.step()
    child = sm.grow(parent, layers=4, mlp=96, scheme="netmorph")
    rep = sm.last_report(child)
    assert set(rep.param_map) == {n for n, _ in child.named_parameters()}
    # block 1 of the child is a new block; block 2 is the parent's block 1, unchanged in place
    new_q = rep.param_map["model.layers.1.self_attn.q_proj.weight"]
    assert new_q.is_fresh and new_q.stand_in == "model.layers.0.self_attn.q_proj.weight"
    assert rep.param_map["model.layers.2.self_attn.q_proj.weight"].source == \
        "model.layers.1.self_attn.q_proj.weight"
    up = rep.param_map["model.layers.2.mlp.up_proj.weight"]
    assert up.dim == 0 and up.index.tolist() == [*range(64), *[-1] * 32]
    new_opt = sm.transfer_optimizer(opt, parent, child)
    state = new_opt.state[child.model.layers[2].self_attn.q_proj.weight]
    torch.testing.assert_close(state["exp_avg"],
                               opt.state[parent.model.layers[1].self_attn.q_proj.weight]
                               ["exp_avg"])
    child(torch.randint(0, 100, (2, 6))).logits.square().mean().backward()
    new_opt.step()
    # a second growth of the child: history carried over, the optimiser follows again
    grandchild = sm.grow(child, hidden=48)
    assert [r.kwargs["hidden"] for r in sm.history(grandchild)] == [32, 48]
    sm.transfer_optimizer(new_opt, child, grandchild)


def test_probes_dict_ids_and_mask() -> None:
    parent = llama()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    child = sm.grow(parent, mlp=80, inputs={"input_ids": ids, "attention_mask": mask})
    assert sm.history(child)[-1].kwargs["input_shape"] == [2, 7]
    with torch.no_grad():
        a = parent(input_ids=ids, attention_mask=mask).logits
        b = child(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())
    sm.grow(parent, mlp=80, inputs=ids)


def test_import_stablemorph_does_not_import_transformers() -> None:
    code = "import sys, stablemorph; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_llama_with_output_biases_and_batch_encoding() -> None:
    import transformers as tf

    parent = llama(attention_bias=True, mlp_bias=True)
    ids = torch.randint(0, 100, (2, 6))
    enc = tf.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    child = sm.grow(parent, layers=4, hidden=48, heads=6, mlp=80, inputs=enc)
    assert sm.last_report(child).zero_fraction == 0.0
    torch.testing.assert_close(logits(child, ids), logits(parent, ids), rtol=0,
                               atol=1e-5 * logits(parent, ids).abs().max().item())
    only_attn = llama(attention_bias=True)  # o_proj bias but no down_proj bias: it stays 0
    child = sm.grow(only_attn, layers=3)
    assert not child.model.layers[2].self_attn.o_proj.bias.any()  # the new block (last)
    torch.testing.assert_close(logits(child, ids), logits(only_attn, ids), rtol=0,
                               atol=1e-5 * logits(only_attn, ids).abs().max().item())


def test_tied_uniform_final_norm_takes_a_dense_isometry() -> None:
    parent = llama(tied=True)
    with torch.no_grad():
        parent.model.norm.weight.fill_(0.7)
    child = sm.grow(parent, hidden=48)
    torch.testing.assert_close(child.model.norm.weight.detach(),
                               torch.full((48,), 0.7 * 32 / 48))
    assert sm.last_report(child).zero_fraction == 0.0
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(logits(child, ids), logits(parent, ids), rtol=0,
                               atol=1e-5 * logits(parent, ids).abs().max().item())
    # every old coordinate is spread over all new ones (not one block of new ones each):
    # child embedding = parent embedding @ A^T with A dense
    a_t = torch.linalg.lstsq(parent.model.embed_tokens.weight.detach().double(),
                             child.model.embed_tokens.weight.detach().double()).solution
    assert (a_t.abs() > 1e-4).float().mean() > 0.9


def test_frozen_parent_gives_frozen_child() -> None:
    parent = llama()
    for p in parent.parameters():
        p.requires_grad_(False)
    parent.lm_head.weight.requires_grad_(True)
    child = sm.grow(parent, layers=3, mlp=80)
    assert [n for n, p in child.named_parameters() if p.requires_grad] == ["lm_head.weight"]


def test_untied_weights_under_a_tying_config() -> None:
    parent = llama(tied=True)
    parent.lm_head.weight = torch.nn.Parameter(parent.lm_head.weight.detach() * 1.5)
    assert parent.config.tie_word_embeddings
    child = sm.grow(parent, hidden=48)
    assert not child.config.tie_word_embeddings
    assert child.lm_head.weight is not child.model.embed_tokens.weight
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(logits(child, ids), logits(parent, ids), rtol=0,
                               atol=1e-5 * logits(parent, ids).abs().max().item())


def test_gradient_checkpointing_and_train_mode_carried_over() -> None:
    parent = llama()
    parent.activation_checkpointing_enable()
    parent.train()
    child = sm.grow(parent, layers=3)
    assert child.is_activation_checkpointing and child.training and parent.training
