"""Guidance for MAGI-1: how one planned model call turns into transformer passes and a velocity.

Base checkpoints use *three-branch* guidance. Per call the transformer runs

1. conditional on the caption and on earlier chunks (the KV cache is read, not written),
2. conditional on earlier chunks only (null caption; this pass writes clean chunks to the KV cache),
3. unconditional: null caption, each chunk alone (no earlier chunks, no cache),

and each chunk's velocity is `(1 - p) * v3 + (p - s) * v2 + s * v1`, with `p` (`prev_chunk_scales`) and `s`
(`text_scales`) taken from the noise band the chunk is in (`cfg_t_range`). A pass whose velocity has a zero weight
is not run: the conditional pass when no chunk of the call has a text scale, the unconditional pass for the chunks
with `p = 1` (each chunk is alone there, so it runs for the others only). The video's first chunk, with nothing
before it, is alone in pass 2 as well: pass 2's velocity is its unconditional one, and pass 3 skips it. With the
released settings (`p = 1`, `s = 0` from `t = 0.3` on) that leaves out about a tenth of the work of a base model's
video, and the first chunk's unconditional passes another 7 % of a 4-chunk video's (transformer rows, 8 steps).

Distilled checkpoints use one conditional pass. When the first denoised chunk is nearly clean, a copy of it placed
after the window runs in a call of its own that sees only itself, and that chunk's velocity is
`w * v + (1 - w) * v_alone` (`nearly_clean_weight`).

A call may start with clean chunks (`num_clean_chunks`): a chunk that just finished is run once more at the clean
time so that its keys/values enter the cache. They see no caption and their output is not returned.

Batched branches (`batch_branches=True`): the two passes that share the window's attention layout (conditional and
earlier-chunks-only) run as one transformer call on a doubled batch. They read the same cached chunks, and only the
earlier-chunks-only rows are written to the cache (`MagiKVCache.branch_view`). The unconditional pass attends to
each chunk alone, a different layout, and stays a call of its own.

Step caches (Diffusers' `transformer.enable_cache(...)`): every transformer call runs inside
`transformer.cache_context(name)`, the name made of the window (`cache_window`) and the branch, so a cache only
ever compares a call with earlier calls of the same window and branch (the same shapes and the same role).
"""

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence, Tuple, Union

import torch

from ..models.cache_hooks_magi import window_cache_context
from ..models.kv_cache_magi import MagiKVCache
from ..models.transformer_magi import MagiTransformer3DModel
from .text_conditioning_magi import cut_caption_padding

GUIDANCE_MODES = ("three_branch", "distilled")


