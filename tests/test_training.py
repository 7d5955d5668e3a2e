"""The chunk-wise flow-matching objective (tied to the sampler) and the `magi-train-lora` command."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from diffusers_magi import MagiChunkScheduler
from diffusers_magi.pipelines.text_conditioning_magi import chunk_caption_rows, negative_caption_rows
from diffusers_magi.training import MagiChunkwiseFlowMatching, find_clips, time_transform
from diffusers_magi.training.train_lora import main

from .tiny_models import tiny_pipeline, tiny_transformer
from .training_clips import write_moving_squares


def _latents(batch=3, chunks=4, seed=0):
    return torch.randn(batch, 16, chunks * 6, 4, 4, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("time_schedule", ["sd3", "square", "piecewise", "identity"])
@pytest.mark.parametrize("steps", [8, 16, 64])
def test_time_transform_is_the_schedulers_grid(time_schedule, steps):
    """A chunk at position `k / steps` of its path has exactly the time of grid point `k` of the sampler."""
    scheduler = MagiChunkScheduler(time_schedule=time_schedule, shift=3.0)
    positions = torch.linspace(0, 1, steps + 1)
    assert torch.equal(time_transform(positions, time_schedule, 3.0), scheduler.time_grid_for(steps))


@pytest.mark.parametrize("chunk_times", ["trajectory", "sorted"])
@pytest.mark.parametrize("time_distribution", ["uniform", "logit_normal"])
@pytest.mark.parametrize("num_prefix_chunks", [0, 1])
def test_chunk_noise_levels_are_monotone(chunk_times, time_distribution, num_prefix_chunks):
    objective = MagiChunkwiseFlowMatching(chunk_times=chunk_times, time_distribution=time_distribution)
    batch = objective.prepare(_latents(batch=256, chunks=5), 6 * num_prefix_chunks, torch.Generator().manual_seed(0))
    t = batch.timesteps
    assert (t[:, 1:] <= t[:, :-1]).all()  # earlier chunks are at least as clean
    assert ((t >= 0) & (t <= objective.clean_t)).all()
    assert batch.loss_mask.any(dim=1).all()  # every clip has a loss chunk
    assert not batch.loss_mask[:, :num_prefix_chunks].any()
    assert (t[:, :num_prefix_chunks] == objective.clean_t).all()
    if chunk_times == "trajectory":
        # the three kinds of chunks the sampler has: finished (clean), in flight, not yet in the window (noise)
        finished, waiting = batch.positions >= 1, batch.positions < 0
        assert (t[finished] == objective.clean_t).all() and (t[waiting] == 0).all()
        assert (
            finished[:, num_prefix_chunks:].any() and waiting.any() and (~batch.loss_mask[:, num_prefix_chunks:]).any()
        )
        assert torch.equal(batch.loss_mask, ~finished & ~waiting)
        assert (batch.loss_mask.sum(dim=1) <= objective.window_size).all()
    else:
        assert batch.loss_mask[:, num_prefix_chunks:].all()


def test_in_flight_times_have_the_distribution_of_the_sampler_grid():
    """Uniform trajectory points give each in-flight chunk a uniform position along its path, so its time is
    distributed as the sampler's grid points (a coarse histogram check on the position)."""
    objective = MagiChunkwiseFlowMatching()
    batch = objective.prepare(_latents(batch=4000, chunks=3), generator=torch.Generator().manual_seed(1))
    positions = batch.positions[batch.loss_mask]
    histogram = torch.histc(positions, bins=4, min=0, max=1) / positions.numel()
    torch.testing.assert_close(histogram, torch.full((4,), 0.25), atol=0.03, rtol=0)


class _Oracle(torch.nn.Module):
    """A "model" that returns the exact flow-matching velocity `(x0 - x) / (1 - t)` of every chunk it is given,
    knowing the clean latents of each clip (it recognises a clip by its noised latents in `prepared`)."""

    def __init__(self, clean, prepared, transformer):
        super().__init__()
        self.clean, self.prepared = clean, prepared
        self.caption_tokens, self.config = transformer.caption_tokens, transformer.config

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, **kwargs):
        rows = [next(r for r, x in enumerate(self.prepared.noisy_latents) if torch.equal(x, h)) for h in hidden_states]
        t = timestep.repeat_interleave(6, dim=1)[:, None, :, None, None]
        return ((self.clean[rows] - hidden_states) / (1 - t),)


