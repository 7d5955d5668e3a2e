"""`MagiSession`: the whole state of one MAGI-1 generation, which a person can steer, save, resume and branch.

A pipeline is read-only while it generates; everything that changes during one generation lives in its session:
the plan position, the chunks in flight, the KV cache, the random generator, the captions (and prompt switches) and
the interrupt flag. `pipe(...)` and `pipe.stream(...)` run a session to its end; `pipe.start_session(...)` hands it
to the caller, who asks for chunks one at a time (`next_chunk`, `chunks`), switches the prompt (`set_prompt`),
saves it (`save`, resumed by `pipe.resume_session`), or branches it (`fork`). Two sessions never see each other,
so one pipeline can serve several interleaved or concurrent generations.

Reading order: `next_chunk` -> `_run_call` (one planned transformer call: chunks entering as noise, window captions,
guidance, Euler step, cache pruning) -> the pipeline's `_postprocess_chunk` (decode).
"""

import contextvars
import copy
import hashlib
import itertools
import json
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..models.attention_magi import compact_attention_starts
from ..models.cache_hooks_magi import copy_step_cache_contexts, forget_step_cache_contexts, window_cache_context
from ..models.kv_cache_magi import MagiKVCache
from ..models.transformer_magi import MagiLearnedTokens
from ..schedulers.scheduling_magi_chunk import MagiChunkPlan
from .guidance_magi import MagiGuidance
from .input_checks_magi import check_callback_outputs
from .pipeline_output import MagiChunkOutput
from .text_conditioning_magi import MAX_DURATION_TOKEN, chunk_caption_rows, cut_caption_padding

logger = logging.get_logger(__name__)

SESSION_FORMAT = "diffusers-magi-session"
SESSION_FORMAT_VERSION = 1

# The session whose planned call is running in this thread / generator step (what `pipe.interrupt` refers to).
_ACTIVE_SESSION: contextvars.ContextVar = contextvars.ContextVar("active_magi_session", default=None)
# Numbers the sessions of this process: the names of their step-cache contexts (`transformer.enable_cache`).
_SESSION_NUMBERS = itertools.count()


class MagiSessionInterrupted(RuntimeError):
    """Raised by `MagiSession.next_chunk` when the session was interrupted; `session.resume()` lets it go on."""


@dataclass
class MagiSessionSettings:
    """What a session generates, fixed when it starts (JSON-serialisable; saved with the session).

    Args:
        batch_size (`int`): videos generated together.
        num_chunks (`int` or `None`): latent chunks of the whole video (prefix included); `None`: open-ended.
        num_prefix_frames (`int`): clean latent frames the video starts from (image or video prefix).
        latent_size (`Tuple[int, int]`): latent height and width.
        num_inference_steps (`int`): steps every chunk takes.
        guidance (`dict`): the fields of `MagiGuidance`.
        special_tokens (`Tuple[str, ...]`): learned tokens prepended to every chunk's caption.
        num_videos_per_prompt (`int`): videos per prompt (the batch is `videos * num_videos_per_prompt`).
        output_type (`str`): how chunks are handed out (`"np"`, `"pil"`, `"pt"`, `"latent"`).
        kv_cache_device (`str`, *optional*): where the KV cache lives between calls.
        attention_kwargs (`dict`, *optional*): passed to the transformer.
        decode_overlap (`bool`): `chunks()` decodes chunk `k` while chunk `k + 1` is denoised.
    """

    batch_size: int
    num_chunks: Optional[int]
    num_prefix_frames: int
    latent_size: Tuple[int, int]
    num_inference_steps: int
    guidance: Dict[str, Any]
    special_tokens: Tuple[str, ...]
    num_videos_per_prompt: int
    output_type: str
    kv_cache_device: Optional[str] = None
    attention_kwargs: Optional[Dict[str, Any]] = None
    decode_overlap: bool = False


@dataclass
class MagiSessionProgress:
    """Where a session stands.

    Args:
        chunks_done (`int`): generated chunks handed out so far.
        chunks_in_flight (`int`): generated chunks that have started denoising but are not final yet.
        calls_done (`int`): planned transformer calls run so far.
        seconds_per_chunk (`float`, *optional*): mean wall time between finished chunks in this process (`None`
            before the first chunk).
        finished (`bool`): the video is complete (never for an open-ended session).
        interrupted (`bool`): `interrupt()` was called and `resume()` was not.
    """

    chunks_done: int
    chunks_in_flight: int
    calls_done: int
    seconds_per_chunk: Optional[float]
    finished: bool
    interrupted: bool


