"""The probe batch a growth is verified on, and a module comparing what matters (logits).

``inputs`` may be what the model's forward accepts: a tokenizer-style dict (``input_ids``,
``attention_mask``, ``token_type_ids``, ``pixel_values``, ...), a tensor of integer token ids,
or a float tensor of pixel values; ``None`` builds random token ids (batch 2, 8 tokens) or
random pixel values (batch 2) from the config.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.morphs.contract import MorphError, model_device, model_dtype


def make_probe(model: nn.Module, kind: str, inputs: Any, seed: int) -> dict[str, Tensor]:
    """The probe as forward keyword arguments (``kind``: ``"tokens"`` or ``"pixels"``)."""
    config = model.config
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed + 7919)
    if inputs is None:
        if kind == "pixels":
            size = config.image_size
            x = torch.randn(2, config.num_channels, size, size, generator=gen)
            return {"pixel_values": x.to(device, model_dtype(model))}
        limit = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", 8)
        ids = torch.randint(0, config.vocab_size, (2, min(8, limit)), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if isinstance(inputs, Tensor):
        if not inputs.is_floating_point():
            return {"input_ids": inputs.to(device)}
        if kind == "pixels":
            return {"pixel_values": inputs.to(device, model_dtype(model))}
        raise MorphError(
            f"inputs: a float tensor of shape {tuple(inputs.shape)} cannot feed "
            f"{type(model).__name__}: give integer token ids or a dict such as a tokenizer's "
            f"output")
    if isinstance(inputs, Mapping):
        accepted = set(inspect.signature(model.forward).parameters)
        probe = {}
        for key, value in inputs.items():
            if key not in accepted:
                raise MorphError(
                    f"inputs: {type(model).__name__}.forward takes no {key!r}; it takes "
                    f"{', '.join(sorted(accepted - {'kwargs'}))}")
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise MorphError(f"inputs[{key!r}]: expected a tensor, got "
                                 f"{type(value).__name__} (use return_tensors='pt')")
            probe[key] = value.to(device, model_dtype(model)) if value.is_floating_point() \
                else value.to(device)
        if not probe:
            raise MorphError("inputs: the dict holds no tensor to probe the model with")
        return probe
    raise MorphError(
        f"inputs: expected a dict of tensors (e.g. a tokenizer's output), integer token ids "
        f"or pixel values, got {type(inputs).__name__}")


def probe_shape(probe: dict[str, Tensor]) -> list[int]:
    """The shape recorded for the probe: its main tensor's (JSON-able)."""
    main = probe.get("input_ids", probe.get("pixel_values", next(iter(probe.values()))))
    return [int(s) for s in main.shape]


@contextlib.contextmanager
def _no_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout off in train mode, also where a module reads a dropout module's ``p`` or a
    float ``attention_dropout`` attribute itself (HF attention does); restored on exit."""
    saved: list[tuple[object, str, float]] = []
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p:
            saved.append((m, "p", m.p))
        for attr in ("attention_dropout", "dropout"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and value:
                saved.append((m, attr, value))
    try:
        for obj, attr, _ in saved:
            setattr(obj, attr, 0.0)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


class Logits(nn.Module):
    """``model(**probe).logits`` as a module, so that :func:`stablemorph.verify.verify`
    compares exactly the logits of two HF models (their outputs also hold caches and, for
    some classes, hidden states of the grown width).

    A model without logits (``BertModel``) gives its last hidden state and pooled output,
    restricted to the stream coordinates ``take`` (the child's first copy of each parent
    coordinate; ``None``: all)."""

    def __init__(self, model: nn.Module, take: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.take = take

    def forward(self, **probe: Tensor) -> Tensor | tuple[Tensor, ...]:
        with _no_dropout(self.model):
            out = self.model(**probe)
        if getattr(out, "logits", None) is not None:
            return out.logits
        states = tuple(t for t in (out.last_hidden_state, out.get("pooler_output"))
                       if t is not None)
        return states if self.take is None else tuple(t[..., self.take] for t in states)
