"""Original MAGI-1 config + checkpoint folders -> `MagiPipeline`."""

from typing import Optional

import torch

from ..pipelines.pipeline_magi import MagiPipeline
from ..schedulers.scheduling_magi_chunk import MagiChunkScheduler
from .original_checkpoint import read_original_config
from .transformer import load_original_transformer


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


def convert_original_pipeline(
    config_path: str,
    checkpoint_dir: str,
    special_tokens_path: Optional[str],
    vae_dir: Optional[str] = None,
    t5_dir: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
) -> MagiPipeline:
    """Build a `MagiPipeline` from the original layout.

    Args:
        config_path (`str`): original three-section config JSON; its runtime section gives the scheduler settings
            and the guidance defaults (`cfg_number` 3 -> three-branch guidance, 1 -> distilled).
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/`.
        special_tokens_path (`str` or `None`): the original `special_tokens.npz` (a file of the original GitHub repo).
        vae_dir (`str`, *optional*): the original `ckpt/vae` folder; without it the pipeline only returns latents.
        t5_dir (`str`, *optional*): a T5 encoder folder (`ckpt/t5/t5-v1_1-xxl`) loadable by transformers; without
            it the pipeline needs `prompt_embeds`.
        torch_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the transformer blocks and the VAE.
    """
    original_config = read_original_config(config_path)
    transformer = load_original_transformer(config_path, checkpoint_dir, special_tokens_path, torch_dtype=torch_dtype)
    vae = text_encoder = tokenizer = None
    if vae_dir is not None:
        from .vae import load_original_vae

        vae = load_original_vae(vae_dir, torch_dtype=torch_dtype)
    if t5_dir is not None:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(t5_dir)
        text_encoder = T5EncoderModel.from_pretrained(t5_dir, torch_dtype=torch.float32).eval()
    return MagiPipeline(
        transformer=transformer,
        scheduler=scheduler_from_original(original_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        **pipeline_config_from_original(original_config),
    )
