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

from collections import Counter
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


def chunk_window_sequences(num_chunks: int, window_size: int, chunk_offset: int) -> Tuple[List[int], ...]:
    """Per stage: `(chunk_start, chunk_end, stage_start, stage_end)` lists.

    At stage `s` the window holds chunks `[chunk_start[s], chunk_end[s])`; the chunks of the window are at the noise
    bands `[stage_start[s], stage_end[s])`, oldest chunk in the highest band. `chunk_offset` chunks (a clean prefix)
    are never denoised.
    """
    stages = range(chunk_offset, num_chunks + window_size - 1)
    chunk_start = [max(chunk_offset, i - window_size + 1) for i in stages]
    chunk_end = [min(num_chunks, i + 1) for i in stages]
    stage_start = [max(0, i - num_chunks + 1) for i in stages]
    stage_end = [min(window_size, i - chunk_offset + 1) for i in stages]
    return chunk_start, chunk_end, stage_start, stage_end


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
    def set_timesteps(
        self,
        num_inference_steps: int,
        num_chunks: int,
        num_prefix_chunks: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        """Build the time grid and the plan for a video of `num_chunks` latent chunks, the first
        `num_prefix_chunks` of which are clean (a video prefix) and only stored in the KV cache.

        Sets `time_grid`, `sigmas`, `timesteps` (the grid without its last point), `step_intervals` and `plan`.
        """
        self._check_step_count(num_inference_steps)
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
        if not 0 <= num_prefix_chunks < num_chunks:
            raise ValueError(
                f"num_prefix_chunks must be in [0, num_chunks) = [0, {num_chunks}), got {num_prefix_chunks}: at least "
                "one chunk must be generated."
            )
        self.num_inference_steps = num_inference_steps
        self.time_grid = self.time_grid_for(num_inference_steps, device)
        self.sigmas = 1.0 - self.time_grid
        self.timesteps = self.time_grid[:-1]
        self.step_intervals = self.step_intervals_for(num_inference_steps, device)
        self.plan = self._build_plan(num_inference_steps, num_chunks, num_prefix_chunks)

    def _check_step_count(self, num_inference_steps: int) -> None:
        window, bands = self.config.window_size, len(self.config.noise2clean_kvrange)
        if num_inference_steps < 1 or num_inference_steps % window or (bands and num_inference_steps % bands):
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) must be a positive multiple of window_size ({window})"
                + (f" and of the number of noise bands in noise2clean_kvrange ({bands})" if bands else "")
                + f"; for example {window * max(bands, 1) * 2}."
            )

    def _attention_reach(self, denoise_step: int, num_inference_steps: int) -> Optional[int]:
        """Chunks (itself included) a chunk at `denoise_step` attends to; `None` = all earlier chunks."""
        bands = list(self.config.noise2clean_kvrange)
        clean_reach = self.config.clean_chunk_kvrange
        if clean_reach == -1:
            clean_reach = bands[-1] if bands else None
        if denoise_step == num_inference_steps:
            return clean_reach
        if not bands:
            return None
        return bands[denoise_step // (num_inference_steps // len(bands))]

    def _attention_start(self, chunk: int, reach: Optional[int]) -> int:
        return 0 if reach is None else max(0, chunk + 1 - reach)

    def _build_plan(self, num_steps: int, num_chunks: int, num_prefix_chunks: int) -> List[MagiModelCall]:
        steps_per_stage = num_steps // self.config.window_size
        starts, ends, stage_starts, stage_ends = chunk_window_sequences(
            num_chunks, self.config.window_size, num_prefix_chunks
        )
        calls = []
        if num_prefix_chunks:
            prefix_reach = self._attention_reach(num_steps, num_steps)
            if prefix_reach is None:
                prefix_reach = 8
            calls.append(
                dict(
                    first_chunk=0,
                    num_clean_chunks=num_prefix_chunks,
                    time_indices=(),
                    attention_starts=tuple(self._attention_start(c, prefix_reach) for c in range(num_prefix_chunks)),
                    step_in_stage=0,
                    finished_chunk=None,
                )
            )
        denoise_count = Counter()
        for step in range(steps_per_stage * (num_chunks + self.config.window_size - 1 - num_prefix_chunks)):
            stage, step_in_stage = divmod(step, steps_per_stage)
            chunk_start, chunk_end = starts[stage], ends[stage]
            time_indices = [band * steps_per_stage + step_in_stage for band in range(stage_starts[stage], stage_ends[stage])]
            time_indices.reverse()  # the oldest chunk is the least noisy
            rerun_clean_chunk = chunk_start > num_prefix_chunks and step_in_stage == 0
            first_chunk = chunk_start - 1 if rerun_clean_chunk else chunk_start
            denoise_steps = ([num_steps] if rerun_clean_chunk else []) + time_indices
            attention_starts = tuple(
                self._attention_start(first_chunk + offset, self._attention_reach(denoise_step, num_steps))
                for offset, denoise_step in enumerate(denoise_steps)
            )
            for chunk in range(chunk_start, chunk_end):
                denoise_count[chunk] += 1
            calls.append(
                dict(
                    first_chunk=first_chunk,
                    num_clean_chunks=int(rerun_clean_chunk),
                    time_indices=tuple(time_indices),
                    attention_starts=attention_starts,
                    step_in_stage=step_in_stage,
                    finished_chunk=chunk_start if denoise_count[chunk_start] == num_steps else None,
                )
            )

        # After call i, chunks before the earliest chunk any later call attends to can leave the KV cache.
        plan, forget_before = [], num_chunks
        for index in reversed(range(len(calls))):
            plan.append(MagiModelCall(index=index, forget_chunks_before=forget_before, **calls[index]))
            forget_before = min(forget_before, *calls[index]["attention_starts"])
        return plan[::-1]

    # ----------------------------------------------------------------------------------------------------------------
    # Per-call quantities
    # ----------------------------------------------------------------------------------------------------------------
    def call_timesteps(self, call: MagiModelCall) -> torch.Tensor:
        """Time of every chunk of the window of `call`, `(num_chunks,)` float32: `clean_t` for clean chunks."""
        clean = torch.ones(call.num_clean_chunks, device=self.time_grid.device) * self.config.clean_t
        return torch.cat([clean, self.time_grid[list(call.time_indices)]])

    def shortcut_step_size(self, call: MagiModelCall) -> float:
        """Step size fed to the step-size embedding of distilled checkpoints: `steps / 2`, or for the 12-step
        shortcut grid `8 / interval` of the call's position in its stage."""
        if self.num_inference_steps == 12:
            return 4 / float(self.step_intervals[call.step_in_stage]) * 2
        return self.num_inference_steps / 4 * 2

    def step(
        self,
        model_output: torch.Tensor,
        call: MagiModelCall,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[MagiChunkSchedulerOutput, Tuple[torch.Tensor]]:
        """Euler step of the denoised chunks of `call`, each from its time to the next grid point.

        Args:
            model_output (`torch.Tensor` of shape `(batch, channels, denoised_chunks * chunk_width, H, W)`): velocity.
            call (`MagiModelCall`): the plan entry that produced it.
            sample (`torch.Tensor`, same shape): the denoised chunks before the step.
        """
        num_chunks = len(call.time_indices)
        indices = torch.tensor(call.time_indices, device=self.time_grid.device)
        delta = self.time_grid[indices + 1] - self.time_grid[indices]
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
