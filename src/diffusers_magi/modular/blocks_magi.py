"""Modular Diffusers blocks for MAGI-1, built on the same steps as the classic pipelines (and the same session).

`MagiAutoBlocks` runs, in order:

1. `input` (`MagiInputStep`): every check that needs no model (sizes, frames, steps, prompts, guidance settings).
2. `prefix` (`MagiAutoPrefixStep`): the VAE encodes `image` (`MagiImageEncoderStep`) or `video`
   (`MagiVideoEncoderStep`) into clean prefix latents; skipped for text-to-video.
3. `text_encoder` (`MagiTextEncoderStep`): T5 captions (chunk prompts and special tokens), the unconditional caption.
4. `prepare` (`MagiPrepareSessionStep`): the `MagiSession` of the generation (plan, KV cache, noise generators).
5. `denoise` (`MagiChunkLoopStep`): the chunk-wise loop, chunk latents as they become final.
6. `decode` (`MagiDecodeStep`): the VAE decodes each chunk on its own; `videos` as `output_type` asks.

Each block reads the components through a classic pipeline assembled around them (`classic_pipeline`), so a
modular generation equals `MagiPipeline` / `MagiImageToVideoPipeline` / `MagiVideoToVideoPipeline` bit for bit, and
any block can be swapped for a custom one (`blocks.sub_blocks["decode"] = MyDecodeStep()`).
"""

import inspect
import os
from typing import Any, Dict, List, Type

import torch
from diffusers.modular_pipelines import (
    AutoPipelineBlocks,
    ModularPipelineBlocks,
    PipelineState,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, ConfigSpec, InputParam, OutputParam
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from ..models.autoencoder_magi import AutoencoderMagi
from ..models.transformer_magi import MagiTransformer3DModel
from ..pipelines.pipeline_magi import MagiPipeline
from ..pipelines.pipeline_magi_i2v import MagiImageToVideoPipeline
from ..pipelines.pipeline_magi_v2v import MagiVideoToVideoPipeline
from ..schedulers.scheduling_magi_chunk import MagiChunkScheduler

MODEL_NAME = "magi"
# The guidance defaults and step budget a converted folder stores in its model_index.json.
PIPELINE_CONFIGS = (
    "guidance_mode",
    "cfg_t_range",
    "prev_chunk_scales",
    "text_scales",
    "nearly_clean_weight",
    "nearly_clean_threshold",
    "default_num_inference_steps",
)
# Arguments of `MagiPipeline.__call__` (its docstring explains them); the blocks take them under the same names.
CALL_ARGUMENTS = [name for name in inspect.signature(MagiPipeline.__call__).parameters if name not in ("self", "return_dict")]


def classic_pipeline(components, pipeline_class: Type[MagiPipeline] = MagiPipeline) -> MagiPipeline:
    """A classic MAGI-1 pipeline around the modular pipeline's components (shared, not copied) and its config."""
    config = {name: components.config[name] for name in PIPELINE_CONFIGS if components.config.get(name) is not None}
    pipe = pipeline_class(
        transformer=components.transformer,
        scheduler=components.scheduler,
        vae=getattr(components, "vae", None),
        text_encoder=getattr(components, "text_encoder", None),
        tokenizer=getattr(components, "tokenizer", None),
        **config,
    )
    return pipe


def _call_inputs(names: List[str]) -> List[InputParam]:
    parameters = inspect.signature(MagiPipeline.__call__).parameters
    return [
        InputParam(
            name,
            type_hint=parameters[name].annotation,
            default=parameters[name].default,
            description=f"`{name}` of `MagiPipeline.__call__`.",
        )
        for name in names
    ]


def _arguments(block_state) -> Dict[str, Any]:
    return {name: getattr(block_state, name) for name in CALL_ARGUMENTS}


class _MagiBlock(ModularPipelineBlocks):
    model_name = MODEL_NAME

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("transformer", MagiTransformer3DModel), ComponentSpec("scheduler", MagiChunkScheduler)]

    @property
    def expected_configs(self) -> List[ConfigSpec]:
        defaults = inspect.signature(MagiPipeline.__init__).parameters
        return [ConfigSpec(name, defaults[name].default) for name in PIPELINE_CONFIGS]


