"""Growing a trained decoder-only transformer exactly and densely.

- :mod:`.model`: the tiny GPT (:class:`GPT`, :class:`GPTConfig`, :class:`BlockSpec`);
- growths, morphs like any other (run through :func:`stablemorph.morphs.contract.run_morph`,
  registered in :data:`stablemorph.morphs.MORPHS`, so ``sm.apply``, ``sm.morph_ddp`` and
  ``stablemorph morph`` take them), each returning a new model with the same logits and a
  :class:`~stablemorph.record.MorphRecord`: :func:`grow_mlp` (MLP width: ``sm.widen`` of
  each block's ``mlp.fc``), :func:`grow_heads` (attention heads), :func:`grow_d_model`
  (residual stream, LayerNorm exact), :func:`insert_block` (depth), :func:`grow` (a chain of
  them to a target size);
- optimiser state: :func:`stablemorph.transfer_optimizer` (``transfer_adam`` is its
  Adam/AdamW-only alias);
- :mod:`.text`, :mod:`.train`, :mod:`.experiment`: the character-level growth experiment.

Schemes: ``"net2net"`` (copies), ``"netmorph"`` (zero-initialised new parts), ``"stable"``
(dense: every new or changed weight non-zero).
"""

from stablemorph.transformer.adam import transfer_adam
from stablemorph.transformer.depth import insert_block
from stablemorph.transformer.grow import grow
from stablemorph.transformer.heads import grow_heads
from stablemorph.transformer.mlp_width import grow_mlp
from stablemorph.transformer.model import GPT, BlockSpec, GPTConfig
from stablemorph.transformer.stream import grow_d_model
from stablemorph.transformer.surgery import SCHEMES, GrowthVerificationError

__all__ = [
    "GPT",
    "SCHEMES",
    "BlockSpec",
    "GPTConfig",
    "GrowthVerificationError",
    "grow",
    "grow_d_model",
    "grow_heads",
    "grow_mlp",
    "insert_block",
    "transfer_adam",
]
