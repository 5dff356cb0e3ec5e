"""DDP: a 2-process CPU/gloo run that trains, morphs with morph_ddp and trains on stays
identical across ranks and equal to a single-process run on the same global batches;
errors on one rank reach every rank; a DDP-wrapped model given to a morph is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from stablemorph.checkpoint import load, save
from stablemorph.ddp import ddp_constructor_kwargs, morph_ddp
from stablemorph.experiment.data import Dataset, load_dataset
from stablemorph.experiment.launch import launch
from stablemorph.experiment.train import rank_slice, train
from stablemorph.morphs import MORPHS, MorphError, apply, deepen, widen
from stablemorph.optim import transfer_optimizer, transfer_scheduler
from stablemorph.zoo import build_model

torch.set_num_threads(1)

STEPS, MORPH_AT, BATCH, SEED = 12, 5, 32, 3
EVALS = [0, 5, 12]
WIDEN = {"width": 24, "scheme": "stable", "input_shape": [8, 1, 8, 8]}
DEEPEN = {"scheme": "stable", "input_shape": [8, 1, 8, 8]}


def parent() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[16, 12], num_classes=10)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def gathered(model: nn.Module) -> list[Tensor]:
    mine = flat(model)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return out


def make_opt(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def make_sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def ddp_run(data: Dataset) -> dict:
    """Every rank: train, morph twice with morph_ddp, train on; rank 0 returns every rank's
    parameters at each stage, the records, and what the error paths raised."""
    ddp = DDP(parent())
    opt = make_opt(ddp.parameters())
    sched = make_sched(opt)
    records = train(ddp, data, opt, steps=MORPH_AT, seed=SEED, batch_size=BATCH,
                        scheduler=sched, eval_steps=EVALS)
    before = ddp
    ddp, opt = morph_ddp(ddp, "widen", "fc1", optimizer=opt, **WIDEN)
    ddp, opt = morph_ddp(ddp, "deepen", "fc2", optimizer=opt, **DEEPEN)
    sched = transfer_scheduler(sched, opt)
    after_morph = gathered(ddp.module)
    records += train(ddp, data, opt, steps=STEPS, start_step=MORPH_AT, seed=SEED,
                         batch_size=BATCH, scheduler=sched, eval_steps=EVALS)
    rank = dist.get_rank()

    # a morph that fails on one rank raises on both (no rank is left waiting)
    errors = {}
    try:
        morph_ddp(ddp, "widen", "fc1" if rank == 0 else "nope", width=40)
    except (MorphError, RuntimeError) as err:
        errors["one_rank"] = f"{type(err).__name__}: {err}"
    try:
        morph_ddp(ddp, "widen", "head.x" if rank == 0 else "fc1", width=40)
    except (MorphError, RuntimeError) as err:
        errors["other_rank"] = f"{type(err).__name__}: {err}"
    try:
        morph_ddp(ddp, "widen", "fc1", width=40, seed=rank, input_shape=[8, 1, 8, 8])
    except RuntimeError as err:
        errors["different"] = str(err)
    return {"after_morph": after_morph, "final": gathered(ddp.module), "records": records,
            "errors": errors, "rank": rank, "kwargs_before": sorted(ddp_constructor_kwargs(
                before)), "kwargs_after": sorted(ddp_constructor_kwargs(ddp))}


def single_process_run(data: Dataset) -> tuple[nn.Module, list]:
    model = parent()
    opt = make_opt(model.parameters())
    sched = make_sched(opt)
    records = train(model, data, opt, steps=MORPH_AT, seed=SEED, batch_size=BATCH,
                    scheduler=sched, eval_steps=EVALS)
    for morph, target, kwargs in ((widen, "fc1", WIDEN), (deepen, "fc2", DEEPEN)):
        child = morph(model, target, **kwargs)
        opt = transfer_optimizer(opt, model, child)
        model = child
    sched = transfer_scheduler(sched, opt)
    records += train(model, data, opt, steps=STEPS, start_step=MORPH_AT, seed=SEED,
                     batch_size=BATCH, scheduler=sched, eval_steps=EVALS)
    return model, records


def test_two_ranks_match_each_other_and_a_single_process_run() -> None:
    started = time.monotonic()
    data = load_dataset("digits")  # passed to the ranks: they need not import scikit-learn
    out = launch(ddp_run, 2, data, timeout=90)
    assert out["rank"] == 0
    a, b = out["after_morph"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # identical after the morph
    a, b = out["final"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # and after further steps

    model, records = single_process_run(data)
    torch.testing.assert_close(out["final"][0], flat(model), rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in out["records"]] == [r["step"] for r in records] == EVALS
    for got, want in zip(out["records"], records, strict=True):
        assert got["lr"] == pytest.approx(want["lr"])
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
        if want["train_loss"] is not None:
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)

    errors = out["errors"]
    assert errors["one_rank"] == ("RuntimeError: morph_ddp: widen 'fc1' failed on rank 1: "
                                  "MorphError: MLP has no layer named 'nope'")
    assert errors["other_rank"].startswith("MorphError:") and "head.x" in errors["other_rank"]
    assert "the ranks ran different morphs" in errors["different"]
    assert out["kwargs_before"] == out["kwargs_after"]
    assert time.monotonic() - started < 60


def hang() -> None:
    time.sleep(120)


def fail() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one broke")
    dist.barrier()


def test_launch_reports_a_failing_rank_and_times_out() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)launch: rank 1 raised.*ValueError: rank one"):
        launch(fail, 2, timeout=60)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="2 processes did not finish within 3 s"):
        launch(hang, 2, timeout=3)
    assert time.monotonic() - started < 20
    with pytest.raises(ValueError, match="nproc must be an int >= 1, got 0"):
        launch(hang, 0)


def test_rank_slice() -> None:
    idx = torch.arange(10, 16)
    torch.testing.assert_close(rank_slice(idx, 1, 3), torch.tensor([12, 13]))
    with pytest.raises(ValueError, match="a batch of 6 examples does not split evenly over 4"):
        rank_slice(idx, 0, 4)


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_morph_ddp_rewraps_on_one_rank(world_of_one: None, tmp_path: Path) -> None:
    ddp = DDP(parent(), find_unused_parameters=True, bucket_cap_mb=5)
    new, opt = morph_ddp(ddp, "widen", "fc1", width=20, input_shape=[4, 64])
    assert opt is None and new.module.fc1.out_features == 20
    assert new.find_unused_parameters and new.bucket_bytes_cap == 5 * 1024 * 1024
    assert ddp.module.fc1.out_features == 16  # the caller's model is untouched
    save(new, tmp_path / "m.pt")  # a wrapped model is saved as its module
    loaded = load(tmp_path / "m.pt")
    torch.testing.assert_close(flat(loaded), flat(new.module), rtol=0, atol=0)
    with pytest.raises(TypeError, match="morph_ddp expects a DistributedDataParallel model"):
        morph_ddp(ddp.module, "widen", "fc1", width=20)


REQUIRED = {"widen": {"width": 20}, "enlarge_kernel": {"kernel_size": 5}, "grow_mlp": {"d_mlp": 9},
            "grow_heads": {"n_head": 9}, "grow_d_model": {"d_model": 99}}


@pytest.mark.parametrize("op", sorted(MORPHS))
@pytest.mark.parametrize("target", ["fc1", "module.fc1"])
def test_a_morph_refuses_a_ddp_model_and_names_the_helper(world_of_one: None, op: str,
                                                          target: str) -> None:
    ddp = DDP(parent())
    with pytest.raises(MorphError, match=r"DistributedDataParallel-wrapped model.*"
                                         r"stablemorph\.ddp\.morph_ddp"):
        apply(op, ddp, target, input_shape=[4, 64], **REQUIRED.get(op, {}))


@pytest.mark.parametrize(("op", "target", "kwargs"), [
    ("grow_mlp", "blocks", {"d_mlp": 80}),
    ("grow_heads", "blocks.1.attn", {"n_head": 3}),
    ("grow_d_model", "d_model", {"d_model": 24}),
    ("insert_block", "blocks.1", {}),
])
def test_morph_ddp_grows_a_transformer(world_of_one: None, op: str, target: str,
                                       kwargs: dict) -> None:
    from stablemorph.transformer import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig.uniform(vocab_size=29, block_size=8, d_model=16, n_layer=2, n_head=2))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    x = torch.randint(0, 29, (4, 8))
    opt.zero_grad()
    gpt(x).square().mean().backward()
    opt.step()
    ddp = DDP(gpt)
    new, new_opt = morph_ddp(ddp, op, target, optimizer=opt, seed=2, **kwargs)
    alone = apply(op, gpt, target, seed=2, **kwargs)
    torch.testing.assert_close(flat(new.module), flat(alone), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(new(x), gpt(x), rtol=0, atol=1e-5)
    held = {id(p) for g in new_opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in new.module.parameters()}
    new_opt.zero_grad()
    new(x).square().mean().backward()
    new_opt.step()  # the child trains under DDP with the transferred state
