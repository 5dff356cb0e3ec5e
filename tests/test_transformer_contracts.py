"""What every transformer growth guarantees, checked for every growth and scheme: the logits
are unchanged (float32, relative deviation <= 1e-5, on a batch the growth never saw), the
parent is untouched, dtype / train-eval mode / requires_grad survive, the param_map describes
the child's values, "stable" leaves no zeros, and bad input fails clearly before any work."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from stablemorph.morphs import MorphError
from stablemorph.record import history, last_report
from stablemorph.transformer import (
    GPT,
    SCHEMES,
    GPTConfig,
    GrowthVerificationError,
    grow,
    grow_d_model,
    grow_heads,
    grow_mlp,
    insert_block,
)
from stablemorph.transformer import units as units_module

torch.set_num_threads(1)

GROWTHS: dict[str, Callable[..., GPT]] = {
    "mlp": lambda m, **kw: grow_mlp(m, 80, **kw),
    "mlp+1": lambda m, **kw: grow_mlp(m, 65, blocks=[1], **kw),
    "heads": lambda m, **kw: grow_heads(m, 5, **kw),
    "d_model": lambda m, **kw: grow_d_model(m, 32, **kw),
    "depth": lambda m, **kw: insert_block(m, 1, **kw),
}


def trained_like(*, tie_head: bool = False, n_head: int = 2, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> GPT:
    """A small GPT with non-zero biases and LayerNorm parameters, as after training."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.uniform(vocab_size=29, block_size=16, d_model=16, n_layer=2,
                                  n_head=n_head, head_dim=8, tie_head=tie_head))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def unseen_batch() -> torch.Tensor:
    return torch.randint(0, 29, (8, 16), generator=torch.Generator().manual_seed(99))