class MagiSession:
    r"""
    One MAGI-1 generation, chunk by chunk. Made by `pipe.start_session(...)` (or `pipe.resume_session(path)`,
    `session.fork()`); `pipe(...)` and `pipe.stream(...)` run one internally.

    Example:

    ```py
    >>> session = pipe.start_session(prompt="a red fox runs through snow", height=480, width=480)
    >>> first = session.next_chunk()  # MagiChunkOutput: chunk_index 0, 24 frames
    >>> switch_at = session.set_prompt("the fox jumps into a frozen lake")  # from the first chunk not yet started
    >>> for chunk in session.chunks(3):
    ...     frames = chunk.frames
    >>> session.save("fox.safetensors")  # later, in any process: pipe.resume_session("fox.safetensors")
    >>> branch = session.fork()  # an independent copy; steer it elsewhere
    ```

    Memory stays flat in the number of chunks: only the chunks in flight, the cached chunks some later call attends
    to, and one caption per distinct prompt are held.
    """

    def __init__(
        self,
        pipeline,
        settings: MagiSessionSettings,
        captions: Tuple[torch.Tensor, torch.Tensor],
        caption_switches: List[Tuple[int, torch.Tensor]],
        negative: Tuple[torch.Tensor, torch.Tensor],
        prefix_latents: Optional[torch.Tensor],
        generators: List[torch.Generator],
        latents: Optional[torch.Tensor] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Optional[Sequence[str]] = None,
    ):
        self.pipeline = pipeline
        self.settings = settings
        self.guidance = MagiGuidance(**settings.guidance)
        self.device = pipeline._execution_device
        self.callback_on_step_end = callback_on_step_end
        self.callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        # Conditioning: unique caption embeddings `(K, L, C)` / masks `(K, L)`, and the switches that say from which
        # generated chunk on each video uses which caption: `[(first_chunk, caption index per video (B,)), ...]`.
        self._caption_embeds, self._caption_masks = captions
        self._caption_switches = list(caption_switches)
        self._negative = negative  # (B, L, C), (B, L)
        self._prefix_latents = prefix_latents  # (B, C, prefix_frames, h, w) or None
        self._latents = latents  # optional initial noise of the whole video
        self._generators = generators
        # Loop state.
        self._learned_tokens: MagiLearnedTokens = pipeline.transformer.caption_tokens()
        self._model_fingerprint = _model_fingerprint(pipeline, self._learned_tokens)
        self.plan: MagiChunkPlan = pipeline.scheduler.make_plan(
            settings.num_inference_steps, settings.num_chunks, self.num_prefix_chunks, device=self.device
        )
        self._cache = MagiKVCache(pipeline.transformer.config.num_layers, storage_device=settings.kv_cache_device)
        self._chunk_latents: Dict[int, torch.Tensor] = {
            chunk: prefix_latents[:, :, chunk * self.chunk_width : (chunk + 1) * self.chunk_width]
            for chunk in range(self.num_prefix_chunks)
        }
        self._cached_latents: Dict[int, torch.Tensor] = {}  # clean latents of the cached chunks (for `recache`)
        self._recache_rows: Optional[torch.Tensor] = None  # caption rows (B,) clean passes are re-run with
        self._call_index = 0
        self._next_new_chunk = self.num_prefix_chunks
        self._chunks_done = 0
        self._interrupted = False
        self._chunk_times: List[float] = []
        self._last_chunk_time: Optional[float] = None
        self._lock = threading.RLock()
        self._name_step_cache_contexts()

    def _name_step_cache_contexts(self) -> None:
        """Give this session step-cache contexts of its own, `session<n>/chunk<first chunk of the window>/...`,
        forgotten when it is garbage-collected (a session that ends forgets them at once)."""
        self._step_cache_name = f"session{next(_SESSION_NUMBERS)}"
        self._step_cache_chunk: Optional[int] = None  # first chunk of the window whose states are kept
        weakref.finalize(self, forget_step_cache_contexts, self.pipeline.transformer, self._step_cache_name + "/")

    # ----------------------------------------------------------------------------------------------------------------
    # Properties
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def chunk_width(self) -> int:
        return self.pipeline.chunk_width

    @property
    def num_prefix_chunks(self) -> int:
        return self.settings.num_prefix_frames // self.chunk_width

    @property
    def num_generated_chunks(self) -> Optional[int]:
        """Chunks this session generates in all (`None` when open-ended)."""
        if self.settings.num_chunks is None:
            return None
        return self.settings.num_chunks - self.num_prefix_chunks

    @property
    def finished(self) -> bool:
        return self.num_generated_chunks is not None and self._chunks_done >= self.num_generated_chunks

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    @property
    def progress(self) -> MagiSessionProgress:
        started = self._next_new_chunk - self.num_prefix_chunks
        times = self._chunk_times
        return MagiSessionProgress(
            chunks_done=self._chunks_done,
            chunks_in_flight=started - self._chunks_done,
            calls_done=self._call_index,
            seconds_per_chunk=sum(times) / len(times) if times else None,
            finished=self.finished,
            interrupted=self._interrupted,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Control
    # ----------------------------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop this session at the next call boundary (thread-safe): the running `next_chunk` (and every later one,
        until `resume()`) raises `MagiSessionInterrupted`; `pipe.stream` / `pipe(...)` end with the chunks so far.
        Other sessions are not affected."""
        self._interrupted = True

    def resume(self) -> None:
        """Let an interrupted session go on; the next `next_chunk` continues exactly where it stopped."""
        self._interrupted = False

    def next_chunk(self) -> MagiChunkOutput:
        """Run the plan until the next chunk is final; return it decoded per `output_type`.

        Raises:
            `MagiSessionInterrupted`: the session was interrupted (call `resume()` to go on).
            `ValueError`: the video is complete (a session started with `num_frames`).
            Any error of a transformer call or callback propagates; the session is then left at the start of the
            failed call, so calling `next_chunk` again retries it.
        """
        chunk_index, latents = self._next_final_latents()
        return self._decoded(chunk_index, latents)

    def chunks(self, num_chunks: Optional[int] = None) -> Iterator[MagiChunkOutput]:
        """Yield the next `num_chunks` chunks (default: until the video is complete; forever for an open-ended
        session). Stops early, without error, when the session is interrupted.

        With the session's `decode_overlap` (see `MagiPipeline.__call__`), chunk `k` is decoded by a worker thread
        (on CUDA on its own stream) while chunk `k + 1` is denoised, and handed out once it is decoded and the
        next chunk is final (or the iteration ends); the chunks and their order are those of the plain path."""
        if num_chunks is not None and (not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 0):
            raise ValueError(f"num_chunks must be a non-negative integer or None, got {num_chunks!r}.")
        if not self.settings.decode_overlap:
            produced = 0
            while (num_chunks is None or produced < num_chunks) and not self.finished:
                try:
                    chunk = self.next_chunk()
                except MagiSessionInterrupted:
                    return
                produced += 1
                yield chunk
            return
        yield from self._chunks_with_decode_overlap(num_chunks)

    def _chunks_with_decode_overlap(self, num_chunks: Optional[int]) -> Iterator[MagiChunkOutput]:
        decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def decode(chunk_index: int, latents: torch.Tensor, ready) -> MagiChunkOutput:
            if decode_stream is None:
                return self._decoded(chunk_index, latents)
            with torch.cuda.stream(decode_stream):
                decode_stream.wait_event(ready)  # the latents are final on the compute stream
                output = self._decoded(chunk_index, latents)
            decode_stream.synchronize()
            return output

        produced, pending = 0, None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="magi-decode") as worker:
            try:
                while (num_chunks is None or produced < num_chunks) and not self.finished:
                    try:
                        chunk_index, latents = self._next_final_latents()
                    except MagiSessionInterrupted:
                        break
                    ready = torch.cuda.Event() if decode_stream is not None else None
                    if ready is not None:
                        ready.record()
                    produced += 1
                    if pending is not None:
                        yield pending.result()
                    pending = worker.submit(decode, chunk_index, latents, ready)
                if pending is not None:
                    yield pending.result()
                    pending = None
            finally:
                if pending is not None:
                    pending.cancel()

    def _next_final_latents(self) -> Tuple[int, torch.Tensor]:
        """Run the plan until the next chunk is final: `(generated chunk index, its final latents)`."""
        if self.finished:
            raise ValueError(
                f"This session's video is complete ({self.num_generated_chunks} chunks); start a session without "
                "num_frames for an open-ended video, or fork / resume an earlier state to go on differently."
            )
        if self._interrupted:
            raise MagiSessionInterrupted("This session was interrupted; call session.resume() to continue it.")
        total = self.plan.calls_until_chunk_finishes(self._call_index)
        with self.pipeline.progress_bar(total=total) as progress_bar:
            while True:
                if self._interrupted:
                    raise MagiSessionInterrupted("This session was interrupted; call session.resume() to continue it.")
                finished = self._run_call()
                progress_bar.update()
                if finished is not None:
                    return finished

    def _decoded(self, chunk_index: int, latents: torch.Tensor) -> MagiChunkOutput:
        with torch.no_grad():
            frames = self.pipeline._postprocess_chunk(latents, self.settings.output_type)
        now = time.perf_counter()
        if self._last_chunk_time is not None:
            self._chunk_times.append(now - self._last_chunk_time)
        self._last_chunk_time = now
        return MagiChunkOutput(chunk_index=chunk_index, frames=frames)

    # ----------------------------------------------------------------------------------------------------------------
    # Steering
    # ----------------------------------------------------------------------------------------------------------------
    def set_prompt(
        self,
        prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        recache: bool = False,
    ) -> int:
        r"""
        Change the prompt from the first generated chunk that has not started denoising yet; chunks already in flight
        keep their captions. Thread-safe: it takes effect between two transformer calls.

        Args:
            prompt (`str` or `List[str]`): the new text (one for every video, or one per video).
            prompt_embeds, prompt_attention_mask (`torch.Tensor`, *optional*): T5 embeddings `(videos, L, C)` and
                mask `(videos, L)` instead of `prompt`.
            recache (`bool`, defaults to `False`): the LongLive-style switch: the keys/values of the clean chunks
                in the KV cache are recomputed at once by a clean pass conditioned on the new caption, and so are
                those of every chunk that enters the cache from now on (right after its usual clean pass), until a
                later `set_prompt` without `recache`. Later chunks then attend to a past re-read under the new
                prompt. By default (as MAGI-1 itself) cached keys/values come from the clean pass with the null
                caption.

        Returns:
            `int`: the index (among generated chunks) of the first chunk that uses the new prompt.
        """
        repeat = self.settings.num_videos_per_prompt
        num_videos = self.settings.batch_size // repeat
        embeds, mask, video_rows = self.pipeline._encode_switch_prompt(
            prompt, prompt_embeds, prompt_attention_mask, num_videos
        )
        with self._lock:
            first_chunk = self._next_new_chunk - self.num_prefix_chunks
            if self.num_generated_chunks is not None and first_chunk >= self.num_generated_chunks:
                raise ValueError(
                    f"Every chunk of this video ({self.num_generated_chunks}) has started denoising; the new prompt "
                    "would apply to none. Start an open-ended session (no num_frames) to switch prompts later."
                )
            rows = (self._caption_embeds.shape[0] + video_rows).repeat_interleave(repeat)
            self._caption_embeds = torch.cat([self._caption_embeds, embeds.to(self._caption_embeds.device)])
            self._caption_masks = torch.cat([self._caption_masks, mask.to(self._caption_masks.device)])
            self._caption_switches = [s for s in self._caption_switches if s[0] < first_chunk] + [(first_chunk, rows)]
            self._recache_rows = rows if recache else None
            if recache and self._cache.chunk_indices:
                chunks = self._cache.chunk_indices
                reach = self.plan._attention_reach(self.plan.num_inference_steps)
                starts = [max(chunks[0], self.plan._attention_start(chunk, reach)) for chunk in chunks]
                self._recache(chunks, starts, self.plan[self._call_index])
        return first_chunk

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and branching
    # ----------------------------------------------------------------------------------------------------------------
    def fork(self) -> "MagiSession":
        """An independent copy of this session (its own cache, latents, random generators and prompts); the two
        branches can be steered differently and each equals a direct run with its prompts."""
        with self._lock:
            branch = copy.copy(self)
            branch._lock = threading.RLock()
            branch._cache = self._cache.copy()
            branch._chunk_latents = {chunk: latents.clone() for chunk, latents in self._chunk_latents.items()}
            branch._cached_latents = {chunk: latents.clone() for chunk, latents in self._cached_latents.items()}
            branch._caption_switches = list(self._caption_switches)
            branch._chunk_times = list(self._chunk_times)
            branch._generators = [_copy_generator(generator) for generator in self._generators]
            branch.plan = copy.copy(self.plan)
            branch._name_step_cache_contexts()
            branch._step_cache_chunk = self._step_cache_chunk
            copy_step_cache_contexts(self.pipeline.transformer, self._step_cache_name + "/", branch._step_cache_name + "/")
        return branch

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the whole state to one safetensors file (tensors: KV cache, latents in flight, captions, prefix,
        random generator states; the JSON header metadata: settings, plan position, model fingerprint). No pickle.
        Resume it with `pipe.resume_session(path)` (in any process); the continued video equals the uninterrupted
        one bit for bit. (A step cache's state, `transformer.enable_cache`, is not saved: the resumed session starts
        its window's afresh, so with a cache that skips work the continuation can differ.) Returns the path
        written."""
        from .session_state_magi import save_session_state

        with self._lock:
            return save_session_state(self, path)

    # ----------------------------------------------------------------------------------------------------------------
    # One planned call
    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_call(self) -> Optional[Tuple[int, torch.Tensor]]:
        """Run the next planned call; return `(generated_chunk_index, final latents)` if a chunk became final."""
        with self._lock:
            token = _ACTIVE_SESSION.set(self)
            try:
                return self._run_call_locked()
            finally:
                _ACTIVE_SESSION.reset(token)

    def _run_call_locked(self) -> Optional[Tuple[int, torch.Tensor]]:
        pipeline, plan, guidance = self.pipeline, self.plan, self.guidance
        transformer = pipeline.transformer
        call = plan[self._call_index]
        width, batch_size = self.chunk_width, self.settings.batch_size
        window_end = call.first_chunk + call.num_chunks
        for chunk in [chunk for chunk in self._chunk_latents if chunk < call.first_chunk]:
            del self._chunk_latents[chunk]  # no later call reads it
        chunk_shape = (batch_size, transformer.latent_channels, width, *self.settings.latent_size)
        while self._next_new_chunk < window_end:  # chunks enter the window as noise (drawn once, kept on retry)
            self._chunk_latents[self._next_new_chunk] = self._initial_noise(self._next_new_chunk, chunk_shape)
            self._next_new_chunk += 1
        window = torch.cat([self._chunk_latents[chunk] for chunk in range(call.first_chunk, window_end)], dim=2)
        window = _paste_prefix(window, call.first_chunk * width, self._prefix_latents)

        timestep = plan.call_timesteps(call)[None].expand(batch_size, -1)
        negative = _expand_chunks(*self._negative, call.num_chunks)
        common = dict(
            first_chunk_index=call.first_chunk,
            attention_chunk_starts=compact_attention_starts(call.attention_starts),
            kv_cache=self._cache,
            step_size=plan.shortcut_step_size(call) if transformer.config.step_size_conditioning else None,
            attention_kwargs=self.settings.attention_kwargs,
            cache_window=self._step_cache_window(call.first_chunk),
        )
        denoised = None
        if call.is_prefix_call:
            guidance.cache_clean_chunks(transformer, window, timestep, *negative, **common)
        else:
            generated = [chunk - self.num_prefix_chunks for chunk in range(call.first_chunk, window_end)]
            captions = self._window_captions(generated)
            velocity = guidance.predict_velocity(
                transformer, window, timestep, *captions, *negative, num_clean_chunks=call.num_clean_chunks, **common
            )
            denoised = pipeline.scheduler.step(velocity, call, window[:, :, call.num_clean_chunks * width :], plan=plan).prev_sample
            if self.callback_on_step_end is not None:
                denoised = self._run_callback(call, timestep[0], denoised, captions[0], negative[0])

        # The call succeeded: commit its results.
        for chunk in range(call.first_chunk, call.first_chunk + call.num_clean_chunks):
            self._cached_latents[chunk] = window[:, :, (chunk - call.first_chunk) * width : (chunk - call.first_chunk + 1) * width]
        if self._recache_rows is not None and call.num_clean_chunks:
            clean = list(range(call.first_chunk, call.first_chunk + call.num_clean_chunks))
            self._recache(clean, call.attention_starts[: call.num_clean_chunks], call)
        if denoised is not None:
            for offset, chunk in enumerate(call.denoised_chunks):
                self._chunk_latents[chunk] = denoised[:, :, offset * width : (offset + 1) * width]
        self._cache.drop_chunks_before(call.forget_chunks_before)
        self._cached_latents = {c: v for c, v in self._cached_latents.items() if c >= call.forget_chunks_before}
        self._call_index += 1
        finished = None
        if call.finished_chunk is not None:
            chunk = call.finished_chunk
            first_frame = _first_output_frame(chunk, self.settings.num_prefix_frames, width)
            finished = (chunk - self.num_prefix_chunks, self._chunk_latents[chunk][:, :, first_frame:])
            self._chunks_done += 1
        self._drop_unused_switches()
        if self.finished:
            forget_step_cache_contexts(transformer, self._step_cache_name + "/")
        return finished

    def _step_cache_window(self, first_chunk: int) -> Optional[str]:
        """This session's name for the window starting at `first_chunk`, for step caches (`None` without one); the
        states of the window before it are forgotten once the window has moved on (no later call is in it)."""
        transformer = self.pipeline.transformer
        if not getattr(transformer, "is_cache_enabled", False):
            return None
        if self._step_cache_chunk is not None and self._step_cache_chunk != first_chunk:
            forget_step_cache_contexts(transformer, f"{self._step_cache_name}/chunk{self._step_cache_chunk}/")
        self._step_cache_chunk = first_chunk
        return f"{self._step_cache_name}/chunk{first_chunk}"

    def _run_callback(self, call, timestep, denoised, prompt_embeds, negative_prompt_embeds) -> torch.Tensor:
        available = {"latents": denoised, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        tensors = {name: available[name] for name in self.callback_on_step_end_tensor_inputs}
        outputs = self.callback_on_step_end(self.pipeline, call.index, timestep, tensors)
        name = getattr(self.callback_on_step_end, "__name__", type(self.callback_on_step_end).__name__)
        outputs = check_callback_outputs(outputs, name, {"latents": tuple(denoised.shape)})
        return outputs.get("latents", denoised)

    def _initial_noise(self, chunk: int, shape) -> torch.Tensor:
        """Starting noise of `chunk`: its slice of the given `latents`, else a fresh draw from the session's
        generators (chunk by chunk, so memory does not depend on video length)."""
        if self._latents is not None:
            return self._latents[:, :, chunk * self.chunk_width : (chunk + 1) * self.chunk_width].to(self.device, torch.float32)
        generator = self._generators if len(self._generators) > 1 else self._generators[0]
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    # ----------------------------------------------------------------------------------------------------------------
    # Captions
    # ----------------------------------------------------------------------------------------------------------------
    def _caption_rows(self, generated_chunks: Sequence[int]) -> torch.Tensor:
        """Caption index of each (video, generated chunk) `(batch, len(generated_chunks))`."""
        columns = []
        for chunk in generated_chunks:
            rows = self._caption_switches[0][1]
            for first_chunk, switch_rows in self._caption_switches:
                if first_chunk <= max(chunk, 0):
                    rows = switch_rows
            columns.append(rows)
        return torch.stack(columns, dim=1)

    def _duration_horizon(self, generated_chunks: Sequence[int]) -> int:
        """`num_generated_chunks` for the duration tokens; an open-ended video always has many chunks to come."""
        if self.num_generated_chunks is not None:
            return self.num_generated_chunks
        return max(generated_chunks) + MAX_DURATION_TOKEN + 1

    def _window_captions(
        self, generated_chunks: Sequence[int], rows: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Conditional caption rows `(batch, chunks, L, C)` of the given generated chunks, special tokens included."""
        indices = self._caption_rows(generated_chunks) if rows is None else rows
        return chunk_caption_rows(
            self._learned_tokens,
            self._caption_embeds[indices],
            self._caption_masks[indices],
            self.settings.special_tokens,
            chunk_indices=generated_chunks,
            num_generated_chunks=self._duration_horizon(generated_chunks),
            negative=self._negative,
        )

    def _drop_unused_switches(self) -> None:
        """Forget prompt switches no chunk still in flight or to come can use (keeps memory flat with many
        switches); the caption bank keeps one entry per distinct prompt set."""
        live = [chunk - self.num_prefix_chunks for chunk in self._chunk_latents if chunk >= self.num_prefix_chunks]
        oldest = min(live, default=self._next_new_chunk - self.num_prefix_chunks)
        while len(self._caption_switches) > 1 and self._caption_switches[1][0] <= oldest:
            self._caption_switches.pop(0)

    @torch.no_grad()
    def _recache(self, chunks: List[int], attention_starts: Sequence[int], call) -> None:
        """Recompute the cached keys/values of consecutive clean `chunks` with a clean pass conditioned on the
        re-cache caption rows (`set_prompt(..., recache=True)`); `call` is the planned call whose step size applies."""
        transformer, plan = self.pipeline.transformer, self.plan
        window = torch.cat([self._cached_latents[chunk] for chunk in chunks], dim=2)
        generated = [chunk - self.num_prefix_chunks for chunk in chunks]
        rows = self._recache_rows[:, None].expand(-1, len(chunks))
        [captions] = cut_caption_padding(self._window_captions(generated, rows=rows))
        timestep = torch.full((self.settings.batch_size, len(chunks)), plan.clean_t, device=window.device)
        # Under a step cache: a context of its own, forgotten after the pass, so the cache computes the pass.
        window_name = self._step_cache_window(call.first_chunk)
        with window_cache_context(transformer, window_name, "recache"):
            transformer(
                window,
                timestep,
                *captions,
                first_chunk_index=chunks[0],
                attention_chunk_starts=compact_attention_starts(attention_starts),
                kv_cache=self._cache,
                num_chunks_to_cache=len(chunks),
                caption_dropped=False,
                step_size=plan.shortcut_step_size(call) if transformer.config.step_size_conditioning else None,
                attention_kwargs=self.settings.attention_kwargs,
            )
        if window_name:
            forget_step_cache_contexts(transformer, f"{window_name}/recache")


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def active_session() -> Optional[MagiSession]:
    """The session whose call is running in this thread (or generator step), if any."""
    return _ACTIVE_SESSION.get()


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copied = torch.Generator(device=generator.device)
    copied.set_state(generator.get_state())
    return copied


def _model_fingerprint(pipeline, learned_tokens: MagiLearnedTokens) -> Dict[str, Any]:
    """What a saved state must match to be resumed: the transformer and scheduler configs, and a hash of the
    transformer's learned caption tokens (different weights give a different hash)."""
    digest = hashlib.sha256()
    for tensor in (learned_tokens.null_caption_embedding, learned_tokens.special_tokens):
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "transformer_config": _plain_config(pipeline.transformer.config),
        "scheduler_config": _plain_config(pipeline.scheduler.config),
        "learned_tokens_sha256": digest.hexdigest(),
    }


def _plain_config(config) -> Dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


def _expand_chunks(embeds: torch.Tensor, mask: torch.Tensor, num_chunks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One caption `(batch, L, C)` / `(batch, L)` repeated for `num_chunks` chunks."""
    return embeds[:, None].expand(-1, num_chunks, -1, -1), mask[:, None].expand(-1, num_chunks, -1)


def _paste_prefix(window: torch.Tensor, window_start: int, prefix_latents: Optional[torch.Tensor]) -> torch.Tensor:
    """Overwrite the frames of the window that lie inside the prefix with the prefix latents (before every call;
    the Euler step then starts from them)."""
    if prefix_latents is None or prefix_latents.shape[2] <= window_start:
        return window
    count = min(prefix_latents.shape[2] - window_start, window.shape[2])
    window = window.clone()
    window[:, :, :count] = prefix_latents[:, :, window_start : window_start + count]
    return window


def _first_output_frame(chunk: int, prefix_frames: int, chunk_width: int) -> int:
    """First latent frame of a final chunk that is handed out: frames of a video prefix are left out, except the
    first frame of image-to-video chunk 0 (the image, regenerated)."""
    if chunk == 0 and prefix_frames == 1:
        return 0
    start = chunk * chunk_width
    return max(start, prefix_frames) - start

