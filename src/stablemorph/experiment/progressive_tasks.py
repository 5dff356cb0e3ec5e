"""The cells of the progressive benchmark: what is trained, how it grows, how it is scored.

A :class:`Task` gives the one training loop of :mod:`stablemorph.experiment.progressive`
everything model- and data-specific: the model at the start and the large model trained from
scratch, the batch of a global step, the loss, the evaluation (loss and accuracy), and the
in-place growth steps of each arm at each stage. Stages are given as ``layers`` (depth at the
start and after each growth) and ``widths`` (width multipliers of the start model, same
length); a stage may grow depth, width or both.

- :class:`GPTTask`: the project's character-level GPT (:mod:`stablemorph.transformer`);
  depth by evenly spaced block insertion, width by MLP width, heads and residual width.
- :class:`LlamaTask`: a tiny Hugging Face ``LlamaForCausalLM`` built from a config, on the
  same text; growth by :func:`stablemorph.grow` (layers; hidden, heads and MLP for width).
- :class:`CNNTask`: the zoo's ``cnn`` on an image data set (Fashion-MNIST by default);
  depth by :func:`stablemorph.deepen` of the convolutions (3x3 after 3x3, last first),
  width by :func:`stablemorph.widen` of every convolution's output.

Anchors, not function-preserving: ``stack`` (G_stack: the parent's blocks repeated; depth of
the transformers only) and ``random`` (the new parts randomly initialised, the old ones kept).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.record import (
    HISTORY_ATTR,
    MorphRecord,
    MorphReport,
    ParamOrigin,
    append_record,
    history,
)

EXACT = ("stable", "net2net", "netmorph")
ANCHORS = ("stack", "random")
Growth = Callable[[nn.Module], nn.Module]


class TaskError(ValueError):
    """A stage plan the task cannot grow: the message names the stage and the reason."""


def exact_scheme(arm: str) -> str:
    """The morph scheme of an arm that grows exactly (timing and plateau arms use stable)."""
    return arm if arm in EXACT else "stable"


# --- anchors: rebuilt block stacks, re-randomised new parts


def rebuild_blocks(model: nn.Module, child: nn.Module, prefix: str,
                   source_of: Callable[[int], int | None], op: str, seed: int) -> nn.Module:
    """``child`` (a fresh, randomly initialised model with more blocks under ``prefix``)
    with every parameter copied from ``model``: block ``i`` from the parent's block
    ``source_of(i)``, or left fresh for ``None``; recorded as one (non-exact) growth."""
    parent = dict(model.named_parameters())
    origins: dict[str, ParamOrigin] = {}
    depth = prefix.count(".") + 1
    with torch.no_grad():
        for name, p in child.named_parameters():
            parts = name.split(".")
            if name.startswith(prefix + "."):
                src = source_of(int(parts[depth]))
                if src is None:
                    origins[name] = ParamOrigin(None)
                    continue
                parts[depth] = str(src)
            source = ".".join(parts)
            p.copy_(parent[source])
            origins[name] = ParamOrigin(source)
    object.__setattr__(child, HISTORY_ATTR, history(model))
    report = MorphReport(op=op, target=prefix, scheme=op, changed=[
        n for n, o in origins.items() if o.source is None], param_map=origins,
        notes=["not function-preserving (an anchor of the progressive benchmark)"])
    n_layer = sum(1 for _ in child.get_submodule(prefix))
    append_record(child, MorphRecord(op, prefix, {"n_layer": n_layer, "seed": seed}, report))
    return child


def block_slots(n: int, n_layer: int, how: str) -> list[int | None]:
    """Parent block of each child block: ``"stack"`` repeats the stack in order (``n_layer``
    a multiple of ``n``); ``"random"`` puts new (``None``) blocks where the exact schemes
    insert theirs."""
    from stablemorph.transformer.grow import insertion_points

    if how == "stack":
        if n_layer % n:
            raise TaskError(f"stack: {n_layer} blocks is not a multiple of {n}")
        return [i % n for i in range(n_layer)]
    slots: list[int | None] = list(range(n))
    for index in insertion_points(n, n_layer - n):
        slots.insert(index, None)
    return slots


def _fresh_(name: str, p: Tensor, gen: torch.Generator) -> None:
    """PyTorch-default-like values: matrices and kernels ``U(-1/sqrt(fan_in), ...)``, biases
    0, PAct's ``a`` 0 (a plain ReLU), other vectors (norm scales) 1."""
    if p.dim() >= 2:
        bound = 1.0 / math.sqrt(p[0].numel())
        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    elif name.endswith(".a") or name.endswith("bias"):
        p.zero_()
    else:
        p.fill_(1.0)


