"""Handlers of the layers without weights per unit (activations, dropout, pooling,
identity: channels pass through) and of :class:`~stablemorph.activations.PAct` and
``nn.PReLU`` (channel-wise with one parameter per channel, element-wise with a shared one).

``maps_zero`` is what NetMorph's zero-incoming widening needs: a new unit with zero
incoming weights stays 0 through ReLU, GELU, tanh, SiLU, but not through sigmoid.
"""

from __future__ import annotations

from torch import nn

from stablemorph.activations import PAct
from stablemorph.handlers.base import Channelwise, Elementwise, Handler
from stablemorph.handlers.registry import handler_for, register_handler

ZERO_PRESERVING = Elementwise(zero=True)
NOT_ZERO_PRESERVING = Elementwise(zero=False)

_ACTIVATIONS: dict[type[nn.Module], bool] = {
    nn.ReLU: True, nn.LeakyReLU: True, nn.GELU: True, nn.Tanh: True, nn.Sigmoid: False,
    nn.SiLU: True, nn.ELU: True, nn.ReLU6: True, nn.Hardtanh: True, nn.Hardswish: True,
    nn.Mish: True, nn.Softplus: False, nn.Hardsigmoid: False, nn.Identity: True,
    nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True, nn.Dropout3d: True,
    nn.CELU: True, nn.SELU: True, nn.Softsign: True, nn.Tanhshrink: True,
}
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


class PActHandler(Channelwise):
    """``PAct``: per-channel ``a`` on ``channel_dim`` (a new channel copies its source's,
    else 1: the identity); a scalar ``a`` passes channels through."""

    def __init__(self) -> None:
        super().__init__([("a", 1.0)], size=["channels"])

    def role(self, m: nn.Module) -> str:
        return "elementwise" if m.channels is None else "channelwise"

    def unit_dim(self, m: nn.Module, ndim: int) -> int:
        return m.channel_dim % ndim  # type: ignore[operator]

    def maps_zero(self, m: nn.Module) -> bool:
        phi = handler_for(m.phi)  # type: ignore[arg-type]
        return phi is not None and phi.maps_zero(m.phi)  # type: ignore[arg-type]


class PReLUHandler(Channelwise):
    """``nn.PReLU``: one slope per channel (dim 1) when ``num_parameters > 1`` (a new channel
    copies its source's slope, else 0.25, PReLU's initial value); one shared slope passes
    channels through."""

    def __init__(self) -> None:
        super().__init__([("weight", 0.25)], size=["num_parameters"])

    def role(self, m: nn.Module) -> str:
        return "channelwise" if m.num_parameters > 1 else "elementwise"  # type: ignore


PACT: Handler = PActHandler()
PRELU: Handler = PReLUHandler()

for _cls, _zero in _ACTIVATIONS.items():
    register_handler(_cls, ZERO_PRESERVING if _zero else NOT_ZERO_PRESERVING)
for _cls in _POOLS:
    register_handler(_cls, ZERO_PRESERVING)
register_handler(PAct, PACT)
register_handler(nn.PReLU, PRELU)

__all__ = ["NOT_ZERO_PRESERVING", "PACT", "PRELU", "ZERO_PRESERVING", "PActHandler",
           "PReLUHandler"]
