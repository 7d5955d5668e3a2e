"""Tiny random components for fast tests (they live in the package: `diffusers_magi.tiny_random`)."""

import torch

from diffusers_magi.tiny_random import (  # noqa: F401
    tiny_random_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_transformer,
    tiny_transformer_config,
    tiny_vae,
)


def tiny_pipeline(seed: int = 0, with_text_encoder: bool = True, with_vae: bool = True, **transformer_overrides):
    """`tiny_random_pipeline` with its progress bar off."""
    pipe = tiny_random_pipeline(seed, with_text_encoder, with_vae, **transformer_overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer_inputs():
    """Inputs of one call of a tiny transformer: two chunks of 4x4 latents, captions of 40 tokens (all valid)."""
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 16, 12, 4, 4, generator=generator),
        torch.tensor([[0.3, 0.8]]),
        torch.randn(1, 2, 40, 32, generator=generator),
        torch.ones(1, 2, 40),
    )
