"""Small, readable reference architectures and a string-keyed factory.

Every model here is ``torch.fx`` traceable, computes its layer sizes from its constructor
arguments (never from the data in ``forward``), and holds every activation as a module
(``nn.ReLU``, not ``F.relu``) so morphs can find and replace it.

``build_model(name, **kwargs)`` builds one by name and records the recipe on the model as
``model._stablemorph_base = {"name": name, "kwargs": kwargs}`` (kwargs made plain JSON:
tuples become lists), so a checkpoint can rebuild the base architecture with
``build_model(**model._stablemorph_base)``-style calls.

Module names (stable; morphs and tests refer to them):

- ``mlp``       ``flatten``, ``fc1``, ``act1``, ``fc2``, ``act2``, ..., ``head``
- ``cnn``       ``features.conv1``, ``features.bn1``, ``features.act1``, ``features.pool1``,
                ``features.conv2``, ... (``bn*`` absent when ``batch_norm=False``),
                ``flatten``, ``classifier`` (a conv -> flatten -> linear transition)
- ``vgg``       ``features.conv{s}_{i}``, ``features.bn{s}_{i}``, ``features.act{s}_{i}``,
                ``features.pool{s}`` for stage ``s`` and conv ``i`` (1-based), then
                ``pool`` (global average), ``flatten``, ``classifier``
- ``resnet``    ``conv1``, ``bn1``, ``act1`` (stem), ``layer{s}.{b}`` basic blocks with
                ``conv1``, ``bn1``, ``act1``, ``conv2``, ``bn2``, ``act2`` and, where the
                shape changes, ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN); then
                ``pool``, ``flatten``, ``fc``
- ``depthwise`` ``stem.conv``, ``stem.bn``, ``stem.act``, ``blocks.{k}`` with ``dw``,
                ``dw_bn``, ``dw_act`` (3x3, ``groups=C``) and ``pw``, ``pw_bn``, ``pw_act``
                (1x1); then ``pool``, ``flatten``, ``classifier``
- ``cnn1d``     like ``cnn`` with ``Conv1d`` / ``BatchNorm1d`` / ``MaxPool1d``
- ``gpt``       :class:`stablemorph.transformer.GPT` from ``GPTConfig.to_dict()`` keyword
                arguments (``wte``, ``wpe``, ``blocks.{i}`` with ``ln1``, ``attn.q/k/v/proj``,
                ``ln2``, ``mlp.fc/proj``; ``ln_f``, ``head``); every GPT records this recipe
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

BASE_ATTR = "_stablemorph_base"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def _check_widths(what: str, widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {widths!r}")
    return widths


def _size_after_pools(what: str, size: int, pools: int) -> int:
    """Spatial size after ``pools`` 2x max-pools (floor), checked to stay >= 1."""
    out = size
    for _ in range(pools):
        out //= 2
    if out < 1:
        raise ValueError(
            f"{what}={size} is too small for {pools} 2x poolings (size would reach {out})"
        )
    return out


class MLP(nn.Module):
    """Flatten, then ``Linear -> act`` per hidden width, then a ``Linear`` head.

    Input: any shape ``(N, ...)`` with ``in_features`` elements per sample.
    Output: logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (128,),
        num_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        hidden = tuple(hidden)
        if hidden:
            _check_widths("hidden", hidden)
        self.flatten = nn.Flatten()
        width = in_features
        for k, h in enumerate(hidden, start=1):
            self.add_module(f"fc{k}", nn.Linear(width, h))
            self.add_module(f"act{k}", make_activation(activation))
            width = h
        self.head = nn.Linear(width, num_classes)
        self.depth = len(hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for k in range(1, self.depth + 1):
            x = getattr(self, f"act{k}")(getattr(self, f"fc{k}")(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """``conv3x3(pad 1) -> [BN] -> act -> maxpool2`` blocks, then ``Flatten -> Linear``.

    The experiment's parent network. Input ``(N, in_channels, image_size, image_size)``,
    output logits ``(N, num_classes)``. The classifier reads the flattened last feature map
    (``widths[-1] * s * s`` features, ``s = image_size`` halved ``len(widths)`` times).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64),
        image_size: int = 28,
        batch_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = _check_widths("widths", widths)
        side = _size_after_pools("image_size", image_size, len(widths))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for k, w in enumerate(widths, start=1):
            layers[f"conv{k}"] = nn.Conv2d(c_in, w, 3, padding=1)
            if batch_norm:
                layers[f"bn{k}"] = nn.BatchNorm2d(w)
            layers[f"act{k}"] = make_activation(activation)
            layers[f"pool{k}"] = nn.MaxPool2d(2)
            c_in = w
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(widths[-1] * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


class VGG(nn.Module):
    """VGG-like: per stage ``(conv3x3 -> BN -> act) * n -> maxpool2``, then global average
    pooling, ``Flatten`` and a ``Linear`` classifier.

    ``stages`` lists the conv widths of each stage, e.g. ``((32, 32), (64, 64))``.
    Input ``(N, in_channels, H, W)`` with ``H, W >= 2 ** len(stages)``; output
    ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        stages: Sequence[Sequence[int]] = ((32, 32), (64, 64), (128, 128)),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if not stages:
            raise ValueError("stages must list at least one stage of conv widths")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for s, stage in enumerate(stages, start=1):
            for i, w in enumerate(_check_widths(f"stages[{s - 1}]", stage), start=1):
                layers[f"conv{s}_{i}"] = nn.Conv2d(c_in, w, 3, padding=1, bias=False)
                layers[f"bn{s}_{i}"] = nn.BatchNorm2d(w)
                layers[f"act{s}_{i}"] = make_activation(activation)
                c_in = w
            layers[f"pool{s}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


class BasicBlock(nn.Module):
    """ResNet basic block: ``act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1`` carries the stride. The shortcut is the identity when shape is unchanged,
    else ``downsample`` = 1x1 conv (same stride, no bias) + BN.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.act2(out)


class ResNet(nn.Module):
    """ResNet with basic blocks and a CIFAR-style stem (3x3 conv, stride 1, no max-pool).

    Stage ``s`` has ``layers[s]`` blocks of width ``widths[s]``; every stage after the
    first halves the resolution in its first block (stride-2 ``conv1`` plus a 1x1 conv + BN
    projection shortcut). ``layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)`` is
    ResNet-18 (11.2M parameters at 10 classes). Input ``(N, in_channels, H, W)``, output
    ``(N, num_classes)``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers = _check_widths("layers", layers)
        widths = _check_widths("widths", widths)
        if len(layers) != len(widths):
            raise ValueError(
                f"layers {layers} and widths {widths} must have the same length (one per stage)"
            )
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = make_activation(activation)
        c_in = widths[0]
        self.num_stages = len(layers)
        for s, (n_blocks, w) in enumerate(zip(layers, widths, strict=True), start=1):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(BasicBlock(c_in, w, stride, activation))
                c_in = w
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.flatten(self.pool(x)))


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3 (``groups=C``, carries the stride) -> BN -> act,
    then pointwise 1x1 -> BN -> act. ``(N, C_in, H, W) -> (N, C_out, H', W')``."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.dw = nn.Conv2d(
            in_channels, in_channels, 3, stride, padding=1, groups=in_channels, bias=False
        )
        self.dw_bn = nn.BatchNorm2d(in_channels)
        self.dw_act = make_activation(activation)
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_channels)
        self.pw_act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw_act(self.dw_bn(self.dw(x)))
        return self.pw_act(self.pw_bn(self.pw(x)))


