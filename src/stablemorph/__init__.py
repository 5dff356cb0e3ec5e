"""stablemorph: grow trained PyTorch networks exactly, with dense (zero-free) parameters.

The flat public API (see README.md)::

    import stablemorph as sm
    child = sm.deepen(model, "features.conv2", scheme="stable")
    child = sm.widen(model, "features.conv1", width=48)
    rep = sm.verify(model, child, inputs)
    new_opt = sm.transfer_optimizer(opt, model, child)
    sm.save(child, "child.pt"); child = sm.load("child.pt")
"""

from stablemorph.activations import PAct, clamp_pact_
from stablemorph.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load,
    load_checkpoint,
    save,
)
from stablemorph.ddp import morph_ddp
from stablemorph.equation import composite, feasibility, min_mid_channels
from stablemorph.flops import FlopMeter, step_flops
from stablemorph.handlers import register_handler
from stablemorph.hf import grow
from stablemorph.morphs import (
    MORPHS,
    MorphError,
    ResidualBranch,
    apply,
    deepen,
    enlarge_kernel,
    insert_subnet,
    widen,
)
from stablemorph.optim import transfer_optimizer, transfer_scheduler
from stablemorph.progressive import (
    GrowthError,
    GrowthSchedule,
    PlateauTrigger,
    ProgressiveGrowth,
    grow_in_place,
)
from stablemorph.record import MorphRecord, MorphReport, ParamOrigin, history, last_report
from stablemorph.solvers import DecompositionError, DecompositionReport, decompose
from stablemorph.verify import VerifyReport, verify
from stablemorph.zoo import build_model

__all__ = [
    "MORPHS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DecompositionError",
    "DecompositionReport",
    "FlopMeter",
    "GrowthCallback",
    "GrowthError",
    "GrowthSchedule",
    "MorphError",
    "MorphRecord",
    "MorphReport",
    "PAct",
    "ParamOrigin",
    "PlateauTrigger",
    "ProgressiveGrowth",
    "ResidualBranch",
    "VerifyReport",
    "apply",
    "build_model",
    "clamp_pact_",
    "composite",
    "decompose",
    "deepen",
    "enlarge_kernel",
    "feasibility",
    "grow",
    "grow_in_place",
    "history",
    "insert_subnet",
    "last_report",
    "load",
    "load_checkpoint",
    "min_mid_channels",
    "morph_ddp",
    "register_handler",
    "save",
    "step_flops",
    "transfer_optimizer",
    "transfer_scheduler",
    "verify",
    "widen",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # GrowthCallback subclasses transformers.TrainerCallback: import transformers only on use.
    if name == "GrowthCallback":
        from stablemorph.trainer import GrowthCallback

        return GrowthCallback
    raise AttributeError(f"module 'stablemorph' has no attribute {name!r}")
