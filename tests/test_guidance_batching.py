"""Batched guidance branches (`MagiGuidance(batch_branches=True)`): the conditional and earlier-chunks-only passes as
one transformer call give the velocities and the KV cache of the passes run one by one, within 1e-6 of the output
scale (`relative_max_error`, the parity metric: a different batch size rounds the float32 matmuls differently, and the
guidance scales amplify that rounding up to 7.5x)."""

import torch

from diffusers_magi.models.kv_cache_magi import MagiKVCache
from diffusers_magi.pipelines.guidance_magi import MagiGuidance

from .conftest import relative_max_error
from .tiny_models import tiny_transformer

CHUNK_FRAMES = 6

# (first chunk, attention starts, clean re-run chunks, chunk times): a window that grows, the re-run of finished
# chunk 0 that writes it to the cache, then a window that reads it from the cache.
CALLS = [
    (0, (0, 0), 0, (0.6, 0.2)),
    (0, (0, 0, 0), 1, (0.9999, 0.8, 0.4)),
    (1, (0, 0, 0), 0, (0.9, 0.5, 0.1)),
]


def _run(transformer, batch_branches, batch_size=2):
    guidance = MagiGuidance(batch_branches=batch_branches)
    generator = torch.Generator().manual_seed(0)
    cache = MagiKVCache(transformer.config.num_layers)
    text_shape = (batch_size, 1, 40, transformer.config.text_dim)
    velocities, caches = [], []
    for first, starts, clean, times in CALLS:
        num_chunks = len(starts)
        latents = torch.randn(batch_size, 16, num_chunks * CHUNK_FRAMES, 4, 4, generator=generator)
        embeds = torch.randn(text_shape, generator=generator).expand(-1, num_chunks, -1, -1)
        mask = (torch.arange(40) < 25).float().expand(batch_size, num_chunks, -1)
        negative = torch.randn(text_shape, generator=generator).expand(-1, num_chunks, -1, -1)
        negative_mask = (torch.arange(40) < 10).float().expand(batch_size, num_chunks, -1)
        timestep = torch.tensor(times)[None].expand(batch_size, -1)
        velocities.append(
            guidance.predict_velocity(
                transformer, latents, timestep, embeds, mask, negative, negative_mask, first, starts, cache, clean
            )
        )
        caches.append(cache.state_dict())
    return velocities, caches


def test_batched_branches_equal_sequential_passes():
    transformer = tiny_transformer()
    batched, batched_caches = _run(transformer, batch_branches=True)
    sequential, sequential_caches = _run(transformer, batch_branches=False)
    for ours, theirs in zip(batched, sequential):
        assert relative_max_error(ours, theirs) <= 1e-6
    assert sequential_caches[-1], "the calls wrote the cache"
    for ours, theirs in zip(batched_caches, sequential_caches):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert relative_max_error(ours[name], theirs[name]) <= 1e-6, name


def test_branch_view_reads_for_every_branch_and_writes_one():
    cache = MagiKVCache(1)
    keys, values = torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4)
    cache.layer(0).write(0, keys, values, num_chunks=2)
    view = cache.branch_view(3, write_branch=2).layer(0)
    read_keys, read_values = view.read(0, 1, torch.device("cpu"))
    assert torch.equal(read_keys, keys[:, :4].repeat(3, 1, 1, 1)) and torch.equal(read_values, values[:, :4].repeat(3, 1, 1, 1))
    stacked = torch.randn(6, 4, 2, 4)
    view.write(2, stacked, stacked + 1, num_chunks=1)
    assert cache.chunk_indices == [0, 1, 2]
    assert torch.equal(cache.layer(0).read(2, 3, torch.device("cpu"))[0], stacked[4:])


def test_pipeline_argument_chooses_batched_or_one_by_one_passes():
    """`batch_guidance_branches` reaches the guidance: one transformer call per denoising step batched, two one by
    one, the same video (within 1e-6 of its scale); a non-bool is refused before any work. (Scales without a zero
    weight, so that every step runs every pass; the one chunk is the video's first, whose unconditional velocity
    comes from the earlier-chunks-only pass.)"""
    import pytest

    from .tiny_models import tiny_pipeline

    pipe = tiny_pipeline(with_vae=False)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    kwargs = dict(
        num_frames=24, height=32, width=32, num_inference_steps=4, guidance_mode="three_branch", output_type="latent",
        prev_chunk_scales=[1.5] * 5, text_scales=[7.5] * 5,
    )
    videos = {}
    for batched in (True, False):
        calls.clear()
        videos[batched] = pipe("a cat", generator=torch.Generator().manual_seed(0), batch_guidance_branches=batched, **kwargs).frames
        videos[f"calls {batched}"] = len(calls)
    assert videos["calls True"] * 2 == videos["calls False"], videos
    assert relative_max_error(videos[True], videos[False]) <= 1e-6
    calls.clear()
    with pytest.raises(TypeError, match="batch_guidance_branches"):
        pipe("a cat", batch_guidance_branches="no", **kwargs)
    assert not calls


