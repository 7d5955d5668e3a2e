"""Outputs of the MAGI-1 pipelines."""

from dataclasses import dataclass
from typing import List, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class MagiPipelineOutput(BaseOutput):
    r"""
    Args:
        frames (`np.ndarray`, `torch.Tensor` or `List[List[PIL.Image.Image]]`):
            the generated video. `"np"`: float32 array `(batch, frames, height, width, 3)` in [0, 1]; `"pt"`: float32
            tensor `(batch, frames, 3, height, width)` in [0, 1]; `"pil"`: one list of frames per video; `"latent"`:
            the final latent chunks concatenated along time, `(batch, channels, latent_frames, height / 8,
            width / 8)`, VAE-scaled.
    """

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]


@dataclass
class MagiChunkOutput(BaseOutput):
    r"""
    One chunk of a video, handed out by `stream()` as soon as it is final.

    Args:
        chunk_index (`int`): index among the generated chunks (0 = the first chunk after any video prefix).
        frames: the chunk's frames in the requested `output_type` (same layouts as `MagiPipelineOutput.frames`).
    """

    chunk_index: int
    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]
