"""Sessions (`pipe.start_session`, `MagiSession`): open-ended streaming, prompt switches (with and without
re-caching), save / resume (in a fresh process too) / fork, independence of interleaved and concurrent generations,
interrupts, progress, and bad input. Tiny random components; outputs compared with direct pipeline calls."""

import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import accelerate
import imageio
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_magi import MagiImageToVideoPipeline, MagiKVCache, MagiVideoToVideoPipeline
from diffusers_magi.pipelines.session_magi import MagiSessionInterrupted
from diffusers_magi.pipelines.session_state_magi import METADATA_KEY, weights_fingerprint
from diffusers_magi.pipelines.text_conditioning_magi import chunk_caption_rows, cut_caption_padding

from .tiny_models import tiny_pipeline, tiny_transformer_inputs

REPO = Path(__file__).resolve().parents[1]
LATENT = dict(height=32, width=32, num_inference_steps=8, output_type="latent")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _concat(chunks):
    return torch.cat([chunk.frames for chunk in chunks], dim=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_session_with_num_frames_makes_the_video_of_a_call(pipe):
    kwargs = dict(prompt="a cat", num_frames=96, **LATENT)
    video = pipe(generator=_generator(), **kwargs).frames
    session = pipe.start_session(generator=_generator(), **kwargs)
    chunks = list(session.chunks())
    assert [chunk.chunk_index for chunk in chunks] == [0, 1, 2, 3]
    assert torch.equal(_concat(chunks), video)
    assert session.finished and session.progress.chunks_done == 4
    with pytest.raises(ValueError, match="complete"):
        session.next_chunk()


def test_open_ended_session_equals_a_long_video_and_keeps_memory_flat(pipe):
    # A video long enough that its first chunks are made exactly as in an endless one (same windows, and every
    # one of those chunks is told "8 or more chunks follow" by its duration token).
    num_chunks = 3
    video = pipe(prompt="a cat", num_frames=24 * (num_chunks + 7), generator=_generator(), **LATENT).frames
    session = pipe.start_session(prompt="a cat", generator=_generator(), **LATENT)
    assert session.num_generated_chunks is None
    assert torch.equal(_concat([session.next_chunk() for _ in range(num_chunks)]), video[:, :, : 6 * num_chunks])

    def held():
        return (len(session._chunk_latents), len(session._cache.chunk_indices), len(session._cached_latents))

    after_three = held()
    for _ in range(6):
        session.next_chunk()
    assert held() == after_three  # nothing grows with the length of the video
    assert session.progress.chunks_done == 9 and not session.progress.finished


@pytest.mark.parametrize("open_ended", [False, True], ids=["fixed_length", "open_ended"])
def test_set_prompt_equals_chunk_prompts(pipe, open_ended):
    embeds_cat, mask_cat = pipe.encode_prompt(["a cat"])
    embeds_dog, mask_dog = pipe.encode_prompt(["a dog"])
    num_chunks = 6
    length = {} if open_ended else {"num_frames": 24 * num_chunks}
    session = pipe.start_session(prompt_embeds=embeds_cat, prompt_attention_mask=mask_cat, generator=_generator(), special_tokens=("hq",), **length, **LATENT)
    chunks = [session.next_chunk()]
    switch = session.set_prompt(prompt_embeds=embeds_dog, prompt_attention_mask=mask_dog)
    assert switch == 4  # chunk 0 is final, chunks 1-3 are in flight (window of 4): chunk 4 is the first unstarted
    assert session.progress.chunks_in_flight == 3
    chunks += list(session.chunks(num_chunks - 1))

    per_chunk = torch.stack([embeds_cat[0] if chunk < switch else embeds_dog[0] for chunk in range(num_chunks)])[None]
    per_chunk_mask = torch.stack([mask_cat[0] if chunk < switch else mask_dog[0] for chunk in range(num_chunks)])[None]
    expected = pipe(
        prompt_embeds=per_chunk, prompt_attention_mask=per_chunk_mask, num_frames=24 * num_chunks, generator=_generator(), special_tokens=("hq",), **LATENT
    ).frames
    if not open_ended:
        assert torch.equal(_concat(chunks), expected)
    else:  # the last chunks of a fixed-length video are made while the window drains: compare those before it
        assert torch.equal(_concat(chunks)[:, :, : 6 * (num_chunks - 3)], expected[:, :, : 6 * (num_chunks - 3)])


def test_set_prompt_with_text_equals_a_chunk_prompt_schedule(pipe):
    kwargs = dict(num_frames=24 * 6, **LATENT)
    session = pipe.start_session(prompt="a cat walks", generator=_generator(), **kwargs)
    chunks = [session.next_chunk(), session.next_chunk()]
    switch = session.set_prompt("a dog runs")
    chunks += list(session.chunks())
    expected = pipe(chunk_prompts={0: "a cat walks", switch: "a dog runs"}, generator=_generator(), **kwargs).frames
    assert (_concat(chunks) - expected).abs().max() <= 1e-5
    plain = pipe(prompt="a cat walks", generator=_generator(), **kwargs).frames
    assert not torch.equal(expected, plain)  # the switch changes the video


def _direct_clean_pass(pipe, session, chunks, prompt):
    """The keys/values of `chunks` from a clean pass conditioned on `prompt`, computed directly: the chunks' clean
    latents at the clean time, captioned with the prompt and their special tokens (cut after the padding, as every
    caption that enters the transformer), written to a fresh cache."""
    embeds, mask = pipe.encode_prompt([prompt])
    captions = chunk_caption_rows(
        pipe.transformer.caption_tokens(),
        embeds[:, None].expand(-1, len(chunks), -1, -1),
        mask[:, None].expand(-1, len(chunks), -1),
        ("hq", "duration"),
        chunk_indices=chunks,
        num_generated_chunks=session.num_generated_chunks,
    )
    [captions] = cut_caption_padding(captions)
    cache = MagiKVCache(pipe.transformer.config.num_layers)
    reach = pipe.scheduler.config.clean_chunk_kvrange
    with torch.no_grad():
        pipe.transformer(
            torch.cat([session._cached_latents[chunk] for chunk in chunks], dim=2),
            torch.full((1, len(chunks)), pipe.scheduler.config.clean_t),
            *captions,
            first_chunk_index=chunks[0],
            attention_chunk_starts=[max(chunks[0], chunk + 1 - reach) for chunk in chunks],
            kv_cache=cache,
            num_chunks_to_cache=len(chunks),
            caption_dropped=False,
        )
    return cache.state_dict()


def test_set_prompt_recache_recomputes_the_cached_chunks_under_the_new_caption(pipe):
    kwargs = dict(num_frames=24 * 6, guidance_mode="distilled", **LATENT)
    session = pipe.start_session(prompt="a cat walks", generator=_generator(), **kwargs)
    session.next_chunk()
    session._run_call()  # the clean re-run of chunk 0 writes it to the cache
    assert session._cache.chunk_indices == [0]
    branch = session.fork()
    switch = session.set_prompt("a dog runs", recache=True)
    assert switch == branch.set_prompt("a dog runs") == 5

    def assert_cache_is_recomputed(chunks):
        recached, plain = session._cache.state_dict(), branch._cache.state_dict()
        direct = _direct_clean_pass(pipe, session, chunks, "a dog runs")
        assert set(recached) == set(direct) == set(plain)
        for name, tensor in direct.items():
            assert torch.equal(recached[name], tensor), name
        assert any(not torch.equal(recached[name], plain[name]) for name in recached)  # layers after the first see the text

    assert_cache_is_recomputed([0])  # what the cache held at the switch, at once
    for current in (session, branch):
        while current._cache.chunk_indices != [1]:
            current._run_call()
    assert_cache_is_recomputed([1])  # and every chunk that enters the cache later
    # The video goes on from the re-read past: it differs from the plain switch.
    assert not torch.equal(session.next_chunk().frames, branch.next_chunk().frames)


def test_save_and_resume_in_a_fresh_process_equals_the_uninterrupted_video(pipe, tmp_path):
    kwargs = dict(prompt="a cat", guidance_mode="three_branch", **LATENT)
    uninterrupted = pipe.start_session(generator=_generator(), **kwargs)
    expected = _concat([uninterrupted.next_chunk() for _ in range(4)])

    session = pipe.start_session(generator=_generator(), **kwargs)
    first = [session.next_chunk() for _ in range(2)]
    path = session.save(tmp_path / "state.safetensors")
    later_here = [session.next_chunk() for _ in range(2)]
    assert torch.equal(_concat(first + later_here), expected)

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tests.tiny_models import tiny_pipeline
        pipe = tiny_pipeline()
        session = pipe.resume_session({str(path)!r})
        torch.save(torch.cat([session.next_chunk().frames for _ in range(2)], dim=2), {str(tmp_path / 'later.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    later_there = torch.load(tmp_path / "later.pt")
    assert torch.equal(later_there, _concat(later_here))


def test_fork_and_loading_one_state_twice_give_independent_branches(pipe, tmp_path):
    kwargs = dict(num_frames=24 * 6, **LATENT)
    session = pipe.start_session(prompt="a cat", generator=_generator(), **kwargs)
    first = session.next_chunk()
    path = session.save(tmp_path / "state.safetensors")
    fork = session.fork()
    loaded = [pipe.resume_session(path), pipe.resume_session(path)]
    for branch, prompt in zip([session, fork, *loaded], ["a dog", "a bird", "a boat", "a tree"]):
        switch = branch.set_prompt(prompt)
        video = _concat([first, *branch.chunks()])
        expected = pipe(chunk_prompts={0: "a cat", switch: prompt}, generator=_generator(), **kwargs).frames
        assert (video - expected).abs().max() <= 1e-5, prompt


def test_resume_refuses_a_state_of_another_model(pipe, tmp_path):
    session = pipe.start_session(prompt="a cat", generator=_generator(), **LATENT)
    session.next_chunk()
    path = session.save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="num_layers"):
        tiny_pipeline(num_layers=3).resume_session(path)
    with pytest.raises(ValueError, match="different weights"):
        tiny_pipeline(seed=1).resume_session(path)
    other = tiny_pipeline()
    other.scheduler.register_to_config(window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        other.resume_session(path)


def test_resume_checks_the_transformer_weights_and_the_pipeline_class(pipe, tmp_path):
    session = pipe.start_session(prompt="a cat", generator=_generator(), **LATENT)
    session.next_chunk()
    path = session.save(tmp_path / "state.safetensors")
    expected = session.next_chunk().frames
    same = tiny_pipeline()  # same config and weights, another object: accepted
    assert torch.equal(same.resume_session(path).next_chunk().frames, expected)
    with torch.no_grad():
        same.transformer.time_embedder.linear_1.weight += 1  # same config and learned caption tokens
    differ = r"transformer's weights differ \(fingerprint saved \w{16}, here \w{16}: time_embedder\.linear_1\.weight: values"
    with pytest.raises(ValueError, match=differ):
        same.resume_session(path)
    with pytest.raises(ValueError, match=r"saved by a MagiPipeline, not a MagiImageToVideoPipeline"):
        MagiImageToVideoPipeline.from_pipe(pipe).resume_session(path)
    # A state saved before the fingerprint existed (no "transformer_weights") still resumes.
    with safe_open(path, framework="pt") as state:
        description = json.loads(state.metadata()[METADATA_KEY])
        tensors = {name: state.get_tensor(name) for name in state.keys()}
    del description["model"]["transformer_weights"]
    save_file(tensors, tmp_path / "older.safetensors", metadata={METADATA_KEY: json.dumps(description)})
    assert torch.equal(pipe.resume_session(tmp_path / "older.safetensors").next_chunk().frames, expected)


def test_weights_fingerprint_reads_offloaded_and_float8_weights(tmp_path):
    """The fingerprint is that of the weights wherever offloading keeps them: on the meta device with accelerate's
    hooks (sequential offloading), in group-offloading files (the parameters then hold empty placeholders)."""
    reference = weights_fingerprint(tiny_pipeline().transformer)
    assert len(reference["tensors"]) == len(list(tiny_pipeline().transformer.parameters()))
    sequential = tiny_pipeline().transformer
    accelerate.cpu_offload(sequential, torch.device("cpu"))
    assert sequential.time_embedder.linear_1.weight.device.type == "meta"
    assert weights_fingerprint(sequential) == reference
    on_disk = tiny_pipeline().transformer
    on_disk.enable_group_offload(
        onload_device="cpu", offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=tmp_path
    )
    with torch.no_grad():
        on_disk(*tiny_transformer_inputs())  # every group offloaded to its file once
    assert weights_fingerprint(on_disk) == reference
    float8 = tiny_pipeline().transformer
    float8.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    fingerprint = weights_fingerprint(float8)
    assert fingerprint["tensors"]["blocks.0.attn.to_q.weight"][0] == "float8_e4m3fn"
    assert fingerprint != reference and weights_fingerprint(float8) == fingerprint


def test_bad_session_files_and_paths_give_clear_errors(pipe, tmp_path):
    session = pipe.start_session(prompt="a cat", generator=_generator(), **LATENT)
    with pytest.raises(ValueError, match="does not exist"):
        session.save(tmp_path / "missing" / "state.safetensors")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        session.save(unrelated)
    assert unrelated.read_text() == "keep me"
    path = session.save(tmp_path / "state.safetensors")
    data = Path(path).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        pipe.resume_session(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        pipe.resume_session(garbage)
    with pytest.raises(ValueError, match="not a file"):
        pipe.resume_session(tmp_path / "nothing.safetensors")
    # The session is still usable after every rejected call.
    assert session.next_chunk().chunk_index == 0


def test_bad_set_prompt_is_rejected_and_the_session_goes_on(pipe):
    kwargs = dict(prompt="a cat", num_frames=48, **LATENT)
    expected = pipe(generator=_generator(), **kwargs).frames
    session = pipe.start_session(generator=_generator(), **kwargs)
    for bad, error in ((" ", ValueError), ("", ValueError), (3, TypeError), (["a", "b"], ValueError)):
        with pytest.raises(error):
            session.set_prompt(bad)
    with pytest.raises(ValueError, match="exactly one"):
        session.set_prompt()
    assert torch.equal(_concat(list(session.chunks())), expected)
    with pytest.raises(ValueError, match="open-ended"):
        pipe.start_session(prompt="a cat", latents=torch.zeros(1, 16, 12, 4, 4), **LATENT)


def test_interleaved_sessions_give_their_sequential_outputs(pipe):
    settings_a = dict(prompt="a cat", height=32, width=32, num_inference_steps=8, output_type="latent", num_frames=72)
    settings_b = dict(prompt="a dog", height=48, width=32, num_inference_steps=16, output_type="latent", num_frames=96, guidance_mode="distilled")
    sequential_a = pipe(generator=_generator(1), **settings_a).frames
    sequential_b = pipe(generator=_generator(2), **settings_b).frames
    session_a = pipe.start_session(generator=_generator(1), **settings_a)
    session_b = pipe.start_session(generator=_generator(2), **settings_b)
    chunks_a, chunks_b = [], []
    while not (session_a.finished and session_b.finished):
        for session, chunks in ((session_a, chunks_a), (session_b, chunks_b)):
            if not session.finished:
                chunks.append(session.next_chunk())
    assert torch.equal(_concat(chunks_a), sequential_a)
    assert torch.equal(_concat(chunks_b), sequential_b)
    # Interleaved stream() generators too.
    stream_a = pipe.stream(generator=_generator(1), **settings_a)
    stream_b = pipe.stream(generator=_generator(2), **settings_b)
    chunks_a, chunks_b = [next(stream_a)], [next(stream_b)]
    chunks_b += [next(stream_b)]
    chunks_a += list(stream_a)
    chunks_b += list(stream_b)
    assert torch.equal(_concat(chunks_a), sequential_a)
    assert torch.equal(_concat(chunks_b), sequential_b)


@pytest.mark.slow
def test_two_threads_calling_the_pipeline_give_their_sequential_outputs(pipe):
    settings = [
        dict(prompt="a cat", height=32, width=32, num_inference_steps=8, output_type="latent", num_frames=48),
        dict(prompt="a dog", height=48, width=32, num_inference_steps=16, output_type="latent", num_frames=72, guidance_mode="distilled"),
    ]
    sequential = [pipe(generator=_generator(seed), **kwargs).frames for seed, kwargs in enumerate(settings)]
    for trial in range(10):
        results, errors = [None, None], []

        def run(index):
            try:
                results[index] = pipe(generator=_generator(index), **settings[index]).frames
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for result, expected in zip(results, sequential):
            assert (result - expected).abs().max() <= 1e-6, trial


def test_interrupting_one_session_never_stops_another(pipe):
    kwargs = dict(prompt="a cat", num_frames=72, **LATENT)
    expected = pipe(generator=_generator(), **kwargs).frames
    session_a = pipe.start_session(generator=_generator(), **kwargs)
    session_b = pipe.start_session(generator=_generator(), **kwargs)
    chunks_a = [session_a.next_chunk()]
    session_a.interrupt()
    with pytest.raises(MagiSessionInterrupted, match="resume"):
        session_a.next_chunk()
    assert session_a.progress.interrupted
    chunks_b = list(session_b.chunks())  # unaffected
    assert torch.equal(_concat(chunks_b), expected)
    assert list(session_a.chunks()) == []  # chunks() just stops
    session_a.resume()
    chunks_a += list(session_a.chunks())
    assert torch.equal(_concat(chunks_a), expected)  # continued exactly where it stopped

    # The Diffusers way: a callback sets `pipe._interrupt`; only the generation it belongs to stops.
    other = pipe.start_session(generator=_generator(), **kwargs)
    first_final = next(call.index for call in pipe.scheduler.make_plan(8, num_chunks=3) if call.finished_chunk is not None)

    def stop_after_first_chunk(pipeline, index, timestep, tensors):
        assert not pipeline.interrupt
        if index == first_final:
            pipeline._interrupt = True
            other_chunk.append(other.next_chunk())  # another session runs inside this callback, undisturbed
        return tensors

    other_chunk = []
    stopped = list(pipe.stream(generator=_generator(), callback_on_step_end=stop_after_first_chunk, **kwargs))
    assert len(stopped) == 1 and torch.equal(stopped[0].frames, expected[:, :, :6])
    assert torch.equal(_concat(other_chunk + list(other.chunks())), expected)
    assert not pipe.interrupt
    with pytest.raises(ValueError, match="session.interrupt"):
        pipe.interrupt = True
    with pytest.raises(RuntimeError, match="before its first chunk"):
        pipe(generator=_generator(), callback_on_step_end=lambda p, i, t, k: setattr(p, "_interrupt", True) or k, **kwargs)


def test_an_error_in_a_call_leaves_the_session_at_that_call(pipe):
    kwargs = dict(prompt="a cat", num_frames=72, **LATENT)
    expected = pipe(generator=_generator(), **kwargs).frames
    failures = {"left": 1}

    def flaky(pipeline, index, timestep, tensors):
        if index == 5 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("flaky callback")
        return tensors

    session = pipe.start_session(generator=_generator(), callback_on_step_end=flaky, **kwargs)
    with pytest.raises(RuntimeError, match="flaky"):
        session.next_chunk()
    assert torch.equal(_concat(list(session.chunks())), expected)  # the retry continues exactly


def test_progress_bar_per_chunk_and_progress(pipe, monkeypatch, capsys):
    totals = []
    original = type(pipe).progress_bar

    def recording(self, iterable=None, total=None):
        totals.append(total)
        return original(self, iterable=iterable, total=total)

    monkeypatch.setattr(type(pipe), "progress_bar", recording)
    capsys.readouterr()
    pipe.set_progress_bar_config(disable=False)
    try:
        session = pipe.start_session(prompt="a cat", num_frames=72, **LATENT)
        assert session.progress.seconds_per_chunk is None
        list(session.chunks())
    finally:
        pipe.set_progress_bar_config(disable=True)
    plan = pipe.scheduler.make_plan(8, num_chunks=3)
    finishing = [call.index for call in plan if call.finished_chunk is not None]
    assert totals == [finishing[0] + 1] + [b - a for a, b in zip(finishing, finishing[1:])]
    progress = session.progress
    assert (progress.chunks_done, progress.chunks_in_flight, progress.calls_done) == (3, 0, len(plan))
    assert progress.seconds_per_chunk > 0 and progress.finished
    # One tqdm bar per chunk on stderr, each run to its total (the transformer calls until that chunk is final).
    bars = [line for line in capsys.readouterr().err.split("\n") if "it/s" in line or "s/it" in line]
    assert [re.findall(r"(\d+)/(\d+) \[", bar)[-1] for bar in bars] == [(str(n), str(n)) for n in totals]
    # Disabled through set_progress_bar_config: nothing printed.
    list(pipe.start_session(prompt="a cat", num_frames=72, **LATENT).chunks())
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err and "%|" not in err


def test_image_to_video_sessions():
    pipe = MagiImageToVideoPipeline.from_pipe(tiny_pipeline())
    image = torch.rand(32, 32, 3).mul(255).to(torch.uint8).numpy()
    kwargs = dict(image=image, prompt="a boat", num_frames=48, **LATENT)
    expected = pipe(generator=_generator(), **kwargs).frames
    session = pipe.start_session(generator=_generator(), **kwargs)
    assert torch.equal(_concat(list(session.chunks())), expected)


def test_video_to_video_sessions(tmp_path):
    """A video-to-video session (prefix video inside chunk 0, or prefix latents longer than one chunk) gives the
    video of the pipeline's call, its first chunk shortened by the prefix frames it shares."""
    pipe = MagiVideoToVideoPipeline.from_pipe(tiny_pipeline())
    path = str(tmp_path / "prefix.mp4")
    rng = np.random.default_rng(0)
    imageio.mimwrite(path, [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(16)], fps=24)
    prefixes = [dict(video=path, num_prefix_frames=8), dict(prefix_latents=torch.randn(1, 16, 8, 4, 4))]
    for prefix in prefixes:
        kwargs = dict(prompt="a boat", num_frames=48, **prefix, **LATENT)
        expected = pipe(generator=_generator(), **kwargs).frames
        session = pipe.start_session(generator=_generator(), **kwargs)
        chunks = list(session.chunks())
        assert chunks[0].frames.shape[2] < 6  # the prefix frames of chunk 0 are not output again
        assert torch.equal(_concat(chunks), expected), prefix.keys()


def test_decode_overlap_gives_the_sequential_video_in_order(pipe, tmp_path, monkeypatch):
    kwargs = dict(prompt="a cat", height=32, width=32, num_inference_steps=8, num_frames=96, output_type="np")
    expected = pipe(generator=_generator(), **kwargs).frames
    threads = []
    original = type(pipe)._postprocess_chunk

    def recording(self, latents, output_type):
        threads.append(threading.current_thread().name)
        return original(self, latents, output_type)

    monkeypatch.setattr(type(pipe), "_postprocess_chunk", recording)
    chunks = list(pipe.stream(generator=_generator(), decode_overlap=True, **kwargs))
    assert [chunk.chunk_index for chunk in chunks] == [0, 1, 2, 3]
    assert np.array_equal(np.concatenate([chunk.frames for chunk in chunks], axis=1), expected)
    assert threads and all(name.startswith("magi-decode") for name in threads)  # decoded beside the denoising
    assert np.array_equal(pipe(generator=_generator(), decode_overlap=True, **kwargs).frames, expected)
    # Stopping early (two of four chunks) leaves no decode behind and the session where it was.
    session = pipe.start_session(generator=_generator(), decode_overlap=True, **kwargs)
    first_two = list(session.chunks(2))
    assert np.array_equal(np.concatenate([c.frames for c in first_two], axis=1), expected[:, :48])
    assert np.array_equal(np.concatenate([c.frames for c in session.chunks()], axis=1), expected[:, 48:])


def test_decode_overlap_refuses_model_offloading():
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="decode_overlap"):
        pipe(prompt="a cat", num_frames=24, decode_overlap=True, **LATENT)