def test_passes_with_a_zero_weight_are_skipped_and_the_mix_is_the_full_formula():
    """Chunks at t >= 0.3 have p = 1, s = 0 (the released table): their velocity is the earlier-chunks-only one. The
    unconditional pass runs only for the other chunks, and a call whose chunks all have s = 0 runs no conditional
    pass. The video's first chunk sees only itself in the earlier-chunks-only pass as well, so the unconditional pass
    leaves it out (t = 0.1 first: 2 videos x 1 chunk, not 2 x 2). The result equals `(1 - p) * v_uncond + (p - s) * v_prev_only + s * v_cond` with all three passes computed
    in full (each chunk alone for the unconditional one), within 1e-6 of its scale, batched or not."""
    transformer = tiny_transformer()
    batch_sizes = []
    transformer.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generator = torch.Generator().manual_seed(0)
    cases = (
        ((0.9, 0.5, 0.1), {True: [4, 2], False: [2, 2, 2]}),
        ((0.9, 0.5), {True: [2], False: [2]}),
        ((0.1, 0.5, 0.2), {True: [4, 2], False: [2, 2, 2]}),
        ((0.1,), {True: [4], False: [2, 2]}),
    )
    for times, expected_calls in cases:
        num_chunks = len(times)
        latents = torch.randn(2, 16, num_chunks * CHUNK_FRAMES, 4, 4, generator=generator)
        timestep = torch.tensor(times)[None].expand(2, -1)
        embeds = torch.randn(2, num_chunks, 40, transformer.config.text_dim, generator=generator)
        mask = (torch.arange(40) < 25).float().expand(2, num_chunks, -1)
        negative = torch.randn(2, 1, 40, transformer.config.text_dim, generator=generator).expand(-1, num_chunks, -1, -1)
        negative_mask = (torch.arange(40) < 10).float().expand(2, num_chunks, -1)

        cond = transformer(latents, timestep, embeds, mask, caption_dropped=False).sample
        prev_only = transformer(latents, timestep, negative, negative_mask, caption_dropped=True).sample
        uncond = torch.cat(
            [
                transformer(
                    latents[:, :, c * CHUNK_FRAMES : (c + 1) * CHUNK_FRAMES], timestep[:, c : c + 1],
                    negative[:, c : c + 1], negative_mask[:, c : c + 1], caption_dropped=True,
                ).sample
                for c in range(num_chunks)
            ],
            dim=2,
        )
        p = torch.tensor([1.0 if t >= 0.3 else 1.5 for t in times]).repeat_interleave(CHUNK_FRAMES)
        s = torch.tensor([0.0 if t >= 0.3 else 7.5 for t in times]).repeat_interleave(CHUNK_FRAMES)
        p, s = p.view(1, 1, -1, 1, 1), s.view(1, 1, -1, 1, 1)
        expected = (1 - p) * uncond + (p - s) * prev_only + s * cond

        for batched in (True, False):
            batch_sizes.clear()
            velocity = MagiGuidance(batch_branches=batched).predict_velocity(
                transformer, latents, timestep, embeds, mask, negative, negative_mask, 0, 0
            )
            assert batch_sizes == expected_calls[batched], (times, batched)  # uncond: 2 videos x 1 chunk
            assert relative_max_error(velocity, expected) <= 1e-6, (times, batched)


def test_guidance_hands_the_transformer_captions_cut_after_their_padding():
    """Every pass of `predict_velocity` gets its captions cut after their last valid token: 25 of 40 for the
    conditional caption, 10 for the negative one, cut together to 25 where one call batches both (the unconditional
    pass, a call of its own, cuts its negative captions again)."""
    transformer = tiny_transformer()
    lengths = []
    transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[2].shape[-2]))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2 * CHUNK_FRAMES, 4, 4, generator=generator)
    timestep = torch.tensor([[0.99, 0.1]])
    embeds = torch.randn(1, 2, 40, transformer.config.text_dim, generator=generator)
    mask = (torch.arange(40) < 25).float().expand(1, 2, -1)
    negative_mask = (torch.arange(40) < 10).float().expand(1, 2, -1)
    cases = {
        ("three_branch", True): [25, 10],  # conditional + earlier-chunks-only batched, then the unconditional pass
        ("three_branch", False): [25, 10, 10],
        ("distilled", True): [25, 25],  # the pass, then the nearly clean first chunk alone
    }
    for (mode, batch_branches), expected in cases.items():
        lengths.clear()
        MagiGuidance(mode=mode, batch_branches=batch_branches).predict_velocity(
            transformer, latents, timestep, embeds, mask, embeds, negative_mask, 0, 0
        )
        assert lengths == expected, (mode, batch_branches, lengths)


def test_only_the_video_first_chunk_takes_its_unconditional_velocity_from_the_earlier_chunks_only_pass():
    """A window that starts later in the video (or with a clean re-run chunk) runs the unconditional pass for its
    first chunk as well: there the earlier-chunks-only pass sees other chunks (or other positions)."""
    transformer = tiny_transformer()
    batch_sizes = []
    transformer.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 2 * CHUNK_FRAMES, 4, 4, generator=generator)
    embeds = torch.randn(2, 2, 40, transformer.config.text_dim, generator=generator)
    mask = (torch.arange(40) < 25).float().expand(2, 2, -1)
    guidance = MagiGuidance()
    guidance.predict_velocity(transformer, latents, torch.tensor([[0.1, 0.2]] * 2), embeds, mask, embeds, mask, 1, 1)
    assert batch_sizes == [4, 4]  # the unconditional pass: 2 videos x 2 chunks
    batch_sizes.clear()
    times = torch.tensor([[guidance.cfg_t_range[-1], 0.2]] * 2)
    cache = MagiKVCache(transformer.config.num_layers)
    guidance.predict_velocity(transformer, latents, times, embeds, mask, embeds, mask, 0, 0, cache, num_clean_chunks=1)
    assert batch_sizes == [4, 2]  # the clean re-run chunk 0 is not denoised; chunk 1 runs alone
