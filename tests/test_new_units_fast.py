"""The widen rule's measurement (:func:`stablemorph.morphs.new_units.widen_energy`) on its fast
path (one pass of squares per gradient, summed per unit; no entry masks) equals the first
version's loop, rebuilt here by hand: per seeded direction one backward, every part's entries
picked by a full boolean mask and squared and summed in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablemorph.morphs import widen
from stablemorph.morphs.first_step import SAMPLES, SEED
from stablemorph.morphs.new_units import _new_positions, _unit_squares, widen_energy
from stablemorph.record import ParamOrigin, last_report
from tests.test_widen_rule import parent

torch.set_num_threads(1)


def model_and_batch(kind: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    model, x = parent(kind)  # the widen rule's tests' models (a CNN with trained-like BNs)
    return model.to(dtype), x.to(dtype)


def loop_energies(model: nn.Module, x: torch.Tensor, consumers: list[str],
                  parts: dict[str, list[tuple[str, torch.Tensor | None]]]) -> dict[str, float]:
    """The first version: train-mode forward (no dropout here), consumer outputs by hooks,
    one backward per direction, ``g[mask].double().pow(2).sum()`` per member."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    names = sorted({n for members in parts.values() for n, _ in members})
    outs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(c).register_forward_hook(
        lambda m, a, out, c=c: outs.setdefault(c, out)) for c in consumers]
    model.train()
    model(x)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(SEED)
    total = {part: 0.0 for part in parts}
    for _ in range(SAMPLES):
        deltas = [torch.randn(outs[c].shape, generator=gen, dtype=torch.float64)
                  .to(outs[c].dtype) for c in consumers]
        grads = dict(zip(names, torch.autograd.grad([outs[c] for c in consumers],
                                                    [params[n] for n in names], deltas,
                                                    retain_graph=True), strict=True))
        for part, members in parts.items():
            for n, mask in members:
                g = grads[n]
                total[part] += float((g if mask is None else g[mask]).double().pow(2).sum())
    model.load_state_dict(state)
    return {part: v / SAMPLES for part, v in total.items()}


def entry_mask(p: torch.Tensor, origin: ParamOrigin) -> torch.Tensor:
    shape = [1] * p.dim()
    shape[origin.dim] = -1
    return _new_positions(origin.index).view(shape).expand_as(p)


CASES = [("cnn", "features.conv1", ["features.conv2"]),
         ("cnn", "features.conv2", ["classifier"]),
         ("mlp", "fc1", ["fc2"])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["stable", "net2net"])
@pytest.mark.parametrize("kind, target, consumers", CASES)
def test_the_fast_measurement_equals_the_loop_over_full_entry_masks(
        kind: str, target: str, consumers: list[str], scheme: str, dtype: torch.dtype) -> None:
    model, x = model_and_batch(kind, dtype)
    child = widen(model, target, 9, scheme=scheme, inputs=x, step_rule=False)
    origins = {n: o for n, o in last_report(child).param_map.items()
               if o.index is not None and o.source is not None}
    assert origins
    got = widen_energy(model, child, origins, consumers, x)

    cparams = dict(child.named_parameters())
    parts: dict[str, list[tuple[str, torch.Tensor | None]]] = {
        "old": [], "new_in": [], "new_out": []}
    for n, o in origins.items():
        new = entry_mask(cparams[n], o)
        parts["old"].append((n, ~new))
        side = "new_out" if any(n.startswith(f"{c}.") for c in consumers) else "new_in"
        parts[side].append((n, new))
    want = loop_energies(child, x, consumers, parts)
    parent = loop_energies(model, x, consumers,
                           {"parent": [(s, None) for s in {o.source for o in origins.values()}]})
    assert want["new_in"] > 0 and want["new_out"] > 0
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    for field in ("old", "new_in", "new_out"):
        torch.testing.assert_close(getattr(got, field), want[field], rtol=rtol, atol=0.0)
    # stable's pairs keep the old units' values (parent = old, no parent pass); net2net's
    # copies halve outgoing columns (a parent pass)
    torch.testing.assert_close(got.parent, parent["parent"], rtol=10 * rtol, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (6, 5), (7,), (4, 3, 2, 5, 2)])
def test_unit_squares_equal_the_float64_sum_per_unit_along_every_dim(
        shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for dim in range(len(shape)):
        rest = [d for d in range(len(shape)) if d != dim]
        want = g.double().pow(2).sum(rest) if rest else g.double().pow(2)  # sum([]): all
        got = _unit_squares(g, dim)
        assert got.dtype == torch.float64 and got.shape == (shape[dim],)
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14,
                                   atol=0.0)
