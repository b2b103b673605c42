"""openbagel: run, serve and fine-tune BAGEL, the unified multimodal model.

Public API::

    from openbagel import BagelPipeline
    pipe = BagelPipeline.from_pretrained("path/to/checkpoint", dtype="bfloat16", device="cuda")
"""

import openbagel._threads  # noqa: F401 (first: sets OMP_WAIT_POLICY before torch loads)
from openbagel.config import BagelConfig, config_from_checkpoint, preset
from openbagel.errors import CheckpointError, InvalidInputError, NumericalError, OpenBagelError
from openbagel.inference.sampling import ImageSampling, TextSampling
from openbagel.inference.step_cache import StepCacheSettings
from openbagel.kv_cache import CacheBudgetError
from openbagel.pipeline import BagelPipeline, Chat, ImageResult, TextResult

__version__ = "0.1.0"

__all__ = [
    "BagelConfig",
    "BagelPipeline",
    "CacheBudgetError",
    "Chat",
    "CheckpointError",
    "ImageResult",
    "ImageSampling",
    "InvalidInputError",
    "NumericalError",
    "OpenBagelError",
    "StepCacheSettings",
    "TextResult",
    "TextSampling",
    "config_from_checkpoint",
    "preset",
]