class DepthwiseNet(nn.Module):
    """MobileNet-style net: a 3x3 conv stem, depthwise-separable blocks (block ``k`` has
    output width ``widths[k]`` and stride ``strides[k]``), global average pooling and a
    ``Linear`` classifier. Input ``(N, in_channels, H, W)``, output ``(N, num_classes)``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        stem_width: int = 16,
        widths: Sequence[int] = (32, 64, 64),
        strides: Sequence[int] = (1, 2, 2),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = _check_widths("widths", widths)
        strides = _check_widths("strides", strides)
        if len(widths) != len(strides):
            raise ValueError(f"widths {widths} and strides {strides} must have the same length")
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(stem_width),
                act=make_activation(activation),
            )
        )
        blocks = []
        c_in = stem_width
        for w, stride in zip(widths, strides, strict=True):
            blocks.append(DepthwiseSeparable(c_in, w, stride, activation))
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(self.flatten(self.pool(x)))


class SmallCNN1d(nn.Module):
    """1-D analogue of :class:`SmallCNN`: ``conv1d k3 (pad 1) -> [BN] -> act -> maxpool2``
    blocks, then ``Flatten -> Linear``. Input ``(N, in_channels, length)``, output
    ``(N, num_classes)``."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32),
        length: int = 64,
        batch_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = _check_widths("widths", widths)
        out_len = _size_after_pools("length", length, len(widths))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for k, w in enumerate(widths, start=1):
            layers[f"conv{k}"] = nn.Conv1d(c_in, w, 3, padding=1)
            if batch_norm:
                layers[f"bn{k}"] = nn.BatchNorm1d(w)
            layers[f"act{k}"] = make_activation(activation)
            layers[f"pool{k}"] = nn.MaxPool1d(2)
            c_in = w
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(widths[-1] * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _gpt(**config: Any) -> nn.Module:
    """The project GPT (:class:`stablemorph.transformer.GPT`) from the keyword arguments of
    ``GPTConfig.to_dict()`` (every GPT records this recipe on itself), or, without
    ``blocks``, those of ``GPTConfig.uniform`` (every block the same: ``vocab_size``,
    ``block_size``, ``d_model``, ``n_layer``, ``n_head``, ``head_dim``, ``d_mlp``,
    ``tie_head``)."""
    from stablemorph.transformer.model import GPT, GPTConfig

    if "blocks" not in config:
        return GPT(GPTConfig.uniform(**config))
    return GPT(GPTConfig.from_dict(config))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "gpt": _gpt,
    "mlp": MLP,
    "cnn": SmallCNN,
    "vgg": VGG,
    "resnet": ResNet,
    "depthwise": DepthwiseNet,
    "cnn1d": SmallCNN1d,
}


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (JSON's view of it)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` (a key of ``MODELS``) with constructor ``kwargs``.

    The model remembers its recipe as ``model._stablemorph_base = {"name": name, "kwargs":
    kwargs}``, with kwargs as plain JSON values (tuples become lists), so
    ``build_model(base["name"], **base["kwargs"])`` rebuilds the same architecture.
    Raises ``ValueError`` for an unknown name or kwargs that are not JSON-serialisable.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    plain = _plain(kwargs)
    try:
        json.dumps(plain)
    except TypeError as err:
        raise ValueError(
            f"build_model({name!r}, ...): kwargs must be plain JSON values so checkpoints can "
            f"rebuild the model ({err})"
        ) from None
    model = MODELS[name](**kwargs)
    setattr(model, BASE_ATTR, {"name": name, "kwargs": plain})
    return model