def test_oracle_velocity_gives_zero_loss_and_one_euler_step_lands_on_the_clean_latents():
    torch.manual_seed(0)
    objective = MagiChunkwiseFlowMatching(caption_dropout=0.3, unconditional_dropout=0.2)
    transformer = tiny_transformer()
    clean = _latents(batch=6, chunks=4)
    embeds, mask = torch.randn(6, 40, 32), torch.ones(6, 40, dtype=torch.int64)
    oracle = _Oracle(clean, objective.prepare(clean, generator=torch.Generator().manual_seed(3)), transformer)
    result = objective(oracle, clean, embeds, mask, generator=torch.Generator().manual_seed(3))
    batch = result.batch
    assert result.loss.item() < 1e-10
    assert objective.loss(batch.target, batch).loss.item() == 0.0
    assert torch.equal(batch.target, clean - batch.noise)

    # One Euler step of the sampler (the end of its time grid, `step`'s update `x + v * (t_next - t)`) from each noised
    # chunk with the oracle velocity lands on the clean chunk.
    end = MagiChunkScheduler().time_grid_for(8)[-1]  # 1 (clean), up to float32 rounding of the shift
    t = batch.timesteps.repeat_interleave(6, dim=1)[:, None, :, None, None]
    landed = batch.noisy_latents + batch.target * (end - t)
    in_flight = batch.loss_mask.repeat_interleave(6, dim=1)[:, None, :, None, None].expand_as(clean)
    torch.testing.assert_close(landed[in_flight], clean[in_flight], rtol=1e-5, atol=1e-5)
    # finished chunks are given clean, as the KV cache holds them
    finished = (batch.positions >= 1).repeat_interleave(6, dim=1)[:, None, :, None, None].expand_as(clean)
    assert torch.equal(batch.noisy_latents[finished], clean[finished])


def test_image_prefix_frame_is_clean_and_out_of_the_loss():
    """Image-to-video style: the first latent frame is given clean inside the first chunk (which keeps its noise
    level), as the original sampler pads a prefix into the chunks in flight, and only it is left out of the loss."""
    objective = MagiChunkwiseFlowMatching(chunk_times="sorted")
    clean = _latents(batch=4, chunks=2)
    batch = objective.prepare(clean, num_prefix_frames=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.noisy_latents[:, :, :1], clean[:, :, :1])
    assert (
        not torch.equal(batch.noisy_latents[:, :, 1:2], clean[:, :, 1:2])
        and (batch.timesteps[:, 0] < objective.clean_t).all()
    )
    assert batch.loss_mask.all() and not batch.loss_frames[:, 0].any() and batch.loss_frames[:, 1:].all()
    wrong_prefix = batch.target.clone()
    wrong_prefix[:, :, 0] += 5.0
    assert objective.loss(wrong_prefix, batch).loss.item() == 0.0
    wrong_frame = batch.target.clone()
    wrong_frame[:, :, 1] += 1.0
    # one wrong frame of the five loss frames of chunk 0: chunk loss 1/5, mean over the two chunks 1/10
    torch.testing.assert_close(objective.loss(wrong_frame, batch).loss, torch.tensor(0.1))


def test_scheduler_step_with_the_target_velocity_finishes_a_chunk_noised_by_the_objective():
    """`MagiChunkScheduler.step` itself: in the call of a real plan where a chunk takes its last step, chunks noised
    with the objective's formula at the call's times, moved with the objective's target velocity, end exactly clean
    (the finished one) or at their next grid time (the others)."""
    scheduler = MagiChunkScheduler()
    scheduler.set_timesteps(8, num_chunks=3)
    objective = MagiChunkwiseFlowMatching.from_scheduler(scheduler)
    grid = scheduler.time_grid_for(8)
    call = next(call for call in scheduler.plan if call.finished_chunk is not None and len(call.time_indices) > 1)
    chunks = len(call.time_indices)
    clean, noise = _latents(batch=2, chunks=chunks), torch.randn(2, 16, chunks * 6, 4, 4)
    times = grid[list(call.time_indices)].expand(2, -1)
    stepped = scheduler.step(clean - noise, call, objective.add_noise(clean, noise, times)).prev_sample
    next_times = grid[[index + 1 for index in call.time_indices]].expand(2, -1)
    torch.testing.assert_close(stepped, objective.add_noise(clean, noise, next_times), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped[:, :, :6], clean[:, :, :6], rtol=1e-5, atol=1e-5)  # the finished chunk