def randomise_new_(parent: nn.Module, child: nn.Module, seed: int) -> nn.Module:
    """Give ``child`` (just grown from ``parent``, last record) random new parts and the
    parent's values everywhere else: fresh parameters are re-initialised (:func:`_fresh_`),
    grown ones keep the parent's values in the parent's index box and get random values
    outside it. The record's notes say it is no longer exact. Returns ``child``."""
    record = history(child)[-1]
    old = dict(parent.named_parameters())
    gen = torch.Generator().manual_seed(10_007 * seed + 17)
    with torch.no_grad():
        for name, p in child.named_parameters():
            origin = record.report.param_map.get(name)
            if origin is None:
                continue
            if origin.source is None:
                _fresh_(name, p, gen)
                continue
            src = old[origin.source]
            if src.shape == p.shape:
                continue
            fresh = p.detach().clone()
            _fresh_(name, fresh, gen)
            box = tuple(slice(0, n) for n in src.shape)
            fresh[box] = src
            p.copy_(fresh)
    record.report.notes.append("new parts re-randomised: not function-preserving (anchor)")
    return child


# --- the tasks


@dataclasses.dataclass
class Stage:
    """Sizes after a growth: depth and width multiplier of the start model."""

    layers: int
    width: float


def check_stages(layers: Sequence[int], widths: Sequence[float]) -> list[Stage]:
    """Stages from ``layers`` and ``widths`` (same length >= 2): nothing may shrink, every
    growth must grow something."""
    if len(layers) != len(widths) or len(layers) < 2:
        raise TaskError(f"layers {tuple(layers)} and widths {tuple(widths)} need the same "
                        f"length, at least 2 (start and one growth)")
    stages = [Stage(int(n), float(w)) for n, w in zip(layers, widths, strict=True)]
    if stages[0].layers < 1 or stages[0].width != 1.0:
        raise TaskError(f"the start model has >= 1 layer and width multiplier 1, got "
                        f"{stages[0]}")
    for i, (a, b) in enumerate(itertools.pairwise(stages), start=1):
        if b.layers < a.layers or b.width < a.width or (b.layers, b.width) == (a.layers,
                                                                              a.width):
            raise TaskError(f"growth {i}: {a.layers} -> {b.layers} layers, width x{a.width:g}"
                            f" -> x{b.width:g}: sizes must not shrink and must grow")
    return stages


class Task:
    """The model- and data-specific half of the benchmark (module docstring). Subclasses set
    ``name``, ``arms`` (the anchors that make sense) and implement the methods below."""

    name = ""
    anchors: tuple[str, ...] = ANCHORS
    metric = "validation loss"

    def __init__(self, stages: list[Stage], batch_size: int):
        self.stages, self.batch_size = stages, batch_size

    def build(self, seed: int, final: bool) -> nn.Module:
        """The start model, or (``final``) the large model trained from scratch."""
        raise NotImplementedError

    def batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of global step ``step`` (the same for every arm)."""
        raise NotImplementedError

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(loss, accuracy) on the fixed evaluation set."""
        from stablemorph.experiment.train import evaluate

        x, y = self.eval_set
        acc, loss = evaluate(_Logits(model, self), x, y, batch_size=256)
        return loss, acc

    def growths(self, arm: str, model: nn.Module, stage: int, seed: int) -> list[Growth]:
        """The in-place growth steps of ``arm`` from stage ``stage - 1`` to ``stage``."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, arms: Sequence[str]) -> None:
        """Refuse, before any training, arms this task has no growth for."""
        bad = [a for a in arms if a in ANCHORS and a not in self.anchors]
        if bad:
            raise TaskError(f"task {self.name}: no {bad} anchor (it has {list(self.anchors)})")
        widths = any(b.width != a.width for a, b in itertools.pairwise(self.stages))
        if "stack" in arms and widths:
            raise TaskError(f"task {self.name}: the stack anchor grows depth only; these "
                            f"stages grow width too")
        if "random" in arms and widths and isinstance(self, _TextTask):
            raise TaskError(f"task {self.name}: the random anchor grows depth only here (a "
                            f"wider residual stream is re-encoded, so the parent's values "
                            f"have no place to be kept); these stages grow width too")


class _Logits(nn.Module):
    """``model`` returning plain logits (Hugging Face models return an output object)."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: Tensor) -> Tensor:
        return self.task.logits(self.model, x)


