"""Residual-width growth: the LayerNorm algebra behind it, and the growth at several widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stablemorph.record import last_report
from stablemorph.transformer import GPT, SCHEMES, GPTConfig, grow_d_model
from stablemorph.transformer.stream import stream_map

torch.set_num_threads(1)


def trained_like(tie_head: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                  n_head=2, tie_head=tie_head))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_logits(parent: GPT, child: GPT) -> None:
    x = torch.randint(0, 29, (8, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = parent(x), child(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize(("d", "d_new"), [(16, 17), (16, 24), (16, 32), (16, 40), (6, 15),
                                          (4, 12)])
def test_stream_map_preserves_mean_variance_and_layernorm(d: int, d_new: int) -> None:
    smap = stream_map(d, d_new, torch.Generator().manual_seed(0))
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(smap.U.T @ smap.U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(smap.U @ torch.ones(d, dtype=torch.float64),
                               (d / d_new) ** 0.5 * torch.ones(d_new, dtype=torch.float64))
    torch.testing.assert_close(smap.A, (d_new / d) ** 0.5 * smap.U)
    n = smap.N
    assert n.shape == (d_new, d_new - d)
    torch.testing.assert_close(n.T @ n, torch.eye(d_new - d, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(n.T @ smap.A, torch.zeros(d_new - d, d, dtype=torch.float64),
                               rtol=0, atol=1e-12)

    x = 3.0 * torch.randn(50, d, dtype=torch.float64) + 1.5
    xn = x @ smap.A.T
    torch.testing.assert_close(xn.mean(-1), x.mean(-1))
    torch.testing.assert_close(xn.var(-1, unbiased=False), x.var(-1, unbiased=False))
    # n'(A x) = sqrt(d'/d) U n(x), eps included
    torch.testing.assert_close(F.layer_norm(xn, (d_new,), eps=1e-5),
                               (d_new / d) ** 0.5 * F.layer_norm(x, (d,), eps=1e-5) @ smap.U.T)


def test_integer_multiples_are_plain_duplication() -> None:
    smap = stream_map(4, 12, torch.Generator().manual_seed(0))
    x = torch.arange(4, dtype=torch.float64)
    assert (x @ smap.A.T).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert smap.dup.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_copying_part_of_the_stream_changes_the_layernorm() -> None:
    # Why net2net / netmorph raise for non-multiples: x' = [x, x[:8]] (or [x, 0]) changes
    # the statistics the LayerNorm divides by.
    x = torch.randn(20, 16, dtype=torch.float64)
    for xn in (torch.cat([x, x[:, :8]], 1), torch.cat([x, torch.zeros(20, 8)], 1)):
        assert not torch.allclose(xn.var(-1, unbiased=False), x.var(-1, unbiased=False))


@pytest.mark.parametrize("d_new", [17, 24, 40, 48])
def test_stable_takes_any_larger_width(d_new: int) -> None:
    parent = trained_like()
    child = grow_d_model(parent, d_new, scheme="stable")
    assert child.config.d_model == d_new
    assert_same_logits(parent, child)
    report = last_report(child)
    assert report.zero_fraction == 0.0
    if d_new % 16:  # mixed within blocks: no parameter is an indexed copy any more
        assert all(o.source is None for o in report.param_map.values())
    assert "blocks of" in report.notes[0]


@pytest.mark.parametrize("tie_head", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_three_times_the_width(scheme: str, tie_head: bool) -> None:
    parent = trained_like(tie_head)
    child = grow_d_model(parent, 48, scheme=scheme, seed=2)
    assert_same_logits(parent, child)


def test_net2net_and_netmorph_reads() -> None:
    parent = trained_like()
    w = parent.blocks[0].mlp.fc.weight.detach()
    copy = grow_d_model(parent, 32, scheme="net2net").blocks[0].mlp.fc.weight.detach()
    torch.testing.assert_close(copy, w.repeat_interleave(2, dim=1) / 2, rtol=0, atol=1e-7)
    zero = grow_d_model(parent, 32, scheme="netmorph").blocks[0].mlp.fc.weight.detach()
    torch.testing.assert_close(zero[:, 0::2], w, rtol=0, atol=0)
    assert (zero[:, 1::2] == 0).all()


def test_stable_reads_split_unequally_and_tied_shares_are_positive() -> None:
    parent = trained_like(tie_head=True)
    child = grow_d_model(parent, 32, scheme="stable")
    w = child.blocks[0].attn.q.weight.detach()
    assert not torch.allclose(w[:, 0::2], w[:, 1::2])  # the copies are read differently
    g, gf = parent.ln_f.weight.detach(), child.ln_f.weight.detach()
    shares = gf.view(16, 2) / g[:, None]
    torch.testing.assert_close(shares.sum(1), torch.ones(16))
    assert (shares > 0).all() and not torch.allclose(shares, torch.full_like(shares, 0.5))


def test_stable_copes_with_zero_layernorm_gains() -> None:
    parent = trained_like()
    with torch.no_grad():
        parent.blocks[0].ln2.weight[:4] = 0.0
    for d_new in (24, 32):
        child = grow_d_model(parent, d_new, scheme="stable")
        assert_same_logits(parent, child)
        assert (child.blocks[0].ln2.weight != 0).all()
