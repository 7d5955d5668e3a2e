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


# --------------------------------------------------------------------------------------------------------------------
# Sessions side by side: each keeps its own step-cache states, forgets a window's when the window moves and all of
# its own when it ends.
# --------------------------------------------------------------------------------------------------------------------
SESSION = dict(height=32, width=32, num_inference_steps=STEPS, guidance_mode="distilled", output_type="latent")
SIDE_BY_SIDE_CACHES = ["first_block", "pyramid_attention_broadcast"]  # a StateManager cache and a single-state one


def _session(pipe, prompt, **kwargs):
    return pipe.start_session(prompt=prompt, generator=torch.Generator().manual_seed(0), **SESSION, **kwargs)


def _solo(cache, prompt, num_chunks):
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    session = _session(pipe, prompt)
    return [session.next_chunk().frames for _ in range(num_chunks)]


def _held_states(transformer, prefix=""):
    from diffusers_magi.models.cache_hooks_magi import _context_state_tables

    return sum(1 for table in _context_state_tables(transformer) for name in table if name.startswith(prefix))


@pytest.mark.parametrize("cache", SIDE_BY_SIDE_CACHES)
def test_interleaved_sessions_and_a_call_between_keep_their_own_step_cache_states(cache):
    expected = {prompt: _solo(cache, prompt, 3) for prompt in ("a cat runs", "a dog jumps")}
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    sessions = {prompt: _session(pipe, prompt) for prompt in expected}
    made = {prompt: [] for prompt in expected}
    for _ in range(3):
        for prompt, session in sessions.items():
            made[prompt].append(session.next_chunk().frames)
        pipe("a bird", num_frames=24, generator=torch.Generator().manual_seed(1), **SESSION)  # a whole call between
    for prompt in expected:
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(made[prompt], expected[prompt])), prompt


@pytest.mark.parametrize("cache", SIDE_BY_SIDE_CACHES)
def test_sessions_in_threads_with_a_step_cache_give_their_own_videos(cache):
    import threading

    expected = {prompt: _solo(cache, prompt, 2) for prompt in ("a cat runs", "a dog jumps")}
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    made, errors = {}, []

    def run(prompt):
        try:
            session = _session(pipe, prompt)
            made[prompt] = [session.next_chunk().frames for _ in range(2)]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(prompt,)) for prompt in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for prompt in expected:
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(made[prompt], expected[prompt])), prompt


@pytest.mark.parametrize("cache", SIDE_BY_SIDE_CACHES)
def test_step_cache_states_stay_bounded_and_go_with_the_session(cache):
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    session = _session(pipe, "a cat runs")  # open-ended
    held = []
    for _ in range(6):
        session.next_chunk()
        held.append(_held_states(pipe.transformer, session._step_cache_name + "/"))
    assert held[0] > 0 and max(held[2:]) <= max(held[:2]), held  # the finished windows' states are forgotten
    finite = _session(pipe, "a dog", num_frames=48)
    list(finite.chunks())
    assert _held_states(pipe.transformer, finite._step_cache_name + "/") == 0  # an ended session forgets its own
    name = session._step_cache_name
    del session
    import gc

    gc.collect()
    assert _held_states(pipe.transformer, name + "/") == 0  # and a dropped one too


@pytest.mark.parametrize("cache", SIDE_BY_SIDE_CACHES)
def test_a_fork_goes_on_from_its_parents_step_cache_states(cache):
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.enable_cache(_skipping(cache))
    session = _session(pipe, "a cat runs")
    session.next_chunk()
    fork = session.fork()
    assert torch.equal(fork.next_chunk().frames, session.next_chunk().frames)
    assert torch.equal(fork.next_chunk().frames, _solo(cache, "a cat runs", 3)[2])


@pytest.mark.parametrize("cache", SIDE_BY_SIDE_CACHES)
def test_a_recache_switch_under_a_cache_that_never_skips_changes_nothing(cache):
    """`set_prompt(..., recache=True)` re-runs the cached chunks in a step-cache context of its own."""
    videos = []
    for step_cache in (None, _never_skip(cache)):
        pipe = tiny_pipeline(with_vae=False)
        if step_cache is not None:
            pipe.transformer.enable_cache(step_cache)
        session = _session(pipe, "a cat runs")
        frames = [session.next_chunk().frames for _ in range(2)]
        session.set_prompt("a dog jumps", recache=True)
        videos.append(torch.cat(frames + [session.next_chunk().frames for _ in range(2)], dim=2))
    assert torch.equal(*videos)