def test_attention_follows_the_samplers_reach_rules():
    """For every call of a real sampler plan, the chunk positions of that call give the attention ranges the
    scheduler planned (noise bands and the clean re-run)."""
    scheduler = MagiChunkScheduler()
    steps = 16
    scheduler.set_timesteps(steps, num_chunks=7)
    objective = MagiChunkwiseFlowMatching.from_scheduler(scheduler)
    for call in scheduler.plan:
        positions = torch.full((call.first_chunk + call.num_chunks,), 2.0)  # chunks before the call: finished
        positions[call.first_chunk + call.num_clean_chunks :] = (
            torch.tensor(call.time_indices, dtype=torch.float32) / steps
        )
        starts = objective.attention_starts(positions)
        assert starts[call.first_chunk :] == call.attention_starts, call


def test_one_transformer_call_per_attention_layout_with_per_chunk_timesteps_and_captions():
    transformer = tiny_transformer()
    objective = MagiChunkwiseFlowMatching(caption_dropout=0.0, unconditional_dropout=0.5)
    calls = []

    def model(hidden_states, timestep, embeds, mask, **kwargs):
        calls.append(dict(batch=hidden_states.shape[0], timestep=timestep, embeds=embeds, mask=mask, **kwargs))
        return transformer(hidden_states, timestep, embeds, mask, **kwargs)

    model.caption_tokens, model.config = transformer.caption_tokens, transformer.config
    embeds, mask = torch.randn(8, 40, 32), torch.ones(8, 40, dtype=torch.int64)
    mask[:, 30:] = 0
    result = objective(model, _latents(batch=8, chunks=2), embeds, mask, generator=torch.Generator().manual_seed(0))
    batch = result.batch
    assert len(calls) == len(set(batch.attention_chunk_starts)) <= 8 and sum(call["batch"] for call in calls) == 8
    for call in calls:
        assert call["timestep"].shape[1] == 2 and call["embeds"].shape[1] == 2  # per-chunk times and captions
    unconditional = [starts == (0, 1) for starts in batch.attention_chunk_starts]
    assert any(unconditional) and not all(unconditional)
    assert all(batch.caption_dropped[row] for row, alone in enumerate(unconditional) if alone)
    assert torch.isfinite(result.loss) and result.loss > 0

    # Caption rows: the pipelines' special tokens on generated chunks, the null caption on clean / dropped rows.
    learned = transformer.caption_tokens()
    rows, row_masks = objective.caption_rows(learned, embeds, mask, batch)
    expected, expected_mask = chunk_caption_rows(
        learned, embeds[:, None].expand(-1, 2, -1, -1), mask[:, None].expand(-1, 2, -1), ("hq", "duration")
    )
    negative, negative_mask = negative_caption_rows(learned, 8)
    for row in range(8):
        for chunk in range(2):
            uses_negative = bool(batch.caption_dropped[row]) or bool(batch.positions[row, chunk] >= 1)
            want = (
                (negative[row], negative_mask[row])
                if uses_negative
                else (expected[row, chunk], expected_mask[row, chunk])
            )
            assert torch.equal(rows[row, chunk], want[0]) and torch.equal(
                row_masks[row, chunk].float(), want[1].float()
            )


def test_gradient_checkpointing_gives_the_same_gradients():
    from peft import LoraConfig

    def gradients(checkpointing):
        transformer = tiny_transformer()
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_v", "linear_in", "linear_out"])
        )  # A and B random: every gradient non-zero
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        loss = MagiChunkwiseFlowMatching()(
            transformer,
            _latents(batch=2, chunks=3),
            torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1)),
            torch.ones(2, 40, dtype=torch.int64),
            generator=torch.Generator().manual_seed(2),
        ).loss
        loss.backward()
        return {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 16
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7)


