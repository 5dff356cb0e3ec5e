"""Verification that never passes vacuously (issue 13.6), exactness judged against the
parent's float noise (issue 11), probes as the model takes them (issue 11), hooks across
morphs (13.7), memory up front (13.15), NaN probes, meta-device
and compiled models (13.16)."""

from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import pytest
import torch
from morph_cases import assert_untouched, inputs, parent, snapshot
from torch import Tensor, nn

from stablemorph.morphs import MorphError, deepen, insert_subnet, widen
from stablemorph.morphs import memory as morph_memory
from stablemorph.record import last_report
from stablemorph.verify import NOISE_FACTOR, VerifyError, verify

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# output structures (13.6)


@dataclasses.dataclass
class Out:
    logits: Tensor
    extra: tuple[Tensor, ...]


class Pair(NamedTuple):
    logits: Tensor
    hidden: Tensor


class Box:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


class Wrapping(nn.Module):
    """An MLP whose output is wrapped in one of several structures."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 5)
        self.kind = kind

    def forward(self, x: Tensor) -> object:
        y = self.fc(x.flatten(1))
        if self.kind == "dataclass":
            return Out(y, (y * 2,))
        if self.kind == "namedtuple":
            return Pair(y, y.sum(1))
        if self.kind == "object":
            return Box(y)
        if self.kind == "modeloutput":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=y)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "object", "modeloutput"])
def test_verify_compares_every_tensor_of_any_output_structure(kind: str) -> None:
    model = Wrapping(kind)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias[2] += 0.43
    report = verify(model, other, inputs("mlp"))
    assert report.max_abs == pytest.approx(0.43 * (2 if kind == "dataclass" else 1), rel=1e-5)
    assert not report.ok(1e-5)
    assert verify(model, copy.deepcopy(model), inputs("mlp")).max_abs == 0.0


class Keys(nn.Module):
    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)
        self.keys = keys

    def forward(self, x: Tensor) -> object:
        y = self.fc(x.flatten(1))
        return {k: y for k in self.keys} if self.keys else "no tensor here"


def test_verify_refuses_other_structures_empty_probes_and_tensorless_outputs() -> None:
    x = inputs("mlp")
    with pytest.raises(VerifyError, match=r"differs in structure.*keys \['a', 'b'\].*"
                                          r"keys \['a', 'c'\]") as err:
        verify(Keys(("a", "b")), Keys(("a", "c")), x)
    assert err.value.who == "child"
    with pytest.raises(VerifyError, match=r"parent's output holds no tensor \(str\)"):
        verify(Keys(()), Keys(()), x)
    with pytest.raises(VerifyError, match=r"the probe is empty: input 0 has shape \(0, 64\)"):
        verify(Keys(("a",)), Keys(("a",)), x.flatten(1)[:0])
    with pytest.raises(MorphError, match=r"the probe is empty"):
        deepen(parent("mlp"), "fc1", inputs=x.flatten(1)[:0])


# ----------------------------------------------------------------------------------------------
# the noise floor (issue 11)


class Cancelling(nn.Module):
    """Two nearly equal Linears subtracted: outputs near 1e-6 from values near 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 16)
        self.twin = nn.Linear(64, 16)
        with torch.no_grad():
            self.twin.weight.copy_(self.fc.weight + 1e-6 * torch.randn_like(self.fc.weight))
            self.twin.bias.copy_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) - self.twin(x)


class PooledBN(nn.Module):
    """BatchNorm on 1x1 maps: train-mode batch statistics amplify float32 noise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.proj(self.pool(torch.relu(self.conv(x))))).flatten(1))


def _near_pair() -> Tensor:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    return torch.cat([x, x + 1e-3 * torch.randn_like(x)])


@pytest.mark.parametrize("case", ["near-zero output", "BatchNorm on 1x1 maps"])
def test_exact_morphs_within_the_parents_float_noise_are_accepted(case: str) -> None:
    model, x, target = ((Cancelling(), torch.randn(8, 64), "fc") if case == "near-zero output"
                        else (PooledBN(), _near_pair(), "proj"))
    child = deepen(model, target, inputs=x)
    report = last_report(child)
    assert report.max_rel > 1e-5  # the old fixed limit refused it
    check = verify(model, child, x)
    assert check.noise_abs is not None and check.ok(1e-5)
    assert all(t.max_abs <= NOISE_FACTOR * t.noise_abs for t in check.tensors
               if t.max_rel > 1e-5)
    assert check.max_abs < 1e-5  # a few float32 roundings of the output
    assert any("parent's float noise floor (vs float64): max_abs=" in n for n in report.notes)


def test_a_real_deviation_is_still_refused_and_float64_has_no_floor() -> None:
    model = Cancelling()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias[0] += 1e-4  # far above the parent's noise (~1e-7 here)
    report = verify(model, other, torch.randn(8, 64))
    assert report.noise_abs is not None and report.noise_abs < 1e-6
    assert not report.ok(1e-5)
    report64 = verify(model.double(), other.double(), torch.randn(8, 64, dtype=torch.float64))
    assert report64.noise_abs is None and not report64.ok(1e-10)


# ----------------------------------------------------------------------------------------------
# probes as the model takes them (issue 11)


class TokenModel(nn.Module):
    """forward(input_ids, attention_mask=None): an Embedding, a Linear, a masked mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        h = torch.relu(self.fc(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h.mean(1))}


