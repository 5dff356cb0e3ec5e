"""Checkpoints of grown models: round trips (every morph type, fresh process, user factory),
resume after a morph equal to the uninterrupted run, and damaged or foreign files refused.
Hostile files, other model kinds and version-1 files: test_checkpoint_structure.py."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import stablemorph as sm
from stablemorph.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load,
    load_checkpoint,
    save,
)
from stablemorph.experiment.data import load_dataset
from stablemorph.experiment.train import TrainConfig, make_optimizer, make_scheduler, train
from stablemorph.morphs import deepen, enlarge_kernel, insert_subnet, widen
from stablemorph.optim import transfer_optimizer, transfer_scheduler
from stablemorph.record import history
from stablemorph.zoo import build_model

torch.set_num_threads(1)

SHAPE = [4, 1, 8, 8]


def grown_resnet() -> nn.Module:
    """A small ResNet through all four morph types."""
    torch.manual_seed(0)
    model = build_model("resnet", layers=[1, 1], widths=[8, 16], in_channels=1, num_classes=10)
    model = widen(model, "layer1.0.conv1", 12, input_shape=SHAPE)
    model = deepen(model, "layer2.0.conv2", input_shape=SHAPE)
    model = insert_subnet(model, "layer1.0", input_shape=SHAPE)
    return enlarge_kernel(model, "layer2.0.conv1", 5, input_shape=SHAPE)


def probe() -> torch.Tensor:
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_round_trip_of_every_morph_type(tmp_path: Path) -> None:
    model = grown_resnet()
    model.layer2[0].bn1.weight.requires_grad_(False)
    model.eval()
    model.layer1.train()  # a submodule's own mode is kept
    save(model, tmp_path / "m.pt", extra={"step": 7})
    rng = torch.get_rng_state()

    ckpt = load_checkpoint(tmp_path / "m.pt")

    torch.testing.assert_close(torch.get_rng_state(), rng)  # loading leaves the RNG alone
    loaded = ckpt.model
    assert_same_state(loaded, model)
    torch.testing.assert_close(loaded(probe()), model(probe()), rtol=0, atol=0)
    assert [(n, m.training) for n, m in loaded.named_modules()] == [
        (n, m.training) for n, m in model.named_modules()]
    assert not loaded.training and loaded.layer1[0].shortcut.branch.act.training
    assert not loaded.layer2[0].bn1.weight.requires_grad
    assert ckpt.extra == {"step": 7} and ckpt.optimizer_state is None
    with pytest.raises(CheckpointError, match="saved without an optimizer"):
        ckpt.make_optimizer()
    assert [(r.op, r.target, r.kwargs) for r in history(loaded)] == [
        (r.op, r.target, r.kwargs) for r in history(model)]
    # the reports are the ones measured at morph time, with their parameter maps
    assert [r.report.max_rel for r in history(loaded)] == [
        r.report.max_rel for r in history(model)]
    for saved, back in zip(history(model), history(loaded), strict=True):
        assert sorted(back.report.param_map) == sorted(saved.report.param_map)
        for name, origin in saved.report.param_map.items():
            got = back.report.param_map[name]
            assert (got.source, got.dim) == (origin.source, origin.dim), name
            for field in ("index", "scale"):
                a, b = getattr(origin, field), getattr(got, field)
                assert (a is None and b is None) or torch.equal(a, b), (name, field)


def test_mixed_dtypes_are_kept(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = widen(build_model("mlp", in_features=8, hidden=[5]).double(), "fc1", 7,
                  input_shape=[4, 8])
    model.head.to(torch.float32)
    model.fc1.register_buffer("mask", torch.ones(7, dtype=torch.bool))
    save(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert loaded.fc1.weight.dtype == torch.float64 and loaded.head.weight.dtype == torch.float32
    assert loaded.fc1.mask.dtype == torch.bool
    assert_same_state(loaded, model)
    assert [t.dtype for t in loaded.state_dict().values()] == [
        t.dtype for t in model.state_dict().values()]


def test_loads_in_a_fresh_process(tmp_path: Path) -> None:
    model = grown_resnet().eval()
    save(model, tmp_path / "m.pt")
    x = probe()
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import torch, stablemorph.checkpoint as c\n"
        f"m = c.load({str(tmp_path / 'm.pt')!r})\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=0, atol=0)


class Tower(nn.Module):
    """A user's own class (outside the allow-list): it can only come from a factory."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)
        self.head = nn.Linear(width, 3)
        self.scale = lambda x: 2 * x  # an attribute no file can hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(torch.relu(self.fc(x))))


