"""Per-layer handlers: widen through timm-style blocks (BatchNorm with a fused activation,
channels-first LayerNorm, GroupNorm, squeeze-excite), gated MLPs (SwiGLU), RMSNorm,
Embedding, Hugging Face Conv1D/Llama MLPs; the registry; tied weights; fx's real cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from morph_cases import assert_same_function, assert_untouched, batch, snapshot
from torch import Tensor, nn

import stablemorph as sm
from stablemorph.handlers import handler_for, is_leaf
from stablemorph.handlers.norms import BATCHNORM, LAYERNORM
from stablemorph.morphs import MorphError, widen
from stablemorph.record import last_report

torch.set_num_threads(1)

SCHEMES = ["stable", "netmorph", "net2net"]
X = batch("image", 16)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's structure: a BatchNorm2d subclass whose forward applies an activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:  # as timm's, without its asserts
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats
                         else None,
                         self.running_var if not self.training or self.track_running_stats
                         else None, self.weight, self.bias, use_batch, factor, self.eps)
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, F.layer_norm, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SuperLayerNorm2d(nn.LayerNorm):
    """The other spelling: the parent's forward on a permuted input."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """timm's SE: ``x * sigmoid(expand(act(reduce(mean(x)))))`` with 1x1 convs."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class ConvNet(nn.Module):
    """conv -> norm -> (SE) -> conv -> pool -> Linear: the norm and SE vary."""

    def __init__(self, norm: nn.Module, se: bool = False, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.norm = norm
        self.se = SqueezeExcite(width, 3) if se else nn.Identity()
        self.conv2 = nn.Conv2d(width, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.se(torch.relu(self.norm(self.conv1(x))))
        return self.head(self.conv2(h).mean((2, 3)))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` on (batch, tokens, features), as in Llama."""

    def __init__(self, d: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _trained(model: nn.Module, x: Tensor) -> nn.Module:
    """A few steps of training so norms' statistics and affine values are not defaults."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.train()


def _check(model: nn.Module, target: str, width: int, scheme: str, x: Tensor) -> nn.Module:
    snap = snapshot(model)
    child = widen(model, target, width, scheme=scheme, inputs=x)
    assert_same_function(model, child, x)
    assert_untouched(model, snap)
    report = last_report(child)
    if scheme == "stable":
        assert report.zero_fraction == 0.0
    return child


CONV_NETS = {
    "bnact": lambda: ConvNet(BatchNormAct2d(8)),
    "ln2d": lambda: ConvNet(LayerNorm2d(8)),
    "ln2d_super": lambda: ConvNet(SuperLayerNorm2d(8)),
    "groupnorm": lambda: ConvNet(nn.GroupNorm(4, 8)),
    "se": lambda: ConvNet(nn.BatchNorm2d(8), se=True),
    "instancenorm": lambda: ConvNet(nn.InstanceNorm2d(8, affine=True,
                                                      track_running_stats=True)),
    "prelu": lambda: ConvNet(nn.Sequential(nn.BatchNorm2d(8), nn.PReLU(8))),
}
WIDTHS = {"bnact": 11, "ln2d": 16, "ln2d_super": 24, "groupnorm": 12, "se": 11,
          "instancenorm": 11, "prelu": 11}


@pytest.mark.parametrize("name", sorted(CONV_NETS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_timm_style_blocks_widen_exactly(name: str, scheme: str) -> None:
    torch.manual_seed(1)
    model = _trained(CONV_NETS[name](), X)
    child = _check(model, "conv1", WIDTHS[name], scheme, X)
    assert child.conv2.in_channels == WIDTHS[name]


def test_fused_activation_and_channels_first_norms_grow_their_parameters() -> None:
    torch.manual_seed(1)
    bn = _trained(CONV_NETS["bnact"](), X)
    child = widen(bn, "conv1", 11, scheme="net2net", inputs=X)
    src = last_report(child).param_map["conv1.weight"].index[8:]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(child.norm, attr)[8:], getattr(bn.norm, attr)[src])
    assert child.norm.num_features == 11
    ln = _trained(CONV_NETS["ln2d"](), X)
    child = widen(ln, "conv1", 16, inputs=X)
    assert child.norm.normalized_shape == (16,) and child.norm.weight.shape == (16,)
    assert not is_leaf(ln.norm) and handler_for(ln.norm) is LAYERNORM
    assert handler_for(bn.norm) is BATCHNORM  # found along the MRO


def test_groupnorm_grows_by_whole_groups() -> None:
    torch.manual_seed(1)
    model = _trained(CONV_NETS["groupnorm"](), X)
    child = widen(model, "conv1", 14, inputs=X)
    assert (child.norm.num_groups, child.norm.num_channels) == (7, 14)
    with pytest.raises(MorphError, match=r"groups of 2: .* plus a multiple of 2, got 11 "
                                         r"\(nearest: 10\)"):
        widen(model, "conv1", 11, inputs=X)
    odd = _trained(ConvNet(nn.GroupNorm(2, 6), width=6), X)  # groups of 3: split copies
    _check(odd, "conv1", 9, "stable", X)


def test_squeeze_excite_gate_grows_with_the_gated_channels() -> None:
    torch.manual_seed(1)
    model = _trained(CONV_NETS["se"](), X)
    child = widen(model, "conv1", 11, inputs=X)
    assert child.se.conv_expand.out_channels == 11 and child.se.conv_reduce.in_channels == 11
    assert last_report(child).param_map["se.conv_expand.weight"].index is not None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_swiglu_gate_and_up_grow_together(scheme: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 5, 12)
    model = _trained(SwiGLU(), x)
    for target in ("gate", "up"):
        child = _check(model, target, 21, scheme, x)
        assert child.gate.out_features == child.up.out_features == 21
        assert child.down.in_features == 21


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rmsnorm_and_embedding(scheme: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 6), nn.RMSNorm(6), nn.GELU(),
                          nn.Linear(6, 4))
    tokens = torch.randint(0, 20, (4, 7))
    _check(model, "1", 12, scheme, tokens)
    child = _check(model, "0", 11, scheme, tokens)
    assert child[0].embedding_dim == 11 and child[1].in_features == 11


def test_depthwise_under_netmorph_with_zero_incoming_weights() -> None:
    """13.17: NetMorph zeroes the incoming side (smaller here), through a depthwise conv."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(4, 16, 3, padding=1), nn.Flatten(),
                          nn.Linear(16 * 64, 3))
    model = _trained(model, X)
    for scheme in SCHEMES:
        child = _check(model, "0", 7, scheme, X)
        assert child[2].groups == 7
    child = widen(model, "0", 7, scheme="netmorph", inputs=X)
    assert bool((child[0].weight[4:] == 0).all()) and bool((child[2].weight[4:] == 0).all())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc(self.embed(t))))


def test_tied_weights_are_refused_naming_both() -> None:
    model = Tied()
    snap = snapshot(model)
    tokens = torch.randint(0, 10, (3, 4))
    with pytest.raises(MorphError, match=r"'embed.weight' and 'head.weight' are one tied "
                                         r"parameter; widening would grow 'head.weight'"):
        widen(model, "fc", 12, inputs=tokens)
    assert_untouched(model, snap)
    assert model.head.weight is model.embed.weight


def test_register_handler_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"not an nn\.Module subclass"):
        sm.register_handler(int, sm.handlers.Elementwise())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a stablemorph Handler"):
        sm.register_handler(nn.ReLU, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a qualified class name"):
        sm.register_handler("Conv1D", sm.handlers.Elementwise())


class Unhandled(nn.Module):
    """A leaf nobody taught widening (a torch.nn module without a handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.attn(h, h, h)[0]


def test_a_module_without_handler_is_named() -> None:
    with pytest.raises(MorphError, match=r"'attn' \(MultiheadAttention\), which has no handler "
                                         r"\(see sm.register_handler\)"):
        widen(Unhandled(), "fc", 10, inputs=torch.randn(2, 3, 8))


def test_readme_register_handler_examples_run_as_written() -> None:
    """The README's worked examples (fused-qkv attention; handlers driven by hand) run."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Teaching widen a new layer", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # our own README
    model, wider, x = scope["model"], scope["wider"], scope["x"]
    assert_same_function(model, wider, x)  # type: ignore[arg-type]
    assert last_report(wider).zero_fraction == 0.0  # type: ignore[arg-type]
    exec(compile(blocks[1], "README.md", "exec"), scope)
    fc, proj = scope["fc"], scope["proj"]
    h = torch.randn(5, 8)
    w = proj.weight  # type: ignore[union-attr]
    assert w.shape == (8, 24)
    # the pairs' outgoing columns cancel: the grown MLP computes what the 16-unit one did
    hidden = fc(h)  # type: ignore[operator]
    torch.testing.assert_close(hidden[:, 16:24:2], hidden[:, 17:24:2])
    torch.testing.assert_close(w[:, 16::2], -w[:, 17::2])


@pytest.mark.parametrize(("scheme", "variant"), [("stable", "pairs"), ("stable", "split"),
                                                 ("net2net", "random"), ("netmorph", "auto")])
def test_handlers_driven_by_hand_grow_attention_heads(scheme: str, variant: str) -> None:
    """The recipe in stablemorph.handlers' docstring: whole heads via ``block=head_dim``."""
    import copy

    from stablemorph.graph import Remap
    from stablemorph.morphs.widen import plan_widen
    from stablemorph.transformer.model import CausalSelfAttention

    torch.manual_seed(0)
    att = CausalSelfAttention(16, 2, 4)
    child = copy.deepcopy(att)
    x = torch.randn(2, 5, 16)
    gen, origins = torch.Generator().manual_seed(0), {}
    plan = plan_widen(scheme, variant, 8, 16, normalised=False, zero_in=False, gen=gen,
                      block=4)
    for name in ("q", "k", "v"):
        m = getattr(child, name)
        handler_for(m).grow_out(name, m, plan, gen, origins)
    handler_for(child.proj).grow_in("proj", child.proj, Remap.appended(8, 8), plan, gen,
                                    origins)
    child.n_head = 4
    with torch.no_grad():
        torch.testing.assert_close(child(x), att(x), rtol=0, atol=1e-6)
    assert set(origins) == {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
                            "proj.weight"}
    if scheme == "stable":
        assert all(bool((p != 0).all()) for p in child.parameters())


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 2, stride=2)
        self.stem_norm = LayerNorm2d(8)
        self.block = ConvNeXtBlock(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem_norm(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_convnext_block_residual_stream_and_layer_scale(scheme: str) -> None:
    torch.manual_seed(5)
    model = _trained(ConvNeXtNet(), X)
    child = _check(model, "stem", 16, scheme, X)
    assert child.block.gamma.shape == (16,) and child.block.pwconv2.out_features == 16
    origin = last_report(child).param_map["block.gamma"]
    assert origin.source == "block.gamma" and origin.index.tolist()[8:] == list(range(8))
    _check(model, "block.pwconv1", 40, scheme, X)


class ShiftScale(nn.Module):
    """Bare per-channel parameters added and multiplied in forward, shapes (C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, 4).reshape(4, 1, 1))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4).reshape(4, 1, 1))
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.scale * (self.conv(x) + self.shift))).mean((2, 3))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bare_per_channel_parameters_grow(scheme: str) -> None:
    torch.manual_seed(6)
    model = ShiftScale()
    child = _check(model, "conv", 7, scheme, X)
    assert child.shift.shape == child.scale.shape == (7, 1, 1)
    if scheme == "netmorph":  # zero incoming weights: new shifts take the default 0
        assert bool((child.shift[4:] == 0).all()) and bool((child.scale[4:] == 1).all())
