"""MagiChunkScheduler: the reference tables of `schedules/`, the plans of the recorded sampler runs, and properties of
every plan (hypothesis)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_magi import MagiChunkScheduler
from diffusers_magi.schedulers.scheduling_magi_chunk import chunk_window_sequences

from .reference_cases import DIT_DIR


def _tables(reference_dir):
    return json.loads((reference_dir / "dit" / "schedules" / "case.json").read_text())["tables"]


def _mode(key):
    mode = key.split("mode[")[1].rstrip("]")
    return "16,16,8" if mode == "16,16,8" else "8,16,16"  # any other mode behaves like "8,16,16"


def test_time_grids_match_the_reference(reference_dir):
    for key, table in _tables(reference_dir)["init_t"].items():
        steps = int(key.split("_")[0][1:])
        grid = MagiChunkScheduler(shortcut_mode=_mode(key)).time_grid_for(steps)
        assert grid.dtype == torch.float32
        assert torch.equal(grid, torch.tensor(table["values"], dtype=torch.float32)), key


def test_other_time_schedules_match_the_reference(reference_dir):
    for key, table in _tables(reference_dir)["init_t_other_schedules"].items():
        steps, schedule = key.split("_", 1)
        schedule = json.loads(schedule)
        scheduler = MagiChunkScheduler(time_schedule=schedule["tSchedulerFunc"], shift=schedule.get("shift", 3.0))
        grid = scheduler.time_grid_for(int(steps[1:]))
        assert torch.equal(grid, torch.tensor(table, dtype=torch.float32)), key


def test_step_intervals_match_the_reference(reference_dir):
    for key, table in _tables(reference_dir)["init_intervel"].items():
        steps = int(key.split("_")[0][1:])
        intervals = MagiChunkScheduler(shortcut_mode=_mode(key)).step_intervals_for(steps)
        assert intervals.tolist() == table["values"], key


def test_chunk_window_sequences_match_the_reference(reference_dir):
    for key, table in _tables(reference_dir)["generate_sequences"].items():
        chunks, window, offset = (int(part.lstrip("chunkswindowoffset")) for part in key.split("_"))
        starts, ends, stage_starts, stage_ends = chunk_window_sequences(chunks, window, offset)
        assert starts == table["clip_start"] and ends == table["clip_end"], key
        assert stage_starts == table["t_start"] and stage_ends == table["t_end"], key


@pytest.mark.parametrize(
    "case",
    # image-to-video is in the full set only
    [case for case in ("e_sampler_t2v_base", "e_sampler_i2v_base", "e_sampler_t2v_distill_fp8") if (DIT_DIR / case).is_dir()],
)
def test_plan_matches_the_recorded_sampler_calls(reference_dir, case):
    """Every dispatcher call of a recorded run: window, clean re-run, per-chunk times, key ranges, step interval."""
    folder = reference_dir / "dit" / case
    description = json.loads((folder / "case.json").read_text())
    runtime = json.loads((folder / "config.json").read_text())["runtime_config"]
    scheduler = MagiChunkScheduler(
        chunk_width=runtime["chunk_width"],
        window_size=runtime["window_size"],
        noise2clean_kvrange=runtime["noise2clean_kvrange"],
        clean_chunk_kvrange=runtime["clean_chunk_kvrange"],
        clean_t=runtime["clean_t"],
    )
    info = description["inference_input"]
    scheduler.set_timesteps(runtime["num_steps"], info["chunk_num"], num_prefix_chunks=0)
    assert len(scheduler.plan) == len(description["trace"])
    tokens = runtime["chunk_width"] * (runtime["video_size_h"] // 16) * (runtime["video_size_w"] // 16)
    yielded = [step["yielded_chunk_index"] for step in description["steps"]]
    for call, trace in zip(scheduler.plan, description["trace"]):
        context, kwargs = trace["sampler_context"], trace["kwargs"]
        assert call.first_chunk == kwargs["slice_point"]
        assert call.num_chunks == kwargs["denoising_range_num"]
        assert call.num_clean_chunks == int(kwargs["fwd_extra_1st_chunk"])
        assert list(call.denoised_chunks) == list(range(context["chunk_start"], context["chunk_end"]))
        assert scheduler.call_timesteps(call).tolist() == torch.tensor(trace["timestep_row0"]).tolist()
        starts = [start // tokens for start, _ in trace["kv_range"]]
        ends = [end // tokens for _, end in trace["kv_range"]]
        assert list(call.attention_starts) == starts
        assert ends == [call.first_chunk + i + 1 for i in range(call.num_chunks)]
        assert float(scheduler.step_intervals[call.step_in_stage]) == kwargs["distill_interval"]["tensor0d"]
        assert call.finished_chunk == yielded[call.index]


def test_euler_step_moves_each_chunk_along_its_own_times():
    scheduler = MagiChunkScheduler()
    scheduler.set_timesteps(8, num_chunks=4)
    call = scheduler.plan[6]  # 4 chunks at 4 different times
    grid = scheduler.time_grid
    sample = torch.randn(2, 16, 24, 4, 4)
    velocity = torch.randn(2, 16, 24, 4, 4)
    stepped = scheduler.step(velocity, call, sample).prev_sample
    for chunk, index in enumerate(call.time_indices):
        frames = slice(6 * chunk, 6 * chunk + 6)
        expected = sample[:, :, frames] + velocity[:, :, frames] * (grid[index + 1] - grid[index])
        assert torch.equal(stepped[:, :, frames], expected)
    assert torch.allclose(scheduler.sigmas, 1 - grid)


def test_shortcut_step_sizes():
    scheduler = MagiChunkScheduler()
    scheduler.set_timesteps(12, num_chunks=2)
    assert {scheduler.shortcut_step_size(call) for call in scheduler.plan} == {4.0, 8.0}
    assert [scheduler.shortcut_step_size(call) for call in scheduler.plan[:3]] == [4.0, 8.0, 8.0]
    scheduler = MagiChunkScheduler(shortcut_mode="16,16,8")
    scheduler.set_timesteps(12, num_chunks=2)
    assert [scheduler.shortcut_step_size(call) for call in scheduler.plan[:3]] == [8.0, 8.0, 4.0]
    scheduler.set_timesteps(16, num_chunks=2)
    assert {scheduler.shortcut_step_size(call) for call in scheduler.plan} == {8.0}


@settings(max_examples=150, deadline=None)
@given(
    num_chunks=st.integers(1, 7),
    window_size=st.integers(1, 4),
    steps_per_stage=st.integers(1, 3),
    prefix=st.integers(0, 3),
    reach=st.sampled_from([(5, 4, 3, 2), (3,), (2, 1), ()]),
    clean_reach=st.sampled_from([1, 2, -1]),
)
def test_plan_properties(num_chunks, window_size, steps_per_stage, prefix, reach, clean_reach):
    prefix = min(prefix, num_chunks - 1)
    bands = len(reach) or 1
    steps = window_size * bands * steps_per_stage
    scheduler = MagiChunkScheduler(
        window_size=window_size, noise2clean_kvrange=list(reach), clean_chunk_kvrange=clean_reach
    )
    scheduler.set_timesteps(steps, num_chunks, num_prefix_chunks=prefix)
    plan = scheduler.plan
    steps_taken = {chunk: [] for chunk in range(num_chunks)}
    finished, cached = [], set(range(prefix)) if prefix else set()
    if prefix:
        assert plan[0].is_prefix_call and plan[0].num_clean_chunks == prefix
    for call in plan:
        window = range(call.first_chunk, call.first_chunk + call.num_chunks)
        # Nothing attends to the future, and cached chunks are exactly the clean ones that are still needed.
        for offset, start in enumerate(call.attention_starts):
            assert 0 <= start <= window[offset]
        needed = set(range(min(call.attention_starts), call.first_chunk))
        assert needed <= cached
        for chunk in range(call.first_chunk, call.first_chunk + call.num_clean_chunks):
            assert chunk in finished or chunk < prefix  # re-run chunks are clean
            cached.add(chunk)
        for chunk, index in zip(call.denoised_chunks, call.time_indices):
            steps_taken[chunk].append(index)
        if call.finished_chunk is not None:
            finished.append(call.finished_chunk)
        cached = {chunk for chunk in cached if chunk >= call.forget_chunks_before}
        assert len(cached) <= max(max(reach, default=num_chunks), clean_reach, prefix)
        assert call.is_prefix_call or call.num_chunks <= window_size + 1
    # Every generated chunk walks the whole grid exactly once, in order, and is final exactly once, in order.
    for chunk in range(prefix, num_chunks):
        assert steps_taken[chunk] == list(range(steps))
    assert finished == list(range(prefix, num_chunks))
    for chunk in range(prefix):
        assert steps_taken[chunk] == []


def test_step_count_errors():
    scheduler = MagiChunkScheduler()
    with pytest.raises(ValueError, match="multiple of window_size"):
        scheduler.set_timesteps(10, num_chunks=2)
    with pytest.raises(ValueError, match="noise bands"):
        MagiChunkScheduler(window_size=2).set_timesteps(6, num_chunks=2)
    with pytest.raises(ValueError, match="num_prefix_chunks"):
        scheduler.set_timesteps(8, num_chunks=2, num_prefix_chunks=2)
    with pytest.raises(ValueError, match="shortcut_mode"):
        MagiChunkScheduler(shortcut_mode="4,4")


def test_scheduler_config_round_trip(tmp_path):
    scheduler = MagiChunkScheduler(window_size=3, noise2clean_kvrange=[4, 3, 2], shortcut_mode="16,16,8")
    scheduler.save_pretrained(tmp_path)
    loaded = MagiChunkScheduler.from_pretrained(tmp_path)
    assert loaded.config.window_size == 3 and list(loaded.config.noise2clean_kvrange) == [4, 3, 2]
    scheduler.set_timesteps(12, 5)
    loaded.set_timesteps(12, 5)
    assert loaded.plan == scheduler.plan
    assert "window" in scheduler.describe_plan()


@settings(max_examples=100, deadline=None)
@given(
    window_size=st.integers(1, 4),
    steps_per_stage=st.integers(1, 3),
    prefix=st.integers(0, 3),
    reach=st.sampled_from([(5, 4, 3, 2), (3,), (2, 1), (2, 5), ()]),
    clean_reach=st.sampled_from([1, 2, -1]),
)
def test_open_ended_plan_is_the_start_of_every_long_enough_plan(window_size, steps_per_stage, prefix, reach, clean_reach):
    """An open-ended plan (`num_chunks=None`) makes exactly the calls of a fixed-length plan until that plan's window
    starts to drain, `forget_chunks_before` included, so a session without `num_frames` equals a long video."""
    steps = window_size * (len(reach) or 1) * steps_per_stage
    scheduler = MagiChunkScheduler(window_size=window_size, noise2clean_kvrange=list(reach), clean_chunk_kvrange=clean_reach)
    open_ended = scheduler.make_plan(steps, num_chunks=None, num_prefix_chunks=prefix)
    with pytest.raises(TypeError):
        len(open_ended)
    long_enough = scheduler.make_plan(steps, num_chunks=prefix + 30, num_prefix_chunks=prefix)
    compared = int(prefix > 0) + steps_per_stage * 8  # eight stages, far from the drain (and its lookahead)
    assert [open_ended[index] for index in range(compared)] == list(long_enough)[:compared]
    # Calls are computed on demand: reading far ahead keeps only a couple of them.
    far = open_ended[5000]
    assert far.index == 5000 and len(open_ended._calls) <= 2


def test_plans_are_independent_of_the_scheduler_state():
    scheduler = MagiChunkScheduler()
    plan = scheduler.make_plan(8, num_chunks=3)
    scheduler.set_timesteps(16, num_chunks=5)
    assert plan.num_inference_steps == 8 and len(plan) == 12 and torch.equal(plan.time_grid, scheduler.time_grid_for(8))
    sample, velocity = torch.randn(1, 16, 12, 2, 2), torch.randn(1, 16, 12, 2, 2)
    call = plan[2]
    stepped = scheduler.step(velocity, call, sample, plan=plan).prev_sample
    other = MagiChunkScheduler()
    other.set_timesteps(8, num_chunks=3)
    assert torch.equal(stepped, other.step(velocity, other.plan[2], sample).prev_sample)