def test_tokenizer_dicts_token_ids_and_several_tensors_are_probes() -> None:
    model = TokenModel()
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    for probe in ({"input_ids": ids, "attention_mask": mask}, ids, (ids, mask)):
        child = deepen(model, "fc", inputs=probe)
        assert last_report(child).max_rel <= 1e-5
        check = verify(model, child, probe)
        assert check.ok(1e-5) and check.max_abs < 1e-5


def test_errors_say_whether_the_parent_or_the_child_failed() -> None:
    model = parent("mlp")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"running the parent on the probe batch failed in eval "
                                         r"mode .*the probe does not fit the model's forward"):
        deepen(model, "fc1", inputs={"input_ids": torch.zeros(2, 64)})
    assert_untouched(model, snap)
    with pytest.raises(VerifyError, match=r"running the child on the probe batch failed") as e:
        verify(model, nn.Linear(3, 3), inputs("mlp").flatten(1))
    assert e.value.who == "child"


# ----------------------------------------------------------------------------------------------
# hooks (13.7)


class Log:
    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def hook(self, _module: nn.Module, _args: tuple, out: Tensor) -> None:
        self.calls.append(tuple(out.shape))


def test_a_logging_hook_survives_deepen_and_insert_subnet() -> None:
    model = parent("mlp")
    log = Log()
    pre_seen: list[int] = []
    model.fc1.register_forward_hook(log.hook)
    model.fc1.register_forward_pre_hook(lambda _m, args: pre_seen.append(len(args)))
    x = inputs("mlp").flatten(1)
    for child in (deepen(model, "fc1", inputs=x), insert_subnet(model, "fc1", inputs=x)):
        log.calls.clear()
        pre_seen.clear()
        with torch.no_grad():
            child(x)
        assert log.calls == [(16, model.fc1.out_features)]  # the same Log, called once
        assert pre_seen == [1]
        assert "hook(s) carried" in last_report(child).notes[-1]


def test_an_output_changing_hook_is_carried_exactly_or_refused_by_name() -> None:
    model = parent("mlp")
    x = inputs("mlp").flatten(1)

    def double(_m: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return out * 2

    model.fc1.register_forward_hook(double)
    child = deepen(model, "fc1", inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"layer 'fc1': forward hook "
                                         r"'test_an_output_changing_hook.*double' cannot be "
                                         r"carried: the morph changes what the layer sees"):
        widen(model, "fc1", 48, inputs=x)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------------------------
# memory up front (13.15)


def test_a_morph_that_cannot_fit_in_memory_is_refused_up_front() -> None:
    import time

    model = parent("cnn")
    start = time.perf_counter()
    with pytest.raises(MorphError, match=r"widen 'features.conv2' \(width=1000000000\) needs "
                                         r"at least [\d.]+ GiB .* but [\d.]+ GiB is available"):
        widen(model, "features.conv2", 10**9, inputs=inputs("cnn"))
    with pytest.raises(MorphError, match=r"deepen 'features.conv2' \(width=1000000000.*\) needs"):
        deepen(model, "features.conv2", width=10**9, inputs=inputs("cnn"))
    assert time.perf_counter() - start < 10


def test_memory_refusal_uses_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(morph_memory, "available_bytes", lambda _device: 1024)
    with pytest.raises(MorphError, match=r"deepen 'fc1' \(width=\d+, kernel_size=1\) needs at "
                                         r"least .* but 0.0 GiB is available on cpu"):
        deepen(parent("mlp"), "fc1", inputs=inputs("mlp").flatten(1))
    assert morph_memory.available_bytes.__name__ == "<lambda>"


def test_available_memory_is_read() -> None:
    free = morph_memory.available_bytes(torch.device("cpu"))
    assert free is not None and free > 0


# ----------------------------------------------------------------------------------------------
# NaN probes, meta-device and compiled models (13.16)


class Log1p(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.fc(x))  # NaN for negative pre-activations


def test_nan_in_the_probe_or_the_parents_output_is_named() -> None:
    x = inputs("mlp").flatten(1).clone()
    x[3, 5] = float("nan")
    with pytest.raises(MorphError, match=r"deepen 'fc1': the probe holds NaN or inf: input 0"):
        deepen(parent("mlp"), "fc1", inputs=x)
    with pytest.raises(VerifyError, match=r"the probe holds NaN"):
        verify(parent("mlp"), parent("mlp"), x)
    with pytest.raises(MorphError, match=r"the parent's output holds NaN or inf on this probe"):
        deepen(Log1p(), "fc", inputs=inputs("mlp").flatten(1))


def test_a_child_that_outputs_nan_is_named_as_such() -> None:
    from stablemorph.morphs import contract

    model = parent("mlp")
    x = inputs("mlp").flatten(1)

    def surgery(child: nn.Module, probe: tuple) -> contract.Surgery:
        with torch.no_grad():
            child.fc1.weight[0, 0] = float("nan")
        return contract.Surgery({"fc1.weight": contract.ParamOrigin(None)})

    with pytest.raises(MorphError, match=r"deepen 'fc1' \(scheme 'stable'\): the child's "
                                         r"output holds NaN or inf in eval mode where the "
                                         r"parent's is finite"):
        contract.run_morph("deepen", model, "fc1", "stable", {"seed": 0}, surgery, x, None,
                           None)


def test_meta_device_models_are_refused_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to("meta")
    with pytest.raises(MorphError, match=r"parameter '0.weight' is on the meta device"):
        deepen(model, "0", inputs=torch.randn(2, 4))
    with pytest.raises(VerifyError, match=r"the parent's parameter '0.weight' is on the meta"):
        verify(model, model, torch.randn(2, 4))


def test_compiled_models_are_morphed_by_the_users_layer_names() -> None:
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 16), act=nn.ReLU(),
                                      fc2=nn.Linear(16, 4)))
    compiled = torch.compile(model, backend="eager")
    x = inputs("mlp").flatten(1)
    child = deepen(compiled, "fc2", inputs=x)
    assert type(child) is nn.Sequential and isinstance(child.fc2, nn.Sequential)
    assert "torch.compile'd: the child is the morphed uncompiled module" in \
        last_report(child).notes[-1]
    torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(MorphError, match=r"no layer named 'fc3'; did you mean 'fc\d', 'fc\d'") \
            as err:
        deepen(compiled, "fc3", inputs=x)
    assert "_orig_mod" not in str(err.value)
    with pytest.raises(MorphError, match=r"without the private '_orig_mod.' prefix: 'fc2'"):
        deepen(compiled, "_orig_mod.fc2", inputs=x)


