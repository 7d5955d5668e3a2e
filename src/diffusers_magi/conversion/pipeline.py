"""Original MAGI-1 config + checkpoint folders -> the components and settings of a MAGI-1 pipeline.

The conversion layer hands components up and never imports the pipelines: `MagiPipeline(**components)` (or
`MagiPipeline.from_original`) assembles them."""

import os
from typing import Any, Dict, Optional, Union

import torch

from ..placement import DEVICE_MAP_STRATEGIES
from ..schedulers.scheduling_magi_chunk import MagiChunkScheduler
from .original_checkpoint import read_original_config
from .original_layout import OriginalSources, download_original_snapshot, resolve_original_sources
from .streaming import load_component
from .text_encoder import load_original_tokenizer, plan_original_text_encoder
from .transformer import plan_original_transformer
from .vae import plan_original_vae


def scheduler_from_original(original_config: dict) -> MagiChunkScheduler:
    """`MagiChunkScheduler` with the chunk plan settings of an original config (the sampler always uses the `sd3`
    time schedule with shift 3)."""
    runtime, engine = original_config["runtime_config"], original_config["engine_config"]
    return MagiChunkScheduler(
        chunk_width=runtime["chunk_width"],
        window_size=runtime["window_size"],
        noise2clean_kvrange=list(runtime["noise2clean_kvrange"]),
        clean_chunk_kvrange=runtime["clean_chunk_kvrange"],
        clean_t=runtime["clean_t"],
        shortcut_mode="16,16,8" if engine.get("shortcut_mode") == "16,16,8" else "8,16,16",
    )


def pipeline_config_from_original(original_config: dict) -> dict:
    """Guidance defaults and step budget of `MagiPipeline` from an original config's runtime/engine sections."""
    runtime, engine = original_config["runtime_config"], original_config["engine_config"]
    cfg_number = runtime["cfg_number"]
    if cfg_number not in (1, 3):
        raise ValueError(f"runtime_config.cfg_number must be 1 (distilled) or 3 (base), got {cfg_number}.")
    return {
        "guidance_mode": "distilled" if cfg_number == 1 else "three_branch",
        "cfg_t_range": list(runtime["cfg_t_range"]),
        "prev_chunk_scales": list(runtime["prev_chunk_scales"]),
        "text_scales": list(runtime["text_scales"]),
        "nearly_clean_threshold": engine["distill_nearly_clean_chunk_threshold"],
        "default_num_inference_steps": runtime["num_steps"],
    }


def plan_original_components(
    sources: OriginalSources,
    special_tokens_path: Optional[Union[str, os.PathLike]],
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
) -> Dict[str, tuple]:
    """Per component present (`"transformer"`, `"vae"`, `"text_encoder"`), the `(meta model, weights, spec, plan)` a
    load or a conversion works from, read from the configs and weight headers only."""
    components = {
        "transformer": plan_original_transformer(
            sources.config,
            sources.checkpoint_dir,
            special_tokens_path,
            dtype=dtype,
            dequantize_fp8=dequantize_fp8,
        )
    }
    if sources.vae_dir is not None:
        components["vae"] = plan_original_vae(sources.vae_dir, dtype=dtype or torch.float32)
    if sources.t5_dir is not None:
        components["text_encoder"] = plan_original_text_encoder(str(sources.t5_dir))
    return components


