"""MagiPipeline / MagiImageToVideoPipeline / MagiVideoToVideoPipeline end to end with tiny random components (a real T5
encoder, a tokenizer built locally, the transformer and the VAE): outputs, batching, chunk-wise prompts, streaming,
callbacks, saving and loading, and errors on bad input."""

import json

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

import diffusers_magi
from diffusers_magi import (
    MagiImageToVideoPipeline,
    MagiPipeline,
    MagiVideoToVideoPipeline,
    write_video_stream,
)

from .tiny_models import tiny_pipeline

SIZE = dict(height=32, width=32)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("np", lambda f: isinstance(f, np.ndarray) and f.shape == (1, 48, 32, 32, 3) and f.dtype == np.float32),
        ("pt", lambda f: torch.is_tensor(f) and f.shape == (1, 48, 3, 32, 32) and f.dtype == torch.float32),
        ("pil", lambda f: len(f) == 1 and len(f[0]) == 48 and isinstance(f[0][0], PIL.Image.Image)),
        ("latent", lambda f: torch.is_tensor(f) and f.shape == (1, 16, 12, 4, 4)),
    ],
)
def test_text_to_video_output_types(pipe, output_type, check):
    frames = pipe("a fox runs through the snow", num_frames=48, output_type=output_type, generator=_generator(), **SIZE).frames
    assert check(frames)


def test_output_types_describe_the_same_video(pipe):
    kwargs = dict(prompt="a dog walks", num_frames=24, **SIZE)
    as_np = pipe(output_type="np", generator=_generator(), **kwargs).frames
    as_pt = pipe(output_type="pt", generator=_generator(), **kwargs).frames
    as_pil = pipe(output_type="pil", generator=_generator(), **kwargs).frames
    assert np.array_equal(as_np, as_pt.permute(0, 1, 3, 4, 2).numpy())
    assert np.array_equal(np.round(as_np[0] * 255).astype(np.uint8), np.stack([np.asarray(im) for im in as_pil[0]]))
    assert np.all(as_np * 255 == np.round(as_np * 255))  # uint8 frames, as the original writes them


