"""Conversion of the original MAGI-1 checkpoints (Sand.ai's on-disk layout) into diffusers-magi components and
Hub-ready Diffusers folders (`magi-convert`)."""

from .convert import convert_original_to_diffusers
from .hub_folder import push_folder_to_hub, save_pipeline_folder
from .inspect import OriginalInspection, inspect_original
from .original_layout import OriginalSources, download_original_snapshot, resolve_original_sources
from .pipeline import convert_original_components, load_original_components
from .presets import PRESETS, preset
from .text_encoder import load_original_text_encoder
from .transformer import load_original_transformer
from .vae import load_original_vae

__all__ = [
    "PRESETS",
    "OriginalInspection",
    "OriginalSources",
    "convert_original_components",
    "convert_original_to_diffusers",
    "download_original_snapshot",
    "inspect_original",
    "load_original_components",
    "load_original_text_encoder",
    "load_original_transformer",
    "load_original_vae",
    "preset",
    "push_folder_to_hub",
    "resolve_original_sources",
    "save_pipeline_folder",
]