def convert_original_components(
    config: Union[str, os.PathLike, dict],
    checkpoint_dir: Union[str, os.PathLike],
    special_tokens_path: Optional[Union[str, os.PathLike]],
    vae_dir: Optional[Union[str, os.PathLike]] = None,
    t5_dir: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[Dict[str, Union[str, dict]]] = None,
) -> Dict[str, Any]:
    """The components and settings of a MAGI-1 pipeline from the original layout, as keyword arguments of
    `MagiPipeline` (`MagiPipeline(**convert_original_components(...))`).

    Every component is checked against its config from the weight headers first (a missing or mis-shaped tensor in
    any of them fails before a weight is read), then filled one tensor at a time into a model built on the meta
    device, each tensor going straight to its device.

    Args:
        config (`str`, `os.PathLike` or `dict`): original three-section config (JSON path or dict, e.g. a preset); its
            runtime section gives the scheduler settings and the guidance defaults (`cfg_number` 3 -> three-branch
            guidance, 1 -> distilled).
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/`.
        special_tokens_path (`str` or `None`): the original `special_tokens.npz` (a file of the original GitHub repo).
        vae_dir (`str`, *optional*): the original `ckpt/vae` folder; without it the pipeline only returns latents.
        t5_dir (`str`, *optional*): the original T5 folder (`ckpt/t5/t5-v1_1-xxl`); without it the pipeline needs
            `prompt_embeds`. Pickled weights are read with `weights_only=True` only.
        dtype (`torch.dtype`, *optional*): dtype of the transformer blocks (default: the config's
            `params_dtype`, as the original runs). The VAE is float32 unless given; T5 keeps its stored dtype.
        dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, dequantise the float8 linears into plain
            `dtype` linears instead of keeping the float8 arithmetic.
        device (`str` or `torch.device`, *optional*): where every component's weights go (default CPU).
        device_map (`dict`, *optional*): per component (`"transformer"`, `"vae"`, `"text_encoder"`), a device or a
            `device_map` for that component (see `load_original_transformer`); instead of `device`.
    """
    original_config = read_original_config(config)
    sources = OriginalSources(
        config=original_config,
        checkpoint_dir=str(checkpoint_dir),
        vae_dir=None if vae_dir is None else str(vae_dir),
        t5_dir=None if t5_dir is None else str(t5_dir),
    )
    if device is not None and device_map is not None:
        raise ValueError("Pass `device` or `device_map`, not both.")
    unknown = sorted(set(device_map or {}) - {"transformer", "vae", "text_encoder"})
    if unknown:
        raise ValueError(f"device_map keys are components ('transformer', 'vae', 'text_encoder'), got {unknown}.")
    components = plan_original_components(sources, special_tokens_path, dtype, dequantize_fp8)
    for _, _, _, plan in components.values():
        plan.raise_for_errors()
    loaded = {}
    for name, (model, weights, spec, plan) in components.items():
        placement = (device_map or {}).get(name)
        if isinstance(placement, dict) or (isinstance(placement, str) and placement in DEVICE_MAP_STRATEGIES):
            loaded[name] = load_component(model, weights, spec, plan, device_map=placement)
        else:
            loaded[name] = load_component(
                model, weights, spec, plan, device=placement if placement is not None else device
            )
    tokenizer = load_original_tokenizer(str(t5_dir)) if t5_dir is not None else None
    return dict(
        transformer=loaded["transformer"],
        scheduler=scheduler_from_original(original_config),
        vae=loaded.get("vae"),
        text_encoder=loaded.get("text_encoder"),
        tokenizer=tokenizer,
        **pipeline_config_from_original(original_config),
    )


def components_from_sources(
    sources: OriginalSources,
    special_tokens_path: Optional[Union[str, os.PathLike]],
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[dict] = None,
) -> Dict[str, Any]:
    """`convert_original_components` for resolved `OriginalSources`."""
    return convert_original_components(
        sources.config,
        sources.checkpoint_dir,
        special_tokens_path,
        vae_dir=sources.vae_dir,
        t5_dir=sources.t5_dir,
        dtype=dtype,
        dequantize_fp8=dequantize_fp8,
        device=device,
        device_map=device_map,
    )


def load_original_components(
    path_or_repo_id: Union[str, os.PathLike],
    variant: Optional[str] = None,
    special_tokens: Optional[Union[str, os.PathLike]] = None,
    config: Optional[Union[str, os.PathLike, dict]] = None,
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[dict] = None,
    **download_kwargs,
) -> Dict[str, Any]:
    """The components and settings of a MAGI-1 pipeline straight from the original repository layout (a local folder or a Hub repository id such as
    `"sand-ai/MAGI-1"`, of which only the variant's weights, the VAE and T5 are downloaded). See
    `MagiPipeline.from_original`, which assembles them."""
    if variant is None:
        raise ValueError("Pass `variant`, the checkpoint folder name under ckpt/magi/ (e.g. '4.5B_distill').")
    path = str(path_or_repo_id)
    if not os.path.isdir(path):
        original_config = read_original_config(config) if config is not None else None
        path = download_original_snapshot(path, variant, config=original_config, **download_kwargs)
    elif download_kwargs:
        raise TypeError(f"{sorted(download_kwargs)} only apply to Hub downloads; {path} is a local folder.")
    sources = resolve_original_sources(path, variant, config=config)
    return components_from_sources(
        sources,
        special_tokens,
        dtype=dtype,
        dequantize_fp8=dequantize_fp8,
        device=device,
        device_map=device_map,
    )
