"""One call from the original MAGI-1 layout to a Hub-ready Diffusers folder (what `magi-convert` runs)."""

import os
from typing import Optional, Union

import torch

from .hub_folder import check_output_folder, push_folder_to_hub, save_pipeline_folder
from .model_card import model_card
from .original_checkpoint import read_original_config
from .original_layout import download_original_snapshot, resolve_original_sources
from .pipeline import pipeline_from_sources

PathLike = Union[str, os.PathLike]


def convert_original_to_diffusers(
    output_dir: PathLike,
    source: Optional[PathLike] = None,
    variant: Optional[str] = None,
    special_tokens_path: Optional[PathLike] = None,
    config: Optional[Union[PathLike, dict]] = None,
    checkpoint_dir: Optional[PathLike] = None,
    vae_dir: Optional[PathLike] = None,
    t5_dir: Optional[PathLike] = None,
    torch_dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
) -> str:
    """Convert an original MAGI-1 checkpoint into a complete Diffusers pipeline folder; returns the folder's path.

    Args:
        output_dir (`str`): the folder to write (it must not exist or be empty, unless `overwrite`).
        source (`str`, *optional*): a local copy of the original Hub repository layout (`ckpt/magi/<variant>/...`,
            `ckpt/vae`, `ckpt/t5/t5-v1_1-xxl`), or a Hub repository id such as `"sand-ai/MAGI-1"` (only the needed
            folders are downloaded).
        variant (`str`, *optional*): the checkpoint folder name under `ckpt/magi/`; also picks the built-in preset
            config (`4.5B_base`, `4.5B_distill`, `4.5B_distill_quant`, `24B_base`, `24B_distill`,
            `24B_distill_quant`) unless `config` is given.
        special_tokens_path (`str`, *optional*): the original `special_tokens.npz` (from the original GitHub
            repository, `example/assets/special_tokens.npz`); without it the model has no special tokens.
        config (`str` or `dict`, *optional*): an original config JSON instead of the preset.
        checkpoint_dir, vae_dir, t5_dir (`str`, *optional*): explicit folders (override the snapshot's; without a
            snapshot, `checkpoint_dir` is required and a missing VAE / T5 folder leaves that component out).
        torch_dtype (`torch.dtype`, *optional*): dtype of the transformer blocks (default: the config's
            `params_dtype`, bfloat16 for the released checkpoints).
        dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, write plain linears of `torch_dtype` with
            the dequantised weights instead of the float8 weights.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): weights above it are sharded with an index.
        overwrite (`bool`, defaults to `False`): replace an existing `output_dir`.
        push_to_hub (`str`, *optional*): upload the folder to this Hub repository id afterwards.
        private (`bool`, defaults to `False`): create the Hub repository as private.
        token (`str`, *optional*): Hub token (default: the logged-in one).
    """
    output_dir = check_output_folder(output_dir, overwrite)
    if source is not None and not os.path.isdir(str(source)):
        if variant is None:
            raise ValueError("Converting from a Hub repository id needs `variant` (the folder under ckpt/magi/).")
        original_config = read_original_config(config) if config is not None else None
        source = download_original_snapshot(str(source), variant, config=original_config, token=token)
    sources = resolve_original_sources(source, variant, config, checkpoint_dir, vae_dir, t5_dir)
    pipe = pipeline_from_sources(sources, special_tokens_path, torch_dtype=torch_dtype, dequantize_fp8=dequantize_fp8)
    fp8 = bool(sources.config["engine_config"].get("fp8_quant"))
    card = model_card(
        sources.variant,
        sources.config,
        repo_id=push_to_hub or "path/to/this/folder",
        dequantized_dtype=str(pipe.transformer.dtype).replace("torch.", "") if fp8 and dequantize_fp8 else None,
    )
    folder = save_pipeline_folder(pipe, output_dir, card, max_shard_size=max_shard_size, overwrite=overwrite)
    if push_to_hub is not None:
        push_folder_to_hub(folder, push_to_hub, token=token, private=private)
    return folder