def test_one_generator_per_clip_gives_each_clip_the_draws_of_a_batch_of_its_own():
    """What makes gradient accumulation (and data parallelism) see the draws of one large batch: with a generator per
    clip, a clip's times, dropout and noise do not depend on the batch it is in."""
    objective = MagiChunkwiseFlowMatching(caption_dropout=0.3, unconditional_dropout=0.3)
    latents = _latents(batch=3, chunks=3)
    together = objective.prepare(latents, generator=[torch.Generator().manual_seed(seed) for seed in (5, 6, 7)])
    for row, seed in enumerate((5, 6, 7)):
        alone = objective.prepare(latents[row : row + 1], generator=torch.Generator().manual_seed(seed))
        for field in ("noisy_latents", "timesteps", "noise", "positions", "loss_mask", "caption_dropped"):
            assert torch.equal(getattr(together, field)[row], getattr(alone, field)[0]), field
        assert together.attention_chunk_starts[row] == alone.attention_chunk_starts[0]
    assert not torch.equal(together.noise[0], together.noise[1])
    with pytest.raises(ValueError, match="one generator per clip: 2 generators for 3 clips"):
        objective.prepare(latents, generator=[torch.Generator(), torch.Generator()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_times="random"), "chunk_times must be one of"),
        (dict(time_distribution="beta"), "time_distribution must be one of"),
        (dict(caption_dropout=1.5), "caption_dropout must be a probability"),
        (dict(caption_dropout=0.6, unconditional_dropout=0.6), "must not exceed 1"),
    ],
)
def test_objective_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagiChunkwiseFlowMatching(**kwargs)


def test_prepare_checks_its_inputs():
    objective = MagiChunkwiseFlowMatching()
    with pytest.raises(ValueError, match="multiple of chunk_width"):
        objective.prepare(torch.zeros(1, 16, 7, 4, 4))
    with pytest.raises(ValueError, match=r"num_prefix_frames must be in \[0, 12\)"):
        objective.prepare(torch.zeros(1, 16, 12, 4, 4), num_prefix_frames=12)


# --------------------------------------------------------------------------------------------------------------------
# Data folder
# --------------------------------------------------------------------------------------------------------------------
def test_data_folder_layouts(tmp_path):
    write_moving_squares(tmp_path / "pairs", num_frames=24, size=32)
    clips = find_clips(tmp_path / "pairs")
    assert [(clip.video.name, clip.caption) for clip in clips] == [
        ("clip0.mp4", "a red square moves right"),
        ("clip1.mp4", "a blue square moves down"),
    ]
    folder = write_moving_squares(tmp_path / "jsonl", num_frames=24, size=32, captions=False)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "clip1.mp4", "text": "blue"}) + "\n")
    assert [(clip.video.name, clip.caption) for clip in find_clips(folder)] == [("clip1.mp4", "blue")]
    (folder / "metadata.jsonl").write_text('{"file": "clip1.mp4"}\n')
    with pytest.raises(ValueError, match="line 1 must be a JSON object with 'file_name' and 'text'"):
        find_clips(folder)


# --------------------------------------------------------------------------------------------------------------------
# magi-train-lora
# --------------------------------------------------------------------------------------------------------------------
BASE_ARGS = ["--model", "tiny-random", "--num-frames", "48", "--seed", "0"]


def _bad_input(tmp_path, capsys, data, *extra):
    if "--height" not in extra and "--resolution" not in extra:
        extra = ("--resolution", "64", *extra)
    code = main([*BASE_ARGS, "--data", str(data), "--output", str(tmp_path / "out"), *extra])
    assert code == 2
    assert not (tmp_path / "out" / "train_log.jsonl").exists()  # no training step ran
    return capsys.readouterr().err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no training clip" in _bad_input(tmp_path, capsys, tmp_path / "empty")


def test_video_without_caption(tmp_path, capsys):
    data = write_moving_squares(tmp_path / "data", num_frames=24, size=32)
    (data / "clip1.txt").unlink()
    err = _bad_input(tmp_path, capsys, data)
    assert "clip1.mp4' has no caption" in err and "clip1.txt" in err


def test_clip_shorter_than_one_chunk(tmp_path, capsys):
    data = write_moving_squares(tmp_path / "data", num_frames=12, size=32)
    err = _bad_input(tmp_path, capsys, data, "--num-frames", "24")
    assert "clip0.mp4' has about 12 frames" in err and "one chunk is 24 frames" in err


