"""Growth inside a real ``transformers.Trainer`` run, and the FLOPs count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablemorph.flops import FlopMeter, step_flops
from stablemorph.progressive import GrowthSchedule

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


class _Loss(transformers.TrainerCallback):
    """Records the loss on a fixed batch at the end of every step (before or after growth,
    depending on where it sits in the callback list)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch, self.losses = batch, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            model.eval()
            self.losses[state.global_step] = float(model(**self.batch).loss)
            model.train()


def test_trainer_grows_on_schedule_and_keeps_training(tmp_path):
    from stablemorph.trainer import GrowthCallback

    model = _tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (48, 16), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    probe = {"input_ids": ids[:2], "labels": ids[:2]}
    growth = {"op": "deepen", "target": "model.layers.1.mlp.down_proj",
              "inputs": ids[:2]}
    grow = GrowthCallback(GrowthSchedule([(3, growth)]))
    before, after = _Loss(probe), _Loss(probe)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    n_before = sum(p.numel() for p in model.parameters())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[before, grow, after])
    result = trainer.train()

    assert trainer.model is model
    assert sum(p.numel() for p in model.parameters()) > n_before
    assert [(e.step, e.records[0].op) for e in grow.events] == [(3, "deepen")]
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    # The loss is continuous across the growth and training goes on afterwards.
    assert after.losses[3] == pytest.approx(before.losses[3], rel=1e-5)
    assert after.losses[6] != after.losses[3]
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_callback_refuses_a_bad_schedule_before_the_first_step(tmp_path):
    from stablemorph.progressive import GrowthError
    from stablemorph.trainer import GrowthCallback

    model = _tiny_llama()
    data = [{"input_ids": torch.zeros(8, dtype=torch.long),
             "labels": torch.zeros(8, dtype=torch.long)}] * 8
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[],
                                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    bad = GrowthCallback(GrowthSchedule([(1, {"op": "deepen", "target": "model.nope"})]))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[bad])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GrowthError, match=r"stage 0 \(step 1\).*model\.nope"):
        trainer.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_step_flops_match_the_analytic_count():
    layer = nn.Linear(10, 7)
    x = torch.randn(5, 10)
    # forward 2*B*I*O; backward: the weight's gradient only (x needs none): 2*B*I*O.
    assert step_flops(layer, x) == 4 * 5 * 10 * 7
    mlp = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    # second layer also passes its input gradient back: + 2*B*7*3
    assert step_flops(mlp, x) == 4 * 5 * 10 * 7 + 6 * 5 * 7 * 3
    assert layer.weight.grad is None  # the model's gradients are left as they were


def test_flop_meter_follows_growth():
    import stablemorph as sm

    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(4, 10)
    meter = FlopMeter()
    meter.add(model, x, steps=10)
    grown = sm.widen(model, "0", width=16, inputs=x)
    meter.add(grown, x, steps=10)
    per_small, per_big = step_flops(model, x), step_flops(grown, x)
    assert per_big > per_small
    assert meter.total == 10 * per_small + 10 * per_big
