"""Checkpoints store structure: models with token inputs, several inputs, grown transformers
and compiled models round-trip exactly without replaying anything; hostile files are refused
by name without running code or allocating memory; version-1 files load only on request."""

from __future__ import annotations

import json
import resource
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from stablemorph.activations import PAct
from stablemorph.checkpoint import CheckpointError, _digest, _record_json, load, save
from stablemorph.morphs import deepen, widen
from stablemorph.record import history
from stablemorph.transformer import GPT, GPTConfig, grow_d_model, grow_mlp, insert_block
from stablemorph.zoo import build_model

torch.set_num_threads(1)


def edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a checkpoint's JSON as an attacker would, keeping the digest valid."""
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    change(meta, payload)
    payload["meta"] = json.dumps(meta)
    payload["digest"] = _digest(payload)
    torch.save(payload, path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_grown_gpt_round_trips_without_a_recipe(tmp_path: Path) -> None:
    """Token inputs, a tied head, every transformer growth; no base recipe needed."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.uniform(vocab_size=11, block_size=8, d_model=8, n_layer=1, n_head=2,
                                tie_head=True))
    grown = insert_block(grow_d_model(grow_mlp(gpt, 40), 16), 1).eval()
    save(grown, tmp_path / "gpt.pt")
    loaded = load(tmp_path / "gpt.pt")
    idx = torch.randint(0, 11, (3, 8))
    assert torch.equal(loaded(idx), grown(idx))
    assert loaded.config == grown.config and loaded.head.weight is loaded.wte.weight
    assert [r.op for r in history(loaded)] == ["grow_mlp", "grow_d_model", "insert_block"]


class TwoInputs(nn.Module):
    """A user's class with two inputs and an embedding first (outside the allow-list)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.left = nn.Linear(6, 5)
        self.right = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.left(self.emb(tokens).mean(1)) + self.right(x)))


def make_two_inputs() -> TwoInputs:
    return TwoInputs()


def test_token_and_several_inputs_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tokens, x = torch.randint(0, 10, (4, 7)), torch.randn(4, 3)
    model = deepen(make_two_inputs(), "left", inputs=(tokens, x))
    model = widen(model, "right", 8, inputs=(tokens, x)).eval()
    factory = f"{__name__}:make_two_inputs"
    save(model, tmp_path / "m.pt", base=factory)
    loaded = load(tmp_path / "m.pt", allow_factories=[factory])
    assert type(loaded) is TwoInputs and isinstance(loaded.left, nn.Sequential)
    assert torch.equal(loaded(tokens, x), model(tokens, x))


def make_data_dependent() -> TwoInputs:
    model = TwoInputs()
    model.right.weight.data *= float(model.left.weight.abs().max())  # needs real data
    return model


def test_a_factory_that_cannot_build_on_the_meta_device(tmp_path: Path) -> None:
    factory = f"{__name__}:make_data_dependent"
    with pytest.raises(CheckpointError, match=rf"cannot save .*m\.pt: building its base with "
                                              rf"'{factory}' \(on the meta device\) failed"):
        save(make_data_dependent(), tmp_path / "m.pt", base=factory)
    assert not (tmp_path / "m.pt").exists()


def test_compiled_model_saves_its_module(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = widen(build_model("mlp", in_features=6, hidden=[4]), "fc1", 7,
                  input_shape=[2, 6]).eval()
    save(torch.compile(model), tmp_path / "m.pt")  # never run: nothing is compiled here
    loaded = load(tmp_path / "m.pt")
    assert type(loaded) is type(model)
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model(x))


