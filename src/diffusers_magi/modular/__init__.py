"""Modular Diffusers blocks for MAGI-1 (`MagiAutoBlocks`) and the `MagiModularPipeline` that runs them."""

from .blocks_magi import (
    MagiAutoBlocks,
    MagiAutoPrefixStep,
    MagiChunkLoopStep,
    MagiDecodeStep,
    MagiImageEncoderStep,
    MagiInputStep,
    MagiPrepareSessionStep,
    MagiTextEncoderStep,
    MagiVideoEncoderStep,
)
from .pipeline_magi_modular import MagiModularPipeline

__all__ = [
    "MagiAutoBlocks",
    "MagiAutoPrefixStep",
    "MagiChunkLoopStep",
    "MagiDecodeStep",
    "MagiImageEncoderStep",
    "MagiInputStep",
    "MagiModularPipeline",
    "MagiPrepareSessionStep",
    "MagiTextEncoderStep",
    "MagiVideoEncoderStep",
]