def make_tower(width: int) -> Tower:
    return Tower(width)


def test_user_factory_base(tmp_path: Path) -> None:
    torch.manual_seed(3)
    factory = f"{__name__}:make_tower"
    model = widen(make_tower(6), "fc", 9, input_shape=[4, 4])
    with pytest.raises(CheckpointError, match=r"(?s)cannot save .*m\.pt: modules '<root>' "
                                              r"\(.*:Tower\) are of classes outside.*"
                                              r"base='package\.module:function'"):
        save(model, tmp_path / "m.pt")
    save(model, tmp_path / "m.pt", base=factory, base_kwargs={"width": 6})

    with pytest.raises(CheckpointError, match=rf"allow_factories=\['{factory}'\]"):
        load(tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt", allow_factories=[factory])
    assert type(loaded) is Tower and loaded.fc.out_features == 9
    assert_same_state(loaded, model)
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    save(loaded, tmp_path / "again.pt")  # the loaded model remembers its factory
    assert_same_state(load(tmp_path / "again.pt", allow_factories=[factory]), model)
    with pytest.raises(TypeError, match=r"bare string .* pass \["):
        load(tmp_path / "m.pt", allow_factories=factory)  # not a set of characters


def test_a_named_factory_is_never_run_unless_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    save(build_model("mlp", in_features=4, hidden=[3]), tmp_path / "evil.pt")
    rewrite_meta(tmp_path / "evil.pt", lambda meta: meta.update(
        base={"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}))
    with pytest.raises(CheckpointError, match="builds its base with 'os:system'"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def rewrite_meta(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Edit a checkpoint's JSON as an attacker would, with a valid digest."""
    import json

    from stablemorph.checkpoint import _digest

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    change(meta)
    payload["meta"] = json.dumps(meta)
    payload["digest"] = _digest(payload)
    torch.save(payload, path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"meta": "{}", "x": _Exploit(marker)}, f)
    torch.save({"meta": "{}", "x": _Exploit(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="not a readable stablemorph checkpoint"):
            load(tmp_path / name)
    assert not marker.exists()


def test_damaged_and_foreign_files(tmp_path: Path) -> None:
    model = grown_resnet()
    path = tmp_path / "m.pt"
    save(model, path)
    data = path.read_bytes()

    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"short\.pt is not a readable stablemorph "
                                              r"checkpoint \(truncated, corrupt"):
        load(tmp_path / "short.pt")

    # flip bytes inside the largest tensor's data: the archive still reads, the digest catches it
    weight = model.state_dict()["layer2.0.conv2.first.weight"]
    at = data.find(weight.flatten()[:8].numpy().tobytes())
    assert at > 0
    bad = bytearray(data)
    bad[at + 4: at + 8] = b"\x00\x00\x80\x7f"
    (tmp_path / "flip.pt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"flip\.pt is corrupt: its contents do not match"):
        load(tmp_path / "flip.pt")

    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain\.pt is not a stablemorph checkpoint"):
        load(tmp_path / "plain.pt")

    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at .*missing\.pt"):
        load(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")
    with pytest.raises(sm.CheckpointNotFoundError):  # exported where users catch it
        sm.load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is a directory, not a checkpoint"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match=rf"cannot save {tmp_path}: it is a directory"):
        save(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot save .*/nowhere/m\.pt: its directory"):
        save(model, tmp_path / "nowhere" / "m.pt")


def test_a_model_changed_by_hand(tmp_path: Path) -> None:
    """The file holds the structure, not a recipe: layers replaced outside stablemorph load
    as they are; a layer of a class no file can name is refused at save, by path."""
    torch.manual_seed(4)
    model = widen(build_model("mlp", in_features=8, hidden=[5]), "fc1", 7, input_shape=[4, 8])
    model.head = nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 2))
    save(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    model.act1 = Tower(2)
    with pytest.raises(CheckpointError, match=r"cannot save .*m2\.pt: modules 'act1' \(.*Tower\)"):
        save(model, tmp_path / "m2.pt")
    assert not (tmp_path / "m2.pt").exists()


def test_save_refuses_unsaveable_values(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    with pytest.raises(CheckpointError, match="recipe or extra is not JSON"):
        save(model, tmp_path / "m.pt", extra={"fn": print})
    stray = nn.Parameter(torch.zeros(2, 9))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(CheckpointError, match=r"shapes \[\(2, 9\)\] that are not parameters"):
        save(model, tmp_path / "m.pt", optimizer=opt)
    with pytest.raises(CheckpointError, match=r"import path 'package\.module:function'"):
        save(model, tmp_path / "m.pt", base="not a path")
    assert not any(tmp_path.iterdir())  # nothing written, no temporary file left


def test_save_replaces_atomically_and_follows_the_umask(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    path = tmp_path / "m.pt"
    old = os.umask(0o022)
    try:
        save(model, path)
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        save(model, tmp_path / "private.pt")
        assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    path.chmod(0o640)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save(model, path)
    assert path.stat().st_mode & 0o777 == 0o640  # an overwritten file keeps its mode
    assert_same_state(load(path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "private.pt"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_a_morph_equals_the_uninterrupted_run(tmp_path: Path,
                                                           optimizer: str) -> None:
    """Parent trained 12 steps, widened and deepened with optimiser and scheduler carried
    over, trained to step 30; the same run saved at step 20 and resumed from the file in
    fresh objects ends bit-for-bit where the uninterrupted run ends."""
    data = load_dataset("digits")
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                      batch_size=32, schedule="cosine", warmup_steps=3, weight_decay=1e-4)
    total, morph_at, save_at = 30, 12, 20
    evals = [0, 6, 12, 16, 20, 25, 30]

    def grown() -> tuple[nn.Module, torch.optim.Optimizer, object, list]:
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, widths=[4, 8], image_size=8, num_classes=10)
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, total)
        records = train(model, data, opt, steps=morph_at, seed=1, batch_size=32,
                        scheduler=sched, eval_steps=evals)
        for op, kwargs in (("widen", {"width": 6}), ("deepen", {})):
            morph = widen if op == "widen" else deepen
            target = "features.conv1" if op == "widen" else "features.conv2"
            child = morph(model, target, input_shape=[8, 1, 8, 8], **kwargs)
            opt = transfer_optimizer(opt, model, child)
            sched = transfer_scheduler(sched, opt)
            model = child
        return model, opt, sched, records

    model, opt, sched, records = grown()
    records += train(model, data, opt, steps=total, start_step=morph_at, seed=1,
                     batch_size=32, scheduler=sched, eval_steps=evals)

    split, opt2, sched2, split_records = grown()
    split_records += train(split, data, opt2, steps=save_at, start_step=morph_at, seed=1,
                           batch_size=32, scheduler=sched2, eval_steps=evals)
    save(split, tmp_path / "run.pt", optimizer=opt2, scheduler=sched2, extra={"step": save_at})
    del split, opt2, sched2

    ckpt = load_checkpoint(tmp_path / "run.pt")
    resumed = ckpt.model
    opt3 = ckpt.make_optimizer()
    assert type(opt3) is type(opt) and len(opt3.state) == len(opt.state)
    sched3 = make_scheduler(opt3, cfg, total)
    sched3.load_state_dict(ckpt.scheduler_state)
    split_records += train(resumed, data, opt3, steps=total, start_step=ckpt.extra["step"],
                           seed=1, batch_size=32, scheduler=sched3, eval_steps=evals)

    assert_same_state(resumed, model)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in split_records] == strip
    assert records[-1]["step"] == total
