"""Fine-tuning MAGI-1: the chunk-wise flow-matching objective (`MagiChunkwiseFlowMatching`), the captioned-video data
folder and its latent cache, and the `magi-train-lora` command (`diffusers_magi.training.train_lora`)."""

from .data_magi import MagiCachedClips, MagiClip, encode_clips, find_clips
from .objective_magi import MagiChunkwiseFlowMatching, MagiTrainingBatch, MagiTrainingLoss, time_transform

__all__ = [
    "MagiCachedClips",
    "MagiChunkwiseFlowMatching",
    "MagiClip",
    "MagiTrainingBatch",
    "MagiTrainingLoss",
    "encode_clips",
    "find_clips",
    "time_transform",
]
