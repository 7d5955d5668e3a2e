"""`MagiChunkScheduler`: MAGI-1's chunk-wise autoregressive flow-matching schedule.

A video is a sequence of latent chunks (`chunk_width` latent frames each). The step budget is split into
`window_size` stages; a chunk enters the sliding window as noise, spends one stage in each noise band and leaves
clean, so up to `window_size` chunks are denoised together, each at its own noise level. When a chunk becomes clean
it is run once more at time `clean_t` so its keys/values enter the KV cache, and later chunks attend to it there.

`set_timesteps` builds the time grid and the *plan*: an ordered list of `MagiModelCall`s, plain data that says, for
every transformer call, which chunks are in the window, each chunk's time, which earlier chunks each chunk attends
to, which chunk becomes final, and which cached chunks can be forgotten. `step` moves the chunks of a call along
their own times with an Euler step.

Time runs from 0 (noise) to 1 (clean), as in MAGI-1; `sigmas = 1 - time_grid` gives Diffusers' convention. The
model output expected by `step` is the velocity `dx/dt` that `MagiTransformer3DModel` returns.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

TIME_SCHEDULES = ("sd3", "square", "piecewise", "identity")
SHORTCUT_MODES = ("8,16,16", "16,16,8")


@dataclass(frozen=True)
class MagiModelCall:
    """One transformer call of the chunk-wise sampler (chunks are numbered from the start of the video).

    Attributes:
        index (`int`): position in the plan.
        first_chunk (`int`): first chunk of the window.
        num_clean_chunks (`int`): leading chunks of the window that are already clean; they run at `clean_t` only to
            write their keys/values to the KV cache (a chunk that just finished, or the chunks of a video prefix).
        time_indices (`Tuple[int, ...]`): for each denoised chunk (those after the clean ones), the index of its
            current time in the time grid; the Euler step takes it to the next grid point.
        attention_starts (`Tuple[int, ...]`): for each chunk of the window, the earliest chunk it attends to.
        step_in_stage (`int`): index of the call within its stage (selects the shortcut step interval).
        finished_chunk (`int` or `None`): chunk that is final after this call's Euler step.
        forget_chunks_before (`int`): after this call no later call attends to chunks before this one.
    """

    index: int
    first_chunk: int
    num_clean_chunks: int
    time_indices: Tuple[int, ...]
    attention_starts: Tuple[int, ...]
    step_in_stage: int
    finished_chunk: Optional[int]
    forget_chunks_before: int

    @property
    def num_chunks(self) -> int:
        """Chunks in the window (clean and denoised)."""
        return len(self.attention_starts)

    @property
    def denoised_chunks(self) -> range:
        return range(self.first_chunk + self.num_clean_chunks, self.first_chunk + self.num_chunks)

    @property
    def is_prefix_call(self) -> bool:
        """The call only stores clean prefix chunks in the cache; nothing is denoised."""
        return not self.time_indices


@dataclass
class MagiChunkSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor` of shape `(batch, channels, denoised_chunks * chunk_width, height, width)`):
            the denoised chunks of the call after the Euler step.
    """

    prev_sample: torch.Tensor


def stage_window(stage: int, num_chunks: Optional[int], window_size: int, chunk_offset: int) -> Tuple[int, int, int, int]:
    """`(chunk_start, chunk_end, stage_start, stage_end)` of stage `stage` (counted from `chunk_offset`).

    At that stage the window holds chunks `[chunk_start, chunk_end)`; they are at the noise bands
    `[stage_start, stage_end)`, oldest chunk in the highest band. `chunk_offset` chunks (a clean prefix) are never
    denoised. `num_chunks=None`: an open-ended video (the window never drains).
    """
    chunk_start = max(chunk_offset, stage - window_size + 1)
    chunk_end = stage + 1 if num_chunks is None else min(num_chunks, stage + 1)
    stage_start = 0 if num_chunks is None else max(0, stage - num_chunks + 1)
    stage_end = min(window_size, stage - chunk_offset + 1)
    return chunk_start, chunk_end, stage_start, stage_end


def chunk_window_sequences(num_chunks: int, window_size: int, chunk_offset: int) -> Tuple[List[int], ...]:
    """`stage_window` of every stage of a video of `num_chunks` chunks, as four lists (chunk_start, chunk_end,
    stage_start, stage_end)."""
    stages = [stage_window(i, num_chunks, window_size, chunk_offset) for i in range(chunk_offset, num_chunks + window_size - 1)]
    return tuple(list(column) for column in zip(*stages)) if stages else ([], [], [], [])


