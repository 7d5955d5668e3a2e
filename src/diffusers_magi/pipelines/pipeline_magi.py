"""`MagiPipeline`: MAGI-1 text-to-video, and the argument checks and preparation shared with image- and video-to-video.

Reading order of one call: `__call__` / `stream` / `start_session` -> `_session_from_arguments` (`check_inputs`,
T5 captions, `_prefix_latents` for I2V/V2V) -> a `MagiSession` (session_magi.py), which runs the scheduler's plan
chunk by chunk (captions of the window -> guidance -> Euler step -> hand out final chunks) -> `_postprocess_chunk`
(each chunk decoded on its own). The pipeline holds no state of a generation: every generation is its own session.
"""

import inspect
import math
import os
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import get_device
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from ..conversion.pipeline import load_original_components
from ..loaders.lora_magi import MagiLoraLoaderMixin
from ..models.autoencoder_magi import AutoencoderMagi
from ..models.loading_checks_magi import check_transformers_weights
from ..models.transformer_magi import MagiTransformer3DModel
from ..models.weight_alignment import own_cpu_weights
from ..placement import check_device
from ..schedulers.scheduling_magi_chunk import MagiChunkScheduler
from . import input_checks_magi as checks
from .guidance_magi import GUIDANCE_MODES, MagiGuidance
from .offloading_magi import MagiOffloadingMixin
from .pipeline_output import MagiChunkOutput, MagiPipelineOutput
from .session_magi import MagiSession, MagiSessionSettings, active_session
from .text_conditioning_magi import (
    DEFAULT_SPECIAL_TOKENS,
    clean_prompt,
    negative_caption_rows,
    resolve_chunk_prompts,
    validate_special_tokens,
)
from .video_processing_magi import postprocess_video

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
SIZE_MULTIPLE = 16


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import diffusers_magi  # noqa: F401  (registers the MAGI-1 classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers_magi.pipelines import export_to_video

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/MAGI-1-4.5B-distill-diffusers", dtype=torch.bfloat16)
        >>> pipe.enable_model_cpu_offload()  # one 24 GB GPU
        >>> video = pipe(prompt="a red fox runs through fresh snow", height=480, width=480, num_frames=96).frames[0]
        >>> export_to_video(video, "fox.mp4", fps=24)
        ```
"""


class MagiPipeline(MagiOffloadingMixin, DiffusionPipeline, MagiLoraLoaderMixin):
    r"""
    MAGI-1 text-to-video: the video is generated chunk by chunk (24 frames each), several chunks in flight at
    staggered noise levels, each chunk attending to earlier ones through a KV cache.

    Args:
        transformer ([`MagiTransformer3DModel`]): the diffusion transformer.
        scheduler ([`MagiChunkScheduler`]): the chunk-wise schedule.
        vae ([`AutoencoderMagi`], *optional*): needed to decode frames (not for `output_type="latent"`).
        text_encoder ([`~transformers.T5EncoderModel`], *optional*): t5-v1_1-xxl in the real checkpoints; not needed
            with `prompt_embeds`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): the text encoder's tokenizer.
        guidance_mode (`str`): `"three_branch"` (base checkpoints) or `"distilled"` (one pass); the default of calls.
        cfg_t_range, prev_chunk_scales, text_scales (`Sequence[float]`): default three-branch guidance table.
        nearly_clean_weight (`float`): default weight of the nearly-clean blend of distilled checkpoints.
        nearly_clean_threshold (`float`): time above which a first chunk counts as nearly clean.
        default_num_inference_steps (`int`): default step budget per chunk.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: MagiTransformer3DModel,
        scheduler: MagiChunkScheduler,
        vae: Optional[AutoencoderMagi] = None,
        text_encoder: Optional[T5EncoderModel] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        guidance_mode: str = "three_branch",
        cfg_t_range: List[float] = (0.0, 0.0217, 0.1, 0.3, 0.999),
        prev_chunk_scales: List[float] = (1.5, 1.5, 1.5, 1.0, 1.0),
        text_scales: List[float] = (7.5, 7.5, 7.5, 0.0, 0.0),
        nearly_clean_weight: float = 0.7,
        nearly_clean_threshold: float = 0.3,
        default_num_inference_steps: int = 64,
    ):
        super().__init__()
        if text_encoder is not None:
            # transformers initialises a tensor its folder lacks randomly (a load report only): refuse that here, so
            # that every way of building the pipeline from a folder (Diffusers' loaders included) names it.
            check_transformers_weights({"text_encoder": text_encoder})
            # Our models align their weights when loaded; transformers' loader may leave the encoder's as views into a
            # memory-mapped file, whose alignment changes CPU results in the last bits (see `own_cpu_weights`).
            own_cpu_weights(text_encoder)
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {guidance_mode!r}.")
        self.register_to_config(
            guidance_mode=guidance_mode,
            cfg_t_range=list(cfg_t_range),
            prev_chunk_scales=list(prev_chunk_scales),
            text_scales=list(text_scales),
            nearly_clean_weight=nearly_clean_weight,
            nearly_clean_threshold=nearly_clean_threshold,
            default_num_inference_steps=default_num_inference_steps,
        )

    def register_to_config(self, **kwargs):
        # Components of this package are saved under the library name `diffusers_magi` (not a module path), so that
        # `import diffusers_magi` is all a saved folder needs to load.
        for name, value in kwargs.items():
            if (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and isinstance(value[0], str)
                and value[0].startswith("diffusers_magi.")
            ):
                kwargs[name] = ("diffusers_magi", value[1])
        super().register_to_config(**kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "MagiPipeline":
        r"""
        Another MAGI-1 pipeline (text-, image- or video-to-video) sharing `pipeline`'s components and configuration;
        keyword arguments replace components or configuration entries.

        Components keep their dtypes: Diffusers' generic `from_pipe` casts every component to one dtype (float32
        unless `torch_dtype` is given), which would double a bfloat16 transformer or undo its float32 modules. With
        `torch_dtype` (or a non-MAGI source pipeline) the generic behaviour applies.
        """
        if not isinstance(pipeline, MagiPipeline) or {"torch_dtype", "dtype", "custom_pipeline"} & set(kwargs):
            return super().from_pipe(pipeline, **kwargs)
        parameters = inspect.signature(cls.__init__).parameters
        settings = {
            name: value for name, value in pipeline.config.items() if name in parameters and name not in pipeline.components
        }
        return cls(**{**pipeline.components, **settings, **kwargs})

    @classmethod
    def from_original(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        variant: str,
        special_tokens: Optional[Union[str, os.PathLike]] = None,
        config: Optional[Union[str, os.PathLike, dict]] = None,
        dtype: Optional[torch.dtype] = None,
        dequantize_fp8: bool = False,
        **download_kwargs,
    ) -> "MagiPipeline":
        r"""
        Load a pipeline straight from the original MAGI-1 layout, without writing a Diffusers folder.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): a local copy of the original Hub repository (`ckpt/magi/...`,
                `ckpt/vae`, `ckpt/t5/t5-v1_1-xxl`) or its Hub id, e.g. `"sand-ai/MAGI-1"` (then only the variant's
                weights, the VAE and T5 are downloaded).
            variant (`str`): the checkpoint folder under `ckpt/magi/`, e.g. `"4.5B_distill"`; it picks the built-in
                config of the six released variants unless `config` is given.
            special_tokens (`str`, *optional*): the original `special_tokens.npz` (a file of the original GitHub
                repository); without it the transformer has no special tokens.
            config (`str` or `dict`, *optional*): an original config JSON (or dict) instead of the built-in preset.
            dtype (`torch.dtype`, *optional*): dtype of the transformer blocks; defaults to the config's
                `params_dtype` (bfloat16 for the released checkpoints), as the original runs. (`torch_dtype`, the
                keyword Diffusers 0.42 deprecates, is accepted with a warning.)
            dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, dequantise the float8 linears to
                `dtype` instead of running the original float8 arithmetic.
            download_kwargs: passed to `huggingface_hub.snapshot_download` (`revision`, `cache_dir`, `token`, ...).

        Examples:

        ```py
        >>> pipe = MagiPipeline.from_original("sand-ai/MAGI-1", variant="4.5B_distill", special_tokens="special_tokens.npz")
        ```
        """
        if "torch_dtype" in download_kwargs:
            logger.warning("from_original: `torch_dtype` is deprecated (as in Diffusers); pass `dtype`.")
            dtype = download_kwargs.pop("torch_dtype") if dtype is None else dtype
        components = load_original_components(
            path_or_repo_id,
            variant=variant,
            special_tokens=special_tokens,
            config=config,
            dtype=dtype,
            dequantize_fp8=dequantize_fp8,
            **download_kwargs,
        )
        return cls(**components)

    @property
    def chunk_width(self) -> int:
        """Latent frames per chunk."""
        return self.scheduler.config.chunk_width

    @property
    def interrupt(self) -> bool:
        """Whether the generation running in this thread was interrupted. Setting it (e.g. `pipeline._interrupt =
        True` or `pipeline.interrupt = True` in a `callback_on_step_end`, as with Diffusers pipelines) interrupts that
        generation only; other sessions on this pipeline go on. Outside a generation it is `False`."""
        session = active_session()
        return session is not None and session.pipeline is self and session.interrupted

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        session = active_session()
        if session is None or session.pipeline is not self:
            if value:
                raise ValueError(
                    "pipeline.interrupt can only be set by code running inside a generation (a callback); to stop a "
                    "session from elsewhere call session.interrupt()."
                )
            return
        session.interrupt() if value else session.resume()

    _interrupt = interrupt

    # --------------------------------------------------------------------------------------------------------------
    # Text
    # --------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, prompt: Union[str, List[str]], device: Optional[torch.device] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""
        T5 embeddings of prompts, cleaned as MAGI-1 cleans them.

        Returns:
            `(prompt_embeds, prompt_attention_mask)` of shapes `(len(prompt), text_length, text_dim)` (float32) and
            `(len(prompt), text_length)` (int64).
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no text_encoder/tokenizer; pass `prompt_embeds` and `prompt_attention_mask` "
                "instead of a prompt, or load the pipeline with its text encoder."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        tokens = self.tokenizer(
            [clean_prompt(text) for text in prompts],
            max_length=self.transformer.config.text_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        input_device = _input_device(self.text_encoder, device)
        embeds = self.text_encoder(
            input_ids=tokens.input_ids.to(input_device), attention_mask=tokens.attention_mask.to(input_device)
        ).last_hidden_state
        return embeds.float().to(device), tokens.attention_mask.to(device)

    def _caption_bank(
        self, prompt, chunk_prompts, prompt_embeds, prompt_attention_mask, num_generated_chunks: Optional[int], device
    ) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, torch.Tensor]]]:
        """Unique caption embeddings `(K, L, C)`, their masks `(K, L)`, and the prompt switches: from which generated
        chunk on each video uses which caption, `[(first_chunk, caption index per video (videos,)), ...]`. Keeping
        captions unique keeps memory independent of video length. `num_generated_chunks=None`: open-ended."""
        if prompt_embeds is not None:
            if prompt_embeds.ndim == 3:
                rows = torch.arange(prompt_embeds.shape[0])
                return prompt_embeds.float().to(device), prompt_attention_mask.to(device), [(0, rows)]
            videos, chunks = prompt_embeds.shape[:2]
            rows = torch.arange(videos * chunks).view(videos, chunks)
            switches = [(chunk, rows[:, chunk]) for chunk in range(chunks)]
            return prompt_embeds.flatten(0, 1).float().to(device), prompt_attention_mask.flatten(0, 1).to(device), switches

        if chunk_prompts is not None:
            per_video = chunk_prompts if _is_batch_of_chunk_prompts(chunk_prompts) else [chunk_prompts]
            schedules = [_prompt_schedule(prompts, num_generated_chunks) for prompts in per_video]
        else:
            schedules = [{0: text} for text in ([prompt] if isinstance(prompt, str) else prompt)]
        unique = sorted({text for schedule in schedules for text in schedule.values()})
        embeds, mask = self.encode_prompt(unique, device)
        switch_chunks = sorted({chunk for schedule in schedules for chunk in schedule})
        switches = [
            (chunk, torch.tensor([unique.index(_prompt_at(schedule, chunk)) for schedule in schedules]))
            for chunk in switch_chunks
        ]
        return embeds, mask, switches

    def _encode_switch_prompt(
        self, prompt, prompt_embeds, prompt_attention_mask, num_videos: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A new prompt of a session (`MagiSession.set_prompt`): its embeddings `(n, L, C)`, masks `(n, L)` and, per
        video, the index of its embedding `(num_videos,)`. Checked before anything is changed."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("set_prompt needs exactly one of prompt (text) and prompt_embeds (with prompt_attention_mask).")
        if prompt is not None:
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
            if len(texts) not in (1, num_videos):
                raise ValueError(f"prompt has {len(texts)} texts for {num_videos} videos; pass one, or one per video.")
            if any(not text.strip() for text in texts):
                raise ValueError("prompt must not be empty; give the text the next chunks should follow.")
            embeds, mask = self.encode_prompt(list(texts), self._execution_device)
        else:
            if prompt_attention_mask is None:
                raise ValueError("prompt_embeds needs its prompt_attention_mask.")
            text_dim = self.transformer.config.text_dim
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != text_dim or prompt_embeds.shape[0] not in (1, num_videos):
                raise ValueError(
                    f"prompt_embeds must be (1 or {num_videos}, text_length, {text_dim}), got {tuple(prompt_embeds.shape)}."
                )
            if tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:-1]):
                raise ValueError(
                    f"prompt_attention_mask must have shape {tuple(prompt_embeds.shape[:-1])}, got "
                    f"{tuple(prompt_attention_mask.shape)}."
                )
            if not torch.isfinite(prompt_embeds).all():
                raise ValueError("prompt_embeds holds NaN or infinite values.")
            embeds, mask = prompt_embeds.float().to(self._execution_device), prompt_attention_mask.to(self._execution_device)
        video_rows = torch.arange(num_videos) if embeds.shape[0] == num_videos else torch.zeros(num_videos, dtype=torch.long)
        return embeds, mask, video_rows

    # --------------------------------------------------------------------------------------------------------------
    # Checks and preparation
    # --------------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        chunk_prompts,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        output_type: str,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {SIZE_MULTIPLE} (VAE 8x, transformer patch 2x), got "
                f"height={height}, width={width}."
            )
        if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer (frames to generate), got {num_frames!r}.")
        self.scheduler._check_step_count(num_inference_steps)
        given = [name for name, value in (("prompt", prompt), ("chunk_prompts", chunk_prompts)) if value is not None]
        if len(given) == 2:
            raise ValueError("Pass either prompt (one text per video) or chunk_prompts (one text per chunk), not both.")
        if prompt_embeds is not None and given:
            raise ValueError(f"Pass either {given[0]} or prompt_embeds, not both.")
        if not given and prompt_embeds is None:
            raise ValueError("Pass a prompt, chunk_prompts, or prompt_embeds with prompt_attention_mask.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        for name, embeds, mask in (
            ("prompt_embeds", prompt_embeds, prompt_attention_mask),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            if embeds is None:
                continue
            if mask is None:
                raise ValueError(f"{name} needs its attention mask ({name.replace('embeds', 'attention_mask')}).")
            if embeds.ndim not in ((3, 4) if name == "prompt_embeds" else (3,)) or embeds.shape[-1] != self.transformer.config.text_dim:
                raise ValueError(
                    f"{name} must be (batch, text_length, {self.transformer.config.text_dim})"
                    + (" or per chunk (batch, chunks, text_length, text_dim)" if name == "prompt_embeds" else "")
                    + f", got shape {tuple(embeds.shape)}."
                )
            if tuple(mask.shape) != tuple(embeds.shape[:-1]):
                raise ValueError(f"The attention mask of {name} must have shape {tuple(embeds.shape[:-1])}, got {tuple(mask.shape)}.")
        text_length = self.transformer.config.text_length
        checks.check_prompt_embeds_length(prompt_embeds, text_length)
        checks.check_prompt_embeds_length(negative_prompt_embeds, text_length, name="negative_prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type != "latent" and self.vae is None:
            raise ValueError("This pipeline has no VAE; use output_type='latent' or load the pipeline with its VAE.")
        unknown = [name for name in callback_on_step_end_tensor_inputs or () if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}.")

    def _guidance(
        self, guidance_mode, cfg_t_range, prev_chunk_scales, text_scales, nearly_clean_weight, batch_branches
    ) -> MagiGuidance:
        config = self.config
        return MagiGuidance(
            mode=guidance_mode if guidance_mode is not None else config.guidance_mode,
            cfg_t_range=cfg_t_range if cfg_t_range is not None else config.cfg_t_range,
            prev_chunk_scales=prev_chunk_scales if prev_chunk_scales is not None else config.prev_chunk_scales,
            text_scales=text_scales if text_scales is not None else config.text_scales,
            nearly_clean_weight=nearly_clean_weight if nearly_clean_weight is not None else config.nearly_clean_weight,
            nearly_clean_threshold=config.nearly_clean_threshold,
            batch_branches=checks.check_bool(batch_branches, "batch_guidance_branches"),
        )

    def _prefix_latents(self, num_videos: int, height: int, width: int, device: torch.device, **prefix_kwargs):
        """Clean latents the video starts from, `(num_videos, channels, prefix_frames, h, w)`, or `None`.
        Text-to-video has no prefix; the image- and video-to-video pipelines override this."""
        if prefix_kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(prefix_kwargs)}.")
        return None

    def _check_prefix_latents(self, prefix_latents: torch.Tensor, num_videos: int, height: int, width: int):
        checks.check_finite(prefix_latents, "prefix_latents")
        expected = (self.transformer.latent_channels, height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)
        if prefix_latents.ndim != 5 or (prefix_latents.shape[1], *prefix_latents.shape[3:]) != expected:
            raise ValueError(
                f"prefix_latents must be (batch, {expected[0]}, frames, {expected[1]}, {expected[2]}) for a "
                f"{height}x{width} video, got {tuple(prefix_latents.shape)}."
            )
        if prefix_latents.shape[0] not in (1, num_videos):
            raise ValueError(f"prefix_latents has batch {prefix_latents.shape[0]}, expected 1 or {num_videos}.")
        return prefix_latents.expand(num_videos, -1, -1, -1, -1).float()

    def _num_chunks(self, num_frames: Optional[int], prefix_frames: int) -> Optional[int]:
        """Latent chunks of the whole video: `ceil((num_frames // 4 + prefix latent frames) / chunk_width)`; `None`
        for an open-ended session (`num_frames=None`)."""
        if num_frames is None:
            return None
        num_chunks = math.ceil((num_frames // TEMPORAL_COMPRESSION + prefix_frames) / self.chunk_width)
        if num_chunks <= prefix_frames // self.chunk_width:
            raise ValueError(
                f"num_frames={num_frames} asks for no new chunk after a prefix of {prefix_frames} latent frames; ask "
                f"for at least {TEMPORAL_COMPRESSION} frames (a chunk is {TEMPORAL_COMPRESSION * self.chunk_width})."
            )
        return num_chunks

    # --------------------------------------------------------------------------------------------------------------
    # Decoding
    # --------------------------------------------------------------------------------------------------------------
    def _encode_prefix(self, video: torch.Tensor) -> torch.Tensor:
        """VAE-scaled latents `(1, channels, frames, h, w)` of a prefix video `(1, 3, frames, H, W)` in [-1, 1]
        (the posterior mode, scaled in the VAE dtype as the original does, then float32)."""
        video = video.to(_input_device(self.vae, self._execution_device), self.vae.dtype)
        latents = self.vae.encode(video).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).float()

    def _postprocess_chunk(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        vae = self.vae
        video = vae.decode((latents / vae.config.scaling_factor).to(_input_device(vae, latents.device), vae.dtype)).sample
        return postprocess_video(video, output_type)

    @staticmethod
    def _concatenate(chunks: List, output_type: str):
        if output_type == "latent":
            return torch.cat(chunks, dim=2)
        if output_type == "pil":
            return [[frame for chunk in chunks for frame in chunk[video]] for video in range(len(chunks[0]))]
        if output_type == "pt":
            return torch.cat(chunks, dim=1)
        return np.concatenate(chunks, axis=1)

    # --------------------------------------------------------------------------------------------------------------
    # Entry points
    # --------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        chunk_prompts: Union[List[str], Dict[int, str], List[Union[List[str], Dict[int, str]]], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: int = 720,
        width: int = 720,
        num_frames: Optional[int] = 96,
        num_inference_steps: Optional[int] = None,
        guidance_mode: Optional[str] = None,
        cfg_t_range: Optional[Sequence[float]] = None,
        prev_chunk_scales: Optional[Sequence[float]] = None,
        text_scales: Optional[Sequence[float]] = None,
        nearly_clean_weight: Optional[float] = None,
        batch_guidance_branches: bool = True,
        special_tokens: Optional[Sequence[str]] = DEFAULT_SPECIAL_TOKENS,
        negative_special_tokens: bool = False,
        num_videos_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "np",
        kv_cache_device: Optional[Union[str, torch.device]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        allow_oversized: bool = False,
        decode_overlap: bool = False,
        return_dict: bool = True,
    ) -> Union[MagiPipelineOutput, Tuple]:
        r"""
        Generate a video. `stream` (chunks as they are final) and `start_session` (a generation to steer, save and
        branch) take the same arguments.

        Args:
            prompt (`str` or `List[str]`): one prompt per video (a list makes a batch); every chunk uses it.
            chunk_prompts (`List[str]`, `Dict[int, str]`, or a list of those per video): one prompt per generated
                chunk, or a schedule `{first_chunk: prompt}` whose prompts hold until the next key (scene
                transitions). Each chunk is conditioned on its own text.
            negative_prompt (`str` or `List[str]`, *optional*): replaces the learned null caption in the
                unconditional passes of three-branch guidance.
            height, width (`int`, defaults to 720): video size in pixels, multiples of 16.
            num_frames (`int`, defaults to 96): frames to generate after any prefix. Generation runs in whole chunks
                of 24 frames: `ceil((num_frames // 4 + prefix latent frames) / 6)` chunks, as the original counts
                (see the frame-count table in docs/pipelines.md). `start_session` defaults to `None`: open-ended.
            num_inference_steps (`int`, *optional*): steps every chunk takes; a multiple of the window size and of
                the number of noise bands (default from the pipeline config).
            guidance_mode (`str`, *optional*): `"three_branch"` or `"distilled"` (default from the config).
            cfg_t_range, prev_chunk_scales, text_scales (`Sequence[float]`, *optional*): three-branch guidance table:
                band edges in time (0 = noise) and, per band, the scales towards earlier chunks and towards the text.
            nearly_clean_weight (`float`, *optional*): distilled: weight of the normal velocity of a nearly clean
                first chunk (0.7).
            batch_guidance_branches (`bool`, defaults to `True`): three-branch guidance: run the conditional and the
                earlier-chunks-only passes as one transformer call on a doubled batch (faster, more activation
                memory); `False` runs them one after the other, for the smallest GPUs. Same video to float rounding.
            special_tokens (`Sequence[str]`, defaults to `("hq", "duration")`): learned tokens prepended to each
                chunk's caption: `hq`, `duration`, `static_first_frames`, `dynamic_first_frames`, `borderness`,
                `three_d_model`, `two_d_anime`. `None` or `()` for none. In an open-ended session every chunk is told
                that many chunks follow.
            negative_special_tokens (`bool`, defaults to `False`): prepend the negative tokens (caption, logo,
                transition, borderness) to the unconditional caption.
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt.
            generator (`torch.Generator` or list, *optional*): drives the initial noise (drawn chunk by chunk); a list
                needs one generator per video. Without one, the session seeds its own from torch's global generator.
            latents (`torch.Tensor`, *optional*): initial noise of the whole video, `(batch, 16, chunks * 6, h, w)`.
            prompt_embeds (`torch.Tensor`, *optional*): T5 embeddings `(batch, 800, 4096)` or per chunk
                `(batch, chunks, 800, 4096)`, with `prompt_attention_mask` `(batch, 800)` / `(batch, chunks, 800)`.
            negative_prompt_embeds, negative_prompt_attention_mask: `(batch, 800, 4096)` and `(batch, 800)`.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pil"`, `"pt"` or `"latent"`.
            kv_cache_device (`str` or `torch.device`, *optional*): keep the KV cache there (e.g. `"cpu"`, the
                original's `kv_offload`); each layer moves its cached chunks to the compute device when it reads them.
            callback_on_step_end (`Callable`, *optional*): called after every transformer call as
                `callback(pipe, call_index, timesteps, tensors)` with the requested tensors (the denoised chunks of
                the call as `latents`, their caption rows as `prompt_embeds` `(batch, chunks, L, C)`, the
                unconditional caption rows as `negative_prompt_embeds`); returns a dict, whose `latents` (same shape)
                replace the denoised chunks. Setting `pipe._interrupt = True` in it stops this generation.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*): tensors passed to the callback, from
                `_callback_tensor_inputs` (default `["latents"]`).
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. `{"scale": 0.8}` scales LoRA
                adapters).
            allow_oversized (`bool`, defaults to `False`): run a request even when its memory estimate exceeds what
                the execution device has left (by default it is refused before anything is allocated, with the
                estimate, the limit and what to change).
            decode_overlap (`bool`, defaults to `False`): decode chunk `k` (VAE) while chunk `k + 1` is denoised: in a
                worker thread, on CUDA on a side stream, as the original overlaps decoding to stream in real time.
                Same output; not with model or sequential offloading (which move one model at a time).
            return_dict (`bool`, defaults to `True`): return a `MagiPipelineOutput` instead of a tuple.

        Examples:

        Returns:
            [`MagiPipelineOutput`] (or a tuple) with `frames`.
        """
        return self._generate((), {name: value for name, value in locals().items() if name != "self"})

    def _generate(self, args: tuple, kwargs: dict) -> Union[MagiPipelineOutput, Tuple]:
        arguments, _ = self._bind_arguments(args, kwargs)
        return_dict = arguments.pop("return_dict")
        session = self._session_from_arguments(arguments)
        chunks = [chunk.frames for chunk in session.chunks()]
        self.maybe_free_model_hooks()
        if not chunks:
            raise RuntimeError(
                "The generation was interrupted before its first chunk was final, so there are no frames to return; "
                "interrupt later, or use start_session / stream to get chunks as they are made."
            )
        frames = self._concatenate(chunks, session.settings.output_type)
        if not return_dict:
            return (frames,)
        return MagiPipelineOutput(frames=frames)

    def stream(self, *args, **kwargs) -> Iterator[MagiChunkOutput]:
        r"""
        Generate a video chunk by chunk and yield each chunk (decoded unless `output_type="latent"`) as soon as it is
        final; memory does not grow with the number of chunks. Takes the arguments of `__call__` except
        `return_dict`; inputs are checked and encoded at once, generation runs as the iterator is consumed. It ends
        early (without error) when the generation is interrupted.

        Yields:
            [`MagiChunkOutput`] with `chunk_index` and `frames` (24 frames per chunk; fewer for a chunk that overlaps
            a video prefix).
        """
        arguments, _ = self._bind_arguments(args, kwargs)
        arguments.pop("return_dict")
        return self._stream_session(self._session_from_arguments(arguments))

    def _stream_session(self, session: MagiSession) -> Iterator[MagiChunkOutput]:
        yield from session.chunks()
        self.maybe_free_model_hooks()

    def maybe_free_model_hooks(self):
        """Re-arm model offloading after a generation, as Diffusers' pipelines do, without resetting the
        transformer's step cache (`enable_cache`): Diffusers resets every context's state here, which would wipe the
        states of other sessions still generating on this pipeline; each session forgets its own instead
        (`MagiSession`, `cache_hooks_magi.forget_step_cache_contexts`)."""
        if getattr(self, "_all_hooks", None):
            self.enable_model_cpu_offload(device=getattr(self, "_offload_device", get_device()))

    def start_session(self, *args, **kwargs) -> MagiSession:
        r"""
        Start a generation that the caller drives chunk by chunk (`next_chunk`, `chunks`), steers (`set_prompt`),
        saves (`save`) and branches (`fork`); see [`MagiSession`] and docs/sessions.md.

        Takes the arguments of `__call__` except `return_dict`. Without `num_frames` the session is open-ended (it
        goes on as long as chunks are asked for); with it, it makes exactly the video `pipe(num_frames=...)` makes.
        Inputs are checked and encoded at once.
        """
        arguments, given = self._bind_arguments(args, kwargs)
        arguments.pop("return_dict")
        if "num_frames" not in given:
            arguments["num_frames"] = None
        return self._session_from_arguments(arguments)

    def resume_session(
        self,
        path: Union[str, os.PathLike],
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
    ) -> MagiSession:
        r"""
        Continue a session saved with `session.save(path)` (in this process or another): the continued video equals
        the uninterrupted one bit for bit. Loading one state twice gives two independent branches.

        Args:
            path (`str` or `os.PathLike`): the file `session.save` wrote.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in `__call__` (callbacks are not saved).

        Raises:
            `ValueError`: the file is missing, corrupt or truncated, or was saved by a different model or config (the
            message names the mismatch).
        """
        from .session_state_magi import load_session_state

        return load_session_state(self, path, callback_on_step_end, callback_on_step_end_tensor_inputs)

    def _bind_arguments(self, args: tuple, kwargs: dict) -> Tuple[Dict[str, Any], set]:
        """The arguments of a call by name, defaults applied (against the signature of this class's `__call__`, so
        `stream` and `start_session` take exactly its arguments), and the names the caller gave."""
        signature = inspect.signature(type(self).__call__)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}: {error}") from None
        given = set(bound.arguments)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return arguments, given

    def _session_from_arguments(self, arguments: Dict[str, Any]) -> MagiSession:
        """Check the arguments of a call, encode its prefix and captions, and return its session (nothing runs yet).
        The four steps are also the blocks of the modular pipeline (`diffusers_magi.modular`)."""
        arguments = dict(arguments)
        prefix_kwargs = {name: arguments.pop(name) for name in self._prefix_argument_names}
        checked = self._check_call_arguments(arguments)
        with torch.no_grad():
            prefix_latents = self._prefix_latents(
                checked["num_videos"], arguments["height"], arguments["width"], self._execution_device, **prefix_kwargs
            )
        conditioning = self._encode_conditioning(arguments, checked, prefix_latents)
        return self._new_session(arguments, checked, prefix_latents, conditioning)

    def _check_call_arguments(self, arguments: Dict[str, Any]) -> Dict[str, Any]:
        """Everything that can be checked before any model runs; returns the settings it resolves (guidance, special
        tokens, step count, KV cache device, callback tensors, number of videos and batch size)."""
        checks.check_generation_sizes(
            height=arguments["height"],
            width=arguments["width"],
            num_frames=arguments["num_frames"],
            num_inference_steps=arguments["num_inference_steps"],
        )
        for name in ("latents", "prompt_embeds", "negative_prompt_embeds"):
            checks.check_tensor(arguments[name], name)
            checks.check_finite(arguments[name], name)
        checks.check_cfg_t_range(arguments["cfg_t_range"])
        if arguments["decode_overlap"] and any(
            hasattr(module, "_hf_hook") for module in self.components.values() if isinstance(module, torch.nn.Module)
        ):
            raise ValueError(
                "decode_overlap cannot run with model or sequential CPU offloading, which keep one model on the device "
                "at a time; disable offloading (or use group offloading with streams) or pass decode_overlap=False."
            )
        if self.vae is not None:
            checks.check_scaling_factor(self.vae.config.scaling_factor)
        num_inference_steps = arguments["num_inference_steps"]
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        callback_on_step_end = arguments["callback_on_step_end"]
        callback_on_step_end_tensor_inputs = arguments["callback_on_step_end_tensor_inputs"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            arguments["prompt"],
            arguments["chunk_prompts"],
            arguments["prompt_embeds"],
            arguments["prompt_attention_mask"],
            arguments["negative_prompt"],
            arguments["negative_prompt_embeds"],
            arguments["negative_prompt_attention_mask"],
            arguments["height"],
            arguments["width"],
            arguments["num_frames"],
            num_inference_steps,
            arguments["output_type"],
            callback_on_step_end_tensor_inputs,
        )
        guidance = self._guidance(
            arguments["guidance_mode"],
            arguments["cfg_t_range"],
            arguments["prev_chunk_scales"],
            arguments["text_scales"],
            arguments["nearly_clean_weight"],
            arguments["batch_guidance_branches"],
        )
        if guidance.mode == "distilled" and (
            arguments["negative_prompt"] is not None or arguments["negative_prompt_embeds"] is not None
        ):
            logger.warning("Distilled guidance runs no unconditional pass: the negative prompt has no effect.")
        kv_cache_device = arguments["kv_cache_device"]
        if kv_cache_device is not None:
            kv_cache_device = str(check_device(kv_cache_device, "kv_cache_device"))
        num_videos_per_prompt = arguments["num_videos_per_prompt"]
        checks.check_num_videos_per_prompt(num_videos_per_prompt)
        num_videos = _count_videos(arguments["prompt"], arguments["chunk_prompts"], arguments["prompt_embeds"])
        batch_size = num_videos * num_videos_per_prompt
        checks.check_generators(arguments["generator"], batch_size)
        self._check_memory(arguments, guidance, kv_cache_device, batch_size)
        return dict(
            guidance=guidance,
            special_tokens=validate_special_tokens(arguments["special_tokens"]),
            num_inference_steps=num_inference_steps,
            kv_cache_device=kv_cache_device,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            num_videos=num_videos,
            batch_size=batch_size,
        )

    def _check_memory(self, arguments: Dict[str, Any], guidance: MagiGuidance, kv_cache_device, batch_size: int) -> None:
        """Refuse, before anything is allocated, a request whose memory estimate exceeds what the execution device
        has left (`allow_oversized=True` skips this). The estimate counts the weights the pipeline's offloading will
        move in during the call (`input_checks_magi.weights_moved_in`), not those already on the device."""
        device = self._execution_device
        offloading = checks.offloading_mode(self.components)
        scheduler = self.scheduler.config
        window = scheduler.window_size
        num_frames = arguments["num_frames"]
        num_chunks = window if num_frames is None else math.ceil(num_frames / (TEMPORAL_COMPRESSION * self.chunk_width)) + 1
        estimate = checks.estimate_generation_memory(
            self.transformer.config,
            self.vae.config if self.vae is not None else {},
            batch_size,
            arguments["height"],
            arguments["width"],
            window,
            max([*scheduler.noise2clean_kvrange, scheduler.clean_chunk_kvrange, 1]),
            self.transformer.dtype,
            num_chunks=num_chunks,
            chunk_width=self.chunk_width,
            guidance_branches=3 if guidance.mode == "three_branch" else 1,
            fused_attention=device.type != "cpu",
            kv_cache_on_device=kv_cache_device is None,
            weights_bytes=checks.weights_moved_in(self.components, device),
        )
        checks.check_generation_fits(
            estimate,
            device,
            offloading=offloading,
            kv_cache_on_device=kv_cache_device is None,
            allow_oversized=arguments["allow_oversized"],
        )

    def _encode_conditioning(
        self, arguments: Dict[str, Any], checked: Dict[str, Any], prefix_latents: Optional[torch.Tensor]
    ) -> Dict[str, Any]:
        """The video length in chunks, the caption bank with its prompt switches, and the unconditional caption (T5
        runs here), after the checks that need the prefix length."""
        device = self._execution_device
        prompt_embeds, latents = arguments["prompt_embeds"], arguments["latents"]
        num_videos, batch_size = checked["num_videos"], checked["batch_size"]
        height, width = arguments["height"], arguments["width"]
        prefix_frames = 0 if prefix_latents is None else prefix_latents.shape[2]
        num_chunks = self._num_chunks(arguments["num_frames"], prefix_frames)
        num_generated = None if num_chunks is None else num_chunks - prefix_frames // self.chunk_width
        latent_size = (height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)
        per_chunk_embeds = prompt_embeds is not None and prompt_embeds.ndim == 4
        if num_chunks is None:
            for name, given in (("latents", latents is not None), ("per-chunk prompt_embeds", per_chunk_embeds)):
                if given:
                    raise ValueError(
                        f"An open-ended session (no num_frames) cannot take {name}, which fix the video length; pass "
                        "num_frames."
                    )
        elif latents is not None:
            expected = (batch_size, self.transformer.latent_channels, num_chunks * self.chunk_width, *latent_size)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"latents must be the initial noise of the whole video, shape {expected} (batch, channels, "
                    f"{num_chunks} chunks x {self.chunk_width} frames, height / 8, width / 8), got {tuple(latents.shape)}."
                )
        if per_chunk_embeds and prompt_embeds.shape[1] != num_generated:
            raise ValueError(
                f"Per-chunk prompt_embeds has {prompt_embeds.shape[1]} chunks but the video has {num_generated} "
                "generated chunks; pass one embedding per chunk or a single (batch, text_length, text_dim) embedding."
            )
        negative_prompt = arguments["negative_prompt"]
        negative_prompt_embeds = arguments["negative_prompt_embeds"]
        negative_prompt_attention_mask = arguments["negative_prompt_attention_mask"]
        with torch.no_grad():
            # Read through a call of the module, so that offloading hooks place the learned tensors first.
            learned_tokens = self.transformer.caption_tokens()
            embeds, masks, switches = self._caption_bank(
                arguments["prompt"], arguments["chunk_prompts"], prompt_embeds, arguments["prompt_attention_mask"], num_generated, device
            )
            if negative_prompt is not None:
                texts = [negative_prompt] * num_videos if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(texts) != num_videos:
                    raise ValueError(f"negative_prompt has {len(texts)} entries for {num_videos} videos.")
                negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(texts, device)
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != num_videos:
                raise ValueError(f"negative_prompt_embeds has batch {negative_prompt_embeds.shape[0]}, expected {num_videos}.")
            negative = negative_caption_rows(
                learned_tokens,
                num_videos,
                arguments["negative_special_tokens"],
                negative_prompt_embeds.to(device) if negative_prompt_embeds is not None else None,
                negative_prompt_attention_mask.to(device) if negative_prompt_attention_mask is not None else None,
            )
        return dict(num_chunks=num_chunks, latent_size=latent_size, captions=(embeds, masks), switches=switches, negative=negative)

    def _new_session(
        self,
        arguments: Dict[str, Any],
        checked: Dict[str, Any],
        prefix_latents: Optional[torch.Tensor],
        conditioning: Dict[str, Any],
    ) -> MagiSession:
        """The session of a checked and encoded call (batch rows repeated `num_videos_per_prompt` times)."""
        device = self._execution_device
        repeat = arguments["num_videos_per_prompt"]
        negative = conditioning["negative"]
        settings = MagiSessionSettings(
            batch_size=checked["batch_size"],
            num_chunks=conditioning["num_chunks"],
            num_prefix_frames=0 if prefix_latents is None else prefix_latents.shape[2],
            latent_size=conditioning["latent_size"],
            num_inference_steps=checked["num_inference_steps"],
            guidance=asdict(checked["guidance"]),
            special_tokens=checked["special_tokens"],
            num_videos_per_prompt=repeat,
            output_type=arguments["output_type"],
            kv_cache_device=checked["kv_cache_device"],
            attention_kwargs=arguments["attention_kwargs"],
            decode_overlap=arguments["decode_overlap"],
        )
        return MagiSession(
            self,
            settings,
            captions=conditioning["captions"],
            caption_switches=[(chunk, rows.repeat_interleave(repeat, dim=0)) for chunk, rows in conditioning["switches"]],
            negative=(negative[0].to(device).repeat_interleave(repeat, 0), negative[1].to(device).repeat_interleave(repeat, 0)),
            prefix_latents=None if prefix_latents is None else prefix_latents.repeat_interleave(repeat, dim=0),
            generators=_session_generators(arguments["generator"], device),
            latents=arguments["latents"],
            callback_on_step_end=arguments["callback_on_step_end"],
            callback_on_step_end_tensor_inputs=checked["callback_on_step_end_tensor_inputs"],
        )

    # Arguments of `__call__` that only the image- and video-to-video pipelines take (their prefix).
    _prefix_argument_names: Tuple[str, ...] = ()


def _input_device(module: torch.nn.Module, execution_device: torch.device) -> torch.device:
    """Where inputs of `module` go: its own device, unless sequential offloading left its weights on the meta device
    between calls (its hooks then move inputs to the execution device themselves)."""
    device = module.device
    return execution_device if device.type == "meta" else device


def _is_batch_of_chunk_prompts(chunk_prompts) -> bool:
    return isinstance(chunk_prompts, (list, tuple)) and bool(chunk_prompts) and not isinstance(chunk_prompts[0], str)


def _count_videos(prompt, chunk_prompts, prompt_embeds) -> int:
    if prompt_embeds is not None:
        return prompt_embeds.shape[0]
    if chunk_prompts is not None:
        return len(chunk_prompts) if _is_batch_of_chunk_prompts(chunk_prompts) else 1
    return 1 if isinstance(prompt, str) else len(prompt)


def call_signature_with_prefix(first: inspect.Parameter, *keyword: inspect.Parameter) -> inspect.Signature:
    """The signature of `MagiPipeline.__call__` with a prefix input (`image` / `video`) as first argument and more
    prefix arguments before `return_dict`: how the image- and video-to-video pipelines state their arguments without
    copying the list."""
    parameters = list(inspect.signature(MagiPipeline.__call__).parameters.values())
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    extra = [parameter.replace(kind=kind) for parameter in keyword]
    return inspect.Signature([parameters[0], first.replace(kind=kind), *parameters[1:-1], *extra, parameters[-1]])


def _session_generators(generator, device: torch.device) -> List[torch.Generator]:
    """The generators a session draws its noise from: the caller's, or one of its own seeded from torch's global
    generator (so that a saved session resumes with the same noise)."""
    if generator is None:
        own = torch.Generator(device=device)
        own.manual_seed(int(torch.randint(0, 2**63 - 1, (1,)).item()))
        return [own]
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    for item in generators:
        if not isinstance(item, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(item).__name__}.")
    return generators


def _prompt_schedule(chunk_prompts, num_generated_chunks: Optional[int]) -> Dict[int, str]:
    """`{first_chunk: prompt}` of one video from a per-chunk list or a schedule (checked against the video length;
    an open-ended video takes schedules only)."""
    if num_generated_chunks is not None:
        per_chunk = resolve_chunk_prompts(chunk_prompts, num_generated_chunks)
        if isinstance(chunk_prompts, dict):
            return dict(sorted(chunk_prompts.items()))
        return dict(enumerate(per_chunk))
    if not isinstance(chunk_prompts, dict):
        raise ValueError(
            "An open-ended session (no num_frames) takes chunk_prompts as a {first_chunk: prompt} schedule, not a list "
            "(whose length would fix the video length)."
        )
    if not chunk_prompts or 0 not in chunk_prompts or any(not isinstance(k, int) or k < 0 for k in chunk_prompts):
        raise ValueError(f"chunk_prompts as a schedule needs non-negative integer keys including 0, got {sorted(chunk_prompts)}.")
    return dict(sorted(chunk_prompts.items()))


def _prompt_at(schedule: Dict[int, str], chunk: int) -> str:
    return schedule[max(first for first in schedule if first <= chunk)]