class _TextTask(Task):
    """Character-level text: random training windows, fixed validation windows."""

    def __init__(self, stages: list[Stage], batch_size: int, *, d_model: int, n_head: int,
                 block_size: int, max_chars: int, eval_windows: int):
        from stablemorph.transformer.text import fixed_windows, load_stdlib_corpus

        super().__init__(stages, batch_size)
        self.d_model, self.n_head, self.block_size = d_model, n_head, block_size
        self.corpus = load_stdlib_corpus(max_chars=max_chars)
        self.eval_set = fixed_windows(self.corpus.val, eval_windows, block_size)

    def batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        from stablemorph.transformer.text import random_windows

        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return random_windows(self.corpus.train, self.batch_size, self.block_size, gen)

    def size(self, stage: Stage) -> tuple[int, int]:
        """(d_model, n_head) at ``stage``; the head width stays."""
        d_model = round(self.d_model * stage.width)
        n_head = round(self.n_head * stage.width)
        if n_head * (self.d_model // self.n_head) != d_model:
            raise TaskError(f"width x{stage.width:g}: {d_model} is not {n_head} heads of "
                            f"{self.d_model // self.n_head}")
        return d_model, n_head


class GPTTask(_TextTask):
    name = "gpt"

    def config(self, stage: Stage):
        from stablemorph.transformer.model import GPTConfig
        from stablemorph.transformer.text import VOCAB_SIZE

        d_model, n_head = self.size(stage)
        return GPTConfig.uniform(vocab_size=VOCAB_SIZE, block_size=self.block_size,
                                 d_model=d_model, n_layer=stage.layers, n_head=n_head)

    def build(self, seed: int, final: bool) -> nn.Module:
        from stablemorph.transformer.model import GPT

        torch.manual_seed(seed)
        return GPT(self.config(self.stages[-1] if final else self.stages[0]))

    def growths(self, arm: str, model: nn.Module, stage: int, seed: int) -> list[Growth]:
        from stablemorph.experiment.growth import morph_steps

        before, after = self.stages[stage - 1], self.stages[stage]
        steps: list[Growth] = []
        if after.width > before.width:
            factor = after.width / before.width
            scheme = exact_scheme(arm)
            for s in morph_steps("width", model, [], {"factor": factor}):
                steps.append(lambda m, _s=s: _s.run(m, scheme, seed, None))
        if after.layers > before.layers:
            steps += _depth_steps(arm, model.config.n_layer, after.layers, seed,
                                  insert=lambda m, i, k, r: _insert_gpt(m, i, k, r),
                                  rebuild=lambda m, slots, op: _rebuild_gpt(m, slots, op, seed))
        return steps

    def describe(self) -> str:
        return (f"char-level GPT d_model={self.d_model}, {self.n_head} heads, context "
                f"{self.block_size}, batch {self.batch_size}")


def _insert_gpt(model: nn.Module, index: int, scheme: str, seed: int) -> nn.Module:
    from stablemorph.transformer.depth import insert_block

    return insert_block(model, index, scheme=scheme, seed=seed)


def _rebuild_gpt(model: nn.Module, slots: list[int | None], op: str, seed: int) -> nn.Module:
    from stablemorph.transformer.model import GPT

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        child = GPT(dataclasses.replace(model.config,
                                        blocks=(model.config.blocks[0],) * len(slots)))
    return rebuild_blocks(model, child, "blocks", lambda i: slots[i], op, seed)


def _with_anchor(arm: str, step: Growth, seed: int) -> Growth:
    """``step``, followed for the ``random`` arm by re-randomising what it added."""
    if arm != "random":
        return step
    return lambda m: randomise_new_(m, step(m), seed)


def _depth_steps(arm: str, n: int, n_layer: int, seed: int,
                 insert: Callable[[nn.Module, int, str, int], nn.Module] | None,
                 rebuild: Callable[[nn.Module, list[int | None], str], nn.Module]
                 ) -> list[Growth]:
    """Depth growth of a block stack from ``n`` to ``n_layer`` blocks: one exact insertion
    per new block (evenly spaced), or one rebuild for the anchors."""
    from stablemorph.transformer.grow import insertion_points

    if arm in ANCHORS:
        slots = block_slots(n, n_layer, arm)
        return [lambda m: rebuild(m, slots, arm)]
    if insert is None:
        raise TaskError(f"arm {arm}: no exact block insertion given")
    scheme = exact_scheme(arm)
    return [lambda m, i=i, r=r: insert(m, i, scheme, seed + r)
            for r, i in enumerate(insertion_points(n, n_layer - n))]


class LlamaTask(_TextTask):
    """A tiny ``LlamaForCausalLM`` (SwiGLU MLP of ``mlp_ratio * hidden``, RMSNorm, RoPE,
    untied embeddings) on the character-level text."""

    name = "llama"
    mlp_ratio = 8 / 3

    def config(self, stage: Stage):
        import transformers

        from stablemorph.transformer.text import VOCAB_SIZE

        d_model, n_head = self.size(stage)
        return transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=d_model, num_attention_heads=n_head,
            num_key_value_heads=n_head, intermediate_size=self.mlp(d_model),
            num_hidden_layers=stage.layers, max_position_embeddings=self.block_size,
            tie_word_embeddings=False)

    def mlp(self, d_model: int) -> int:
        return 8 * math.ceil(self.mlp_ratio * d_model / 8)

    def build(self, seed: int, final: bool) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(self.config(self.stages[-1] if final
                                                         else self.stages[0]))

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(input_ids=x).logits

    def growths(self, arm: str, model: nn.Module, stage: int, seed: int) -> list[Growth]:
        import stablemorph as sm

        before, after = self.stages[stage - 1], self.stages[stage]
        steps: list[Growth] = []
        if after.width > before.width:
            d_model, n_head = self.size(after)
            steps.append(lambda m: sm.grow(
                m, hidden=d_model, heads=n_head, kv_heads=n_head, mlp=self.mlp(d_model),
                scheme=exact_scheme(arm), seed=seed))
        if after.layers > before.layers:
            if arm in ANCHORS:
                steps += _depth_steps(arm, before.layers, after.layers, seed, insert=None,
                                      rebuild=lambda m, slots, op: self._rebuild(
                                          m, slots, op, seed))
            else:
                steps.append(lambda m: sm.grow(m, layers=after.layers,
                                               scheme=exact_scheme(arm), seed=seed))
        return steps

    def _rebuild(self, model: nn.Module, slots: list[int | None], op: str,
                 seed: int) -> nn.Module:
        import transformers

        config = model.config.to_dict()
        config["num_hidden_layers"] = len(slots)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            child = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        return rebuild_blocks(model, child, "model.layers", lambda i: slots[i], op, seed)

    def describe(self) -> str:
        return (f"HF LlamaForCausalLM hidden={self.d_model}, {self.n_head} heads, SwiGLU MLP "
                f"{self.mlp(self.d_model)}, context {self.block_size}, batch "
                f"{self.batch_size} (char-level text)")


