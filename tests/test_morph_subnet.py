"""insert_subnet: the Modularized Morphing residual case. An identity shortcut (implicit in a
block's forward, or an nn.Identity module) or a layer is split into two parts and one part
becomes an exact branch of convs."""

from __future__ import annotations

import pytest
import torch
from morph_cases import assert_same_function, assert_untouched, inputs, parent, snapshot
from torch import Tensor, nn

from stablemorph.morphs import MorphError, ResidualBranch, apply, insert_subnet, widen
from stablemorph.record import history, last_report

torch.set_num_threads(1)

SCHEMES = ["stable", "netmorph", "net2net"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kernels", [(3, 1), (1, 3)])
def test_identity_shortcut_of_a_block(scheme: str, kernels: tuple[int, int]) -> None:
    model = parent("resnet")
    x = inputs("resnet")
    snap = snapshot(model)
    child = insert_subnet(model, "layer1.0", kernel_sizes=kernels, scheme=scheme, inputs=x)
    block = child.layer1[0]
    assert type(block).__name__ == "BasicBlock"
    assert isinstance(block.shortcut, ResidualBranch) and block.shortcut.scale == 0.5
    branch = block.shortcut.branch
    sizes = {branch.first.kernel_size[0], branch.second.kernel_size[0]}
    assert sizes == {1, 3}
    parent_state, child_state = model.state_dict(), child.state_dict()
    for key, value in parent_state.items():  # nothing renamed, nothing changed
        torch.testing.assert_close(child_state[key], value, rtol=0, atol=0)
    assert {k for k in child_state if k not in parent_state} == {
        f"layer1.0.shortcut.branch.{n}" for n in ("first.weight", "act.a", "second.weight")}
    assert_same_function(model, child, x)
    assert_untouched(model, snap)
    if scheme == "stable":
        assert last_report(child).zero_fraction == 0.0


def test_projection_shortcut_is_split_with_the_branch() -> None:
    model = parent("resnet")
    x = inputs("resnet")
    child = insert_subnet(model, "layer2.0.downsample.0", share=0.3, inputs=x)
    split = child.layer2[0].downsample[0]
    assert isinstance(split, ResidualBranch) and split.scale == pytest.approx(0.3)
    torch.testing.assert_close(split.shortcut.weight, model.layer2[0].downsample[0].weight)
    origins = last_report(child).param_map
    assert origins["layer2.0.downsample.0.shortcut.weight"].source == "layer2.0.downsample.0.weight"
    assert origins["layer2.0.downsample.0.branch.first.weight"].is_fresh
    assert_same_function(model, child, x)


class IdentityModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Identity()
        self.head = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.body(h) + self.skip(h))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_identity_module_becomes_a_residual_branch(scheme: str) -> None:
    model = IdentityModule()
    x = inputs("cnn")
    child = insert_subnet(model, "skip", scheme=scheme, inputs=x)
    assert isinstance(child.skip, ResidualBranch)
    assert type(child) is IdentityModule
    assert_same_function(model, child, x)


def test_linear_layer_split() -> None:
    model = parent("mlp")
    x = inputs("mlp")
    child = insert_subnet(model, "fc2", inputs=x)
    assert isinstance(child.fc2, ResidualBranch)
    assert_same_function(model, child, x)


def test_record_replays_the_architecture() -> None:
    model = parent("resnet")
    child = insert_subnet(model, "layer1.0", scheme="netmorph", inputs=inputs("resnet"))
    record = history(child)[-1]
    assert record.kwargs["kernel_sizes"] == [3, 1]
    assert record.kwargs["width"] == 5  # C + 1: a null space keeps the solved factor dense
    replay = apply(record.op, model, record.target, **record.kwargs)
    assert [(k, v.shape) for k, v in replay.state_dict().items()] == \
        [(k, v.shape) for k, v in child.state_dict().items()]


@pytest.mark.parametrize(
    ("name", "target", "kw", "message"),
    [
        ("cnn", "features", {}, "Sequential.forward has no add of its input"),
        ("resnet", "layer1.0", {"share": 1.0}, r"share must be in \(0, 1\)"),
        ("resnet", "layer1.0", {"kernel_sizes": (2, 1)}, "must be even and >= 0"),
        ("resnet", "layer1.0", {"scheme": "stable", "width": 2},
         "cannot be exact and dense"),
        ("resnet", "layer1.9", {}, "did you mean 'layer1.0'"),
    ],
)
def test_insert_subnet_errors(name: str, target: str, kw: dict, message: str) -> None:
    model = parent(name)
    snap = snapshot(model)
    with pytest.raises(MorphError, match=message):
        insert_subnet(model, target, inputs=inputs(name), **kw)
    assert_untouched(model, snap)


