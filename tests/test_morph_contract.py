"""The contract every morph shares (DESIGN.md section 4) and ``verify``: wrapped models,
non-finite weights, probe batches, tolerance, records, and side-effect-free checking."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from morph_cases import assert_untouched, inputs, parent, snapshot
from torch import Tensor, nn

from stablemorph.morphs import MORPHS, MorphError, apply, deepen, enlarge_kernel, widen
from stablemorph.record import history, last_report
from stablemorph.verify import verify

torch.set_num_threads(1)

CALLS = {
    "deepen": {"target": "features.conv2"},
    "widen": {"target": "features.conv2", "width": 8},
    "enlarge_kernel": {"target": "features.conv2", "kernel_size": 5},
    "insert_subnet": {"target": "classifier"},
}


GROWTHS = {"grow_mlp", "grow_heads", "grow_d_model", "insert_block"}  # GPT only: see
# tests/test_transformer_contracts.py for their records and replay


@pytest.mark.parametrize("op", sorted(CALLS))
def test_every_morph_records_a_replayable_recipe(op: str) -> None:
    assert set(MORPHS) == set(CALLS) | GROWTHS
    model = parent("cnn")
    kw = dict(CALLS[op])
    target = kw.pop("target")
    child = apply(op, model, target, inputs=inputs("cnn"), **kw)
    assert history(model) == []
    (record,) = history(child)
    assert (record.op, record.target) == (op, target)
    assert record.report.op == op and record.report.seconds > 0
    assert json.loads(json.dumps(record.kwargs)) == record.kwargs
    assert record.kwargs["seed"] == 0 and record.kwargs["input_shape"] == [16, 1, 8, 8]
    replay = apply(record.op, model, record.target, **record.kwargs)
    assert [(k, v.shape) for k, v in replay.state_dict().items()] == \
        [(k, v.shape) for k, v in child.state_dict().items()]
    grandchild = deepen(child, "features.conv1", inputs=inputs("cnn"))
    assert [r.op for r in history(grandchild)] == [op, "deepen"]


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("scheme", ["stable", "net2net"])
def test_morphs_leave_the_callers_rng_alone(op: str, scheme: str) -> None:
    model = parent("cnn")
    kw = dict(CALLS[op])
    target = kw.pop("target")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    apply(op, model, target, inputs=inputs("cnn"), scheme=scheme, **kw)
    assert torch.equal(torch.get_rng_state(), before)


def test_wrapped_models_are_refused_with_the_helper_named() -> None:
    model = parent("cnn")
    wrapped = nn.DataParallel(model)
    with pytest.raises(MorphError, match=r"DataParallel-wrapped.*stablemorph\.ddp\.morph_ddp"):
        deepen(wrapped, "module.features.conv1", inputs=inputs("cnn"))


def test_non_finite_weights_are_refused() -> None:
    model = parent("cnn")
    with torch.no_grad():
        model.features.conv2.weight[0, 0, 0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"layer 'features.conv2'.*non-finite"):
        widen(model, "features.conv1", 6, inputs=inputs("cnn"))
    assert_untouched(model, snap)


def test_missing_probe_is_a_clear_error() -> None:
    with pytest.raises(MorphError, match=r"layer 'features.conv1': no probe batch.*input_shape="):
        deepen(parent("cnn"), "features.conv1")


def test_probe_from_input_shape_attribute_or_linear_input() -> None:
    model = parent("cnn")
    model.input_shape = (4, 1, 8, 8)
    child = deepen(model, "features.conv1")
    assert history(child)[-1].kwargs["input_shape"] == [4, 1, 8, 8]
    mlp_child = deepen(parent("mlp"), "fc1")  # a Linear first layer: (8, in_features)
    assert history(mlp_child)[-1].kwargs["input_shape"] == [8, 64]
    explicit = widen(parent("cnn"), "features.conv1", 6, input_shape=(3, 1, 8, 8))
    assert history(explicit)[-1].kwargs["input_shape"] == [3, 1, 8, 8]


def test_deviation_beyond_tolerance_raises() -> None:
    model = parent("cnn")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"does not preserve the function: eval: max_rel="):
        deepen(model, "features.conv2", inputs=inputs("cnn"), tol=0.0)
    assert_untouched(model, snap)


def test_unknown_morph() -> None:
    with pytest.raises(MorphError, match="unknown morph 'shrink'"):
        apply("shrink", parent("cnn"), "features.conv1")
    assert issubclass(MorphError, ValueError)


def test_report_summary_mentions_the_numbers() -> None:
    child = enlarge_kernel(parent("cnn"), "features.conv1", 5, inputs=inputs("cnn"))
    text = last_report(child).summary()
    assert text.startswith("enlarge_kernel('features.conv1', scheme='stable'): max_abs=")
    assert "zeros=0.0%" in text


# ----------------------------------------------------------------------------------------------
# verify


def test_verify_measures_a_real_difference_and_restores_state() -> None:
    model = parent("vgg")
    other = copy.deepcopy(model).eval()
    with torch.no_grad():
        other.classifier.bias[3] += 0.5
    snaps = snapshot(model), snapshot(other)
    x = inputs("vgg")
    report = verify(model, other, x)
    assert set(report.per_mode) == {"eval", "train"}
    with torch.no_grad():
        model.eval()
        want = model(x)
        model.train()
    assert report.max_abs == pytest.approx(0.5, rel=1e-6)
    assert report.per_mode["eval"][1] == pytest.approx(0.5 / float(want.abs().max()), rel=1e-5)
    assert not report.ok(1e-3)
    assert_untouched(model, snaps[0])
    assert_untouched(other, snaps[1])


class TwoHeads(nn.Module):
    def __init__(self, width: int = 3, p: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(64, width)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.drop(self.fc(x.flatten(1)))
        return {"logits": h, "pair": h[:, :1] * 2}


def test_verify_walks_structures_and_ignores_dropout() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    report = verify(model, copy.deepcopy(model), inputs("mlp"))
    assert report.max_abs == 0.0 and report.max_rel == 0.0


def test_verify_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"parent shape \(16, 3\) != child shape \(16, 4\)"):
        verify(TwoHeads(3), TwoHeads(4), inputs("mlp"))


def test_ddp_wrapped_model_is_refused(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        model = parent("mlp")
        wrapped = nn.parallel.DistributedDataParallel(model)
        for target in ("module.fc1", "fc1"):  # refused before the name is looked up
            with pytest.raises(MorphError, match=r"DistributedDataParallel-wrapped.*morph_ddp"):
                widen(wrapped, target, 16, inputs=inputs("mlp"))
    finally:
        dist.destroy_process_group()


def test_run_morph_accepts_a_target_that_is_no_module() -> None:
    """Growths of a whole model (e.g. a transformer's depth) name no single layer."""
    from stablemorph.morphs.contract import Surgery, run_morph

    model = parent("mlp")
    child = run_morph("noop", model, "depth", "stable", {"seed": 0},
                      lambda _child, _probe: Surgery(), inputs("mlp").flatten(1), None, None)
    assert history(child)[-1].target == "depth" and last_report(child).max_abs == 0.0


def test_a_morph_that_would_untie_tied_weights_is_refused_by_name() -> None:
    import pytest
    import torch
    from torch import nn

    from stablemorph import MorphError, deepen

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.emb(x))))

    model, x = Tied(), torch.randint(0, 10, (4, 5))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MorphError, match=r"deepen 'head': \['emb.weight', 'head.weight'\] "
                                         r"are one tied tensor"):
        deepen(model, "head", inputs=x)
    assert model.head.weight is model.emb.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    deepen(model, "mid", inputs=x)  # a layer outside the tie still deepens