def assert_same_function(parent: GPT, child: GPT, tol: float = 1e-5) -> None:
    x = unseen_batch()
    with torch.no_grad():
        ref, out = parent(x), child(x)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=0, atol=tol * scale)


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: GPT, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tie_head", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("growth", GROWTHS)
def test_growth_is_exact_and_leaves_the_parent_alone(growth: str, scheme: str,
                                                     tie_head: bool) -> None:
    parent = trained_like(tie_head=tie_head)
    before = snapshot(parent)
    child = GROWTHS[growth](parent, scheme=scheme, seed=3)
    assert_untouched(parent, before)
    assert_same_function(parent, child)
    report = last_report(child)
    assert report.scheme == scheme and report.max_rel <= 1e-5
    assert history(parent) == [] and len(history(child)) == 1
    record = history(child)[0]
    assert json.loads(json.dumps(record.kwargs)) == record.kwargs
    assert record.kwargs["seed"] == 3 and record.kwargs["scheme"] == scheme
    assert child.config.tie_head == tie_head
    if tie_head:
        assert child.head.weight is child.wte.weight


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("growth", GROWTHS)
def test_param_map_describes_every_child_value(growth: str, scheme: str) -> None:
    parent = trained_like(tie_head=growth == "d_model")
    child = GROWTHS[growth](parent, scheme=scheme)
    report = last_report(child)
    parent_params = dict(parent.named_parameters())
    child_params = dict(child.named_parameters())
    assert report.param_map.keys() == child_params.keys()
    for name, origin in report.param_map.items():
        value = child_params[name].detach()
        if origin.source is None:
            assert name in report.changed
            continue
        source = parent_params[origin.source].detach()
        if origin.index is None:
            torch.testing.assert_close(value, source, rtol=1e-6, atol=0)
            continue
        assert name in report.changed
        scale = torch.ones(len(origin.index)) if origin.scale is None else origin.scale.float()
        for k, i in enumerate(origin.index.tolist()):
            if i >= 0:
                torch.testing.assert_close(value.select(origin.dim, k),
                                           source.select(origin.dim, i) * scale[k],
                                           rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("growth", GROWTHS)
def test_stable_is_dense_and_the_zero_measure_sees_netmorph_zeros(growth: str) -> None:
    parent = trained_like()
    stable = GROWTHS[growth](parent, scheme="stable")
    report = last_report(stable)
    assert report.changed
    assert report.zero_fraction == 0.0
    values = dict(stable.named_parameters())
    for name in report.changed:
        assert (values[name] != 0).all(), name
    assert last_report(GROWTHS[growth](parent, scheme="netmorph")).zero_fraction > 0.0


@pytest.mark.parametrize("growth", GROWTHS)
def test_dtype_mode_and_requires_grad_survive(growth: str) -> None:
    parent = trained_like(dtype=torch.float64).eval()
    parent.wte.weight.requires_grad_(False)
    parent.blocks[0].ln1.weight.requires_grad_(False)
    child = GROWTHS[growth](parent, scheme="stable")
    assert not child.training
    assert {p.dtype for p in child.parameters()} == {torch.float64}
    assert_same_function(parent, child, tol=1e-12)
    frozen = {n for n, p in child.named_parameters() if not p.requires_grad}
    expected = {"wte.weight", "blocks.0.ln1.weight"}
    if growth == "depth":  # the new block 1 copies block 0's role
        expected.add("blocks.1.ln1.weight")
    assert frozen == expected
    assert GROWTHS[growth](parent.train(), scheme="stable").training


def test_chained_growths_stay_exact() -> None:
    parent = trained_like()
    child = grow_mlp(parent, 96, blocks=[0], scheme="netmorph")
    child = grow_d_model(child, 24, scheme="stable", seed=1)
    child = grow_heads(child, 3, scheme="net2net", seed=2)
    child = insert_block(child, 0, scheme="stable", seed=3)
    child = grow_mlp(child, 100, scheme="stable", seed=4)
    assert_same_function(parent, child)
    assert [r.op for r in history(child)] == ["grow_mlp", "grow_d_model", "grow_heads",
                                              "insert_block", "grow_mlp"]
    assert child.config.d_model == 24 and child.config.n_layer == 3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_grow_to_twice_the_depth_and_width(scheme: str) -> None:
    parent = trained_like()
    child = grow(parent, d_model=32, n_head=4, d_mlp=128, n_layer=4, scheme=scheme)
    assert child.config == GPTConfig.uniform(vocab_size=29, block_size=16, d_model=32,
                                             n_layer=4, n_head=4, head_dim=8, d_mlp=128)
    assert_same_function(parent, child)
    assert len(history(child)) == 5


def test_grow_to_one_and_a_half_width_with_stable() -> None:
    parent = trained_like()
    child = grow(parent, d_model=24, n_head=3, d_mlp=96, n_layer=4, scheme="stable")
    assert_same_function(parent, child)
    assert all(r.report.zero_fraction == 0.0 for r in history(child))


def test_grow_errors() -> None:
    parent = trained_like()
    with pytest.raises(ValueError, match="n_layer=2 is not larger than the current 2"):
        grow(parent, n_layer=2)
    with pytest.raises(ValueError, match="nothing to grow"):
        grow(parent)


ERRORS: list[tuple[Callable[[GPT], GPT], type[Exception], str]] = [
    (lambda m: grow_mlp(m, 64), ValueError, "d_mlp=64 is not larger than block 0's MLP width 64"),
    (lambda m: grow_mlp(m, 80, blocks=[2]), ValueError,
     r"unknown block index 2; the model has blocks 0..1"),
    (lambda m: grow_heads(m, 2), ValueError, "n_head=2 is not larger than block 0's 2 heads"),
    (lambda m: grow_heads(m, 3, blocks=[-1]), ValueError, "unknown block index -1"),
    (lambda m: grow_d_model(m, 16), ValueError, "d_model=16 is not larger than the current 16"),
    (lambda m: grow_d_model(m, 24, scheme="net2net"), ValueError,
     r"only for multiples of d_model=16 \(32, 48, ...\), got 24"),
    (lambda m: grow_d_model(m, 40, scheme="netmorph"), ValueError, "only for multiples"),
    (lambda m: insert_block(m, 3), ValueError, r"unknown block index 3; insert at 0..2"),
    (lambda m: insert_block(m, -1), ValueError, "unknown block index -1"),
    (lambda m: grow_mlp(m, 80, scheme="copy"), ValueError, "unknown scheme 'copy'"),
    (lambda m: grow_mlp(m, 80, sheme="net2net"), TypeError,
     r"grow_mlp\(\) got unexpected keyword arguments \['sheme'\]"),
    (lambda m: grow(m, n_layer=3, tol=1e-3, inputs=None), TypeError,
     r"grow\(\) got unexpected keyword arguments \['inputs'\]"),
]


@pytest.mark.parametrize(("call", "error", "message"), ERRORS)
def test_bad_input_fails_clearly_and_touches_nothing(call, error, message) -> None:
    parent = trained_like()
    before = snapshot(parent)
    with pytest.raises(error, match=message):
        call(parent)
    assert_untouched(parent, before)
    assert history(parent) == []


def test_tied_head_needs_a_multiple_of_the_width() -> None:
    parent = trained_like(tie_head=True)
    with pytest.raises(ValueError, match="with a tied head only multiples of d_model=16"):
        grow_d_model(parent, 24, scheme="stable")


def test_stable_depth_needs_two_heads() -> None:
    parent = trained_like(n_head=1)
    with pytest.raises(ValueError, match=r"'stable' needs >= 2 heads .* block 0 has 1 heads"):
        insert_block(parent, 1, scheme="stable")


def test_non_gpt_and_non_finite_weights_are_refused() -> None:
    with pytest.raises(TypeError, match=r"expects a stablemorph\.transformer\.GPT, got Linear"):
        grow_mlp(torch.nn.Linear(2, 2), 80)  # type: ignore[arg-type]
    parent = trained_like()
    with torch.no_grad():
        parent.blocks[1].mlp.fc.weight[0, 0] = float("nan")
    before = snapshot(parent)
    for growth in GROWTHS.values():
        with pytest.raises(MorphError, match=r"layer 'blocks.1.mlp.fc': parameter "
                                             r"'blocks.1.mlp.fc.weight' has non-finite"):
            growth(parent, scheme="stable")
    assert_untouched(parent, before)


def test_an_inexact_growth_is_caught_by_its_self_check(monkeypatch) -> None:
    # Break the cancellation of stable's new heads: the shared contract's probe must notice,
    # in eval and in train mode.
    monkeypatch.setattr(units_module, "_zero_sum", lambda cols, groups, size: cols)
    parent = trained_like()
    before = snapshot(parent)
    with pytest.raises(GrowthVerificationError,
                       match=r"grow_heads 'blocks.0.attn,blocks.1.attn' \(scheme 'stable'\) does "
                             r"not preserve the function: eval: max_rel=\S+, train: max_rel=\S+ "
                             r"> tolerance 1.0e-05"):
        grow_heads(parent, 4, scheme="stable")
    assert GrowthVerificationError is MorphError
    assert_untouched(parent, before)


def test_the_self_check_uses_the_probe_given() -> None:
    parent = trained_like()
    probe = torch.randint(0, 29, (2, 5))
    child = grow_heads(parent, 3, probe=probe, scheme="netmorph")
    assert last_report(child).max_rel == 0.0
    with pytest.raises(ValueError, match="exceeds block_size"):
        grow_heads(parent, 3, probe=torch.zeros(1, 17, dtype=torch.long))


def test_growths_are_morphs_save_load_and_run_from_the_cli(tmp_path, capsys) -> None:
    from stablemorph import MORPHS, apply, load, save
    from stablemorph.cli import MORPH_OPS, main
    from stablemorph.transformer.grow import GROWTHS

    assert sorted(MORPH_OPS) == sorted(MORPHS) and set(GROWTHS) < set(MORPHS)
    parent = trained_like(tie_head=True)
    child = grow(parent, d_model=32, n_head=3, d_mlp=80, n_layer=3, scheme="stable")
    replayed = parent
    for record in history(child):  # every record replays through sm.apply
        replayed = apply(record.op, replayed, record.target, **record.kwargs)
    for (name, p), q in zip(child.named_parameters(), replayed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    save(child, tmp_path / "child.pt")
    loaded = load(tmp_path / "child.pt")
    assert loaded.config == child.config and loaded.head.weight is loaded.wte.weight
    assert_same_function(child, loaded, tol=0.0)

    assert main(["morph", "--checkpoint", str(tmp_path / "child.pt"), "--op", "insert_block",
                 "--at", "blocks.3", "--kwargs", '{"seed": 1}', "--out",
                 str(tmp_path / "deeper.pt")]) == 0
    assert "insert_block('blocks.3', scheme='stable')" in capsys.readouterr().out
    deeper = load(tmp_path / "deeper.pt")
    assert deeper.config.n_layer == 4
    assert_same_function(child, deeper)


def test_morph_targets_are_checked() -> None:
    from stablemorph import apply

    parent = trained_like()
    with pytest.raises(MorphError, match=r"grow_mlp: target 'fc1' names no blocks; use e\.g\. "
                                         r"'blocks\.0\.mlp,blocks\.1\.mlp'"):
        apply("grow_mlp", parent, "fc1", d_mlp=80)
    with pytest.raises(MorphError, match=r"insert_block: target must be 'blocks.<index>'"):
        apply("insert_block", parent, "blocks")
    with pytest.raises(MorphError, match=r"grow_d_model: target must be 'd_model'"):
        apply("grow_d_model", parent, "blocks.0", d_model=32)
    child = apply("grow_heads", parent, "blocks.1", n_head=3)
    assert [b.n_head for b in child.config.blocks] == [2, 3]
    assert history(child)[-1].target == "blocks.1.attn"


@pytest.mark.parametrize("growth", ["heads", "depth"])
def test_hooks_on_rebuilt_modules_are_carried_over(growth: str) -> None:
    parent = trained_like()
    seen: list[tuple[int, ...]] = []
    handle = parent.blocks[1].mlp.register_forward_hook(
        lambda m, args, out: seen.append(tuple(out.shape)))
    child = GROWTHS[growth](parent, scheme="stable")
    seen.clear()
    with torch.no_grad():
        child(unseen_batch())
    assert seen == [(8, 16, 16)]  # the child's block 1 (block 2 after insert_block at 1)
    assert any("hooks carried over on ['blocks.1.mlp']" in n for n in last_report(child).notes)
    handle.remove()  # the parent's handle still removes the parent's hook
    seen.clear()
    with torch.no_grad():
        parent(unseen_batch())
    assert seen == []