def test_a_hugging_face_model_grows_on_a_tokenizer_batch() -> None:
    from transformers import BatchEncoding, BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    batch = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    child = deepen(model, "encoder.layer.0.intermediate.dense", inputs=batch)
    check = verify(model, child, batch)
    assert {t.path for t in check.tensors} == {"output['last_hidden_state']",
                                               "output['pooler_output']"}
    assert check.ok(1e-5) and last_report(child).max_rel <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(child(**batch).last_hidden_state,
                                   model(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_weight_norm_layers_still_deepen_and_keep_the_callers_hooks() -> None:
    model = parent("mlp")
    model.fc2 = nn.utils.weight_norm(model.fc2)
    log = Log()
    model.fc2.register_forward_hook(log.hook)
    x = inputs("mlp").flatten(1)
    child = deepen(model, "fc1", inputs=x)  # fc2 keeps its own weight-norm hook and ours
    with torch.no_grad():
        torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
    deeper = deepen(model, "fc2", inputs=x)  # the weight-norm layer itself is replaced
    log.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(deeper(x), model(x), rtol=1e-5, atol=1e-6)
    assert log.calls == [(16, model.fc2.out_features)] * 2  # the child's layer, the parent's


class CastsToFloat32(nn.Module):
    """A forward that casts its input to float32: a float64 copy of it cannot run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.to(torch.float32))


def test_a_parent_that_cannot_run_in_float64_falls_back_to_the_fixed_tolerance() -> None:
    model = CastsToFloat32()
    x = inputs("mlp").flatten(1)
    report = verify(model, copy.deepcopy(model), x)
    assert report.max_abs == 0.0 and report.noise_abs is None and report.ok(1e-5)
    assert any("no float64 noise floor in eval mode (running the parent on the probe batch "
               "failed" in n for n in report.notes)
    child = deepen(model, "fc", inputs=x)
    assert last_report(child).max_rel <= 1e-5


def test_an_allocation_failure_during_surgery_is_named_as_memory() -> None:
    from stablemorph.morphs import contract

    def surgery(_child: nn.Module, _probe: tuple) -> contract.Surgery:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses: a RuntimeError
        raise AssertionError("unreachable")

    with pytest.raises(MorphError, match=r"deepen 'fc1': out of memory building the child "
                                         r"\(RuntimeError: .*memory: estimated"):
        contract.run_morph("deepen", parent("mlp"), "fc1", "stable", {"seed": 0}, surgery,
                           inputs("mlp").flatten(1), None, None)