def test_resolution_not_a_multiple_of_16(tmp_path, capsys):
    data = write_moving_squares(tmp_path / "data", num_frames=24, size=32)
    assert "--resolution must be a positive multiple of 16 (VAE 8x, patch 2x), got 72" in _bad_input(
        tmp_path, capsys, data, "--resolution", "72"
    )
    assert "--width must be a positive multiple of 16 (VAE 8x, patch 2x), got 100" in _bad_input(
        tmp_path, capsys, data, "--height", "64", "--width", "100"
    )
    assert "either --resolution or --height/--width" in _bad_input(
        tmp_path, capsys, data, "--resolution", "64", "--width", "64"
    )


def test_num_frames_not_whole_chunks(tmp_path, capsys):
    data = write_moving_squares(tmp_path / "data", num_frames=24, size=32)
    assert "--num-frames must be a positive multiple of 24" in _bad_input(tmp_path, capsys, data, "--num-frames", "30")


def test_target_module_that_does_not_exist(tmp_path, capsys, monkeypatch):
    """Checked against the module names of a meta-device model built from the config: nothing is loaded."""
    from diffusers_magi import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("the pipeline was loaded"))
    data = write_moving_squares(tmp_path / "data", num_frames=48, size=64)
    err = _bad_input(tmp_path, capsys, data, "--target-modules", "to_q,to_qkv")
    assert "--target-modules: 'to_qkv' names no module of the transformer" in err and "'to_q'" in err
    err = _bad_input(tmp_path, capsys, data, "--target-modules", "blocks.1.attn.to_q,blocks.2.attn.to_q")
    assert "'blocks.2.attn.to_q' names no module" in err  # the tiny transformer has 2 blocks


def test_target_modules_of_a_converted_folder_are_read_from_its_config(tmp_path):
    from diffusers_magi.training.train_lora import check_target_modules, transformer_config

    tiny_pipeline(num_layers=3).save_pretrained(tmp_path / "converted")
    config = transformer_config(str(tmp_path / "converted"), None)
    check_target_modules(config, ["blocks.2.ff.linear_in", "to_cross_kv"])
    with pytest.raises(ValueError, match="'blocks.3.ff.linear_in' names no module"):
        check_target_modules(config, ["blocks.3.ff.linear_in"])
    assert transformer_config("sand-ai/MAGI-1", "24B_base")["num_layers"] == 48  # the preset, nothing downloaded


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="checks the error without bitsandbytes"
)
def test_8bit_adam_without_bitsandbytes(tmp_path, capsys):
    data = write_moving_squares(tmp_path / "data", num_frames=48, size=64)
    assert "--use-8bit-adam needs bitsandbytes" in _bad_input(tmp_path, capsys, data, "--use-8bit-adam")


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "magi-train-lora"]
    assert script.load() is main


def test_load_pipeline_leaves_t5_and_the_vae_out(tmp_path, reference_dir, monkeypatch):
    """What a run with a complete cache loads: the transformer (and scheduler) only, from each kind of source; the
    original layout's T5 and VAE folders are not read (empty here)."""
    from diffusers_magi import MagiPipeline, loading
    from diffusers_magi.conversion import original_layout
    from diffusers_magi.conversion.original_checkpoint import read_original_config

    from .original_snapshot import SPECIAL_TOKENS, build_original_snapshot, variant_config, weight_folder

    tiny_pipeline().save_pretrained(tmp_path / "converted")
    for source in ("tiny-random", str(tmp_path / "converted")):
        pipe = loading.load_pipeline(source, dtype=torch.float32, with_text_encoder=False, with_vae=False)
        assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.vae is None
        assert pipe.transformer is not None
        assert loading.load_pipeline(source, dtype=torch.float32, with_vae=False).text_encoder is not None

    variant = "tiny45_base"  # not a built-in preset: its config stands in for one
    monkeypatch.setattr(original_layout, "preset", lambda name: read_original_config(variant_config(name)))
    full = build_original_snapshot(tmp_path / "MAGI-1", reference_dir / "vae" / "tiny_vae_a")
    bare = tmp_path / "bare"
    (bare / "ckpt" / "magi" / variant).mkdir(parents=True)
    (bare / "ckpt" / "magi" / variant / weight_folder(variant)).symlink_to(
        full / "ckpt" / "magi" / variant / weight_folder(variant)
    )
    (bare / "ckpt" / "vae").mkdir()
    (bare / "ckpt" / "t5" / "t5-v1_1-xxl").mkdir(parents=True)
    pipe = loading.load_pipeline(
        str(bare), variant, SPECIAL_TOKENS, dtype=torch.float32, with_text_encoder=False, with_vae=False
    )
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.vae is None
    complete = loading.load_pipeline(str(full), variant, SPECIAL_TOKENS, dtype=torch.float32)
    direct = MagiPipeline.from_original(full, variant, special_tokens=SPECIAL_TOKENS, dtype=torch.float32)
    assert complete.text_encoder is not None and complete.vae is not None
    for name, tensor in direct.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor) and torch.equal(
            complete.transformer.state_dict()[name], tensor
        )