class MagiChunkScheduler(SchedulerMixin, ConfigMixin):
    """Chunk-wise flow-matching scheduler of MAGI-1 (time grid, chunk plan, per-chunk Euler update).

    Args:
        chunk_width (`int`, defaults to 6): latent frames per chunk (24 video frames).
        window_size (`int`, defaults to 4): chunks denoised together; the step budget is split into this many stages.
        noise2clean_kvrange (`Sequence[int]`, defaults to `(5, 4, 3, 2)`): how many chunks (itself included) a chunk
            attends to, per noise band from noisiest to cleanest (the step budget is split into `len(...)` bands).
            Empty: every chunk attends to all earlier chunks.
        clean_chunk_kvrange (`int`, defaults to 1): chunks a clean chunk attends to when its keys/values are stored
            (1: only itself); -1 uses the last entry of `noise2clean_kvrange`.
        clean_t (`float`, defaults to 0.9999): time at which clean chunks are run to store their keys/values.
        shift (`float`, defaults to 3.0): shift of the `"sd3"` time schedule.
        shortcut_mode (`str`, defaults to `"8,16,16"`): distilled checkpoints: uneven 12-step grid and step intervals
            (`"8,16,16"` or `"16,16,8"`).
        time_schedule (`str`, defaults to `"sd3"`): `"sd3"` (square, then shift; what MAGI-1 samples with), `"square"`,
            `"piecewise"` or `"identity"`.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        chunk_width: int = 6,
        window_size: int = 4,
        noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
        clean_chunk_kvrange: int = 1,
        clean_t: float = 0.9999,
        shift: float = 3.0,
        shortcut_mode: str = "8,16,16",
        time_schedule: str = "sd3",
    ):
        if shortcut_mode not in SHORTCUT_MODES:
            raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}.")
        if time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"time_schedule must be one of {TIME_SCHEDULES}, got {time_schedule!r}.")
        if shift < 1.0:
            raise ValueError(f"shift must be >= 1, got {shift}.")
        if chunk_width < 1 or window_size < 1:
            raise ValueError(f"chunk_width and window_size must be positive, got {chunk_width}, {window_size}.")
        # Set only by the stateful `set_timesteps`; generations use their own `make_plan` objects.
        self.time_grid: Optional[torch.Tensor] = None
        self.step_intervals: Optional[torch.Tensor] = None
        self.plan: List[MagiModelCall] = []
        self.num_inference_steps: Optional[int] = None

    # ----------------------------------------------------------------------------------------------------------------
    # Time grid
    # ----------------------------------------------------------------------------------------------------------------
    def time_grid_for(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The `num_inference_steps + 1` times (float32, 0 = noise) every chunk walks through."""
        if num_inference_steps == 12:
            # Shortcut-distilled grid: four segments of uneven steps.
            base = torch.linspace(0, 1, 5, device=device) / 4
            offsets = torch.linspace(0, 1, 5, device=device)
            base = base[:3] if self.config.shortcut_mode == "16,16,8" else torch.cat([base[:1], base[2:4]])
            grid = torch.cat([base + offset for offset in offsets])[: num_inference_steps + 1]
        else:
            grid = torch.linspace(0, 1, num_inference_steps + 1, device=device)

        schedule = self.config.time_schedule
        if schedule == "sd3":
            grid = grid**2
            inverse_shift = 1.0 / self.config.shift
            grid = inverse_shift * grid / (1 + (inverse_shift - 1) * grid)
        elif schedule == "square":
            grid = grid**2
        elif schedule == "piecewise":
            low = grid < 0.875
            grid = torch.where(low, grid * (0.5 / 0.875), 0.5 + (grid - 0.875) * (0.5 / (1 - 0.875)))
        return grid

    def step_intervals_for(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Shortcut step intervals: `[2, 1, 1]` (or `[1, 1, 2]` for `"16,16,8"`) repeated when the step count is a
        multiple of 3, else ones."""
        if num_inference_steps % 3:
            return torch.ones(num_inference_steps, device=device)
        pattern = [1, 1, 2] if self.config.shortcut_mode == "16,16,8" else [2, 1, 1]
        return torch.tensor(pattern * (num_inference_steps // 3), device=device)

    # ----------------------------------------------------------------------------------------------------------------
    # Plan
    # ----------------------------------------------------------------------------------------------------------------
    def make_plan(
        self,
        num_inference_steps: int,
        num_chunks: Optional[int] = None,
        num_prefix_chunks: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> "MagiChunkPlan":
        """The time grid and the plan of one generation, as a new immutable object (the scheduler keeps no state,
        so any number of generations can share it).

        Args:
            num_inference_steps (`int`): steps every chunk takes.
            num_chunks (`int`, *optional*): latent chunks of the whole video; `None` for an open-ended video whose
                plan goes on as long as it is read.
            num_prefix_chunks (`int`, defaults to 0): leading chunks that are clean (a video prefix) and only stored
                in the KV cache.
        """
        self._check_step_count(num_inference_steps)
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
        if num_prefix_chunks < 0 or (num_chunks is not None and num_prefix_chunks >= num_chunks):
            raise ValueError(
                f"num_prefix_chunks must be in [0, num_chunks) = [0, {num_chunks}), got {num_prefix_chunks}: at least "
                "one chunk must be generated."
            )
        return MagiChunkPlan(self, num_inference_steps, num_chunks, num_prefix_chunks, device)

    def set_timesteps(
        self,
        num_inference_steps: int,
        num_chunks: int,
        num_prefix_chunks: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        """Diffusers-style stateful form of `make_plan` (the pipelines do not use it): stores the plan of a video of
        `num_chunks` chunks and sets `time_grid`, `sigmas`, `timesteps` (the grid without its last point),
        `step_intervals` and `plan` (a list of `MagiModelCall`s) on the scheduler."""
        if num_chunks is None:
            raise ValueError("set_timesteps needs num_chunks; use make_plan(num_chunks=None) for an open-ended plan.")
        self._plan = self.make_plan(num_inference_steps, num_chunks, num_prefix_chunks, device)
        self.num_inference_steps = num_inference_steps
        self.time_grid = self._plan.time_grid
        self.sigmas = 1.0 - self.time_grid
        self.timesteps = self.time_grid[:-1]
        self.step_intervals = self._plan.step_intervals
        self.plan = list(self._plan)

    def _check_step_count(self, num_inference_steps: int) -> None:
        window, bands = self.config.window_size, len(self.config.noise2clean_kvrange)
        if num_inference_steps < 1 or num_inference_steps % window or (bands and num_inference_steps % bands):
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) must be a positive multiple of window_size ({window})"
                + (f" and of the number of noise bands in noise2clean_kvrange ({bands})" if bands else "")
                + f"; for example {window * max(bands, 1) * 2}."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Per-call quantities (of the plan stored by `set_timesteps`, or of the `plan` given)
    # ----------------------------------------------------------------------------------------------------------------
    def _stored_plan(self, plan: Optional["MagiChunkPlan"]) -> "MagiChunkPlan":
        plan = plan if plan is not None else getattr(self, "_plan", None)
        if plan is None:
            raise ValueError("Pass the `plan` (from `make_plan`), or call `set_timesteps` first.")
        return plan

    def call_timesteps(self, call: MagiModelCall, plan: Optional["MagiChunkPlan"] = None) -> torch.Tensor:
        """Time of every chunk of the window of `call`, `(num_chunks,)` float32: `clean_t` for clean chunks."""
        return self._stored_plan(plan).call_timesteps(call)

    def shortcut_step_size(self, call: MagiModelCall, plan: Optional["MagiChunkPlan"] = None) -> float:
        """Step size fed to the step-size embedding of distilled checkpoints (see `MagiChunkPlan.shortcut_step_size`)."""
        return self._stored_plan(plan).shortcut_step_size(call)

    def step(
        self,
        model_output: torch.Tensor,
        call: MagiModelCall,
        sample: torch.Tensor,
        plan: Optional["MagiChunkPlan"] = None,
        return_dict: bool = True,
    ) -> Union[MagiChunkSchedulerOutput, Tuple[torch.Tensor]]:
        """Euler step of the denoised chunks of `call`, each from its time to the next grid point.

        Args:
            model_output (`torch.Tensor` of shape `(batch, channels, denoised_chunks * chunk_width, H, W)`): velocity.
            call (`MagiModelCall`): the plan entry that produced it.
            sample (`torch.Tensor`, same shape): the denoised chunks before the step.
            plan (`MagiChunkPlan`, *optional*): the plan `call` belongs to (default: the one `set_timesteps` stored).
        """
        time_grid = self._stored_plan(plan).time_grid
        num_chunks = len(call.time_indices)
        indices = torch.tensor(call.time_indices, device=time_grid.device)
        delta = time_grid[indices + 1] - time_grid[indices]
        chunks = sample.unflatten(2, (num_chunks, -1)) + model_output.unflatten(2, (num_chunks, -1)) * delta.to(
            sample.device
        ).view(1, 1, -1, 1, 1, 1)
        prev_sample = chunks.flatten(2, 3)
        if not return_dict:
            return (prev_sample,)
        return MagiChunkSchedulerOutput(prev_sample=prev_sample)

    def describe_plan(self) -> str:
        """The plan as a table (one line per call), for printing and debugging."""
        lines = [f"{'call':>4} {'window':>9} {'clean':>5} {'times':<24} {'attends from':<16} {'final':>5} {'forget<':>7}"]
        for call in self.plan:
            window = f"{call.first_chunk}-{call.first_chunk + call.num_chunks - 1}"
            times = ",".join(f"{self.time_grid[i].item():.3f}" for i in call.time_indices) or "(prefix)"
            final = "" if call.finished_chunk is None else str(call.finished_chunk)
            starts = ",".join(map(str, call.attention_starts))
            lines.append(
                f"{call.index:>4} {window:>9} {call.num_clean_chunks:>5} {times:<24} {starts:<16} {final:>5} "
                f"{call.forget_chunks_before:>7}"
            )
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.plan)


class MagiChunkPlan:
    """The time grid and the ordered transformer calls of one generation (made by `MagiChunkScheduler.make_plan`).

    Immutable and cheap to share: calls are computed on demand, so an open-ended plan (`num_chunks=None`) goes on
    for as long as it is read, and `plan[i]` of a long video costs no more memory than of a short one.

    Attributes:
        num_inference_steps (`int`), num_chunks (`int` or `None`), num_prefix_chunks (`int`).
        time_grid (`torch.Tensor` of shape `(num_inference_steps + 1,)`): times every chunk walks (0 = noise).
        step_intervals (`torch.Tensor` of shape `(num_inference_steps,)`): shortcut intervals.
    """

    def __init__(self, scheduler: MagiChunkScheduler, num_inference_steps: int, num_chunks: Optional[int], num_prefix_chunks: int, device=None):
        config = scheduler.config
        self.num_inference_steps = num_inference_steps
        self.num_chunks = num_chunks
        self.num_prefix_chunks = num_prefix_chunks
        self.window_size = config.window_size
        self.clean_t = config.clean_t
        self.time_grid = scheduler.time_grid_for(num_inference_steps, device)
        self.step_intervals = scheduler.step_intervals_for(num_inference_steps, device)
        self._steps_per_stage = num_inference_steps // config.window_size
        self._bands = list(config.noise2clean_kvrange)
        clean_reach = config.clean_chunk_kvrange
        self._clean_reach = (self._bands[-1] if self._bands else None) if clean_reach == -1 else clean_reach
        # Every call after stage `s + lookahead` attends from chunks beyond any call of stage `s + 1`, so the
        # earliest chunk a later call reads (`forget_chunks_before`) is known from the next `lookahead` stages.
        reaches = self._bands + [self._clean_reach]
        self._lookahead = None if None in reaches or not self._bands else self.window_size + max(reaches) + 1
        self._calls = {} if num_chunks is None else None
        if num_chunks is not None:
            self._calls = self._finite_calls()

    # -- reading ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.num_chunks is None:
            raise TypeError("An open-ended plan (num_chunks=None) has no length.")
        return len(self._calls)

    def __getitem__(self, index: int) -> MagiModelCall:
        if index < 0:
            raise IndexError("Plans are read forwards; negative indices are not supported.")
        if self.num_chunks is not None:
            return self._calls[index]
        if index not in self._calls:
            self._calls = {i: call for i, call in self._calls.items() if i >= index - 1}  # keep memory flat
            self._calls[index] = self._open_ended_call(index)
        return self._calls[index]

    def __iter__(self):
        index = 0
        while self.num_chunks is None or index < len(self._calls):
            yield self[index]
            index += 1

    def calls_until_chunk_finishes(self, start_index: int) -> int:
        """Calls from `start_index` up to and including the next one that finishes a chunk (0 past the end)."""
        index = start_index
        while self.num_chunks is None or index < len(self._calls):
            if self[index].finished_chunk is not None:
                return index - start_index + 1
            index += 1
        return 0

    # -- per-call quantities ---------------------------------------------------------------------------------------
    def call_timesteps(self, call: MagiModelCall) -> torch.Tensor:
        """Time of every chunk of the window of `call`, `(num_chunks,)` float32: `clean_t` for clean chunks."""
        clean = torch.ones(call.num_clean_chunks, device=self.time_grid.device) * self.clean_t
        return torch.cat([clean, self.time_grid[list(call.time_indices)]])

    def shortcut_step_size(self, call: MagiModelCall) -> float:
        """Step size fed to the step-size embedding of distilled checkpoints: `steps / 2`, or for the 12-step
        shortcut grid `8 / interval` of the call's position in its stage."""
        if self.num_inference_steps == 12:
            return 4 / float(self.step_intervals[call.step_in_stage]) * 2
        return self.num_inference_steps / 4 * 2

    # -- construction ----------------------------------------------------------------------------------------------
    def _attention_reach(self, denoise_step: int) -> Optional[int]:
        """Chunks (itself included) a chunk at `denoise_step` attends to; `None` = all earlier chunks."""
        if denoise_step == self.num_inference_steps:
            return self._clean_reach
        if not self._bands:
            return None
        return self._bands[denoise_step // (self.num_inference_steps // len(self._bands))]

    @staticmethod
    def _attention_start(chunk: int, reach: Optional[int]) -> int:
        return 0 if reach is None else max(0, chunk + 1 - reach)

    def _prefix_call(self) -> dict:
        reach = self._attention_reach(self.num_inference_steps)
        reach = 8 if reach is None else reach
        return dict(
            first_chunk=0,
            num_clean_chunks=self.num_prefix_chunks,
            time_indices=(),
            attention_starts=tuple(self._attention_start(c, reach) for c in range(self.num_prefix_chunks)),
            step_in_stage=0,
            finished_chunk=None,
        )

    def _denoising_call(self, step: int) -> dict:
        """The `step`-th denoising call (prefix call not counted). Stage `i` (counted from the first generated chunk)
        is described by `stage_window`."""
        window, offset, steps = self.window_size, self.num_prefix_chunks, self.num_inference_steps
        stage, step_in_stage = divmod(step, self._steps_per_stage)
        i = stage + offset
        chunk_start, _, band_start, band_end = stage_window(i, self.num_chunks, window, offset)
        time_indices = [band * self._steps_per_stage + step_in_stage for band in range(band_start, band_end)]
        time_indices.reverse()  # the oldest chunk is the least noisy
        rerun_clean_chunk = chunk_start > offset and step_in_stage == 0
        first_chunk = chunk_start - 1 if rerun_clean_chunk else chunk_start
        denoise_steps = ([steps] if rerun_clean_chunk else []) + time_indices
        attention_starts = tuple(
            self._attention_start(first_chunk + position, self._attention_reach(denoise_step))
            for position, denoise_step in enumerate(denoise_steps)
        )
        # A chunk spends `window` stages in the window; it is final after the last call of its last stage.
        last_call_of_stage = step_in_stage == self._steps_per_stage - 1
        finished = chunk_start if last_call_of_stage and i - window + 1 >= offset else None
        return dict(
            first_chunk=first_chunk,
            num_clean_chunks=int(rerun_clean_chunk),
            time_indices=tuple(time_indices),
            attention_starts=attention_starts,
            step_in_stage=step_in_stage,
            finished_chunk=finished,
        )

    def _raw_call(self, index: int) -> dict:
        if self.num_prefix_chunks:
            return self._prefix_call() if index == 0 else self._denoising_call(index - 1)
        return self._denoising_call(index)

    def _finite_calls(self) -> dict:
        num_stages = self.num_chunks + self.window_size - 1 - self.num_prefix_chunks
        count = self._steps_per_stage * num_stages + int(self.num_prefix_chunks > 0)
        raw = [self._raw_call(index) for index in range(count)]
        # After call i, chunks before the earliest chunk any later call attends to can leave the KV cache.
        calls, forget_before = {}, self.num_chunks
        for index in reversed(range(count)):
            calls[index] = MagiModelCall(index=index, forget_chunks_before=forget_before, **raw[index])
            forget_before = min(forget_before, *raw[index]["attention_starts"])
        return dict(sorted(calls.items()))

    def _open_ended_call(self, index: int) -> MagiModelCall:
        raw = self._raw_call(index)
        if self._lookahead is None:
            forget_before = 0  # some chunk of every later call attends to the whole past
        else:
            horizon = index + 1 + self._lookahead * self._steps_per_stage
            forget_before = min(min(self._raw_call(later)["attention_starts"]) for later in range(index + 1, horizon))
        return MagiModelCall(index=index, forget_chunks_before=forget_before, **raw)
