"""MLP-width and head growth: what each scheme puts into the new units."""

from __future__ import annotations

import pytest
import torch

from stablemorph.morphs import widen
from stablemorph.record import last_report
from stablemorph.transformer import GPT, GPTConfig, grow_heads, grow_mlp

torch.set_num_threads(1)


def trained_like() -> GPT:
    torch.manual_seed(1)
    model = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                  n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_logits(parent: GPT, child: GPT) -> None:
    x = torch.randint(0, 29, (8, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = parent(x), child(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_net2net_copies_units_and_splits_their_fan_out() -> None:
    parent = trained_like()
    child = grow_mlp(parent, 70, scheme="net2net", seed=4)
    fc0, fc1 = parent.blocks[0].mlp.fc.weight.detach(), child.blocks[0].mlp.fc.weight.detach()
    origin = last_report(child).param_map["blocks.0.mlp.fc.weight"]
    torch.testing.assert_close(fc1, fc0[origin.index])
    proj = last_report(child).param_map["blocks.0.mlp.proj.weight"]
    counts = torch.bincount(proj.index, minlength=64)
    torch.testing.assert_close(proj.scale, 1.0 / counts[proj.index].double())
    assert_same_logits(parent, child)


def test_netmorph_units_have_random_fan_in_and_zero_fan_out() -> None:
    parent = trained_like()
    child = grow_mlp(parent, 70, scheme="netmorph")
    new_in = child.blocks[1].mlp.fc.weight.detach()[64:]
    assert (new_in != 0).all()
    assert (child.blocks[1].mlp.fc.bias.detach()[64:] == 0).all()
    assert (child.blocks[1].mlp.proj.weight.detach()[:, 64:] == 0).all()


def test_stable_units_come_in_cancelling_pairs() -> None:
    parent = trained_like()
    child = grow_mlp(parent, 69, scheme="stable")  # 5 new units: two pairs, one split copy
    fc = child.blocks[0].mlp.fc.weight.detach()[64:]
    proj = child.blocks[0].mlp.proj.weight.detach()[:, 64:]
    torch.testing.assert_close(fc[0], fc[1], rtol=0, atol=0)
    torch.testing.assert_close(fc[2], fc[3], rtol=0, atol=0)
    assert not torch.allclose(fc[0], fc[2])
    torch.testing.assert_close(proj[:, 0], -proj[:, 1], rtol=0, atol=0)  # widen's (Z, -Z)
    torch.testing.assert_close(proj[:, 2], -proj[:, 3], rtol=0, atol=0)
    origin = last_report(child).param_map["blocks.0.mlp.fc.weight"]
    assert origin.index[64:68].tolist() == [-1] * 4 and int(origin.index[68]) >= 0
    assert (proj != 0).all() and (fc != 0).all()
    assert_same_logits(parent, child)


def test_grow_mlp_is_widen_of_each_blocks_fc() -> None:
    """The same child as ``sm.widen`` of ``blocks.<b>.mlp.fc`` (out_scale 1: no rescaling)."""
    parent = trained_like()
    child = grow_mlp(parent, 72, blocks=[1], scheme="stable", seed=5, out_scale=1.0)
    block = widen(parent.blocks[1], "mlp.fc", 72, scheme="stable", seed=6,
                  input_shape=[2, 8, 16])
    for name, p in block.named_parameters():
        torch.testing.assert_close(dict(child.blocks[1].named_parameters())[name], p,
                                   rtol=0, atol=0)
    assert child.config.blocks[1].d_mlp == 72 and child.config.blocks[0].d_mlp == 64


def test_stable_single_unit_is_an_unequal_split() -> None:
    parent = trained_like()
    child = grow_mlp(parent, 65, blocks=[0], scheme="stable", seed=2)
    origin = last_report(child).param_map["blocks.0.mlp.proj.weight"]
    j = int(origin.index[64])
    a = float(origin.scale[j])
    assert 0.25 <= a <= 0.75 and float(origin.scale[64]) == pytest.approx(1.0 - a)
    w = parent.blocks[0].mlp.proj.weight.detach()[:, j]
    torch.testing.assert_close(child.blocks[0].mlp.proj.weight.detach()[:, 64], (1 - a) * w)
    assert child.config.blocks[1].d_mlp == 64
    assert_same_logits(parent, child)


@pytest.mark.parametrize("scheme", ["net2net", "netmorph", "stable"])
def test_heads_keep_their_size_and_old_heads(scheme: str) -> None:
    parent = trained_like()
    child = grow_heads(parent, 4, blocks=[1], scheme=scheme)
    assert [b.n_head for b in child.config.blocks] == [2, 4]
    assert child.blocks[1].attn.head_dim == 8
    old, new = parent.blocks[1].attn, child.blocks[1].attn
    for m in ("q", "k", "v"):
        torch.testing.assert_close(getattr(new, m).weight.detach()[:16],
                                   getattr(old, m).weight.detach())
    assert_same_logits(parent, child)


def test_stable_heads_share_q_k_v_within_a_group() -> None:
    parent = trained_like()
    attn = grow_heads(parent, 4, scheme="stable").blocks[0].attn
    for m in (attn.q, attn.k, attn.v):
        w = m.weight.detach()
        torch.testing.assert_close(w[16:24], w[24:32], rtol=0, atol=0)
    proj = attn.proj.weight.detach()
    torch.testing.assert_close(proj[:, 16:24] + proj[:, 24:32], torch.zeros(16, 8), rtol=0,
                               atol=0)


def test_out_scale_sets_the_scale_of_stable_fan_out() -> None:
    parent = trained_like()
    existing = parent.blocks[0].mlp.proj.weight.detach().pow(2).mean().sqrt()
    for out_scale in (0.1, 1.0):
        child = grow_mlp(parent, 256, scheme="stable", out_scale=out_scale)
        new = child.blocks[0].mlp.proj.weight.detach()[:, 64:]
        assert float(new.pow(2).mean().sqrt() / existing) == pytest.approx(out_scale, rel=0.15)
        assert last_report(child).zero_fraction == 0.0
        assert_same_logits(parent, child)


@pytest.mark.parametrize("out_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_out_scale_must_be_positive_and_finite(out_scale: float) -> None:
    with pytest.raises(ValueError, match="out_scale must be a positive finite number"):
        grow_heads(trained_like(), 3, out_scale=out_scale)
