"""Conversion of the original MAGI-1 checkpoints (Sand.ai's on-disk layout) into diffusers-magi components."""

from .transformer import load_original_transformer
from .vae import load_original_vae