class CNNTask(Task):
    """The zoo's ``cnn`` (``conv3x3 -> BN -> ReLU -> maxpool`` per entry of ``widths``, then a
    linear classifier). ``layers`` counts convolutions: from ``len(widths)`` up to twice
    that, each growth in depth replacing a convolution (the last ones first) by two 3x3 ones
    with a PAct between; width multiplies every convolution's output channels."""

    name = "cnn"
    anchors = ("random",)
    metric = "test loss"

    def __init__(self, stages: list[Stage], batch_size: int, *, widths: Sequence[int],
                 dataset: str, limit_test: int | None):
        from stablemorph.experiment.data import load_dataset

        super().__init__(stages, batch_size)
        self.widths = tuple(widths)
        n = len(self.widths)
        if stages[0].layers != n or stages[-1].layers > 2 * n:
            raise TaskError(f"cnn: a {n}-convolution start model has layers {n} at the start "
                            f"and at most {2 * n} after growing, got "
                            f"{[s.layers for s in stages]}")
        for s in stages:
            if any(abs(w * s.width - round(w * s.width)) > 1e-9 for w in self.widths):
                raise TaskError(f"cnn: width x{s.width:g} of {self.widths} is not whole")
        self.data = load_dataset(dataset, limit_test=limit_test)
        self.eval_set = (self.data.x_test, self.data.y_test)

    def build(self, seed: int, final: bool) -> nn.Module:
        from stablemorph.zoo import build_model

        torch.manual_seed(seed)
        model = build_model("cnn", in_channels=self.data.input_shape[0],
                            image_size=self.data.input_shape[-1], widths=list(self.widths))
        if not final:
            return model
        for stage in range(1, len(self.stages)):
            for growth in self.growths("random", model, stage, seed):
                model = growth(model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                _fresh_(name, p, gen)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        return model

    def batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, self.data.num_train, (self.batch_size,), generator=gen)
        return self.data.x_train[idx], self.data.y_train[idx]

    def _conv(self, k: int, deepened: bool) -> str:
        return f"features.conv{k}.second" if deepened else f"features.conv{k}"

    def _deepened(self, layers: int) -> set[int]:
        n = len(self.widths)
        return set(range(n, n - (layers - n), -1))

    def growths(self, arm: str, model: nn.Module, stage: int, seed: int) -> list[Growth]:
        import stablemorph as sm

        before, after = self.stages[stage - 1], self.stages[stage]
        scheme = "netmorph" if arm == "random" else exact_scheme(arm)
        probe = self.data.x_train[:32]
        steps: list[Growth] = []
        old, new = self._deepened(before.layers), self._deepened(after.layers)
        for k in sorted(new - old, reverse=True):
            steps.append(_with_anchor(arm, lambda m, _k=k: sm.deepen(
                m, f"features.conv{_k}", scheme=scheme, kernel_size=3, seed=seed + _k,
                inputs=probe), seed))
        if after.width > before.width:
            for k, w in enumerate(self.widths, start=1):
                target = self._conv(k, k in new)
                steps.append(_with_anchor(arm, lambda m, _t=target, _w=w: sm.widen(
                    m, _t, scheme=scheme, width=round(_w * after.width), seed=seed,
                    inputs=probe), seed))
        return steps

    def describe(self) -> str:
        return (f"zoo cnn widths {list(self.widths)} on {self.data.name} "
                f"({self.data.num_train} training / {self.data.num_test} test images), "
                f"batch {self.batch_size}")


def growth_label(task: Task, stage: int) -> str:
    s = task.stages[stage]
    return f"{s.layers}L x{s.width:g}"


def make_task(cfg: Any) -> Task:
    """The task named by ``cfg.task`` with ``cfg``'s sizes (a ``ProgressiveConfig``)."""
    stages = check_stages(cfg.layers, cfg.widths or (1.0,) * len(cfg.layers))
    text = dict(d_model=cfg.d_model, n_head=cfg.n_head, block_size=cfg.block_size,
                max_chars=cfg.max_chars, eval_windows=cfg.eval_windows)
    if cfg.task == "gpt":
        return GPTTask(stages, cfg.batch_size, **text)
    if cfg.task == "llama":
        return LlamaTask(stages, cfg.batch_size, **text)
    if cfg.task == "cnn":
        return CNNTask(stages, cfg.batch_size, widths=cfg.cnn_widths, dataset=cfg.dataset,
                       limit_test=cfg.limit_test)
    raise TaskError(f"unknown task {cfg.task!r}; choose one of {list(TASKS)}")


TASKS = ("gpt", "llama", "cnn")