class MagiInputStep(_MagiBlock):
    @property
    def description(self) -> str:
        return "Checks every argument that needs no model (sizes, frames, steps, prompts, guidance) before any work."

    @property
    def inputs(self) -> List[InputParam]:
        return _call_inputs(CALL_ARGUMENTS)

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("checked", type_hint=dict, description="Resolved settings: guidance, steps, batch size.")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        block_state.checked = classic_pipeline(components)._check_call_arguments(_arguments(block_state))
        self.set_block_state(state, block_state)
        return components, state


class _MagiPrefixEncoderStep(_MagiBlock):
    pipeline_class: Type[MagiPipeline]

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [*super().expected_components, ComponentSpec("vae", AutoencoderMagi)]

    @property
    def inputs(self) -> List[InputParam]:
        signature = inspect.signature(self.pipeline_class.__call__).parameters
        prefix = [
            InputParam(name, type_hint=signature[name].annotation, default=signature[name].default, description=f"`{name}` of `{self.pipeline_class.__name__}`.")
            for name in self.pipeline_class._prefix_argument_names
        ]
        return [*prefix, *_call_inputs(["height", "width"]), InputParam("checked", required=True, type_hint=dict)]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("prefix_latents", type_hint=torch.Tensor, description="Clean VAE-scaled prefix latents (videos, 16, frames, h, w).")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        pipe = classic_pipeline(components, self.pipeline_class)
        prefix = {name: getattr(block_state, name) for name in self.pipeline_class._prefix_argument_names}
        block_state.prefix_latents = pipe._prefix_latents(
            block_state.checked["num_videos"], block_state.height, block_state.width, pipe._execution_device, **prefix
        )
        self.set_block_state(state, block_state)
        return components, state


class MagiImageEncoderStep(_MagiPrefixEncoderStep):
    pipeline_class = MagiImageToVideoPipeline

    @property
    def description(self) -> str:
        return "Image-to-video: the VAE encodes `image` into one clean latent frame (or checks `prefix_latents`)."


class MagiVideoEncoderStep(_MagiPrefixEncoderStep):
    pipeline_class = MagiVideoToVideoPipeline

    @property
    def description(self) -> str:
        return "Video-to-video: the VAE encodes the first `num_prefix_frames` frames of `video` into clean latents."


class MagiAutoPrefixStep(AutoPipelineBlocks):
    block_classes = [MagiImageEncoderStep, MagiVideoEncoderStep]
    block_names = ["image_encoder", "video_encoder"]
    block_trigger_inputs = ["image", "video"]

    @property
    def description(self) -> str:
        return "Encodes the prefix: `image` (image-to-video) or `video` (video-to-video); skipped for text-to-video."


class MagiTextEncoderStep(_MagiBlock):
    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [
            *super().expected_components,
            ComponentSpec("text_encoder", T5EncoderModel),
            ComponentSpec("tokenizer", PreTrainedTokenizerBase),
        ]

    @property
    def description(self) -> str:
        return "T5 captions of the prompt or chunk prompts (special tokens prepended per chunk) and the unconditional caption."

    @property
    def inputs(self) -> List[InputParam]:
        return [*_call_inputs(CALL_ARGUMENTS), InputParam("checked", required=True, type_hint=dict), InputParam("prefix_latents", type_hint=torch.Tensor)]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("conditioning", type_hint=dict, description="Caption bank, prompt switches, unconditional caption, length in chunks.")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        pipe = classic_pipeline(components)
        block_state.conditioning = pipe._encode_conditioning(_arguments(block_state), block_state.checked, block_state.prefix_latents)
        self.set_block_state(state, block_state)
        return components, state


