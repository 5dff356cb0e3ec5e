"""The parametric activation ``P-phi_a(x) = (1 - a) * phi(x) + a * x`` used between the
factors of a morphed layer, and the helper that keeps ``a`` in ``[0, 1]``.

At ``a = 1`` the activation is the identity, which is what makes an inserted layer exact
whatever its weights; training then moves ``a`` towards ``0`` (the plain ``phi``). For ReLU
this is PReLU with slope ``a``. Call :func:`clamp_pact_` after every optimiser step, as the
NetMorph authors did with their PReLU slopes: outside ``[0, 1]`` the activation is no longer
an interpolation between ``phi`` and the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def make_phi(activation: str | nn.Module) -> nn.Module:
    """The base non-linearity ``phi``: a module as given, or a fresh one by name (a key of
    ``ACTIVATIONS``)."""
    if isinstance(activation, nn.Module):
        return activation
    try:
        return ACTIVATIONS[activation]()
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} "
            f"or pass an nn.Module"
        ) from None


class PAct(nn.Module):
    """Parametric activation ``(1 - a) * phi(x) + a * x`` with a learnable ``a``.

    Args:
        activation: ``phi``, a name from ``ACTIVATIONS`` or an element-wise ``nn.Module``.
        channels: ``None`` for one scalar ``a``; else one ``a`` per channel, shape
            ``(channels,)``.
        channel_dim: the input dimension holding the channels (``1`` for conv feature
            maps ``(N, C, ...)``, ``-1`` for linear features ``(..., C)``).
        a: the initial value (``1.0``: the identity, as at morph time).

    Input and output have the same shape. ``a`` is a parameter named ``a``.
    """

    def __init__(
        self,
        activation: str | nn.Module = "relu",
        channels: int | None = None,
        channel_dim: int = 1,
        a: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.phi = make_phi(activation)
        self.channels = channels
        self.channel_dim = channel_dim
        shape = () if channels is None else (channels,)
        self.a = nn.Parameter(torch.full(shape, float(a), device=device, dtype=dtype))

    def _a_shaped(self, x: Tensor) -> Tensor:
        if self.channels is None:
            return self.a
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.channels:
            raise ValueError(
                f"PAct with {self.channels} channels got input {tuple(x.shape)} "
                f"(channel dim {self.channel_dim})"
            )
        return self.a.reshape(-1, *([1] * (x.dim() - dim - 1)))

    def forward(self, x: Tensor) -> Tensor:
        a = self._a_shaped(x)
        if self._identity_now(x):
            # a == 1 everywhere: (1 - a) (phi(x) - x) is exactly 0 for finite x, so the
            # formula returns x; a copy, as the formula gives a fresh tensor
            return x.clone()
        return x + (1 - a) * (self.phi(x) - x)

    def _identity_now(self, x: Tensor) -> bool:
        """True when this forward on ``x`` may skip the formula: no gradient is being
        recorded for ``a`` (a morph's checks run under ``no_grad``), not inside
        ``torch.compile``, ``a`` of ``x``'s dtype and device, and every ``a`` exactly 1
        (:func:`_all_ones`).

        At a = 1 the output equals the formula's for every finite input (bitwise, except that
        ``-0.0`` stays ``-0.0`` where the formula gives ``+0.0``); an infinite input passes
        through as itself where the formula gives NaN (``0 * inf``)."""
        a = self.a
        if (torch.is_grad_enabled() and a.requires_grad) or torch.compiler.is_compiling() \
                or a.dtype != x.dtype or a.device != x.device:  # the formula would promote
            return False
        return _all_ones(a)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_dim={self.channel_dim}"


#: a -> (in-place version, storage address, all ones): the comparison runs once per value
#: of ``a``, so repeated forwards of an unchanged model do not synchronise a device
_ONES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _all_ones(a: Tensor) -> bool:
    """Whether every element of ``a`` is exactly 1 (remembered per tensor and version)."""
    try:
        key = (a._version, a.data_ptr())
    except RuntimeError:  # an inference-mode tensor has no version counter
        return bool((a == 1).all())
    known = _ONES.get(a)
    if known is None or known[:2] != key:
        known = (*key, bool((a == 1).all()))
        _ONES[a] = known
    return known[2]


@torch.no_grad()
def clamp_pact_(model: nn.Module) -> int:
    """Clamp ``a`` of every :class:`PAct` in ``model`` to ``[0, 1]`` in place; call it after
    each optimiser step. Returns the number of activations clamped."""
    count = 0
    for module in model.modules():
        if isinstance(module, PAct):
            module.a.clamp_(0.0, 1.0)
            count += 1
    return count
