"""`load_pipeline`: one call for every place a MAGI-1 pipeline comes from.

* `"tiny-random"`: the tiny random pipeline built in memory (`diffusers_magi.tiny_random`), a smoke test, not a model;
* the original MAGI-1 layout (the Hub repository `sand-ai/MAGI-1` or a local snapshot of it) with a `variant`,
  converted in memory by `MagiPipeline.from_original`;
* a folder or Hub id written by `magi-convert` (`DiffusionPipeline.from_pretrained`).

Used by `magi-generate` and the example scripts.
"""

import os
from typing import Optional, Type, Union

import torch

from .pipelines.pipeline_magi import MagiPipeline

TINY_RANDOM = "tiny-random"
ORIGINAL_REPO_ID = "sand-ai/MAGI-1"
DEFAULT_VARIANT = "4.5B_distill"


def is_original_layout(model: str, variant: Optional[str]) -> bool:
    """Whether `model` names the original layout: a `variant` is given, or it is the original Hub repository."""
    return model != TINY_RANDOM and (variant is not None or model == ORIGINAL_REPO_ID)


def load_pipeline(
    model: str = ORIGINAL_REPO_ID,
    variant: Optional[str] = None,
    special_tokens: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    pipeline_class: Type[MagiPipeline] = MagiPipeline,
    device: Optional[Union[str, torch.device]] = None,
    with_text_encoder: bool = True,
    with_vae: bool = True,
) -> MagiPipeline:
    """Load a MAGI-1 pipeline of class `pipeline_class` (T2V, I2V or V2V; all share components).

    Args:
        model (`str`, defaults to `"sand-ai/MAGI-1"`): `"tiny-random"`, the original layout (Hub id or local snapshot,
            see `variant`), or a Diffusers folder / Hub id written by `magi-convert`.
        variant (`str`, *optional*): MAGI-1 variant of the original layout (`"4.5B_distill"`, `"24B_base"`, ...;
            default `"4.5B_distill"` for `"sand-ai/MAGI-1"`). Giving it means `model` is in the original layout.
        special_tokens (`str`, *optional*): the original `special_tokens.npz`, for the original layout.
        dtype (`torch.dtype`, *optional*): dtype of the transformer and VAE; defaults to bfloat16 for real
            checkpoints and float32 for `"tiny-random"`.
        pipeline_class: `MagiPipeline`, `MagiImageToVideoPipeline` or `MagiVideoToVideoPipeline`.
        device (`str` or `torch.device`, *optional*): for the original layout, the device every weight is read onto
            (one tensor at a time, so host memory holds one tensor, not the model); other sources load on the CPU
            and the caller moves them.
        with_text_encoder (`bool`, defaults to `True`), with_vae (`bool`, defaults to `True`): `False` leaves T5 (and
            its tokenizer) or the VAE out without loading them; such a pipeline needs `prompt_embeds` or returns
            latents only (`magi-train-lora` with a complete latent cache).
    """
    if model == TINY_RANDOM:
        from .tiny_random import tiny_random_pipeline

        pipe = tiny_random_pipeline(with_text_encoder=with_text_encoder, with_vae=with_vae)
        if dtype is not None:
            pipe.transformer.to(dtype)
            if with_vae:
                pipe.vae.to(dtype)
    elif is_original_layout(model, variant):
        from .conversion import convert_original_components, download_original_snapshot, resolve_original_sources

        variant = variant or DEFAULT_VARIANT
        sources = resolve_original_sources(
            model if os.path.isdir(model) else download_original_snapshot(model, variant), variant
        )
        pipe = MagiPipeline(
            **convert_original_components(
                sources.config,
                sources.checkpoint_dir,
                special_tokens,
                vae_dir=sources.vae_dir if with_vae else None,
                t5_dir=sources.t5_dir if with_text_encoder else None,
                dtype=dtype or torch.bfloat16,
                device=device,
            )
        )
    else:
        # `MagiPipeline.from_pretrained`, not `DiffusionPipeline.from_pretrained`: Diffusers skips a component passed
        # as `None` only when the class it is called on lists it in `_optional_components`.
        left_out = {} if with_text_encoder else {"text_encoder": None, "tokenizer": None}
        if not with_vae:
            left_out["vae"] = None
        pipe = MagiPipeline.from_pretrained(model, dtype=dtype or torch.bfloat16, **left_out)
    return pipe if isinstance(pipe, pipeline_class) else pipeline_class.from_pipe(pipe)