class MagiPrepareSessionStep(_MagiBlock):
    @property
    def description(self) -> str:
        return "The generation's MagiSession: plan, KV cache, noise generators (nothing runs yet)."

    @property
    def inputs(self) -> List[InputParam]:
        return [
            *_call_inputs(CALL_ARGUMENTS),
            InputParam("checked", required=True, type_hint=dict),
            InputParam("prefix_latents", type_hint=torch.Tensor),
            InputParam("conditioning", required=True, type_hint=dict),
        ]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("session", description="The MagiSession of this generation (chunks come out as latents).")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        arguments = dict(_arguments(block_state), output_type="latent")  # decoding is the decode block's job
        block_state.session = classic_pipeline(components)._new_session(
            arguments, block_state.checked, block_state.prefix_latents, block_state.conditioning
        )
        self.set_block_state(state, block_state)
        return components, state


class MagiChunkLoopStep(ModularPipelineBlocks):
    model_name = MODEL_NAME

    @property
    def description(self) -> str:
        return "The chunk-wise denoising loop (schedule plan, guidance, KV cache): runs the session to its end."

    @property
    def inputs(self) -> List[InputParam]:
        return [InputParam("session", required=True)]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("chunk_latents", type_hint=list, description="Final latents of each chunk, in order.")]

    def set_progress_bar_config(self, **kwargs):
        """Settings of the per-chunk tqdm bars (`disable=True` turns them off); `MagiModularPipeline`'s
        `set_progress_bar_config` forwards here."""
        self._progress_bar_config = kwargs

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        session = block_state.session
        session.pipeline.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        block_state.chunk_latents = [chunk.frames for chunk in session.chunks()]
        if not block_state.chunk_latents:
            raise RuntimeError("The generation was interrupted before its first chunk was final; no frames to decode.")
        self.set_block_state(state, block_state)
        return components, state


class MagiDecodeStep(ModularPipelineBlocks):
    model_name = MODEL_NAME

    @property
    def expected_components(self) -> List[ComponentSpec]:
        return [ComponentSpec("vae", AutoencoderMagi)]

    @property
    def description(self) -> str:
        return "The VAE decodes each chunk on its own (memory flat in video length); `videos` in `output_type`."

    @property
    def inputs(self) -> List[InputParam]:
        return [InputParam("chunk_latents", required=True, type_hint=list), *_call_inputs(["output_type"])]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam("videos", description="The video(s), in the layout of MagiPipelineOutput.frames.")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        pipe = classic_pipeline(components)
        output_type = block_state.output_type
        chunks = [pipe._postprocess_chunk(latents, output_type) for latents in block_state.chunk_latents]
        block_state.videos = pipe._concatenate(chunks, output_type)
        self.set_block_state(state, block_state)
        return components, state


class MagiAutoBlocks(SequentialPipelineBlocks):
    block_classes = [
        MagiInputStep,
        MagiAutoPrefixStep,
        MagiTextEncoderStep,
        MagiPrepareSessionStep,
        MagiChunkLoopStep,
        MagiDecodeStep,
    ]
    block_names = ["input", "prefix", "text_encoder", "prepare", "denoise", "decode"]

    @property
    def description(self) -> str:
        return (
            "MAGI-1 text-, image- and video-to-video (the inputs select: `image` -> image-to-video, `video` -> "
            "video-to-video): input checks, prefix encoding, text encoding, session, chunk loop, decoding."
        )

    @property
    def outputs(self) -> List[OutputParam]:
        return [OutputParam("videos")]

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        """Save the blocks as Modular Diffusers publishes blocks (`modular_config.json` whose `auto_map` names the
        code file), with a code file that imports them from the installed `diffusers_magi` package: loading them
        back with `ModularPipelineBlocks.from_pretrained(path, trust_remote_code=True)` needs the package, not a
        copy of its code."""
        os.makedirs(save_directory, exist_ok=True)
        module, name = "magi_blocks", type(self).__name__
        with open(os.path.join(save_directory, f"{module}.py"), "w", encoding="utf-8") as code:
            code.write(f"from diffusers_magi.modular import {name}  # noqa: F401\n")
        # What `ModularPipelineBlocks.save_pretrained` writes, with the code file above (an override would otherwise
        # be recorded under this class's name instead of `ModularPipelineBlocks`).
        self.register_to_config(auto_map={"ModularPipelineBlocks": f"{module}.{name}"})
        self.save_config(save_directory=save_directory, push_to_hub=push_to_hub, **kwargs)
