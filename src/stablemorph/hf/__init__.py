"""Growing Hugging Face models (and the project's GPT) exactly: :func:`grow`.

Nothing here imports ``transformers``: the models passed in bring their classes along.
"""

from stablemorph.hf.growth import grow

__all__ = ["grow"]
