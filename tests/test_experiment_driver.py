"""The one experiment driver: the warmup regime, per-group learning-rate multipliers in the
one training loop, validation before anything is written, damaged files named, GPT growths
through the same path as CNN morphs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stablemorph.experiment.data import load_dataset
from stablemorph.experiment.stability import (
    Experiment,
    ExperimentConfig,
    ExperimentError,
    Ramp,
    parse_arm,
)
from stablemorph.experiment.train import TrainConfig, make_optimizer, train
from stablemorph.zoo import build_model

torch.set_num_threads(1)


def tiny(**overrides: object) -> ExperimentConfig:
    cfg = ExperimentConfig(dataset="digits", model_kwargs={"widths": [4, 8]}, seeds=1,
                           parent_steps=20, child_steps=6, dense_until=6, dense_every=3,
                           every=6, drop_window=6, threads=1, batch_size=32)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def quiet(cfg: ExperimentConfig, out: Path) -> Experiment:
    return Experiment(cfg, out, progress=False, log=lambda _: None)


def test_warmup_regime_ramps_linearly_from_the_parents_final_rate() -> None:
    cfg = tiny(lr=0.05, warmup_steps=10)
    ramp = cfg.lr_at("warmup")
    assert ramp == Ramp(0.005, 0.05, 10)
    assert [ramp(s) for s in (0, 5, 10, 11, 400)] == pytest.approx(
        [0.005, 0.0275, 0.05, 0.05, 0.05])
    assert cfg.lr_at("same")(0) == cfg.lr_at("same")(99) == pytest.approx(0.005)
    assert cfg.lr_at("raised")(3) == pytest.approx(0.05)


def test_the_loop_sets_each_groups_rate_from_lr_at_and_its_multiplier() -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[8], num_classes=10)
    opt = make_optimizer(model, TrainConfig(lr=1.0))
    first, rest = list(model.parameters())[:1], list(model.parameters())[1:]
    opt.param_groups[0]["params"] = rest
    opt.add_param_group({"params": first, "lr_scale": 0.25})
    seen = []
    records = train(model, data, opt, steps=4, seed=0, batch_size=16, eval_steps=[0, 2, 4],
                    lr_at=Ramp(0.1, 0.3, 2),
                    after_step=lambda m: seen.append([g["lr"] for g in opt.param_groups]))
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), torch.tensor(
        [[0.1, 0.025], [0.2, 0.05], [0.3, 0.075], [0.3, 0.075]], dtype=torch.float64))
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.3, 0.3])


def test_arm_names() -> None:
    assert parse_arm("stable") == ("stable", ())
    assert parse_arm("netmorph+lr") == ("netmorph", ("lr",))
    with pytest.raises(ExperimentError, match="unknown arm 'stable\\+fast'"):
        parse_arm("stable+fast")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seeds": 0}, "--seeds must be an integer >= 1, got 0"),
        ({"nproc": 0}, "--nproc must be an integer >= 1, got 0"),
        ({"batch_size": 33, "nproc": 2}, "--batch-size 33 must be a multiple of --nproc 2"),
        ({"regimes": ["hot"]}, "--lr-after takes"),
        ({"dataset": "nope"}, "unknown data set 'nope'"),
        ({"model_kwargs": {"widths": [4, 8], "bogus": 1}}, "bad --model-kwargs"),
        ({"morph_kwargs": {"bogus": 1}}, r"--morph deepen: unknown option\(s\) \['bogus'\]"),
        ({"targets": ["features.nope"]}, r"--targets \['features.nope'\] are not layers"),
        ({"morph": "depth"}, "--morph depth applies to GPT models"),
    ],
)
def test_a_bad_request_is_refused_before_anything_is_written(
        tmp_path: Path, overrides: dict, message: str) -> None:
    out = tmp_path / "run"
    with pytest.raises((ExperimentError, ValueError), match=message):
        quiet(tiny(**overrides), out)
    assert not out.exists()


def test_damaged_files_are_named(tmp_path: Path) -> None:
    cfg = tiny(schemes=["net2net"], baselines=[], regimes=["same"])
    quiet(cfg, tmp_path).run()
    parent = tmp_path / "parents" / "seed0.pt"
    assert parent.exists() and not list(tmp_path.rglob(".*.tmp"))
    for run in (tmp_path / "runs").glob("*.json"):
        run.unlink()
    parent.write_bytes(parent.read_bytes()[:100])
    with pytest.raises(ExperimentError, match=r"seed0\.pt is damaged .*delete it"):
        quiet(cfg, tmp_path).run()
    (tmp_path / "config.json").write_text('{"dataset": "dig')
    with pytest.raises(ExperimentError, match=r"config\.json is damaged"):
        quiet(cfg, tmp_path)


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ExperimentError, match="is a file, not a folder"):
        quiet(tiny(), out)


def test_widen_by_factor_skips_a_target_its_channel_group_already_grew(tmp_path: Path
                                                                       ) -> None:
    """A ResNet's stem and its first block's second conv share one channel group (the
    residual add): widening the stem widens both, so the later target is not widened twice
    (the driver refused it: 'width must be an int larger than the current 16, got 16')."""
    cfg = tiny(model="resnet", model_kwargs={"layers": [1], "widths": [8]}, morph="widen",
               morph_kwargs={"factor": 2}, schemes=["stable", "net2net"], regimes=["raised"],
               targets=["conv1", "layer1.0.conv1", "layer1.0.conv2"])
    arms = quiet(cfg, tmp_path).run()
    stable = next(a for a in arms if a.arm == "stable")
    assert stable.zero_fraction == 0.0
    from stablemorph.experiment.growth import morph_steps

    model = build_model("resnet", layers=[1], widths=[8], in_channels=1, num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    steps = morph_steps("widen", model, cfg.targets, {"factor": 2})
    child = steps[0].run(model, "stable", 0, x)
    assert child.layer1[0].conv2.out_channels == 16
    assert steps[2].run(child, "stable", 2, x) is child
    assert steps[1].run(child, "stable", 1, x).layer1[0].conv1.out_channels == 16


GPT_KWARGS = {"d_model": 8, "n_layer": 1, "n_head": 2, "head_dim": 4, "d_mlp": 16,
              "block_size": 8}


@pytest.mark.parametrize(("morph", "kwargs"), [("depth", {}), ("width", {"factor": 2})])
def test_gpt_growths_run_through_the_same_driver(tmp_path: Path, morph: str,
                                                 kwargs: dict) -> None:
    cfg = tiny(dataset="text", model="gpt", model_kwargs=GPT_KWARGS, morph=morph,
               morph_kwargs=kwargs, limit_train=4000, limit_test=8, optimizer="adamw",
               lr=3e-3, parent_steps=4, child_steps=3, dense_until=3, dense_every=1,
               every=3, drop_window=3, batch_size=8, baselines=["parent"],
               schemes=["stable", "net2net"], regimes=["warmup"], warmup_steps=2)
    arms = quiet(cfg, tmp_path).run()  # raises if a child does not start at its parent
    assert {a.arm for a in arms} == {"stable", "net2net", "parent"}
    by_arm = {a.arm: a for a in arms}
    assert by_arm["stable"].zero_fraction == 0.0
    assert by_arm["stable"].moved is not None and by_arm["stable"].moved > 0
    assert [r["lr"] for r in by_arm["stable"].records] == pytest.approx(
        [3e-4, 3e-4 + 1.35e-3, 3e-3, 3e-3])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "gpt" and config["morph"] == morph


def test_cli_gpt_experiment_honours_every_option(tmp_path: Path) -> None:
    from stablemorph.cli import main

    out = tmp_path / "gpt"
    rc = main(["experiment", "--model", "tiny-gpt", "--model-kwargs", json.dumps(GPT_KWARGS),
               "--limit-train", "4000", "--limit-test", "8", "--lr", "0.002",
               "--optimizer", "adamw", "--schemes", "stable", "--baselines", "parent",
               "--seeds", "1", "--parent-steps", "3", "--steps", "2", "--dense-until", "2",
               "--dense-every", "1", "--every", "2", "--drop-window", "2", "--batch-size", "8",
               "--lr-after", "raised", "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["dataset"], config["morph"], config["lr"],
            config["schemes"]) == ("gpt", "text", "depth", 0.002, ["stable"])
    # a different run in the same folder is refused, not overwritten
    assert main(["experiment", "--model", "tiny-gpt", "--lr", "0.01", "--out", str(out)]) == 2
    assert json.loads((out / "config.json").read_text())["lr"] == 0.002


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
    (["--nproc", "0"], "--nproc must be an integer >= 1, got 0"),
    (["--model-kwargs", '{"bogus": 1}'], "bad --model-kwargs"),
    (["--morph-kwargs", '{"bogus": 1}'], "unknown option(s) ['bogus']"),
])
def test_cli_mistakes_exit_2_with_a_message_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    from stablemorph.cli import main

    out = tmp_path / "run"
    assert main(["experiment", "--dataset", "digits", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_from_before_the_stable_rule_is_not_resumed_with_it(tmp_path: Path) -> None:
    cfg = tiny(schemes=["stable"], baselines=[], regimes=["same"])
    quiet(cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["stable_rule"]  # written before the rule existed: published stable
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ExperimentError, match=r"differs in \['stable_rule'\]"):
        quiet(cfg, tmp_path)
    quiet(tiny(schemes=["stable"], baselines=[], regimes=["same"], stable_rule=[]), tmp_path)
