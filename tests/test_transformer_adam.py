"""Adam/AdamW state carried over transformer growths by the one optimiser transfer
(:func:`stablemorph.optim.transfer_optimizer`; ``transfer_adam`` is its alias)."""

from __future__ import annotations

import copy

import pytest
import torch

from stablemorph.optim import TransferRule, transfer_optimizer
from stablemorph.record import ParamOrigin, compose_origins, last_report
from stablemorph.transformer import (
    GPT,
    SCHEMES,
    GPTConfig,
    grow,
    grow_d_model,
    grow_heads,
    grow_mlp,
    insert_block,
    transfer_adam,
)
from stablemorph.transformer.train import OptimConfig, lm_loss, make_adamw

torch.set_num_threads(1)

GROWTHS = {
    "mlp": lambda m, s: grow_mlp(m, 70, scheme=s),
    "heads": lambda m, s: grow_heads(m, 3, scheme=s),
    "d_model": lambda m, s: grow_d_model(m, 32, scheme=s),
    "depth": lambda m, s: insert_block(m, 1, scheme=s),
}


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 29, (4, 17), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def trained_with_adamw() -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                  n_head=2))
    opt = make_adamw(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    for step in range(3):
        opt.zero_grad()
        lm_loss(model, *batch(step)).backward()
        opt.step()
    return model, opt


def snapshot_state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(("scheme", "borrow"), [*((s, True) for s in SCHEMES),
                                                ("stable", False)])
@pytest.mark.parametrize("growth", GROWTHS)
def test_state_follows_the_param_map(growth: str, scheme: str, borrow: bool) -> None:
    parent, opt = trained_with_adamw()
    before = snapshot_state(opt)
    child = GROWTHS[growth](parent, scheme)
    # the published mapping (the stable step rule's adjustments: test_stable_rule.py)
    rule = TransferRule(scaled=frozenset(), fresh_state="borrow" if borrow else "none",
                        adaptive_new=False)
    new = transfer_optimizer(opt, parent, child, rule=rule)
    torch.testing.assert_close(opt.state_dict(), before, rtol=0, atol=0)

    assert type(new) is torch.optim.AdamW
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in new.param_groups] == [1e-2, 1e-2]
    in_groups = [id(p) for g in new.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in child.parameters())
    for p in new.param_groups[0]["params"]:
        assert p.dim() >= 2

    parent_params = dict(parent.named_parameters())
    for name, p in child.named_parameters():
        origin = last_report(child).param_map[name]
        if origin.source is None:
            # the growth records the parameter it stands in for: same kind, same group
            assert origin.stand_in in parent_params, name
            assert name.rsplit(".", 1)[-1] == origin.stand_in.rsplit(".", 1)[-1]
            if not borrow:
                assert p not in new.state
                continue
            src = opt.state[parent_params[origin.stand_in]]
            state = new.state[p]
            assert float(state["step"]) == 3.0 and (state["exp_avg"] == 0).all()
            torch.testing.assert_close(state["exp_avg_sq"],
                                       torch.full_like(p, float(src["exp_avg_sq"].mean())))
            continue
        state = new.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert float(state["step"]) == 3.0
        src = opt.state[parent_params[origin.source]]
        if origin.index is None:
            torch.testing.assert_close(state["exp_avg"], src["exp_avg"], rtol=0, atol=0)
            continue
        for k, i in enumerate(origin.index.tolist()):
            m, v = state["exp_avg"].select(origin.dim, k), state["exp_avg_sq"].select(
                origin.dim, k)
            if i >= 0:  # copied unscaled under this rule
                torch.testing.assert_close(m, src["exp_avg"].select(origin.dim, i))
                torch.testing.assert_close(v, src["exp_avg_sq"].select(origin.dim, i))
            else:
                assert (m == 0).all()
                torch.testing.assert_close(v, torch.full_like(v, float(src["exp_avg_sq"]
                                                                        .mean())))

    new.zero_grad()
    lm_loss(child, *batch(9)).backward()
    new.step()
    assert all(torch.isfinite(p).all() for p in child.parameters())


def test_transfer_after_a_chain_of_growths() -> None:
    parent, opt = trained_with_adamw()
    child = grow(parent, d_mlp=80, n_head=3, n_layer=3, scheme="net2net")
    new = transfer_adam(opt, parent, child)
    fc = dict(child.named_parameters())["blocks.2.mlp.fc.weight"]  # parent block 1, widened
    index = last_report(child).param_map  # the depth step only renamed it
    assert index["blocks.2.mlp.fc.weight"].source == "blocks.1.mlp.fc.weight"
    src = opt.state[parent.blocks[1].mlp.fc.weight]["exp_avg"]
    torch.testing.assert_close(new.state[fc]["exp_avg"][:64], src, rtol=0, atol=0)


def test_compose_origins() -> None:
    inner = {"b": ParamOrigin("a", 0, torch.tensor([0, 1, 1, -1]), torch.tensor([1., .5, .5, 1.])),
             "c": ParamOrigin(None, stand_in="z", lr_scale=0.5), "d": ParamOrigin("x")}
    outer = {"b2": ParamOrigin("b", 0, torch.tensor([2, 3, -1, 0]), torch.tensor([2.] * 4)),
             "c2": ParamOrigin("c"), "d2": ParamOrigin("d", 1, torch.tensor([0])),
             "e": ParamOrigin("b", 1, torch.tensor([0]))}
    out = compose_origins(outer, inner)
    assert out["b2"].source == "a" and out["b2"].index.tolist() == [1, -1, -1, 0]
    assert out["b2"].scale.tolist()[0] == 1.0 and out["b2"].scale.tolist()[3] == 2.0
    assert out["c2"].source is None and out["c2"].stand_in == "z" and out["c2"].lr_scale == 0.5
    assert out["d2"].source == "x" and out["d2"].dim == 1
    assert out["e"].source is None and out["e"].stand_in == "a"  # indexed along two dims


def test_frozen_parameters_stay_out_of_the_optimiser() -> None:
    torch.manual_seed(0)
    parent = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                   n_head=2))
    parent.wte.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in parent.parameters() if p.requires_grad], lr=1e-3)
    child = grow_mlp(parent, 70)
    new = transfer_adam(opt, parent, child)
    held = {id(p) for g in new.param_groups for p in g["params"]}
    assert id(child.wte.weight) not in held
    assert len(held) == sum(1 for p in child.parameters() if p.requires_grad)
    assert type(new) is torch.optim.Adam and not new.state  # no step taken yet: no state


def test_errors() -> None:
    parent, opt = trained_with_adamw()
    child = grow_mlp(parent, 70)
    with pytest.raises(TypeError, match="handles Adam and AdamW, got SGD"):
        transfer_adam(torch.optim.SGD(parent.parameters(), lr=0.1), parent, child)
    with pytest.raises(ValueError, match="the child was not morphed from the parent"):
        transfer_adam(opt, child, parent)
    other, _ = trained_with_adamw()
    with pytest.raises(ValueError, match=r"holds a \(29, 16\) tensor that is not a parameter "
                                         "of the parent GPT"):
        transfer_adam(opt, other, grow_mlp(other, 70))  # opt holds another model's params
