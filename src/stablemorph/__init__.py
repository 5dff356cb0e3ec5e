"""stablemorph: grow trained PyTorch networks exactly, with dense (zero-free) parameters.

Public API (flat): see README.md.
"""

from stablemorph.record import MorphRecord, MorphReport, ParamOrigin, history, last_report

__all__ = [
    "MorphRecord",
    "MorphReport",
    "ParamOrigin",
    "history",
    "last_report",
]

__version__ = "0.1.0"
