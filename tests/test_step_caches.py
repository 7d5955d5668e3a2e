"""Diffusers' step caches (`transformer.enable_cache`) on the chunk-wise loop: each cache accepts the MAGI-1
transformer, a cache that never skips changes nothing, and a skipping cache keeps its state per window and guidance
branch and forgets it between calls (the second of two calls equals the same call on a fresh pipeline)."""

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from .tiny_models import tiny_pipeline

# 16 steps over a window of 4: 4 calls per window, so a context sees several calls and a skipping cache skips.
STEPS = 16


def _never_skip(name):
    return {
        "first_block": FirstBlockCacheConfig(threshold=-1.0),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, -1), current_timestep_callback=lambda: 500
        ),
        "faster_cache": FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, -1),
            current_timestep_callback=lambda: 500,
            is_guidance_distilled=True,
            spatial_attention_block_identifiers=("blocks.*attn",),
        ),
        "taylorseer": TaylorSeerCacheConfig(disable_cache_before_step=10**6, cache_identifiers=[r"blocks\.\d+\.attn"]),
        "mag_cache": MagCacheConfig(threshold=0.0, max_skip_steps=0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
    }[name]


def _skipping(name):
    return {
        "first_block": FirstBlockCacheConfig(threshold=10.0),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001), current_timestep_callback=lambda: 500
        ),
        "faster_cache": FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: 500,
            is_guidance_distilled=True,
            spatial_attention_block_identifiers=("blocks.*attn",),
        ),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, cache_identifiers=[r"blocks\.\d+\.attn"]),
        "mag_cache": MagCacheConfig(threshold=10.0, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
    }[name]


CACHES = ["first_block", "pyramid_attention_broadcast", "faster_cache", "taylorseer", "mag_cache"]


def _generate(pipe, guidance_mode):
    return pipe(
        "a cat runs",
        num_frames=48,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_mode=guidance_mode,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


@pytest.fixture(scope="module")
def uncached():
    pipe = tiny_pipeline(with_vae=False)
    return {mode: _generate(pipe, mode) for mode in ("three_branch", "distilled")}


@pytest.mark.parametrize("guidance_mode", ["three_branch", "distilled"])
@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_that_never_skips_changes_nothing(cache, guidance_mode, uncached):
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_never_skip(cache))
    assert torch.equal(_generate(pipe, guidance_mode), uncached[guidance_mode])


@pytest.mark.slow
@pytest.mark.parametrize("guidance_mode", ["three_branch", "distilled"])
@pytest.mark.parametrize("cache", CACHES)
def test_a_skipping_cache_keeps_no_state_across_calls(cache, guidance_mode, uncached):
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    _generate(pipe, guidance_mode)
    second = _generate(pipe, guidance_mode)
    fresh = tiny_pipeline(with_vae=False)
    fresh.transformer.enable_cache(_skipping(cache))
    assert torch.equal(second, _generate(fresh, guidance_mode))
    assert not torch.equal(second, uncached[guidance_mode])  # it did skip work


def test_faster_cache_needs_attention_only_mode():
    pipe = tiny_pipeline(with_text_encoder=False, with_vae=False)
    with pytest.raises(ValueError, match="is_guidance_distilled=True"):
        pipe.transformer.enable_cache(FasterCacheConfig(current_timestep_callback=lambda: 500))
