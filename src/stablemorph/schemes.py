"""The three schemes (DESIGN.md section 2) as one table that morphs consult.

A scheme is a set of choices, not code: each morph asks the table what to do (how new units
are initialised, whether parameters must be dense, which variants exist) and the per-layer
handlers (:mod:`stablemorph.handlers`) execute the resulting plan, knowing nothing of
schemes.

| scheme | widen | replicated units' outgoing shares | dense | random bias | step rule |
|---|---|---|---|---|---|
| ``stable`` | ``pairs`` (V, V)/(Z, -Z), or ``split`` | random, summing to 1 | yes | yes | yes |
| ``netmorph`` | ``auto``: zeros on the smaller side | 1 for the original, 0 | no | no | no |
| ``net2net`` | ``random``: copies of random units | equal (1 / copies) | no | no | no |

The step rule (deepen, insert_subnet, widen; issue 9): pointwise factor pairs get an
orthogonal second factor (:func:`stablemorph.morphs.factor.orthogonalise_`), and the morph
records the learning-rate multipliers and the optimiser-state mapping that
:func:`stablemorph.optim.transfer_optimizer` applies (:mod:`stablemorph.step_rule`); a widen
records its channel group's SGD multiplier (:mod:`stablemorph.morphs.new_units`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """One scheme's choices.

    ``widen_variants``: the widen plans it offers, the default first; ``replica_shares``:
    how a unit and its copies split the unit's outgoing weights when every unit must be
    replicated (``"equal"``, ``"original"``: all to the original, ``"random"``);
    ``dense``: every new or changed parameter must be non-zero (feasibility is checked before
    solving, fresh units get random biases); ``step_rule``: the morphs' default for their
    ``step_rule`` option (module docstring).
    """

    name: str
    widen_variants: tuple[str, ...]
    replica_shares: str
    dense: bool
    step_rule: bool = False


TABLE: dict[str, Scheme] = {
    s.name: s for s in (
        Scheme("stable", ("pairs", "split"), "random", dense=True, step_rule=True),
        Scheme("netmorph", ("auto",), "original", dense=False),
        Scheme("net2net", ("random",), "equal", dense=False),
    )
}
SCHEMES: tuple[str, ...] = tuple(TABLE)


def get_scheme(name: str) -> Scheme:
    """The :class:`Scheme` called ``name``.

    Raises:
        ValueError: unknown name (the message lists the schemes).
    """
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheme {name!r}; choose one of {SCHEMES}") from None


def step_rule_on(scheme: str, step_rule: bool | None = None) -> bool:
    """Whether a morph applies the step rule: ``step_rule`` when given, else the scheme's
    default (``False`` for a name not in :data:`TABLE`, e.g. a growth's own).

    Raises:
        ValueError: ``step_rule`` is neither ``None`` nor a bool.
    """
    if step_rule is not None and not isinstance(step_rule, bool):
        raise ValueError(f"step_rule={step_rule!r} must be True, False or None (the "
                         f"scheme's default)")
    if step_rule is not None:
        return step_rule
    return scheme in TABLE and TABLE[scheme].step_rule


__all__ = ["SCHEMES", "TABLE", "Scheme", "get_scheme", "step_rule_on"]
