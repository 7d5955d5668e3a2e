"""diffusers-magi: MAGI-1 (Sand.ai's autoregressive video model) as native Hugging Face Diffusers components.

Importing this package registers its classes with Diffusers, so that ``DiffusionPipeline.from_pretrained``,
``AutoModel.from_pretrained`` and ``from diffusers import MagiTransformer3DModel`` resolve them.
"""

from . import _quiet_imports  # noqa: F401  (first: imports Diffusers' models without torchao's import-time logs)
from .models import AutoencoderMagi, MagiKVCache, MagiTransformer3DModel
from .pipelines import (
    MagiChunkOutput,
    MagiGuidance,
    MagiImageToVideoPipeline,
    MagiPipeline,
    MagiPipelineOutput,
    MagiSession,
    MagiSessionInterrupted,
    MagiSessionProgress,
    MagiVideoToVideoPipeline,
    write_video_stream,
)
from .schedulers import MagiChunkScheduler
from .modular import MagiAutoBlocks, MagiModularPipeline
from ._registration import register_with_diffusers

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoencoderMagi",
    "MagiAutoBlocks",
    "MagiChunkOutput",
    "MagiChunkScheduler",
    "MagiGuidance",
    "MagiImageToVideoPipeline",
    "MagiKVCache",
    "MagiModularPipeline",
    "MagiPipeline",
    "MagiPipelineOutput",
    "MagiSession",
    "MagiSessionInterrupted",
    "MagiSessionProgress",
    "MagiTransformer3DModel",
    "MagiVideoToVideoPipeline",
]

register_with_diffusers()
