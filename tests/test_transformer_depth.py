"""Inserting an identity block: placement, what each scheme puts in it, and whether the new
block can learn."""

from __future__ import annotations

import pytest
import torch

from stablemorph.transformer import GPT, SCHEMES, GPTConfig, insert_block
from stablemorph.transformer.grow import insertion_points
from stablemorph.transformer.train import lm_loss

torch.set_num_threads(1)


def trained_like() -> GPT:
    torch.manual_seed(2)
    model = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                  n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_blocks_keep_their_order_around_the_new_one(scheme: str, index: int) -> None:
    parent = trained_like()
    child = insert_block(parent, index, scheme=scheme)
    assert child.config.n_layer == 3
    kept = [j for j in range(3) if j != index]
    for old, new in zip(parent.blocks, (child.blocks[j] for j in kept), strict=True):
        for (n, a), (_, b) in zip(old.named_parameters(), new.named_parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    x = torch.randn(3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(child.blocks[index](x), x, rtol=0, atol=2e-6)


def test_net2net_copies_the_neighbour_and_zeroes_the_outputs() -> None:
    parent = trained_like()
    new = insert_block(parent, 2, scheme="net2net").blocks[2]
    nb = parent.blocks[1]
    torch.testing.assert_close(new.attn.q.weight, nb.attn.q.weight, rtol=0, atol=0)
    torch.testing.assert_close(new.ln2.bias, nb.ln2.bias, rtol=0, atol=0)
    for proj in (new.attn.proj, new.mlp.proj):
        assert (proj.weight == 0).all() and (proj.bias == 0).all()


def test_stable_block_is_dense_with_cancelling_biases() -> None:
    new = insert_block(trained_like(), 1, scheme="stable").blocks[1]
    for name, p in new.named_parameters():
        assert (p != 0).all(), name
    torch.testing.assert_close(new.attn.proj.bias, -new.mlp.proj.bias, rtol=0, atol=0)


def new_block_grads(scheme: str) -> dict[str, float]:
    child = insert_block(trained_like(), 1, scheme=scheme)
    x = torch.randint(0, 29, (4, 16), generator=torch.Generator().manual_seed(0))
    lm_loss(child, x[:, :-1], x[:, 1:]).backward()
    return {n: float(p.grad.abs().max()) for n, p in child.blocks[1].named_parameters()}


def test_stable_block_learns_everywhere_at_once_zeroed_outputs_do_not() -> None:
    stable = new_block_grads("stable")
    assert all(g > 0 for g in stable.values()), stable
    for scheme in ("netmorph", "net2net"):
        grads = new_block_grads(scheme)
        # Behind a zero output projection, q, k, v and the MLP input get no gradient.
        assert grads["attn.q.weight"] == 0 and grads["mlp.fc.weight"] == 0
        assert grads["attn.proj.weight"] > 0 and grads["mlp.proj.weight"] > 0


def test_insertion_points_spread_new_blocks_evenly() -> None:
    assert insertion_points(2, 2) == [1, 3]  # after each block
    assert insertion_points(4, 2) == [2, 5]  # after blocks 1 and 3
    assert insertion_points(3, 1) == [3]
    assert insertion_points(2, 3) == [0, 2, 4]