def test_prompt_text_changes_the_video_and_seed_reproduces_it(pipe):
    kwargs = dict(num_frames=24, output_type="latent", **SIZE)
    first = pipe("a cat runs", generator=_generator(1), **kwargs).frames
    again = pipe("a cat runs", generator=_generator(1), **kwargs).frames
    other = pipe("a bird flies over the ocean", generator=_generator(1), **kwargs).frames
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_batch_rows_equal_single_runs(pipe):
    prompts = ["a cat runs", "a red car drives at night"]
    kwargs = dict(num_frames=48, output_type="latent", **SIZE)
    batch = pipe(prompts, generator=[_generator(3), _generator(4)], **kwargs).frames
    for row, (prompt, seed) in enumerate(zip(prompts, (3, 4))):
        single = pipe(prompt, generator=_generator(seed), **kwargs).frames
        torch.testing.assert_close(batch[row : row + 1], single, rtol=1e-5, atol=1e-5)
    repeated = pipe("a cat runs", num_videos_per_prompt=2, generator=[_generator(3), _generator(5)], **kwargs).frames
    torch.testing.assert_close(repeated[:1], batch[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(repeated[0], repeated[1])


def test_chunk_prompts_only_affect_their_chunk_and_later(pipe):
    kwargs = dict(num_frames=72, output_type="latent", generator=None, **SIZE)
    noise = torch.randn(1, 16, 18, 4, 4, generator=_generator(7))
    base = pipe(chunk_prompts=["a cat runs", "a dog jumps", "a bird flies"], latents=noise, **kwargs).frames
    changed = pipe(chunk_prompts=["a cat runs", "a dog jumps", "the ocean at sunset"], latents=noise, **kwargs).frames
    assert torch.equal(base[:, :, :12], changed[:, :, :12])  # chunks 0-1 bit-identical
    assert not torch.allclose(base[:, :, 12:], changed[:, :, 12:])
    schedule = pipe(chunk_prompts={0: "a cat runs", 1: "a dog jumps", 2: "a bird flies"}, latents=noise, **kwargs).frames
    assert torch.equal(schedule, base)
    single = pipe(prompt="a cat runs", latents=noise, **kwargs).frames
    as_chunks = pipe(chunk_prompts={0: "a cat runs"}, latents=noise, **kwargs).frames
    assert torch.equal(single, as_chunks)


def test_per_chunk_prompt_embeds_equal_chunk_prompts(pipe):
    prompts = ["a cat runs", "a dog jumps"]
    embeds, mask = pipe.encode_prompt(prompts)
    kwargs = dict(num_frames=48, output_type="latent", latents=torch.randn(1, 16, 12, 4, 4), **SIZE)
    by_text = pipe(chunk_prompts=prompts, **kwargs).frames
    by_embeds = pipe(prompt_embeds=embeds[None], prompt_attention_mask=mask[None], **kwargs).frames
    assert torch.equal(by_text, by_embeds)


def test_stream_yields_chunks_in_order_equal_to_the_call(pipe, tmp_path):
    kwargs = dict(prompt="a fox runs", num_frames=72, **SIZE)
    chunks = list(pipe.stream(generator=_generator(2), **kwargs))
    assert [chunk.chunk_index for chunk in chunks] == [0, 1, 2]
    whole = pipe(generator=_generator(2), **kwargs).frames
    assert np.array_equal(np.concatenate([chunk.frames for chunk in chunks], axis=1), whole)

    path = write_video_stream(pipe.stream(generator=_generator(2), **kwargs), str(tmp_path / "stream.mp4"), fps=24)
    written = imageio.mimread(path)
    assert len(written) == whole.shape[1] and written[0].shape == (32, 32, 3)


def test_stream_checks_inputs_before_iterating(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.stream("a cat", height=30, width=32)


def test_callback_on_step_end_sees_every_call_and_can_change_latents(pipe):
    calls = []

    def record(pipeline, index, timestep, tensors):
        calls.append((index, timestep.shape, tensors["latents"].shape))
        return tensors

    kwargs = dict(prompt="a cat", num_frames=48, output_type="latent", **SIZE)
    plain = pipe(callback_on_step_end=record, generator=_generator(), **kwargs).frames
    num_calls = len(pipe.scheduler.make_plan(pipe.config.default_num_inference_steps, num_chunks=2))
    assert [index for index, _, _ in calls] == list(range(num_calls))

    def zero_out(pipeline, index, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if index == num_calls - 1 else {}

    changed = pipe(callback_on_step_end=zero_out, generator=_generator(), **kwargs).frames
    assert torch.equal(changed[:, :, 6:], torch.zeros_like(changed[:, :, 6:]))
    assert torch.equal(changed[:, :, :6], plain[:, :, :6])


def test_distilled_guidance_and_overrides(pipe):
    kwargs = dict(prompt="a cat", num_frames=24, output_type="latent", generator=None, latents=torch.randn(1, 16, 6, 4, 4), **SIZE)
    base = pipe(**kwargs).frames
    distilled = pipe(guidance_mode="distilled", **kwargs).frames
    other_scales = pipe(text_scales=[1.0, 1.0, 1.0, 0.0, 0.0], **kwargs).frames
    assert not torch.allclose(base, distilled) and not torch.allclose(base, other_scales)
    with pytest.raises(ValueError, match="non-negative"):
        pipe(text_scales=[7.5, -1.0, 7.5, 0.0, 0.0], **kwargs)
    with pytest.raises(ValueError, match="non-negative"):
        pipe(prev_chunk_scales=[float("nan")] * 5, **kwargs)


def test_special_tokens_and_negative_prompt_change_the_video(pipe):
    kwargs = dict(prompt="a cat", num_frames=24, output_type="latent", latents=torch.randn(1, 16, 6, 4, 4), **SIZE)
    default = pipe(**kwargs).frames
    assert not torch.allclose(default, pipe(special_tokens=None, **kwargs).frames)
    assert not torch.allclose(default, pipe(special_tokens=["hq", "duration", "two_d_anime"], **kwargs).frames)
    assert not torch.allclose(default, pipe(negative_special_tokens=True, **kwargs).frames)
    assert not torch.allclose(default, pipe(negative_prompt="blurry", **kwargs).frames)
    with pytest.raises(ValueError, match="Unknown special_tokens"):
        pipe(special_tokens=["sharp"], **kwargs)


def test_image_to_video(pipe):
    i2v = MagiImageToVideoPipeline.from_pipe(pipe)
    assert i2v.transformer is pipe.transformer and i2v.vae is pipe.vae
    image = PIL.Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    frames = i2v(image=image, prompt="a cat runs", num_frames=24, generator=_generator(), **SIZE).frames
    # ceil((24 // 4 + 1) / 6) = 2 chunks; chunk 0 keeps the image frame: 12 latent frames -> 48 video frames.
    assert frames.shape == (1, 48, 32, 32, 3)
    latents = i2v(image=image, prompt="a cat runs", num_frames=24, generator=_generator(), output_type="latent", **SIZE).frames
    assert latents.shape == (1, 16, 12, 4, 4)
    with pytest.raises(ValueError, match="needs exactly one of `image`"):
        i2v(prompt="a cat", num_frames=24, **SIZE)


def test_video_to_video(pipe, tmp_path):
    v2v = MagiVideoToVideoPipeline.from_pipe(pipe)
    path = str(tmp_path / "prefix.mp4")
    rng = np.random.default_rng(0)
    imageio.mimwrite(path, [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(16)], fps=24)
    latents = v2v(video=path, num_prefix_frames=8, prompt="a cat", num_frames=24, output_type="latent", **SIZE).frames
    # 8 prefix frames = 2 latent frames inside chunk 0; the output starts after them: 6 - 2 + 6 = 10 latent frames.
    assert latents.shape == (1, 16, 10, 4, 4)
    prefix = torch.randn(1, 16, 8, 4, 4)  # longer than one chunk: chunk 0 is stored in the cache once
    continued = v2v(prefix_latents=prefix, prompt="a cat", num_frames=24, output_type="latent", **SIZE).frames
    assert continued.shape == (1, 16, 10, 4, 4)
    with pytest.raises(ValueError, match="needs exactly one of `video`"):
        v2v(prompt="a cat", num_frames=24, **SIZE)
    with pytest.raises(ValueError, match="does not exist"):
        v2v(video=str(tmp_path / "missing.mp4"), prompt="a cat", num_frames=24, **SIZE)


def test_save_and_load_with_diffusion_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "MagiPipeline"
    for name in ("transformer", "scheduler", "vae"):
        assert index[name][0] == "diffusers_magi", index[name]
    assert index["guidance_mode"] == "three_branch" and index["default_num_inference_steps"] == 4

    loaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert isinstance(loaded, MagiPipeline)
    loaded.set_progress_bar_config(disable=True)
    again = MagiPipeline.from_pretrained(str(tmp_path))
    assert isinstance(again.transformer, diffusers_magi.MagiTransformer3DModel)
    kwargs = dict(prompt="a cat runs", num_frames=24, output_type="latent", latents=torch.randn(1, 16, 6, 4, 4), **SIZE)
    torch.testing.assert_close(loaded(**kwargs).frames, pipe(**kwargs).frames, rtol=1e-5, atol=1e-5)


def test_latent_only_pipeline_without_vae_or_text_encoder():
    pipe = tiny_pipeline(with_text_encoder=False, with_vae=False)
    embeds = torch.randn(1, 64, 32)
    mask = torch.zeros(1, 64, dtype=torch.int64)
    mask[:, :9] = 1
    latents = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, num_frames=24, output_type="latent", **SIZE).frames
    assert latents.shape == (1, 16, 6, 4, 4)
    with pytest.raises(ValueError, match="no VAE"):
        pipe(prompt_embeds=embeds, prompt_attention_mask=mask, num_frames=24, **SIZE)
    with pytest.raises(ValueError, match="no text_encoder"):
        pipe(prompt="a cat", num_frames=24, output_type="latent", **SIZE)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(height=40, width=36), ValueError, "multiples of 16"),
        (dict(num_frames=0), ValueError, "num_frames"),
        (dict(num_frames=3), ValueError, "no new chunk"),
        (dict(num_inference_steps=6), ValueError, "multiple of window_size"),
        (dict(prompt_embeds=torch.randn(1, 64, 32), prompt_attention_mask=torch.ones(1, 64)), ValueError, "not both"),
        (dict(chunk_prompts=["a", "b"]), ValueError, "not both"),
        (dict(latents=torch.randn(1, 16, 5, 4, 4)), ValueError, "latents must be"),
        (dict(output_type="mp4"), ValueError, "output_type"),
        (dict(guidance_mode="four_branch"), ValueError, "guidance mode"),
        (dict(cfg_t_range=[0.0, 0.5]), ValueError, "one entry per band"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_errors(pipe, kwargs, error, match):
    arguments = dict(prompt="a cat", num_frames=24, output_type="latent", **SIZE)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        pipe(**arguments)


def test_chunk_prompt_count_must_match_the_chunks(pipe):
    with pytest.raises(ValueError, match="2 prompts but the video has 3 generated chunks"):
        pipe(chunk_prompts=["a cat", "a dog"], num_frames=72, output_type="latent", **SIZE)
    with pytest.raises(ValueError, match="Per-chunk prompt_embeds has 2 chunks"):
        pipe(
            prompt_embeds=torch.randn(1, 2, 64, 32),
            prompt_attention_mask=torch.ones(1, 2, 64),
            num_frames=72,
            output_type="latent",
            **SIZE,
        )


def test_missing_prompt_and_wrong_types(pipe):
    with pytest.raises(ValueError, match="Pass a prompt"):
        pipe(num_frames=24, output_type="latent", **SIZE)
    with pytest.raises(TypeError, match="prompt must be"):
        pipe(prompt=5, num_frames=24, output_type="latent", **SIZE)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        pipe(prompt_embeds=torch.randn(1, 64, 32), num_frames=24, output_type="latent", **SIZE)


def test_kv_cache_size_does_not_grow_with_video_length(pipe, monkeypatch):
    """The cache holds only chunks a later call attends to: as many for 10 chunks as for 4."""
    from diffusers_magi.models.kv_cache_magi import MagiKVCache

    held = []
    original_drop = MagiKVCache.drop_chunks_before

    def drop_and_record(cache, chunk_index):
        original_drop(cache, chunk_index)
        held.append((len(cache.chunk_indices), cache.nbytes()))

    monkeypatch.setattr(MagiKVCache, "drop_chunks_before", drop_and_record)
    peaks = {}
    for num_chunks in (4, 10):
        held.clear()
        chunks = list(
            pipe.stream(prompt="a cat", num_frames=24 * num_chunks, num_inference_steps=8, output_type="latent", **SIZE)
        )
        assert len(chunks) == num_chunks
        peaks[num_chunks] = max(held)
    assert peaks[4] == peaks[10]
    # The most chunks any call reads from the cache (with the real settings: the one chunk before the window).
    most_read = max(call.first_chunk - min(call.attention_starts) for call in pipe.scheduler.make_plan(8, num_chunks=10))
    assert peaks[10][0] == most_read == 1


def test_callback_gets_the_tensors_diffusers_pipelines_offer(pipe):
    seen = {}

    def record(pipeline, index, timestep, tensors):
        seen.setdefault(index, {name: tuple(value.shape) for name, value in tensors.items()})
        return {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    pipe(prompt="a cat", num_frames=48, output_type="latent", callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs, generator=_generator(), **SIZE)
    first = seen[0]
    text_length, text_dim = pipe.transformer.config.text_length, pipe.transformer.config.text_dim
    assert first == {
        "latents": (1, 16, 6, 4, 4),  # the call's denoised chunk
        "prompt_embeds": (1, 1, text_length, text_dim),  # its caption row (special tokens included)
        "negative_prompt_embeds": (1, 1, text_length, text_dim),
    }
    with pytest.raises(ValueError, match="not in"):
        pipe(prompt="a cat", num_frames=24, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"], **SIZE)
