"""One call from the original MAGI-1 layout to a Hub-ready Diffusers folder (what `magi-convert` runs).

The conversion streams: every component is checked from the weight headers first, then each tensor is read,
converted, cast and appended to its output shard at once (`shard_writer.StreamingShardWriter`), so a conversion
holds one tensor at a time whatever the model's size.
"""

import os
from typing import Callable, Dict, Optional, Union

import torch

from .hub_folder import check_output_folder, push_folder_to_hub, save_pipeline_folder
from .model_card import model_card
from .original_checkpoint import read_original_config
from .original_layout import OriginalSources, download_original_snapshot, resolve_original_sources
from .pipeline import pipeline_config_from_original, plan_original_components, scheduler_from_original
from .shard_writer import StreamingShardWriter
from .streaming import converted_tensors
from .text_encoder import load_original_tokenizer

# File names of the weights, as each library's save_pretrained writes them.
_WEIGHTS_NAMES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def input_paths(sources: OriginalSources, special_tokens_path=None, config=None, source=None) -> list:
    """Every folder and file a conversion reads (an output there, inside or around one, is refused)."""
    paths = [source, sources.checkpoint_dir, sources.vae_dir, sources.t5_dir, special_tokens_path]
    if isinstance(config, (str, os.PathLike)):
        paths.append(config)
    return [str(path) for path in paths if path is not None]


def _component_writer(name: str, model, weights, spec, plan, max_shard_size) -> Callable[[str], None]:
    """A function writing component `name`'s subfolder: its config, then its weights streamed from the original."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    layout = {key: tensor for key, tensor in plan.outputs.items() if key not in tied}

    def write(folder: str) -> None:
        if name == "text_encoder":
            dtypes = {tensor.dtype for tensor in layout.values() if tensor.is_floating_point()}
            if len(dtypes) == 1:
                model.config.dtype = dtypes.pop()
            model.config.save_pretrained(folder)
        else:
            model.save_config(folder)
        writer = StreamingShardWriter(folder, _WEIGHTS_NAMES[name], layout, max_shard_size)
        try:
            for key, tensor in converted_tensors(model, weights, spec, plan):
                if key not in tied:
                    writer.write(key, tensor)
            writer.close()
        finally:
            writer.abort()

    return write


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
    dtype: Optional[torch.dtype] = None,
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
        dtype (`torch.dtype`, *optional*): dtype of the transformer blocks (default: the config's
            `params_dtype`, bfloat16 for the released checkpoints).
        dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, write plain linears of `dtype` with
            the dequantised weights instead of the float8 weights.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): weights above it are sharded with an index.
        overwrite (`bool`, defaults to `False`): replace an existing `output_dir` that is empty or a previous
            output of this package (its `model_index.json` names a MAGI-1 pipeline); files and other folders are
            never replaced, and an `output_dir` at, inside or around an input is refused.
        push_to_hub (`str`, *optional*): upload the folder to this Hub repository id afterwards.
        private (`bool`, defaults to `False`): create the Hub repository as private.
        token (`str`, *optional*): Hub token (default: the logged-in one).
    """
    inputs = [source if source is not None and os.path.isdir(str(source)) else None, checkpoint_dir, vae_dir, t5_dir]
    inputs += [special_tokens_path, config if isinstance(config, (str, os.PathLike)) else None]
    output_dir = check_output_folder(output_dir, overwrite, inputs)
    if source is not None and not os.path.isdir(str(source)):
        if variant is None:
            raise ValueError("Converting from a Hub repository id needs `variant` (the folder under ckpt/magi/).")
        original_config = read_original_config(config) if config is not None else None
        source = download_original_snapshot(str(source), variant, config=original_config, token=token)
    sources = resolve_original_sources(source, variant, config, checkpoint_dir, vae_dir, t5_dir)
    inputs = input_paths(sources, special_tokens_path, config, source)
    check_output_folder(output_dir, overwrite, inputs)
    components = plan_original_components(sources, special_tokens_path, dtype, dequantize_fp8)
    for _, _, _, plan in components.values():
        plan.raise_for_errors()
        plan.warn_unexpected()
    transformer = components["transformer"][0]
    pipeline = dict(
        transformer=transformer,
        scheduler=scheduler_from_original(sources.config),
        vae=components["vae"][0] if "vae" in components else None,
        text_encoder=components["text_encoder"][0] if "text_encoder" in components else None,
        tokenizer=load_original_tokenizer(sources.t5_dir) if sources.t5_dir is not None else None,
        **pipeline_config_from_original(sources.config),
    )
    streamed: Dict[str, Callable[[str], None]] = {
        name: _component_writer(name, *parts, max_shard_size) for name, parts in components.items()
    }
    fp8 = bool(sources.config["engine_config"].get("fp8_quant"))
    block_dtype = components["transformer"][3].outputs["blocks.0.attn.to_q.weight"].dtype  # block 0 is never fp8
    card = model_card(
        sources.variant,
        sources.config,
        repo_id=push_to_hub or "path/to/this/folder",
        dequantized_dtype=str(block_dtype).replace("torch.", "") if fp8 and dequantize_fp8 else None,
    )
    folder = save_pipeline_folder(
        pipeline,
        output_dir,
        card,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        streamed_components=streamed,
        inputs=inputs,
    )
    if push_to_hub is not None:
        push_folder_to_hub(folder, push_to_hub, token=token, private=private)
    return folder
