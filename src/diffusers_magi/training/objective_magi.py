"""MAGI-1's chunk-wise flow-matching training objective.

MAGI-1 (arXiv 2505.13211) is trained to denoise a clip whose chunks carry noise that grows monotonically along the
chunks: earlier chunks are cleaner, as the sampler (`MagiChunkScheduler`) presents them, because a chunk enters the
sliding window as noise only after the chunk before it has gone one stage further. Training sees the whole clip in
one transformer call, with chunk-causal attention (a chunk attends to itself and earlier chunks only) and one time per
chunk. The release has no training code; this objective is derived from the paper and from what the inference code
feeds the model.

With `x0` the clean latents of chunk `c`, `eps` standard normal noise and the chunk's time `t_c` (0 = noise,
1 = clean, as in MAGI-1):

    x_c = t_c * x0_c + (1 - t_c) * eps_c            (the noised chunk)
    v_c = x0_c - eps_c                              (the velocity dx/dt the transformer predicts)
    loss = mean over loss chunks of  mean((model(x)_c - v_c) ** 2)

so one Euler step `x_c + v_c * (1 - t_c)` of the sampler lands on `x0_c`.

Chunk times (`chunk_times`, default `"trajectory"`): a point of the sampler's trajectory is drawn for the clip:
`p = q * (n + W - 1)` stages (`q` from `time_distribution`, `W` the window size, `n` the chunks after any clean
prefix), and chunk `c` sits at position `s_c = (p - c) / W` of its own denoising path. Chunks with `0 <= s_c < 1` are
in flight and get `t_c = time_transform(s_c)` (the scheduler's `time_schedule` and `shift`, so the times have the
distribution of the sampler's time grid); they are the loss chunks. Chunks with `s_c >= 1` are finished: they are
clean (`x0`, time `clean_t`) and serve as context, as the sampler's KV cache does. Chunks with `s_c < 0` have not
entered the window: they are pure noise at time 0; causal attention keeps them from influencing the other chunks, and
they are left out of the loss. `"sorted"` instead draws `n` independent positions and sorts them (earliest chunk
cleanest); every chunk is a loss chunk.

A clean prefix (`num_prefix_frames`: 1 for image-to-video, whole chunks for video-to-video) is given clean and left
out of the loss: whole prefix chunks as finished chunks, the frames of a partial chunk inside that chunk, which keeps
its time (as the original sampler pads a prefix into the chunks in flight).

Attention follows the sampler's rules: a chunk in flight attends to `noise2clean_kvrange[band]` chunks (itself
included), a finished chunk to `clean_chunk_kvrange`.

Conditioning: caption rows as the pipelines build them (special tokens prepended, `chunk_caption_rows`), finished
chunks see the unconditional caption as in the sampler's cache pass. Guidance needs the unconditional branches, so
with probability `caption_dropout` a clip's caption is replaced by the learned null caption (`caption_dropped=True`,
the "earlier chunks only" branch) and with probability `unconditional_dropout` each chunk additionally attends only to
itself (the fully unconditional branch).

One approximation: the adaLN caption token (`caption_dropped`) is per clip in a transformer call, so the finished
chunks of a conditional clip are computed with the "caption present" token, while three-branch sampling writes the
KV cache with the "caption dropped" one (distilled sampling writes it with "caption present", as here).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..pipelines.text_conditioning_magi import (
    DEFAULT_SPECIAL_TOKENS,
    chunk_caption_rows,
    cut_caption_padding,
    negative_caption_rows,
)

CHUNK_TIME_MODES = ("trajectory", "sorted")
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
TIME_SCHEDULES = ("sd3", "square", "piecewise", "identity")


def time_transform(position: torch.Tensor, time_schedule: str = "sd3", shift: float = 3.0) -> torch.Tensor:
    """Map a position `s` in [0, 1] along a chunk's denoising path to its time `t`, as `MagiChunkScheduler` maps its
    uniform grid (`time_grid_for`): `"sd3"` squares then shifts (`t = s'/(shift - (shift - 1) s')` with `s' = s^2`),
    `"square"`, `"piecewise"`, `"identity"`."""
    if time_schedule == "sd3":
        squared = position**2
        inverse_shift = 1.0 / shift
        return inverse_shift * squared / (1 + (inverse_shift - 1) * squared)
    if time_schedule == "square":
        return position**2
    if time_schedule == "piecewise":
        return torch.where(position < 0.875, position * (0.5 / 0.875), 0.5 + (position - 0.875) * (0.5 / (1 - 0.875)))
    if time_schedule == "identity":
        return position
    raise ValueError(f"time_schedule must be one of {TIME_SCHEDULES}, got {time_schedule!r}.")


@dataclass
class MagiTrainingBatch:
    """The inputs and target of one training call (see `MagiChunkwiseFlowMatching.prepare`).

    Attributes:
        noisy_latents (`torch.Tensor` of shape `(batch, channels, num_chunks * chunk_width, height, width)`): `x`.
        timesteps (`torch.Tensor` of shape `(batch, num_chunks)`): time of each chunk (non-increasing along chunks).
        target (`torch.Tensor`, shape of `noisy_latents`): the velocity `x0 - noise`.
        loss_mask (`torch.Tensor` of shape `(batch, num_chunks)`, bool): chunks in the loss.
        loss_frames (`torch.Tensor` of shape `(batch, num_chunks * chunk_width)`, bool): latent frames in the loss
            (those of the loss chunks, less any clean prefix frames).
        attention_chunk_starts (`List[Tuple[int, ...]]`): per batch row, the earliest chunk each chunk attends to.
        caption_dropped (`torch.Tensor` of shape `(batch,)`, bool): rows trained with the null caption.
        noise (`torch.Tensor`, shape of `noisy_latents`): the noise drawn.
        positions (`torch.Tensor` of shape `(batch, num_chunks)`): `s_c`, each chunk's position along its path.
    """

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    loss_frames: torch.Tensor
    attention_chunk_starts: List[Tuple[int, ...]]
    caption_dropped: torch.Tensor
    noise: torch.Tensor
    positions: torch.Tensor


@dataclass
class MagiTrainingLoss:
    """Attributes:
    loss (`torch.Tensor`, 0-d): mean of `chunk_losses` over the loss chunks.
    chunk_losses (`torch.Tensor` of shape `(batch, num_chunks)`): velocity MSE of each chunk (0 where masked).
    batch (`MagiTrainingBatch`): what the transformer was given.
    """

    loss: torch.Tensor
    chunk_losses: torch.Tensor
    batch: MagiTrainingBatch


@dataclass
class MagiChunkwiseFlowMatching:
    r"""
    The chunk-wise flow-matching objective of MAGI-1 (see the module docstring for the formulas).

    Args:
        chunk_width (`int`, defaults to 6): latent frames per chunk.
        window_size (`int`, defaults to 4): chunks the sampler denoises together (`W`).
        chunk_times (`str`, defaults to `"trajectory"`): `"trajectory"` (a point of the sampler's trajectory per clip)
            or `"sorted"` (independent positions, sorted so that earlier chunks are cleaner).
        time_distribution (`str`, defaults to `"uniform"`): distribution of `q` in [0, 1): `"uniform"` or
            `"logit_normal"` (`sigmoid(N(logit_mean, logit_std))`).
        logit_mean, logit_std (`float`, defaults to 0 and 1): parameters of `"logit_normal"`.
        time_schedule (`str`, defaults to `"sd3"`), shift (`float`, defaults to 3.0): position-to-time map, the
            scheduler's (`time_transform`).
        clean_t (`float`, defaults to 0.9999): time given to clean chunks (prefix and finished chunks).
        noise2clean_kvrange (`Sequence[int]`, defaults to `(5, 4, 3, 2)`), clean_chunk_kvrange (`int`, defaults to
            1): attention reach per noise band and of clean chunks, as in the scheduler (empty: no limit).
        caption_dropout (`float`, defaults to 0.1): probability that a clip is trained with the null caption.
        unconditional_dropout (`float`, defaults to 0.05): probability that a clip is trained fully unconditionally
            (null caption and each chunk attending only to itself).
        special_tokens (`Sequence[str]`, defaults to `("hq", "duration")`): learned tokens prepended to the caption of
            every chunk, as the pipelines do by default.
        step_size (`float`, *optional*): shortcut step size for distilled transformers (`step_size_conditioning`);
            defaults to 32, what `MagiChunkScheduler` gives for 64 steps (the finest, plain flow-matching level).
    """

    chunk_width: int = 6
    window_size: int = 4
    chunk_times: str = "trajectory"
    time_distribution: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_schedule: str = "sd3"
    shift: float = 3.0
    clean_t: float = 0.9999
    noise2clean_kvrange: Tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    caption_dropout: float = 0.1
    unconditional_dropout: float = 0.05
    special_tokens: Tuple[str, ...] = DEFAULT_SPECIAL_TOKENS
    step_size: Optional[float] = None

    def __post_init__(self):
        if self.chunk_times not in CHUNK_TIME_MODES:
            raise ValueError(f"chunk_times must be one of {CHUNK_TIME_MODES}, got {self.chunk_times!r}.")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time_distribution must be one of {TIME_DISTRIBUTIONS}, got {self.time_distribution!r}.")
        if self.time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"time_schedule must be one of {TIME_SCHEDULES}, got {self.time_schedule!r}.")
        for name in ("caption_dropout", "unconditional_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}.")
        if self.caption_dropout + self.unconditional_dropout > 1.0:
            raise ValueError("caption_dropout + unconditional_dropout must not exceed 1.")
        self.noise2clean_kvrange = tuple(int(reach) for reach in self.noise2clean_kvrange)
        self.special_tokens = tuple(self.special_tokens or ())

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> "MagiChunkwiseFlowMatching":
        """The objective matching a `MagiChunkScheduler`'s chunk width, window, time schedule, shift, attention
        reach and clean time; `kwargs` set the other fields (or override these)."""
        config = scheduler.config
        settings = dict(
            chunk_width=config.chunk_width,
            window_size=config.window_size,
            time_schedule=config.time_schedule,
            shift=config.shift,
            clean_t=config.clean_t,
            noise2clean_kvrange=tuple(config.noise2clean_kvrange),
            clean_chunk_kvrange=config.clean_chunk_kvrange,
        )
        return cls(**{**settings, **kwargs})

    # ------------------------------------------------------------------------------------------------------------
    # Noise levels
    # ------------------------------------------------------------------------------------------------------------
    def _draw_fraction(self, shape, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.time_distribution == "uniform":
            return torch.rand(shape, generator=generator)
        normal = torch.randn(shape, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(normal).clamp(max=1.0 - 1e-6)

    def sample_positions(
        self, batch_size: int, num_chunks: int, num_prefix_chunks: int = 0, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Position `s_c` of every chunk along its denoising path, `(batch, num_chunks)` float32, non-increasing
        along the chunks: `>= 1` finished (clean), `[0, 1)` in flight, `< 0` not yet in the window. The first
        `num_prefix_chunks` chunks are a clean prefix (`inf`)."""
        if not 0 <= num_prefix_chunks < num_chunks:
            raise ValueError(
                f"num_prefix_chunks must be in [0, num_chunks) = [0, {num_chunks}): at least one chunk is trained, got "
                f"{num_prefix_chunks}."
            )
        generated = num_chunks - num_prefix_chunks
        if self.chunk_times == "trajectory":
            point = self._draw_fraction((batch_size, 1), generator) * (generated + self.window_size - 1)
            positions = (point - torch.arange(generated, dtype=torch.float32)) / self.window_size
        else:
            positions = self._draw_fraction((batch_size, generated), generator).sort(dim=1, descending=True).values
        prefix = torch.full((batch_size, num_prefix_chunks), float("inf"))
        return torch.cat([prefix, positions], dim=1)

    def chunk_timesteps(self, positions: torch.Tensor) -> torch.Tensor:
        """Times `(batch, num_chunks)` of the chunks at `positions`: `clean_t` when finished, 0 before the window,
        `time_transform(s)` (at most `clean_t`) in flight."""
        in_flight = time_transform(positions.clamp(0.0, 1.0), self.time_schedule, self.shift).clamp(max=self.clean_t)
        return torch.where(positions >= 1, torch.full_like(positions, self.clean_t), in_flight)

    def _reach(self, position: float) -> Optional[int]:
        bands = self.noise2clean_kvrange
        if position >= 1:
            reach = self.clean_chunk_kvrange
            return (bands[-1] if bands else None) if reach == -1 else reach
        if not bands:
            return None
        return bands[min(int(max(position, 0.0) * len(bands)), len(bands) - 1)]

    def attention_starts(self, positions: torch.Tensor, alone: bool = False) -> Tuple[int, ...]:
        """Earliest chunk each chunk of one row attends to (the sampler's reach rules; `alone`: itself only)."""
        starts = []
        for chunk, position in enumerate(positions.tolist()):
            reach = 1 if alone else self._reach(position)
            starts.append(0 if reach is None else max(0, chunk + 1 - reach))
        return tuple(starts)

    # ------------------------------------------------------------------------------------------------------------
    # Batch and loss
    # ------------------------------------------------------------------------------------------------------------
    def _draw(
        self, shape: Tuple[int, ...], num_prefix_chunks: int, generator: Optional[torch.Generator]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random part of `prepare` for latents of `shape`: chunk positions, the dropout draw and the noise."""
        batch_size, num_chunks = shape[0], shape[2] // self.chunk_width
        positions = self.sample_positions(batch_size, num_chunks, num_prefix_chunks, generator)
        draw = torch.rand(batch_size, generator=generator)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return positions, draw, noise

    def prepare(
        self,
        latents: torch.Tensor,
        num_prefix_frames: int = 0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
    ) -> MagiTrainingBatch:
        """Noise a batch of clean clips.

        Args:
            latents (`torch.Tensor` of shape `(batch, channels, num_chunks * chunk_width, height, width)`): clean,
                VAE-scaled latents.
            num_prefix_frames (`int`, defaults to 0): leading latent frames kept clean as conditioning, left out of
                the loss: 1 for image-to-video (the first frame), whole chunks or more for video-to-video. Whole
                prefix chunks are clean context (time `clean_t`, the sampler's prefix call); frames of a partial
                chunk replace that chunk's noised frames while it keeps its time, as the original sampler pads a
                video prefix into the chunks in flight.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): a CPU generator driving times,
                dropout and noise, or one per clip (each clip's draws are then those of a batch of that clip alone
                with its generator, whatever the batch it is in).
        """
        if latents.ndim != 5 or latents.shape[2] % self.chunk_width:
            raise ValueError(
                f"latents must be (batch, channels, frames, height, width) with frames a multiple of chunk_width "
                f"({self.chunk_width}), got shape {tuple(latents.shape)}."
            )
        batch_size, num_frames = latents.shape[0], latents.shape[2]
        num_chunks = num_frames // self.chunk_width
        if not 0 <= num_prefix_frames < num_frames:
            raise ValueError(
                f"num_prefix_frames must be in [0, {num_frames}) (the latent frames of the clip): at least one frame is "
                f"trained, got {num_prefix_frames}."
            )
        num_prefix_chunks = num_prefix_frames // self.chunk_width
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"Pass one generator per clip: {len(generator)} generators for {batch_size} clips.")
            rows = [self._draw((1, *latents.shape[1:]), num_prefix_chunks, row) for row in generator]
            positions, draw, noise = (torch.cat(parts) for parts in zip(*rows))
        else:
            positions, draw, noise = self._draw(tuple(latents.shape), num_prefix_chunks, generator)
        timesteps = self.chunk_timesteps(positions)
        unconditional = draw < self.unconditional_dropout
        caption_dropped = draw < self.unconditional_dropout + self.caption_dropout
        noise = noise.to(latents.device)

        clean = latents.float()
        noisy = self.add_noise(clean, noise, timesteps.to(latents.device))
        finished = (
            (positions >= 1).to(latents.device).repeat_interleave(self.chunk_width, dim=1)[:, None, :, None, None]
        )
        noisy = torch.where(finished, clean, noisy)  # clean chunks are given exactly, as the KV cache holds them
        noisy[:, :, :num_prefix_frames] = clean[:, :, :num_prefix_frames]
        loss_mask = (positions >= 0) & (positions < 1)
        loss_frames = loss_mask.repeat_interleave(self.chunk_width, dim=1)
        loss_frames[:, :num_prefix_frames] = False
        return MagiTrainingBatch(
            noisy_latents=noisy,
            timesteps=timesteps.to(latents.device),
            target=clean - noise,
            loss_mask=(loss_mask & loss_frames.unflatten(1, (num_chunks, -1)).any(dim=2)).to(latents.device),
            loss_frames=loss_frames.to(latents.device),
            attention_chunk_starts=[
                self.attention_starts(row, alone=bool(alone)) for row, alone in zip(positions, unconditional)
            ],
            caption_dropped=caption_dropped.to(latents.device),
            noise=noise,
            positions=positions,
        )

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`t * clean + (1 - t) * noise` chunk by chunk; `clean`, `noise` `(batch, C, num_chunks * chunk_width, H, W)`,
        `timesteps` `(batch, num_chunks)`."""
        t = timesteps.repeat_interleave(self.chunk_width, dim=1)[:, None, :, None, None]
        return t * clean + (1 - t) * noise

    def loss(self, prediction: torch.Tensor, batch: MagiTrainingBatch) -> MagiTrainingLoss:
        """Velocity MSE per chunk (over its loss frames), averaged over the loss chunks of the batch (float32)."""
        num_chunks = batch.timesteps.shape[1]
        error = ((prediction.float() - batch.target.float()) ** 2).mean(dim=(1, 3, 4))  # (batch, frames)
        frames = batch.loss_frames.to(error.dtype)
        per_chunk = (error * frames).unflatten(1, (num_chunks, -1)).sum(dim=2)
        counts = frames.unflatten(1, (num_chunks, -1)).sum(dim=2)
        mask = batch.loss_mask.to(error.dtype)
        chunk_losses = per_chunk / counts.clamp(min=1) * mask
        return MagiTrainingLoss(
            loss=chunk_losses.sum() / mask.sum().clamp(min=1), chunk_losses=chunk_losses, batch=batch
        )

    def caption_rows(
        self,
        learned_tokens,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        batch: MagiTrainingBatch,
        num_prefix_frames: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-chunk caption rows `(batch, num_chunks, L, C)` and masks: the clip's caption with the special tokens
        for generated chunks (duration counted over the generated chunks), the unconditional caption for clean
        chunks and for caption-dropped rows.

        Args:
            learned_tokens (`MagiLearnedTokens`): `transformer.caption_tokens()`.
            prompt_embeds (`torch.Tensor` of shape `(batch, L, C)`), prompt_attention_mask (`(batch, L)`): T5 output.
        """
        batch_size, num_chunks = batch.timesteps.shape
        num_prefix_chunks = num_prefix_frames // self.chunk_width
        generated = num_chunks - num_prefix_chunks
        device = prompt_embeds.device
        negative, negative_mask = negative_caption_rows(learned_tokens, batch_size)
        negative, negative_mask = negative.to(device), negative_mask.to(device)
        embeds = prompt_embeds.float()[:, None].expand(-1, generated, -1, -1)
        mask = prompt_attention_mask[:, None].expand(-1, generated, -1)
        embeds, mask = chunk_caption_rows(
            learned_tokens, embeds, mask, self.special_tokens, negative=(negative, negative_mask)
        )
        negative_rows = negative[:, None].expand(-1, num_chunks, -1, -1)
        negative_masks = negative_mask[:, None].expand(-1, num_chunks, -1).to(mask.dtype)
        embeds = torch.cat([negative_rows[:, :num_prefix_chunks], embeds], dim=1)
        mask = torch.cat([negative_masks[:, :num_prefix_chunks], mask], dim=1)
        use_negative = (batch.positions.to(device) >= 1) | batch.caption_dropped[:, None].to(device)
        embeds = torch.where(use_negative[..., None, None], negative_rows, embeds)
        mask = torch.where(use_negative[..., None], negative_masks, mask)
        return embeds, mask

    def __call__(
        self,
        transformer,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        num_prefix_frames: int = 0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        attention_kwargs: Optional[Dict] = None,
    ) -> MagiTrainingLoss:
        """Noise `latents`, run `transformer` once over all chunks (one call per group of rows sharing attention
        ranges) and return the loss.

        Args:
            transformer (`MagiTransformer3DModel`, possibly wrapped by accelerate/PEFT).
            latents (`torch.Tensor` of shape `(batch, channels, num_chunks * chunk_width, height, width)`).
            prompt_embeds (`torch.Tensor` of shape `(batch, L, C)`), prompt_attention_mask (`(batch, L)`).
            num_prefix_frames, generator: see `prepare`.
        """
        model = getattr(transformer, "module", transformer)
        batch = self.prepare(latents, num_prefix_frames, generator)
        with torch.no_grad():
            learned_tokens = model.caption_tokens()
        embeds, mask = self.caption_rows(
            learned_tokens, prompt_embeds, prompt_attention_mask, batch, num_prefix_frames
        )
        step_size = None
        if model.config.step_size_conditioning:
            step_size = self.step_size if self.step_size is not None else 32.0
        prediction = self.predict(
            transformer, batch, embeds, mask, step_size=step_size, attention_kwargs=attention_kwargs
        )
        return self.loss(prediction, batch)

    @staticmethod
    def predict(
        transformer: Callable,
        batch: MagiTrainingBatch,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        step_size: Optional[float] = None,
        attention_kwargs: Optional[Dict] = None,
    ) -> torch.Tensor:
        """The transformer's velocity for every chunk of `batch`: one call per group of rows that share attention
        ranges (all rows in one call unless their ranges differ)."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for row, starts in enumerate(batch.attention_chunk_starts):
            groups.setdefault(starts, []).append(row)
        outputs = [None] * batch.noisy_latents.shape[0]
        for starts, rows in groups.items():
            index = torch.tensor(rows, device=batch.noisy_latents.device)
            [(embeds, mask)] = cut_caption_padding((prompt_embeds[index], prompt_attention_mask[index]))
            velocity = transformer(
                batch.noisy_latents[index],
                batch.timesteps[index],
                embeds,
                mask,
                attention_chunk_starts=starts,
                caption_dropped=batch.caption_dropped[index],
                step_size=step_size,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
            for offset, row in enumerate(rows):
                outputs[row] = velocity[offset]
        return torch.stack(outputs)