def test_a_branch_is_not_split_twice() -> None:
    model = parent("resnet")
    child = insert_subnet(model, "layer1.0", inputs=inputs("resnet"))
    with pytest.raises(MorphError, match="already a ResidualBranch"):
        insert_subnet(child, "layer1.0.shortcut", inputs=inputs("resnet"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_widening_a_stage_grows_the_inserted_branch(scheme: str) -> None:
    model = parent("resnet")
    x = inputs("resnet")
    child = insert_subnet(model, "layer1.0", inputs=x)
    wider = widen(child, "conv1", 7, scheme=scheme, inputs=x)
    branch = wider.layer1[0].shortcut.branch
    assert branch.first.in_channels == 7 and branch.second.out_channels == 7
    assert_same_function(model, wider, x)


class TokenMLP(nn.Module):
    """(batch, tokens, features): Linear -> identity shortcut (a block to be) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.skip = nn.Identity()
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(torch.relu(h + self.skip(h)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_token_inputs_get_a_per_token_branch(scheme: str) -> None:
    torch.manual_seed(0)
    model = TokenMLP()
    probe = torch.randn(3, 6, 6)
    child = insert_subnet(model, "skip", scheme=scheme, inputs=probe)
    branch = child.skip.branch
    assert isinstance(branch.first, nn.Linear) and isinstance(branch.second, nn.Linear)
    longer = torch.randn(2, 11, 6)  # another sequence length than the probe's
    assert_same_function(model, child, longer)
    # once trained (here: perturbed), position t still depends on tokens <= t only
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p))
        changed = longer.clone()
        changed[:, 7:] += 1.0
        torch.testing.assert_close(child(changed)[:, :7], child(longer)[:, :7], rtol=0, atol=0)


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(t)))


def test_tied_layer_split_keeps_the_tie() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    tokens = torch.randint(0, 10, (3, 4))
    child = insert_subnet(model, "head", inputs=tokens)
    assert child.head.shortcut.weight is child.embed.weight
    assert_same_function(model, child, tokens)
    assert last_report(child).param_map["embed.weight"].source == "embed.weight"


class BranchyBlock(nn.Module):
    """A residual block whose forward branches on a tensor value (fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return x + (h if bool(h.mean() > 0) else -h)


def test_untraceable_block_is_a_morph_error() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BranchyBlock())
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"insert_subnet '1': torch\.fx cannot trace "
                                         r"BranchyBlock: .*branches on a traced tensor's "
                                         r"value or attribute .* at test_morph_subnet\.py:"
                                         r"\d+"):
        insert_subnet(model, "1", inputs=inputs("cnn"))
    assert_untouched(model, snap)


class TokenBlock(nn.Module):
    """A pre-norm residual MLP block over (batch, tokens, features)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(torch.relu(self.fc(self.norm(x))))


def test_token_block_shortcut_gets_a_per_token_branch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), TokenBlock(), nn.Linear(8, 3))
    child = insert_subnet(model, "1", inputs=torch.randn(3, 6, 6))
    branch = child[1].shortcut.branch
    assert isinstance(branch.first, nn.Linear) and branch.first.in_features == 8
    assert_same_function(model, child, torch.randn(2, 10, 6))


def test_insert_subnet_takes_a_dict_probe_of_keyword_inputs() -> None:
    import torch
    from torch import nn

    import stablemorph as sm

    class Keyworded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Identity()  # a branch grows here, shaped by the probe's input
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.block(torch.relu(self.a(pixel_values)))))

    torch.manual_seed(0)
    model, x = Keyworded(), torch.randn(4, 3, 8, 8)
    child = sm.insert_subnet(model, "block", inputs={"pixel_values": x})
    torch.testing.assert_close(child(pixel_values=x), model(pixel_values=x), rtol=1e-5,
                               atol=1e-6)
    assert sm.last_report(child).zero_fraction == 0.0


def test_a_kernel_that_cannot_compose_suggests_one_that_does() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    snap = snapshot(model)
    with pytest.raises(MorphError, match=r"kernel_sizes=\(5, 1\)"):
        insert_subnet(model, "0", inputs=x)  # the default (3, 1) cannot hold a 5x5
    assert_untouched(model, snap)
    child = insert_subnet(model, "0", inputs=x, kernel_sizes=(5, 1))
    torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-5)