def _losses(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


# In-process runs at toy size (32 x 32, one chunk, a few steps: well under a second each after the first).
FAST_ARGS = ["--model", "tiny-random", "--resolution", "32", "--num-frames", "24", "--seed", "0"]


@pytest.fixture
def fast_data(tmp_path):
    return write_moving_squares(tmp_path / "data", num_frames=24, size=32)


def _train(data, output, *extra):
    code = main([*FAST_ARGS, "--data", str(data), "--output", str(output), "--checkpointing-steps", "0", *extra])
    assert code == 0


class _Spies:
    """Counts, during `magi-train-lora` runs in this process, the VAE encodes, the T5 prompt encodes, the tiny VAE and
    T5 built (what loading them is for `tiny-random`) and the objective's calls; at each objective call (a training
    step) it records which of the loaded VAE / T5 are still alive and where."""

    def __init__(self, monkeypatch):
        import gc
        import weakref

        from diffusers_magi import AutoencoderMagi, MagiPipeline, loading, tiny_random

        self.counts = dict(vae_encode=0, prompt_encode=0, vae_built=0, t5_built=0, steps=0)
        self.encoders = {}  # "vae" / "text_encoder" -> weakref of the one the last run loaded
        self.during_steps = []  # per step: {"vae": device or None (freed), "text_encoder": ...}

        def counted(name, function):
            def wrapper(*args, **kwargs):
                self.counts[name] += 1
                return function(*args, **kwargs)

            return wrapper

        monkeypatch.setattr(AutoencoderMagi, "encode", counted("vae_encode", AutoencoderMagi.encode))
        monkeypatch.setattr(MagiPipeline, "encode_prompt", counted("prompt_encode", MagiPipeline.encode_prompt))
        monkeypatch.setattr(tiny_random, "tiny_vae", counted("vae_built", tiny_random.tiny_vae))
        monkeypatch.setattr(tiny_random, "tiny_text_encoder", counted("t5_built", tiny_random.tiny_text_encoder))
        load_pipeline = loading.load_pipeline

        def spied_load_pipeline(*args, **kwargs):
            pipe = load_pipeline(*args, **kwargs)
            self.encoders = {
                name: weakref.ref(getattr(pipe, name))
                for name in ("vae", "text_encoder")
                if getattr(pipe, name) is not None
            }
            return pipe

        monkeypatch.setattr(loading, "load_pipeline", spied_load_pipeline)
        call = MagiChunkwiseFlowMatching.__call__

        def spied_call(objective, transformer, *args, **kwargs):
            self.counts["steps"] += 1
            gc.collect()
            alive = {name: ref() for name, ref in self.encoders.items()}
            self.during_steps.append(
                {name: None if model is None else model.device.type for name, model in alive.items()}
            )
            del alive
            return call(objective, transformer, *args, **kwargs)

        monkeypatch.setattr(MagiChunkwiseFlowMatching, "__call__", spied_call)


def test_cache_dir_is_read_by_a_second_and_a_resumed_run_without_loading_t5_or_the_vae(
    tmp_path, fast_data, monkeypatch
):
    spies = _Spies(monkeypatch)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _train(fast_data, tmp_path / "first", *cache, "--max-steps", "2", "--checkpointing-steps", "1")
    assert spies.counts == dict(vae_encode=2, prompt_encode=2, vae_built=1, t5_built=1, steps=2)
    first = _losses(tmp_path / "first")
    assert sorted(path.name for path in (tmp_path / "first").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    _train(fast_data, tmp_path / "second", *cache, "--max-steps", "2")
    assert spies.counts == dict(vae_encode=2, prompt_encode=2, vae_built=1, t5_built=1, steps=4)  # nothing encoded
    assert spies.encoders == {}  # neither T5 nor the VAE was loaded
    assert _losses(tmp_path / "second") == first  # trained on the cached latents and captions

    _train(fast_data, tmp_path / "first", *cache, "--max-steps", "3", "--resume-from-checkpoint", "latest")
    assert spies.counts == dict(vae_encode=2, prompt_encode=2, vae_built=1, t5_built=1, steps=5)  # from step 2 on
    resumed = _losses(tmp_path / "first")
    assert [entry["step"] for entry in resumed] == [1, 2, 3] and resumed[:2] == first

    _train(fast_data, tmp_path / "third", *cache, "--max-steps", "2", "--resolution", "64")
    assert spies.counts["vae_encode"] == 4  # other settings: not in the cache, encoded again


def test_training_steps_run_without_t5_and_without_the_vae(tmp_path, fast_data, monkeypatch):
    """T5 and the VAE are loaded to fill the cache; during the training steps T5 is freed, and so is the VAE unless
    it decodes validation videos (then it waits on the CPU, off the training device)."""
    spies = _Spies(monkeypatch)
    _train(fast_data, tmp_path / "plain", "--max-steps", "2")
    assert spies.counts["vae_built"] == spies.counts["t5_built"] == 1
    assert spies.during_steps == [{"vae": None, "text_encoder": None}] * 2

    spies.during_steps.clear()
    _train(fast_data, tmp_path / "validated", "--max-steps", "2", "--validation-prompt", "a red square")
    assert spies.during_steps == [{"vae": "cpu", "text_encoder": None}] * 2
    assert (tmp_path / "validated" / "validation" / "step-000002.mp4").is_file()

    # A complete cache (clips and the validation prompt): T5 is not loaded at all, the VAE only for validation.
    spies.counts.update(vae_built=0, t5_built=0)
    cache = ["--cache-dir", str(tmp_path / "validated" / "cache")]
    _train(fast_data, tmp_path / "again", *cache, "--max-steps", "1", "--validation-prompt", "a red square")
    assert spies.counts["t5_built"] == 0 and spies.counts["vae_built"] == 1


def test_log_file_lora_alpha_and_progress_bar(tmp_path, fast_data, capsys):
    from safetensors import safe_open

    log_file = tmp_path / "logs" / "steps.jsonl"
    log_file.parent.mkdir()
    extra = ["--max-steps", "3", "--rank", "4", "--lora-alpha", "8", "--log-file", str(log_file)]
    _train(fast_data, tmp_path / "out", *extra)
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [entry["step"] for entry in entries] == [1, 2, 3]
    assert all(type(entry["loss"]) is float and 0 < entry["loss"] < 10 for entry in entries)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
    progress = capsys.readouterr().err
    assert "magi-train-lora: 100%" in progress and "3/3" in progress and "loss=" in progress

    with safe_open(tmp_path / "out" / "pytorch_lora_weights.safetensors", "pt") as lora:
        metadata = json.loads(lora.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 8.0 and metadata["transformer.r"] == 4
    pipe = tiny_pipeline()
    pipe.load_lora_weights(tmp_path / "out", adapter_name="trained")
    assert pipe.transformer.blocks[0].attn.to_q.scaling["trained"] == 2.0  # alpha / rank


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, fast_data):
    """Accumulating 2 micro-steps of 1 clip gives the updates of batches of 2 clips: the same clips and draws (a
    generator per sample), one optimiser step per 2 micro-steps, the loss of each step the mean of its micro-steps.
    Exact up to float rounding here because every clip has the same number of loss chunks (one-chunk clips)."""
    from safetensors.torch import load_file

    common = ["--max-steps", "3", "--learning-rate", "1e-2", "--checkpointing-steps", "3"]
    _train(fast_data, tmp_path / "batch", *common, "--batch-size", "2")
    _train(fast_data, tmp_path / "accumulated", *common, "--gradient-accumulation-steps", "2")
    batch, accumulated = _losses(tmp_path / "batch"), _losses(tmp_path / "accumulated")
    assert [entry["step"] for entry in accumulated] == [1, 2, 3]
    assert [entry["samples"] for entry in accumulated] == [entry["samples"] for entry in batch] == [2, 4, 6]
    for entry, expected in zip(accumulated, batch):
        assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    optimizer = torch.load(tmp_path / "accumulated" / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {3}  # 3 updates, not 6
    lora, expected = (
        load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("accumulated", "batch")
    )
    assert lora.keys() == expected.keys()
    assert any(key.endswith("lora_B.weight") and tensor.abs().max() > 1e-3 for key, tensor in lora.items())
    for key in lora:
        # Compared as whole tensors: AdamW's update of an element whose gradient is ~0 is +-lr or 0 depending on float
        # rounding (the rounding of one batched call against two single calls), so single elements may differ.
        assert (lora[key] - expected[key]).norm() <= 1e-3 * expected[key].norm(), key


@pytest.mark.slow
def test_train_lora_end_to_end_resume_and_load(tmp_path):
    """40 steps on two moving-square clips (64x64, two chunks each) with the console script: the loss falls, the
    LoRA loads into a pipeline and changes its output, and resuming from the step-20 checkpoint continues the step
    count with the loss sequence of the uninterrupted run."""
    data = write_moving_squares(tmp_path / "data")
    common = [
        *BASE_ARGS,
        "--resolution",
        "64",
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-steps",
        "40",
        "--learning-rate",
        "1e-2",
        "--rank",
        "16",
        "--checkpointing-steps",
        "20",
        "--target-modules",
        "patch_embedding,to_q,to_k,to_v,to_out,linear_in,linear_out,proj_out",
    ]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_magi.training.train_lora",
            *common,
            "--output",
            str(tmp_path / "full"),
            "--validation-prompt",
            "a red square",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = _losses(tmp_path / "full")
    assert [entry["step"] for entry in log] == list(range(1, 41))
    losses = [entry["loss"] for entry in log]
    assert all(map(lambda loss: loss == loss and abs(loss) < float("inf"), losses))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "full" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "full" / "validation").iterdir()) == [
        "step-000020.mp4",
        "step-000040.mp4",
    ]

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_magi.training.train_lora",
            *common,
            "--output",
            str(tmp_path / "resumed"),
            "--resume-from-checkpoint",
            str(tmp_path / "full" / "checkpoint-20"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "resumed") == log[20:]

    kwargs = dict(prompt="a red square", num_frames=48, height=64, width=64, output_type="latent")
    pipe = tiny_pipeline()
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(tmp_path / "full")
    adapted = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert (adapted - base).abs().max() > 1e-3


@pytest.mark.slow
def test_train_lora_in_bfloat16_with_gradient_checkpointing(tmp_path):
    """The 24 GB recipe's switches at toy size: bf16 weights with autocast, float32 LoRA, checkpointed blocks."""
    from safetensors.torch import load_file

    data = write_moving_squares(tmp_path / "data")
    run = subprocess.run(  # a fresh process: accelerate's mixed-precision state is per process
        [
            sys.executable,
            "-m",
            "diffusers_magi.training.train_lora",
            *BASE_ARGS,
            "--resolution",
            "64",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "3",
            "--mixed-precision",
            "bf16",
            "--gradient-checkpointing",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [entry["loss"] for entry in _losses(tmp_path / "out")]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert lora and {tensor.dtype for tensor in lora.values()} == {torch.float32}


@pytest.mark.slow
def test_train_lora_data_parallel_on_two_cpu_processes(tmp_path):
    """Two processes (torchrun, what `accelerate launch` runs; gloo on CPU): one cache, each process its own clips,
    the LoRA gradients averaged over processes, the logged loss the mean."""
    import os

    data = write_moving_squares(tmp_path / "data")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "diffusers_magi.training.train_lora",
            *BASE_ARGS,
            "--resolution",
            "64",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--unconditional-dropout",
            "0.5",
        ],  # rows with different attention ranges: several calls
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = _losses(tmp_path / "out")
    assert [entry["step"] for entry in log] == [1, 2, 3] and [entry["samples"] for entry in log] == [4, 8, 12]
    assert len(list((tmp_path / "out" / "cache").glob("clip-*.safetensors"))) == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