@dataclass(frozen=True)
class MagiGuidance:
    """Guidance settings and the transformer passes they imply.

    Args:
        mode (`str`): `"three_branch"` (base checkpoints) or `"distilled"` (one pass).
        cfg_t_range (`Sequence[float]`): lower edges of the noise bands, in time `t` (0 = noise, 1 = clean). A chunk
            is in the last band whose edge is below its time (with a 1e-7 margin, as the original).
        prev_chunk_scales (`Sequence[float]`): guidance scale towards earlier chunks, per band.
        text_scales (`Sequence[float]`): guidance scale towards the caption, per band.
        nearly_clean_weight (`float`): distilled mode: weight of the normal velocity of a nearly clean first chunk.
        nearly_clean_threshold (`float`): distilled mode: a first chunk with `t` above this is nearly clean.
        batch_branches (`bool`, defaults to `True`): three-branch mode: run the conditional and earlier-chunks-only
            passes as one transformer call on a doubled batch (faster; more activation memory). `False` runs them
            one after the other (the least memory). Results agree to float rounding.
    """

    mode: str = "three_branch"
    cfg_t_range: Tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: Tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: Tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    nearly_clean_weight: float = 0.7
    nearly_clean_threshold: float = 0.3
    batch_branches: bool = True

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {self.mode!r}.")
        object.__setattr__(self, "cfg_t_range", tuple(float(edge) for edge in self.cfg_t_range))
        object.__setattr__(self, "prev_chunk_scales", tuple(float(scale) for scale in self.prev_chunk_scales))
        object.__setattr__(self, "text_scales", tuple(float(scale) for scale in self.text_scales))
        if not len(self.cfg_t_range) == len(self.prev_chunk_scales) == len(self.text_scales):
            raise ValueError(
                f"cfg_t_range, prev_chunk_scales and text_scales need one entry per band; got lengths "
                f"{len(self.cfg_t_range)}, {len(self.prev_chunk_scales)}, {len(self.text_scales)}."
            )
        if list(self.cfg_t_range) != sorted(self.cfg_t_range):
            raise ValueError(f"cfg_t_range must be increasing, got {self.cfg_t_range}.")
        for name in ("prev_chunk_scales", "text_scales"):
            for scale in getattr(self, name):
                if math.isnan(scale) or scale < 0:
                    raise ValueError(f"{name} must hold non-negative numbers, got {getattr(self, name)}.")
        if not 0.0 <= self.nearly_clean_weight <= 1.0 or math.isnan(self.nearly_clean_weight):
            raise ValueError(f"nearly_clean_weight must be in [0, 1], got {self.nearly_clean_weight}.")

    @property
    def cache_writer_caption_dropped(self) -> bool:
        """`caption_dropped` of the pass that writes the KV cache (the previous-chunks-only pass in three-branch
        mode, the single conditional pass in distilled mode)."""
        return self.mode == "three_branch"

    def guidance_scales(self, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(prev_chunk_scale, text_scale)` of the band each time falls in (float32, shape of `timestep`)."""
        edges = torch.tensor(self.cfg_t_range, device=timestep.device) - 1e-7
        band = torch.searchsorted(edges, timestep.float().contiguous()) - 1
        if band.min() < 0:
            raise ValueError(f"A chunk time ({timestep.min().item()}) lies below the first guidance band edge.")
        prev = torch.tensor(self.prev_chunk_scales, device=timestep.device)[band]
        text = torch.tensor(self.text_scales, device=timestep.device)[band]
        return prev, text

    def branch_weights(self, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights `(1 - p, p - s, s)` of the unconditional, earlier-chunks-only and conditional velocities of each
        chunk (float32, each of the shape of `timestep`)."""
        prev_scale, text_scale = self.guidance_scales(timestep)
        return 1 - prev_scale, prev_scale - text_scale, text_scale

    def combine(
        self,
        cond: Optional[torch.Tensor],
        prev_only: torch.Tensor,
        uncond: Optional[torch.Tensor],
        timestep: torch.Tensor,
        chunk_frames: int,
    ) -> torch.Tensor:
        """Three-branch mix, chunk by chunk: `(1 - p) * uncond + (p - s) * prev_only + s * cond`.

        A term whose weight is zero for the chunk (in every batch row) is left out: adding it would change nothing,
        so the result is the full sum, and a pass that only such terms need can be skipped (`None`; the chunks of
        `uncond` with a zero weight may hold anything).

        Args:
            cond, prev_only, uncond (`torch.Tensor` of shape `(batch, channels, num_chunks * chunk_frames, H, W)`):
                velocities of the caption+earlier-chunks, earlier-chunks-only and unconditional passes.
            timestep (`torch.Tensor` of shape `(batch, num_chunks)`): time of each chunk.
        """
        weights = self.branch_weights(timestep)
        used = torch.stack([weight.ne(0).any(dim=0) for weight in weights]).tolist()  # [branch][chunk]
        mixed = []
        for chunk in range(timestep.shape[1]):
            frames = slice(chunk * chunk_frames, (chunk + 1) * chunk_frames)
            terms = [
                weight[:, chunk].view(-1, 1, 1, 1, 1) * velocity[:, :, frames]
                for weight, branch_used, velocity in zip(weights, used, (uncond, prev_only, cond))
                if branch_used[chunk]
            ]  # never empty: the three weights sum to 1
            mixed.append(sum(terms[1:], terms[0]))
        return torch.cat(mixed, dim=2)

    def predict_velocity(
        self,
        transformer: MagiTransformer3DModel,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        negative_prompt_attention_mask: torch.Tensor,
        first_chunk_index: int,
        attention_chunk_starts: Union[int, Sequence[int]],
        kv_cache: Optional[MagiKVCache] = None,
        num_clean_chunks: int = 0,
        step_size: Optional[float] = None,
        attention_kwargs: Optional[dict] = None,
        cache_window: Optional[Hashable] = None,
    ) -> torch.Tensor:
        """Guided velocity of the denoised chunks of one model call.

        Args:
            transformer (`MagiTransformer3DModel`)
            latents (`torch.Tensor` of shape `(batch, channels, num_chunks * chunk_frames, H, W)`): the window, clean
                re-run chunks first.
            timestep (`torch.Tensor` of shape `(batch, num_chunks)`): time of each chunk (the clean time for the
                re-run chunks).
            prompt_embeds, prompt_attention_mask (`(batch, num_chunks, text_length, text_dim)`,
                `(batch, num_chunks, text_length)`): caption of each chunk (rows of re-run chunks are ignored: those
                chunks see the negative caption, as in the original).
            negative_prompt_embeds, negative_prompt_attention_mask: the unconditional caption of each chunk (the
                learned null caption, possibly with negative special tokens), same shapes.
            first_chunk_index, attention_chunk_starts, kv_cache: see `MagiTransformer3DModel.forward`.
            num_clean_chunks (`int`): leading chunks re-run at the clean time; written to `kv_cache`, not returned.
            step_size (`float`, *optional*): shortcut step size of distilled checkpoints.
            cache_window (hashable, *optional*): names the window for step caches (`transformer.enable_cache`): each
                pass runs in `transformer.cache_context(f"{cache_window}/{call shape}/{branch}")`. The caller passes
                a key that is the same for all calls of one window and differs between windows and generations
                (`MagiSession` passes `f"{session}/chunk{first_chunk_index}"`), and forgets a finished window's
                states (`cache_hooks_magi.forget_step_cache_contexts`). Defaults to `f"chunk{first_chunk_index}"`
                when a step cache is enabled (no context otherwise).

        Returns:
            `torch.Tensor` of shape `(batch, channels, (num_chunks - num_clean_chunks) * chunk_frames, H, W)`.
        """
        num_chunks = timestep.shape[1]
        chunk_frames = latents.shape[2] // num_chunks
        clean_frames = num_clean_chunks * chunk_frames
        if num_clean_chunks:
            prompt_embeds = torch.cat(
                [negative_prompt_embeds[:, :num_clean_chunks], prompt_embeds[:, num_clean_chunks:]], dim=1
            )
            prompt_attention_mask = torch.cat(
                [negative_prompt_attention_mask[:, :num_clean_chunks], prompt_attention_mask[:, num_clean_chunks:]],
                dim=1,
            )
        call = dict(
            first_chunk_index=first_chunk_index,
            attention_chunk_starts=attention_chunk_starts,
            kv_cache=kv_cache,
            step_size=step_size,
            attention_kwargs=attention_kwargs,
        )
        window = _cache_window(transformer, cache_window, first_chunk_index, num_chunks, num_clean_chunks)

        # The captions of a transformer call are cut after their padding (`cut_caption_padding`), together where
        # one call batches them.
        if self.mode == "distilled":
            [(prompt_embeds, prompt_attention_mask)] = cut_caption_padding((prompt_embeds, prompt_attention_mask))
            return self._distilled_velocity(
                transformer, latents, timestep, prompt_embeds, prompt_attention_mask, num_clean_chunks, call, window
            )

        # A pass is run only where its velocity has a non-zero weight (`combine`): the conditional pass when some
        # chunk has a text scale, the unconditional pass (each chunk alone) for the chunks whose weight `1 - p` is
        # not zero. The earlier-chunks-only pass always runs (it writes the cache).
        denoised_timestep = timestep[:, num_clean_chunks:]
        uncond_weight, _, cond_weight = self.branch_weights(denoised_timestep)
        needs_cond = bool(cond_weight.ne(0).any())
        uncond_chunks = uncond_weight.ne(0).any(dim=0).nonzero().flatten().tolist()
        # The video's first chunk has nothing before it, so it sees only itself in the earlier-chunks-only pass too:
        # that pass gives its unconditional velocity.
        first_chunk_alone = first_chunk_index == 0 and num_clean_chunks == 0 and 0 in uncond_chunks
        if first_chunk_alone:
            uncond_chunks.remove(0)
        batched = self.batch_branches and needs_cond
        captions = [(prompt_embeds, prompt_attention_mask), (negative_prompt_embeds, negative_prompt_attention_mask)]
        captions = cut_caption_padding(*captions) if batched else [cut_caption_padding(pair)[0] for pair in captions]
        (prompt_embeds, prompt_attention_mask), (negative_prompt_embeds, negative_prompt_attention_mask) = captions
        cond = None
        if batched:
            batch_size = latents.shape[0]
            call = dict(call, kv_cache=kv_cache.branch_view(2, write_branch=1) if kv_cache is not None else None)
            with window_cache_context(transformer, window, "cond+prev_only"):
                both = transformer(
                    torch.cat([latents, latents]),
                    torch.cat([timestep, timestep]),
                    torch.cat([prompt_embeds, negative_prompt_embeds]),
                    torch.cat([prompt_attention_mask, negative_prompt_attention_mask.to(prompt_attention_mask.dtype)]),
                    caption_dropped=torch.arange(2 * batch_size, device=latents.device) >= batch_size,
                    num_chunks_to_cache=num_clean_chunks,
                    **call,
                ).sample[:, :, clean_frames:]
            cond, prev_only = both[:batch_size], both[batch_size:]
        else:
            if needs_cond:
                with window_cache_context(transformer, window, "cond"):
                    cond = transformer(
                        latents, timestep, prompt_embeds, prompt_attention_mask, caption_dropped=False, **call
                    ).sample[:, :, clean_frames:]
            with window_cache_context(transformer, window, "prev_only"):
                prev_only = transformer(
                    latents,
                    timestep,
                    negative_prompt_embeds,
                    negative_prompt_attention_mask,
                    caption_dropped=True,
                    num_chunks_to_cache=num_clean_chunks,
                    **call,
                ).sample[:, :, clean_frames:]
        uncond = None
        if uncond_chunks:
            # The step-cache context names the number of chunks, which varies between calls of one window.
            with window_cache_context(transformer, window, f"uncond{len(uncond_chunks)}"):
                uncond = self._unconditional_velocity(
                    transformer,
                    latents[:, :, clean_frames:],
                    denoised_timestep,
                    negative_prompt_embeds[:, num_clean_chunks:],
                    negative_prompt_attention_mask[:, num_clean_chunks:],
                    uncond_chunks,
                    step_size,
                    attention_kwargs,
                )
        if first_chunk_alone:
            uncond = torch.zeros_like(prev_only) if uncond is None else uncond
            uncond[:, :, :chunk_frames] = prev_only[:, :, :chunk_frames]
        return self.combine(cond, prev_only, uncond, denoised_timestep, chunk_frames)

    def cache_clean_chunks(
        self,
        transformer: MagiTransformer3DModel,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        negative_prompt_attention_mask: torch.Tensor,
        first_chunk_index: int,
        attention_chunk_starts: Union[int, Sequence[int]],
        kv_cache: MagiKVCache,
        step_size: Optional[float] = None,
        attention_kwargs: Optional[dict] = None,
        cache_window: Optional[Hashable] = None,
    ) -> torch.Tensor:
        """Write the keys/values of clean chunks (a video prefix) to `kv_cache` with the pass that writes the cache
        in this guidance mode. Returns that pass's raw output (of no use to sampling). Shapes and `cache_window` as
        in `predict_velocity`."""
        num_chunks = timestep.shape[1]
        window = _cache_window(transformer, cache_window, first_chunk_index, num_chunks, num_chunks)
        [(negative_prompt_embeds, negative_prompt_attention_mask)] = cut_caption_padding(
            (negative_prompt_embeds, negative_prompt_attention_mask)
        )
        with window_cache_context(transformer, window, "prefix"):
            return transformer(
                latents,
                timestep,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                first_chunk_index=first_chunk_index,
                attention_chunk_starts=attention_chunk_starts,
                kv_cache=kv_cache,
                num_chunks_to_cache=num_chunks,
                caption_dropped=self.cache_writer_caption_dropped,
                step_size=step_size,
                attention_kwargs=attention_kwargs,
            ).sample

    @staticmethod
    def _unconditional_velocity(
        transformer,
        latents,
        timestep,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        chunks: Sequence[int],
        step_size,
        attention_kwargs,
    ) -> torch.Tensor:
        """The given `chunks` (indices into the window), each alone as its own batch element:
        (batch, C, n * f, H, W) -> (batch * len(chunks), C, f, H, W). Returns velocities of the window's shape; the
        frames of the other chunks are zeros."""
        batch_size, num_chunks = timestep.shape
        per_chunk = latents.unflatten(2, (num_chunks, -1))
        [(embeds, mask)] = cut_caption_padding(
            (
                negative_prompt_embeds[:, chunks].flatten(0, 1)[:, None],
                negative_prompt_attention_mask[:, chunks].flatten(0, 1)[:, None],
            )
        )
        velocity = transformer(
            per_chunk[:, :, chunks].transpose(1, 2).flatten(0, 1),
            timestep[:, chunks].reshape(-1, 1),
            embeds,
            mask,
            caption_dropped=True,
            step_size=step_size,
            attention_kwargs=attention_kwargs,
        ).sample
        full = torch.zeros_like(per_chunk, dtype=velocity.dtype)
        full[:, :, chunks] = velocity.unflatten(0, (batch_size, len(chunks))).transpose(1, 2)
        return full.flatten(2, 3)

    def _distilled_velocity(
        self, transformer, latents, timestep, prompt_embeds, prompt_attention_mask, num_clean_chunks, call, window
    ) -> torch.Tensor:
        num_chunks = timestep.shape[1]
        chunk_frames = latents.shape[2] // num_chunks
        clean_frames = num_clean_chunks * chunk_frames
        first = num_clean_chunks  # the first denoised chunk
        with window_cache_context(transformer, window, "distilled"):
            velocity = transformer(
                latents,
                timestep,
                prompt_embeds,
                prompt_attention_mask,
                caption_dropped=False,
                num_chunks_to_cache=num_clean_chunks,
                **call,
            ).sample[:, :, clean_frames:]
        if float(timestep[0, first]) <= self.nearly_clean_threshold:
            return velocity

        # The first denoised chunk is nearly clean: a copy of it that attends only to itself, placed after the
        # window (its own call, so every call keeps one attention start for all its chunks).
        first_frames = slice(clean_frames, clean_frames + chunk_frames)
        appended_index = call["first_chunk_index"] + num_chunks
        with window_cache_context(transformer, window, "alone"):
            alone = transformer(
                latents[:, :, first_frames],
                timestep[:, first : first + 1],
                prompt_embeds[:, first : first + 1],
                prompt_attention_mask[:, first : first + 1],
                caption_dropped=False,
                first_chunk_index=appended_index,
                attention_chunk_starts=appended_index,
                step_size=call["step_size"],
                attention_kwargs=call["attention_kwargs"],
            ).sample
        weight = self.nearly_clean_weight
        blended = velocity[:, :, :chunk_frames] * weight + alone * (1 - weight)
        return torch.cat([blended, velocity[:, :, chunk_frames:]], dim=2)


def _cache_window(transformer, cache_window, first_chunk_index: int, num_chunks: int, num_clean_chunks: int):
    """The prefix of a call's cache context names: the window (the caller's `cache_window`, else the call's first
    chunk when a step cache is enabled) and the call's shape (chunks, clean chunks), so that the pass that writes
    the KV cache, whose window holds one more chunk, is never compared with the other calls of its window. `None`
    without a window and without a step cache: no cache context, no overhead."""
    if cache_window is None:
        if not getattr(transformer, "is_cache_enabled", False):
            return None
        cache_window = f"chunk{first_chunk_index}"
    return f"{cache_window}/{num_chunks}chunks{num_clean_chunks}clean"