def test_load_does_not_replay_the_solver(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    model = deepen(build_model("cnn", in_channels=1, widths=[4, 8], image_size=8),
                   "features.conv2", kernel_size=3, input_shape=[2, 1, 8, 8])
    save(model, tmp_path / "m.pt")
    import stablemorph.morphs.factor as factor

    def refuse(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("load ran the solver")

    monkeypatch.setattr(factor, "decompose", refuse)
    loaded = load(tmp_path / "m.pt")
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(x), model(x))


def test_huge_shapes_in_a_tiny_file_allocate_nothing(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    path = tmp_path / "m.pt"

    def huge_param(meta, _payload):  # type: ignore[no-untyped-def]
        meta["structure"]["modules"][2]["params"][0]["shape"] = [10**6, 10**6]

    def huge_recipe(meta, _payload):  # type: ignore[no-untyped-def]
        meta["base"]["kwargs"]["hidden"] = [1] * 10**5   # a hundred thousand layers

    before = peak_rss_mb()
    started = time.perf_counter()
    for change, message in ((huge_param, r"tensor 'fc1\.weight' is \(\(3, 4\).*says "
                                         r"\(\(1000000, 1000000\)"),
                            (huge_recipe, r"builds more than \d+ modules")):
        save(model, path)
        assert path.stat().st_size < 10_000
        edit(path, change)
        with pytest.raises(CheckpointError, match=rf"{path}: .*{message}"):
            load(path)
    assert time.perf_counter() - started < 10
    assert peak_rss_mb() - before < 200


class _Storage:
    """Stands for a tensor storage in a hand-made archive."""


class _Tensor:
    def __init__(self, size: tuple[int, ...]) -> None:
        self.size = size

    def __reduce__(self):  # type: ignore[no-untyped-def]
        stride = (self.size[1], 1)
        return (torch._utils._rebuild_tensor_v2,
                (_Storage(), 0, self.size, stride, False, OrderedDict()))


def test_a_tensor_declared_larger_than_its_bytes(tmp_path: Path) -> None:
    """A 1 KB archive whose tensor header declares 10^5 x 10^5 floats (40 GB) and whose
    storage record declares 10^10 elements over 8 bytes: refused, nothing allocated."""
    import io
    import pickle

    class Pickler(pickle.Pickler):
        numel = 0

        def persistent_id(self, obj):  # type: ignore[no-untyped-def]
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
            return None

    path = tmp_path / "huge.pt"
    before = peak_rss_mb()
    for numel in (2, 10**10):
        buf = io.BytesIO()
        pickler = Pickler(buf, protocol=2)
        pickler.numel = numel
        pickler.dump({"meta": "{}", "state_dict": {"w": _Tensor((10**5,) * 2)}})
        writer = torch._C.PyTorchFileWriter(str(path))
        writer.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
        writer.write_record("byteorder", b"little", 6)
        writer.write_record("data/0", b"\0" * 8, 8)
        writer.write_end_of_file()
        del writer
        assert path.stat().st_size < 4096
        with pytest.raises(CheckpointError, match=rf"{path} is not a readable stablemorph "
                                                  r"checkpoint"):
            load(path)
    assert peak_rss_mb() - before < 200


def test_classes_and_functions_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    path = tmp_path / "m.pt"
    for cls in ("subprocess:Popen", "os:system", "builtins:eval"):
        save(model, path)
        edit(path, lambda meta, _p, cls=cls: meta["structure"]["modules"][1].update({"class": cls}))
        with pytest.raises(CheckpointError, match=rf"{path}: module 'flatten': class {cls!r} is "
                                                  r"outside the allowed packages"):
            load(path)
    save(model, path)   # a dataclass whose __post_init__ would run (and set up a trainer)
    edit(path, lambda meta, _p: meta["structure"]["modules"][0]["attrs"].update(
        args=["dataclass", "transformers.training_args:TrainingArguments", [["output_dir", "x"]]]))
    with pytest.raises(CheckpointError, match=r"dataclass 'transformers\.training_args:"
                                              r"TrainingArguments' is not stablemorph's"):
        load(path)


def test_a_graph_may_call_only_allowed_functions(tmp_path: Path) -> None:
    """insert_subnet rewires a block as a torch.fx graph; a file cannot make that graph call
    anything but torch ops, tensor methods and operators."""
    from stablemorph.morphs import insert_subnet

    torch.manual_seed(4)
    model = build_model("resnet", layers=[1], widths=[4], in_channels=1, num_classes=3)
    model = insert_subnet(model, "layer1.0", input_shape=[2, 1, 6, 6]).eval()
    path = tmp_path / "m.pt"
    save(model, path)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(load(path)(x), model(x))

    def graph_of(meta):  # type: ignore[no-untyped-def]
        return next(e for e in meta["structure"]["modules"] if "graph" in e)["graph"]["nodes"]

    def node(meta, op):  # type: ignore[no-untyped-def]
        return next(n for n in graph_of(meta) if n[1] == op)

    attacks = [
        (lambda m, _p: node(m, "call_function").__setitem__(2, "torch:from_file"),
         r"calls 'torch:from_file', which is not an allowed function"),
        (lambda m, _p: node(m, "call_function").__setitem__(2, "builtins:exec"),
         r"calls 'builtins:exec', which is not an allowed function"),
        (lambda m, _p: node(m, "call_module").__setitem__(1, "call_method") or
         node(m, "call_method").__setitem__(2, "__reduce__"), r"not a public tensor method"),
        (lambda m, _p: node(m, "call_module").__setitem__(0, "x; import os"),
         r"bad graph node name"),
    ]
    for attack, message in attacks:
        save(model, path)
        edit(path, attack)
        with pytest.raises(CheckpointError, match=rf"{path}: .*{message}"):
            load(path)


def test_tensors_that_do_not_match_their_structure(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    path = tmp_path / "m.pt"
    save(model, path)

    def swap(_meta, payload):  # type: ignore[no-untyped-def]
        payload["state_dict"]["fc1.weight"] = torch.zeros(3, 4, dtype=torch.float64)

    edit(path, swap)
    with pytest.raises(CheckpointError, match=r"tensor 'fc1\.weight' is \(\(3, 4\), "
                                              r"torch\.float64\), its structure says"):
        load(path)

    def drop(_meta, payload):  # type: ignore[no-untyped-def]
        del payload["state_dict"]["head.bias"]

    save(model, path)
    edit(path, drop)
    with pytest.raises(CheckpointError, match=r"do not match its structure \(missing "
                                              r"\['head\.bias'\]"):
        load(path)


def test_every_save_loads_or_save_says_why(tmp_path: Path) -> None:
    model = build_model("mlp", in_features=4, hidden=[3])
    model.act1 = PAct(nn.ReLU(), channels=3, channel_dim=-1)
    model.act1.phi.fn = print  # a function attribute: no file can hold it
    with pytest.raises(CheckpointError, match=r"cannot save .*m\.pt: module 'act1\.phi' .*"
                                              r"\['fn'\]"):
        save(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    model.act1.phi = nn.ReLU()
    handle = model.fc1.register_forward_hook(lambda _m, _i, out: 2 * out)
    with pytest.raises(CheckpointError, match=r"modules \['fc1'\] have forward or backward "
                                              r"hooks.*remove them"):
        save(model, tmp_path / "m.pt")
    handle.remove()
    save(model, tmp_path / "m.pt")
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(CheckpointError, match=r"parameter '0\.weight' is uninitialised"):
        save(lazy, tmp_path / "m.pt")


def write_version_1(model: nn.Module, path: Path) -> None:
    """A file in the version-1 format (base + morph replay), as stablemorph wrote them."""
    state = dict(model.state_dict())
    old = {"scheme", "max_abs", "max_rel", "residual", "zero_fraction", "near_zero_fraction",
           "changed", "seconds", "notes"}
    morphs = [_record_json(r) for r in history(model)]
    for m in morphs:
        m["report"] = {k: v for k, v in m["report"].items() if k in old}
    meta = {"format": "stablemorph-checkpoint", "version": 1, "torch": torch.__version__,
            "base": model._stablemorph_base, "morphs": morphs, "dtype": "float32",
            "training": model.training, "frozen": [], "extra": {}, "optimizer": None}
    payload = {"state_dict": state, "meta": json.dumps(meta)}
    payload["digest"] = _digest(payload)
    torch.save(payload, path)


def test_version_1_files_load_only_on_request(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = widen(build_model("mlp", in_features=4, hidden=[3]), "fc1", 5,
                  input_shape=[2, 4]).eval()
    path = tmp_path / "v1.pt"
    write_version_1(model, path)
    with pytest.raises(CheckpointError, match=rf"{path} is a version-1 checkpoint: .* "
                                              r"legacy_replay=True"):
        load(path)
    loaded = load(path, legacy_replay=True)
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))
    save(loaded, tmp_path / "v2.pt")  # converted
    assert torch.equal(load(tmp_path / "v2.pt")(x), model(x))

    model.head = nn.Linear(5, 10**4)   # the state dict no longer matches the recipe...
    write_version_1(model, path)
    edit(path, lambda meta, _p: meta["base"]["kwargs"].update(hidden=[10**5]))
    with pytest.raises(CheckpointError, match=r"base recipe builds \d+ parameters, more than"):
        load(path, legacy_replay=True)   # ...and a hostile recipe is refused before building


def test_a_model_built_by_hand_from_allowed_classes(tmp_path: Path) -> None:
    """A deepened layer as deepen makes it (Sequential(first, act=PAct, second)) inside an
    nn.Sequential: every class rebuilt from the file alone."""
    torch.manual_seed(6)
    block = nn.Sequential(OrderedDict(
        first=nn.Linear(4, 6), act=PAct("gelu", channels=6, channel_dim=-1),
        second=nn.Linear(6, 4)))
    model = nn.Sequential(block, nn.LayerNorm(4), nn.Dropout(0.1)).eval()
    model[2].train()
    save(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert loaded[2].training and not loaded[0].training
    x = torch.randn(3, 4)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
