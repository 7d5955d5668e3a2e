"""`MagiTransformer3DModel`: the MAGI-1 video diffusion transformer (DiT).

Reading order: `MagiTransformer3DModel.forward` embeds the latent window, the timesteps and the captions, runs the
`MagiTransformerBlock`s and un-patchifies. Each block is parallel self- and cross-attention from one pre-norm
(`attention_magi.MagiAttention`), then an MLP, each branch gated by the timestep condition ("gating-only"
modulation with a tanh softcap) and normalised after gating ("sandwich" post-norms).

Conventions (those of the original checkpoints):
* time `t` runs from 0 (pure noise) to 1 (clean); Diffusers' `sigma` is `1 - t`;
* the output is the velocity `dx/dt`, i.e. `-(noise - x0)` in Diffusers' flow-matching terms;
* latents are already multiplied by the VAE's scaling factor (0.18215).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale

from ..loaders.peft_magi import MagiPeftAdapterMixin
from ..placement import check_device_map
from .attention_magi import CHUNK_ATTENTION_FORMS, ChunkAttentionLayout, MagiAttention, MagiLayerNorm
from .cache_hooks_magi import register_cache_hooks
from .context_parallel_magi import check_context_parallel_config, context_parallel_config, sequence_shards
from .fp8_linear_magi import MagiFp8Linear
from .kv_cache_magi import MagiKVCache
from .loading_checks_magi import check_config_types, checked_from_pretrained
from .weight_alignment import own_cpu_weights

# Learned special tokens of MAGI-1 (rows of the original `special_tokens.npz`), prepended to captions by the
# pipelines. `duration_k` means "k chunks remain after this one" (clamped at 8).
SPECIAL_TOKEN_NAMES = (
    "caption",
    "logo",
    "trans",
    "hq",
    "static_first_frames",
    "dynamic_first_frames",
    "borderness",
    *(f"duration_{k}" for k in range(1, 9)),
    "three_d_model",
    "two_d_anime",
)


# Linears of a block that fp8 checkpoints quantise: (path in the block, per-channel scales). All other linears (gates,
# caption keys/values) stay in the model dtype.
FP8_BLOCK_LINEARS = (
    ("attn.to_q", False),
    ("attn.to_k", False),
    ("attn.to_v", False),
    ("attn.to_cross_q", False),
    ("attn.to_out", True),
    ("ff.linear_in", False),
    ("ff.linear_out", True),
)


@dataclass
class MagiTransformerOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, out_latent_channels, frames, height, width)`):
            velocity `dx/dt` of every chunk of the input window.
    """

    sample: torch.Tensor


class MagiTimestepEmbedder(nn.Module):
    """Sinusoidal features of `t * 1000` (cosines first, then sines) followed by a two-layer MLP."""

    def __init__(self, embedding_dim: int, frequency_dim: int = 256, timestep_scale: float = 1000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_scale = timestep_scale
        self.linear_1 = nn.Linear(frequency_dim, embedding_dim)
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, timestep: torch.Tensor, feature_dtype: torch.dtype) -> torch.Tensor:
        """
        Args:
            timestep (`torch.Tensor` of shape `(N,)`): times in [0, 1] (or step sizes for the distillation embedding).
            feature_dtype (`torch.dtype`): the sinusoidal features are rounded to this dtype (the model dtype) before
                the MLP, as the original does; the MLP itself runs in its own (float32) dtype.
        Returns:
            `torch.Tensor` of shape `(N, embedding_dim)`.
        """
        half = self.frequency_dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
        args = timestep.float()[:, None] * torch.exp(exponent)[None] * self.timestep_scale
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        features = features.to(feature_dtype).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


@dataclass(frozen=True)
class MagiLearnedTokens:
    """MAGI-1's learned caption-side tensors, as `MagiCaptionTokens` returns them.

    Args:
        null_caption_embedding (`torch.Tensor` of shape `(text_length, text_dim)`): the learned "empty caption". Its
            first 50 tokens are the caption of unconditional rows; its last two rows feed the adaLN condition (`[-2]`
            when a caption is present, `[-1]` when it is dropped).
        special_tokens (`torch.Tensor` of shape `(len(SPECIAL_TOKEN_NAMES), text_dim)`, *optional*): MAGI-1's learned
            special tokens (quality, duration, style, negative tokens), float16-rounded as the original uses them.
    """

    null_caption_embedding: torch.Tensor
    special_tokens: Optional[torch.Tensor]

    def special_token(self, name: str) -> torch.Tensor:
        """The learned special token `name` (one of `SPECIAL_TOKEN_NAMES`), shape `(text_dim,)`."""
        if self.special_tokens is None:
            raise ValueError(
                "This transformer holds no special tokens (it was converted without `special_tokens.npz`); convert it "
                "with `special_tokens_path=...` or generate without special tokens."
            )
        if name not in SPECIAL_TOKEN_NAMES:
            raise ValueError(f"Unknown special token {name!r}; expected one of {SPECIAL_TOKEN_NAMES}.")
        return self.special_tokens[SPECIAL_TOKEN_NAMES.index(name)]


class MagiCaptionTokens(nn.Module):
    """Holds the learned null caption and special tokens; call it to read them (a `MagiLearnedTokens`).

    Read them through a call, not through the attributes: offloading hooks (model, sequential and group offloading, to
    memory or to disk) place a module's weights when the module is called, and between calls the parameters may live
    on another device, on the meta device, or on disk. The returned tensors are detached from the parameters, so they
    stay valid after the hooks offload the module again.
    """

    def __init__(self, text_dim: int, text_length: int, use_special_tokens: bool):
        super().__init__()
        self.null_caption_embedding = nn.Parameter(torch.zeros(text_length, text_dim))
        self.special_tokens = (
            nn.Parameter(torch.zeros(len(SPECIAL_TOKEN_NAMES), text_dim)) if use_special_tokens else None
        )

    def forward(self) -> MagiLearnedTokens:
        special_tokens = self.special_tokens.detach() if self.special_tokens is not None else None
        return MagiLearnedTokens(self.null_caption_embedding.detach(), special_tokens)


class MagiTextEmbedder(nn.Module):
    """Caption projections: caption tokens for cross-attention, and the learned caption rows for the adaLN condition.
    The caption itself never enters the condition, only cross-attention."""

    def __init__(self, text_dim: int, cross_attention_dim: int, condition_dim: int):
        super().__init__()
        self.cross_attention_proj = nn.Linear(text_dim, cross_attention_dim)
        self.condition_proj = nn.Linear(text_dim, condition_dim)

    def caption_condition(self, null_caption_embedding: torch.Tensor, caption_dropped: torch.Tensor) -> torch.Tensor:
        """adaLN caption condition, `(rows, condition_dim)`, from the last two rows of the learned null caption
        `(text_length, text_dim)`: `[-1]` for rows whose caption is dropped, `[-2]` for the others."""
        token = torch.where(
            caption_dropped[:, None].to(null_caption_embedding.device),
            null_caption_embedding[-1][None],
            null_caption_embedding[-2][None],
        )
        return self.condition_proj(token.to(self.condition_proj.weight.dtype))

    def forward(self, caption: torch.Tensor, caption_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            caption (`torch.Tensor` of shape `(batch, num_chunks, text_length, text_dim)`)
            caption_mask (`torch.Tensor` of shape `(batch, num_chunks, text_length)`): non-zero = valid token.
        Returns:
            `(text_states, text_mask)`: the projected tokens `(batch, num_chunks, text_length, cross_attention_dim)`,
            padding included, and the boolean mask of the valid ones `(batch, num_chunks, text_length)`. Padding is
            kept (and masked in cross-attention) so that shapes never depend on the data: `torch.compile` traces
            the model without graph breaks.
        """
        tokens = F.silu(self.cross_attention_proj(caption.to(self.cross_attention_proj.weight.dtype)))
        return tokens, caption_mask.bool()


class MagiRotaryPosEmbed(nn.Module):
    """3D rotary embedding over (frame, row, column) with learned frequency bands.

    `head_dim // 8` bands (shared by the three axes) rotate the first `6 * (head_dim // 8)` channels of each head.
    Frame positions are frame indices counted from the start of the video. Row/column positions are centred on the
    grid and stretched as if the grid covered 16 x 16 patches of the same aspect ratio, so every resolution spans
    the range the model was trained on.
    """

    def __init__(self, head_dim: int, reference_grid_size: int = 16, temperature: float = 10000.0):
        super().__init__()
        self.reference_grid_size = reference_grid_size
        num_bands = head_dim // 8
        exponents = torch.arange(num_bands, dtype=torch.int64).to(torch.float32) / num_bands
        self.bands = nn.Parameter(1.0 / (temperature**exponents))

    def forward(self, first_frame: int, num_frames: int, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            first_frame (`int`): index (from the start of the video, in patch frames) of the first frame of the call.
            num_frames, height, width (`int`): size of the call's patch grid.
        Returns:
            `(cos, sin)`, each `(num_frames * height * width, 3 * num_bands)` float32, token order frame-major.
        """
        device = self.bands.device
        total_frames = first_frame + num_frames
        scale = math.sqrt((height * width) / (self.reference_grid_size**2))
        reference_shape = (total_frames, height / scale, width / scale)
        grid_shape = (total_frames, height, width)
        axes = [torch.arange(size, dtype=torch.int64, device=device).to(torch.float32) for size in grid_shape]
        axes[1] = axes[1] - (height - 1) / 2
        axes[2] = axes[2] - (width - 1) / 2
        # Stretch every axis so that its end points match the reference grid (an identity up to rounding for time).
        axes = [
            axis if size == 1 else axis / (size - 1) * (reference - 1)
            for axis, size, reference in zip(axes, grid_shape, reference_shape)
        ]
        axes[0] = axes[0][first_frame:]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        angles = (grid[..., None] * self.bands.float()).reshape(num_frames * height * width, -1)
        return angles.cos(), angles.sin()


class MagiFeedForward(nn.Module):
    """Pre-norm MLP: GELU (exact) or SwiGLU (`silu(a) * b` with `a, b` the two halves of the first projection)."""

    def __init__(self, hidden_size: int, ffn_dim: int, gated: bool, eps: float = 1e-6):
        super().__init__()
        self.gated = gated
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.linear_in = nn.Linear(hidden_size, 2 * ffn_dim if gated else ffn_dim, bias=False)
        self.linear_out = nn.Linear(ffn_dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_in(self.norm(hidden_states))
        if self.gated:
            gate, up = hidden_states.chunk(2, dim=-1)
            dtype = gate.dtype
            # silu(gate) * up in float32, in place on a float32 copy of the gate (the product promotes `up`
            # exactly): the same values as out of place, with fewer (tokens, ffn_dim) tensors alive at once.
            activated = F.silu(gate.to(torch.float32, copy=True), inplace=True).mul_(up)
            del hidden_states, gate, up
            hidden_states = activated.to(dtype)
        elif hidden_states.requires_grad:
            hidden_states = F.gelu(hidden_states)
        else:
            # In place when no gradient needs the input: the same values, one (tokens, ffn_dim) tensor fewer to
            # allocate. On a CPU a fresh tensor that large costs page faults: ~7 % of a base model's video time at
            # the CPU case of docs/performance.md.
            hidden_states = torch.ops.aten.gelu_(hidden_states)
        return self.linear_out(hidden_states)


class MagiTransformerBlock(nn.Module):
    """One MAGI-1 layer: `h = h + post_norm(tanh(gate) * branch)` for the attention branch, then the MLP branch.

    The gates come from the per-chunk condition; there is no shift/scale modulation. Residual and gating run in
    float32 and the result is rounded to the model dtype after each branch.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        attention_head_dim: int,
        ffn_dim: int,
        condition_dim: int,
        cross_attention_dim: int,
        gated_linear_unit: bool,
        eps: float,
        zero_centered_norm_weights: bool,
        gate_softcap: float,
        attention_output_groups: int,
    ):
        super().__init__()
        self.gate_softcap = gate_softcap
        self.modulation = nn.Linear(condition_dim, 2 * hidden_size)
        self.attn = MagiAttention(
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            attention_head_dim,
            cross_attention_dim,
            eps=eps,
            zero_centered_norm_weight=zero_centered_norm_weights,
            output_groups=attention_output_groups,
        )
        self.attn_post_norm = MagiLayerNorm(hidden_size, eps, zero_centered_norm_weights)
        self.ff = MagiFeedForward(hidden_size, ffn_dim, gated_linear_unit, eps)
        self.ff_post_norm = MagiLayerNorm(hidden_size, eps, zero_centered_norm_weights)

    def _gated_residual(
        self,
        branch: torch.Tensor,
        residual: torch.Tensor,
        gate: torch.Tensor,
        post_norm: MagiLayerNorm,
        layout: ChunkAttentionLayout,
    ) -> torch.Tensor:
        # Each chunk's tokens (those this process holds, under context parallelism) are scaled by that chunk's gate.
        if layout.shards is None:
            gated = (branch.float().unflatten(1, (layout.num_chunks, -1)) * gate.float()[:, :, None]).flatten(1, 2)
        else:
            gated = torch.cat(
                [branch[:, start:end].float() * gate[:, chunk, None].float() for chunk, start, end in layout.local_chunk_segments()],
                dim=1,
            )
        normed = post_norm(gated)
        del gated
        return normed.add_(residual).to(residual.dtype)  # the float32 sum; `residual` is promoted exactly

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        layout: ChunkAttentionLayout,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        kv_cache=None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, tokens, hidden_size)`): the call's tokens, or this
                process's slice of them under context parallelism.
            condition (`torch.Tensor` of shape `(batch, num_chunks, condition_dim)`): per-chunk condition.
            Others: see `MagiAttention.forward`.
        """
        gates = self.modulation(F.silu(condition))
        gates = (self.gate_softcap * torch.tanh(gates.float() / self.gate_softcap)).to(gates.dtype)
        attention_gate, ff_gate = gates.chunk(2, dim=-1)

        attention = self.attn(hidden_states, rotary_emb, layout, text_states, text_mask, kv_cache)
        hidden_states = self._gated_residual(attention, hidden_states, attention_gate, self.attn_post_norm, layout)
        del attention  # not alive during the MLP
        hidden_states = self._gated_residual(self.ff(hidden_states), hidden_states, ff_gate, self.ff_post_norm, layout)
        return hidden_states


class MagiTransformer3DModel(ModelMixin, ConfigMixin, MagiPeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""
    The MAGI-1 diffusion transformer: denoises a window of consecutive latent chunks, each at its own time, with
    chunk-causal attention to earlier chunks (in the window or in a `MagiKVCache`).

    Args:
        in_channels (`int`, defaults to 16): channels the patch embedding takes (32 for 24B, see `half_channel_vae`).
        out_channels (`int`, defaults to 16): channels the final projection produces per patch element.
        patch_size (`Tuple[int, int, int]`, defaults to `(1, 2, 2)`): (frames, height, width) of a patch.
        num_layers (`int`, defaults to 34): number of transformer blocks.
        hidden_size (`int`, defaults to 3072): width of the hidden states.
        num_attention_heads (`int`, defaults to 24): query heads.
        num_key_value_heads (`int`, defaults to 8): key/value heads (grouped-query attention; "query groups").
        attention_head_dim (`int`, defaults to 128): channels per head (the original's `kv_channels`).
        ffn_dim (`int`, defaults to 12288): inner width of the MLP.
        gated_linear_unit (`bool`, defaults to `False`): SwiGLU MLP (24B) instead of GELU (4.5B).
        text_dim (`int`, defaults to 4096): channels of the caption embeddings (T5-XXL).
        text_length (`int`, defaults to 800): caption length, also the length of the learned null caption.
        condition_dim (`int`, defaults to 768): width of the timestep/caption condition (`hidden_size / 4`).
        cross_attention_dim (`int`, defaults to 3072): width of the projected caption tokens.
        eps (`float`, defaults to 1e-6): epsilon of every norm.
        zero_centered_norm_weights (`bool`, defaults to `True`): the q/k norms, post-norms and the final norm store
            `scale - 1` (Megatron's `apply_layernorm_1p`).
        x_rescale_factor (`float`, defaults to 1.0): latents are multiplied by it on input and divided on output
            (0.1 for 24B).
        half_channel_vae (`bool`, defaults to `False`): latents have `in_channels / 2` channels; they are duplicated
            on input and only the first half of the output channels is returned (24B).
        step_size_conditioning (`bool`, defaults to `False`): distilled checkpoints add the embedding of the
            shortcut step size to the time embedding (pass `step_size` to `forward`).
        gate_softcap (`float`, defaults to 1.0): the gates are `softcap * tanh(gate / softcap)`.
        attention_output_groups (`int`, defaults to 8): groups of the [self | cross] attention re-ordering before the
            output projection (a trace of 8-way tensor-parallel training).
        use_special_tokens (`bool`, defaults to `True`): whether the model holds MAGI-1's learned special tokens.
        fp8_layers (`List[int]`, *optional*): blocks whose q/k/v, cross-attention query, attention output and MLP
            linears are `MagiFp8Linear`s (float8 weights and activations, as the original "fp8_quant" checkpoints:
            every block but the first and the last). They return the dtype of the hidden states (the attention output
            projection is not promoted to float32).
    """

    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = [
        "patch_embedding",
        "time_embedder",
        "text_embedder",
        "caption_tokens",
        "rope",
        "norm_q",
        "norm_k",
        "attn_post_norm",
        "ff_post_norm",
        "norm_out",
        "proj_out",
        # float32 scales of the fp8 linears
        "weight_scale",
        "input_scale",
        "smooth_scale",
    ]
    _skip_layerwise_casting_patterns = ["patch_embedding", "time_embedder", "text_embedder", "caption_tokens", "rope", "norm"]
    _no_split_modules = ["MagiTransformerBlock"]
    _repeated_blocks = ["MagiTransformerBlock"]
    # Block-level group offloading gives the learned caption tokens a group of their own, placed when they are read.
    _group_offload_block_modules = ["caption_tokens"]
    # Context parallelism: the tokens (and their rotary embedding) are split after the patch embedding and gathered
    # after the final projection; `MagiAttnProcessor` does the Ulysses exchange inside attention.
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: Tuple[int, int, int] = (1, 2, 2),
        num_layers: int = 34,
        hidden_size: int = 3072,
        num_attention_heads: int = 24,
        num_key_value_heads: int = 8,
        attention_head_dim: int = 128,
        ffn_dim: int = 12288,
        gated_linear_unit: bool = False,
        text_dim: int = 4096,
        text_length: int = 800,
        condition_dim: int = 768,
        cross_attention_dim: int = 3072,
        eps: float = 1e-6,
        zero_centered_norm_weights: bool = True,
        x_rescale_factor: float = 1.0,
        half_channel_vae: bool = False,
        step_size_conditioning: bool = False,
        gate_softcap: float = 1.0,
        attention_output_groups: int = 8,
        use_special_tokens: bool = True,
        fp8_layers: Optional[List[int]] = None,
    ):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({num_key_value_heads})."
            )
        if (num_attention_heads * attention_head_dim) % attention_output_groups:
            raise ValueError(
                f"num_attention_heads * attention_head_dim ({num_attention_heads * attention_head_dim}) must be "
                f"divisible by attention_output_groups ({attention_output_groups})."
            )
        if half_channel_vae and in_channels % 2:
            raise ValueError(f"half_channel_vae needs an even in_channels, got {in_channels}.")

        self.patch_embedding = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=False)
        self.time_embedder = MagiTimestepEmbedder(condition_dim)
        self.text_embedder = MagiTextEmbedder(text_dim, cross_attention_dim, condition_dim)
        self.caption_tokens = MagiCaptionTokens(text_dim, text_length, use_special_tokens)
        self.rope = MagiRotaryPosEmbed(hidden_size // num_attention_heads)
        self.blocks = nn.ModuleList(
            [
                MagiTransformerBlock(
                    hidden_size,
                    num_attention_heads,
                    num_key_value_heads,
                    attention_head_dim,
                    ffn_dim,
                    condition_dim,
                    cross_attention_dim,
                    gated_linear_unit,
                    eps,
                    zero_centered_norm_weights,
                    gate_softcap,
                    attention_output_groups,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = MagiLayerNorm(hidden_size, eps, zero_centered_norm_weights)
        self.gradient_checkpointing = False
        self.proj_out = nn.Linear(hidden_size, math.prod(patch_size) * out_channels, bias=False)
        for layer in fp8_layers or ():
            if not 0 <= layer < num_layers:
                raise ValueError(f"fp8_layers holds {layer}, which is not a block index (0 ... {num_layers - 1}).")
            for path, per_channel in FP8_BLOCK_LINEARS:
                parent_path, name = path.rsplit(".", 1)
                parent = self.blocks[layer].get_submodule(parent_path)
                linear = getattr(parent, name)
                setattr(parent, name, MagiFp8Linear(linear.in_features, linear.out_features, per_channel))

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the model takes and returns."""
        return self.config.in_channels // 2 if self.config.half_channel_vae else self.config.in_channels

    def special_token(self, name: str) -> torch.Tensor:
        """The learned special token `name` (one of `SPECIAL_TOKEN_NAMES`), shape `(text_dim,)`."""
        return self.caption_tokens().special_token(name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""Diffusers' `ModelMixin.from_pretrained`, with a clear error when `device_map` or `max_memory` name devices
        this machine does not have. Blocks are never split across devices (`_no_split_modules`), so
        `device_map="auto"` with `max_memory` spreads whole blocks over GPUs, the CPU and disk (`offload_folder`).
        A tensor the weight files lack is an error naming it (`loading_checks_magi.checked_from_pretrained`).
        Weights left on the CPU get 64-byte aligned memory of their own (`weight_alignment.own_cpu_weights`), so that
        results do not depend on where the loader put them."""
        check_device_map(kwargs.get("device_map"), kwargs.get("max_memory"))
        model = checked_from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path, **kwargs)
        return own_cpu_weights(model) if not isinstance(model, tuple) else (own_cpu_weights(model[0]), model[1])

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        r"""`ConfigMixin.from_config`, with a `TypeError` naming any config field of the wrong type."""
        check_config_types(cls, config if isinstance(config, dict) else {}, kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def enable_cache(self, config) -> None:
        r"""Diffusers' `CacheMixin.enable_cache` (first-block cache, TaylorSeer, MagCache, FasterCache, pyramid
        attention broadcast), with MAGI-1's block and attention registered with Diffusers' hook registries first
        (`cache_hooks_magi`). The MAGI-1 guidance runs every pass in a cache context of its own window and branch;
        see docs/performance.md for the settings that suit MAGI-1."""
        from diffusers.hooks import FasterCacheConfig

        if isinstance(config, FasterCacheConfig) and not config.is_guidance_distilled:
            raise ValueError(
                "FasterCache's unconditional-branch skipping expects [unconditional, conditional] batch halves, which "
                "MAGI-1's guidance does not use; pass `FasterCacheConfig(..., is_guidance_distilled=True)` (attention "
                "caching only)."
            )
        register_cache_hooks()
        super().enable_cache(config)

    def set_chunk_attention(self, form: Optional[str]) -> None:
        r"""How self-attention is computed (see `attention_magi`): `"per_chunk"` (a loop over the chunks of a call,
        each on its exact key range; any backend), `"chunks_as_batch"` (one call, the chunks as batch rows with a
        key-padding mask; needs PyTorch SDPA, does the masked keys' work too, and traces one `torch.compile` graph for
        every window), or `None` (the default: chunks as batch while `torch.compile` traces, the loop otherwise).
        The two forms agree to float rounding; setting one makes a compiled run equal an eager one bit for bit."""
        if form is not None and form not in CHUNK_ATTENTION_FORMS:
            raise ValueError(f"form must be None or one of {CHUNK_ATTENTION_FORMS}, got {form!r}.")
        for module in self.modules():
            if isinstance(module, MagiAttention):
                module.processor._chunk_attention = form

    def enable_parallelism(self, *, config, cp_plan=None):
        r"""Diffusers' `enable_parallelism`: Ulysses context parallelism with `ContextParallelConfig(ulysses_degree=P)`
        (run every process with the same inputs; each computes `1 / P` of the tokens and the output is gathered on
        all). `P` must divide the attention and key/value heads; ring attention is not supported."""
        check_context_parallel_config(config, self.config.num_attention_heads, self.config.num_key_value_heads)
        return super().enable_parallelism(config=config, cp_plan=cp_plan)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        first_chunk_index: int = 0,
        attention_chunk_starts: Optional[Union[int, Sequence[int]]] = None,
        kv_cache: Optional[MagiKVCache] = None,
        num_chunks_to_cache: int = 0,
        caption_dropped: Union[bool, torch.Tensor] = False,
        step_size: Optional[Union[float, torch.Tensor]] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[MagiTransformerOutput, Tuple[torch.Tensor]]:
        r"""
        Velocity of every chunk of a window of consecutive latent chunks.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, latent_channels, num_chunks * chunk_frames, height, width)`):
                the latent window (VAE-scaled); `height` and `width` divisible by the spatial patch size.
            timestep (`torch.Tensor` of shape `(batch, num_chunks)` or `(num_chunks,)`):
                time of each chunk, 0 = pure noise, 1 = clean (`t = 1 - sigma`). Its length sets `num_chunks`.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, num_chunks, text_length, text_dim)` or
                `(batch, text_length, text_dim)`): caption embeddings of each chunk (or one for all chunks).
            encoder_attention_mask (`torch.Tensor` of shape `(batch, num_chunks, text_length)` or
                `(batch, text_length)`): non-zero marks valid caption tokens; padding never influences the output.
            first_chunk_index (`int`, defaults to 0): index, counted from the start of the video, of the first chunk
                of `hidden_states`. It positions the window in time (rotary embedding) and names the chunks in the
                KV cache.
            attention_chunk_starts (`int` or `Sequence[int]`, *optional*): for each chunk of the window, the index of
                the earliest chunk its queries attend to (one int: the same for every chunk, which `torch.compile`
                traces without specialising on the number of chunks); they attend to every chunk from there up to and
                including their own. Chunks before `first_chunk_index` are read from `kv_cache`. Defaults to
                `first_chunk_index` for every chunk (causal within the window, nothing from the cache).
            kv_cache (`MagiKVCache`, *optional*): keys/values of earlier clean chunks.
            num_chunks_to_cache (`int`, defaults to 0): the first `num_chunks_to_cache` chunks of the window are
                clean; their keys/values are written to `kv_cache` (nothing is written otherwise).
            caption_dropped (`bool` or `torch.Tensor` of shape `(batch,)`, defaults to `False`): selects the learned
                adaLN caption token: the "caption present" token (`False`) or the "caption dropped" token (`True`,
                unconditional rows and the rows that refresh the cache in three-branch guidance).
            step_size (`float` or 0-d `torch.Tensor`, *optional*): shortcut step size of distilled checkpoints
                (`step_size_conditioning=True`); `MagiChunkScheduler` provides it.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` multiplies the output of every active LoRA adapter
                by `s` for this call (Diffusers' `lora_scale`); nothing else is read from it.
            return_dict (`bool`, defaults to `True`): return a `MagiTransformerOutput` instead of a tuple.

        Returns:
            `MagiTransformerOutput` (or a tuple) with `sample` of the shape of `hidden_states`: the velocity `dx/dt`.
        """
        config = self.config
        timestep, encoder_hidden_states, encoder_attention_mask = self._check_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, kv_cache, num_chunks_to_cache, step_size
        )
        batch_size, _, num_frames, height, width = hidden_states.shape
        num_chunks = timestep.shape[1]
        patch_t, patch_h, patch_w = config.patch_size
        grid = (num_frames // patch_t, height // patch_h, width // patch_w)
        chunk_frames = grid[0] // num_chunks
        tokens_per_chunk = chunk_frames * grid[1] * grid[2]
        cp_config = context_parallel_config(self._parallel_config)
        layout = ChunkAttentionLayout(
            tokens_per_chunk=tokens_per_chunk,
            first_chunk_index=first_chunk_index,
            attention_chunk_starts=self._check_attention_chunk_starts(
                attention_chunk_starts, first_chunk_index, num_chunks
            ),
            num_chunks_to_cache=num_chunks_to_cache,
            shards=sequence_shards(cp_config, num_chunks * tokens_per_chunk) if cp_config is not None else None,
            num_chunks=num_chunks,
        )
        if layout.num_cached_chunks and kv_cache is None:
            raise ValueError(
                f"attention_chunk_starts reach back to chunk {layout.first_cached_chunk}, before first_chunk_index "
                f"({first_chunk_index}); pass the `kv_cache` that holds those chunks."
            )
        dtype = self.dtype

        # 1. Patch embedding (float32), then tokens in frame-major order: (batch, tokens, hidden_size).
        latents = hidden_states * config.x_rescale_factor
        if config.half_channel_vae:
            latents = torch.cat([latents, latents], dim=1)
        tokens = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        tokens = tokens.flatten(2).transpose(1, 2).to(dtype).contiguous()  # the layout of every block's output
        rotary_emb = self.rope(first_chunk_index * chunk_frames, *grid)

        # 2. Per-chunk condition: time embedding (+ step-size embedding) + learned caption token.
        flat_timestep = timestep.flatten()
        time_embedding = self.time_embedder(flat_timestep, dtype)
        if config.step_size_conditioning:
            step_sizes = torch.ones_like(flat_timestep, dtype=torch.float32) * step_size
            time_embedding = time_embedding + self.time_embedder(step_sizes, dtype)
        if not torch.is_tensor(caption_dropped):
            caption_dropped = torch.tensor([caption_dropped])
        learned_tokens = self.caption_tokens()
        caption_condition = self.text_embedder.caption_condition(
            learned_tokens.null_caption_embedding, caption_dropped.bool().flatten()
        )
        condition = time_embedding.unflatten(0, (batch_size, num_chunks)) + caption_condition[:, None]
        condition = condition.to(dtype)

        # 3. Caption tokens (padded, with their mask) for cross-attention.
        text_states, text_mask = self.text_embedder(encoder_hidden_states, encoder_attention_mask)
        text_states = text_states.to(dtype)

        # 4. Transformer blocks (on this process's slice of the tokens under context parallelism: `_cp_plan`).
        for index, block in enumerate(self.blocks):
            block_inputs = (tokens, condition, rotary_emb, layout, text_states, text_mask)
            block_cache = kv_cache.layer(index) if kv_cache is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, *block_inputs, block_cache)
            else:
                tokens = block(*block_inputs, block_cache)

        # 5. Final norm and projection (float32), then un-patchify: (batch, channels, frames, height, width).
        output = self.proj_out(self.norm_out(tokens.float()).to(self.proj_out.weight.dtype)).float()
        output = output.reshape(batch_size, *grid, patch_t, patch_h, patch_w, config.out_channels)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            batch_size, config.out_channels, num_frames, height, width
        )
        if config.half_channel_vae:
            output = output[:, : self.latent_channels]
        output = output / config.x_rescale_factor

        if not return_dict:
            return (output,)
        return MagiTransformerOutput(sample=output)

    def _check_inputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        kv_cache: Optional[MagiKVCache],
        num_chunks_to_cache: int,
        step_size,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = self.config
        if hidden_states.ndim != 5:
            raise ValueError(
                f"hidden_states must be (batch, channels, frames, height, width), got shape {tuple(hidden_states.shape)}."
            )
        batch_size, channels, num_frames, height, width = hidden_states.shape
        if channels != self.latent_channels:
            raise ValueError(
                f"hidden_states has {channels} channels but this transformer takes {self.latent_channels} latent "
                "channels; pass latents of the matching VAE."
            )
        patch_t, patch_h, patch_w = config.patch_size
        if height % patch_h or width % patch_w or num_frames % patch_t:
            raise ValueError(
                f"Latent size (frames={num_frames}, height={height}, width={width}) must be divisible by the patch "
                f"size {tuple(config.patch_size)}; choose a video height/width divisible by {8 * patch_h} pixels."
            )

        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 1:
            timestep = timestep[None].expand(batch_size, -1)
        if timestep.ndim != 2 or timestep.shape[0] != batch_size:
            raise ValueError(
                f"timestep must have shape (batch, num_chunks) = ({batch_size}, num_chunks) or (num_chunks,), got "
                f"{tuple(timestep.shape)}."
            )
        num_chunks = timestep.shape[1]
        if num_chunks == 0 or (num_frames // patch_t) % num_chunks:
            raise ValueError(
                f"timestep gives {num_chunks} chunks, which does not divide the {num_frames} latent frames of "
                "hidden_states into equal chunks; pass one time per chunk."
            )

        if encoder_hidden_states.ndim == 3:
            encoder_hidden_states = encoder_hidden_states[:, None].expand(-1, num_chunks, -1, -1)
        if encoder_attention_mask.ndim == 2:
            encoder_attention_mask = encoder_attention_mask[:, None].expand(-1, num_chunks, -1)
        expected = (batch_size, num_chunks)
        if (
            encoder_hidden_states.ndim != 4
            or tuple(encoder_hidden_states.shape[:2]) != expected
            or encoder_hidden_states.shape[-1] != config.text_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be (batch, num_chunks, text_length, {config.text_dim}) with "
                f"(batch, num_chunks) = {expected}, or (batch, text_length, {config.text_dim}); got "
                f"{tuple(encoder_hidden_states.shape)}."
            )
        if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:3]):
            raise ValueError(
                f"encoder_attention_mask must have shape {tuple(encoder_hidden_states.shape[:3])} to match "
                f"encoder_hidden_states, got {tuple(encoder_attention_mask.shape)}."
            )

        if num_chunks_to_cache:
            if kv_cache is None:
                raise ValueError("num_chunks_to_cache > 0 needs a `kv_cache` to write to.")
            if not 0 < num_chunks_to_cache <= num_chunks:
                raise ValueError(f"num_chunks_to_cache must be in [0, {num_chunks}], got {num_chunks_to_cache}.")
        if kv_cache is not None and len(kv_cache) != config.num_layers:
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, this transformer has {config.num_layers}.")
        if config.step_size_conditioning and step_size is None:
            raise ValueError(
                "This distilled transformer needs `step_size` (the shortcut step size of the sampling schedule, "
                "given by MagiChunkScheduler)."
            )
        return timestep, encoder_hidden_states, encoder_attention_mask

    @staticmethod
    def _check_attention_chunk_starts(
        attention_chunk_starts: Optional[Union[int, Sequence[int]]], first_chunk_index: int, num_chunks: int
    ) -> Union[int, Tuple[int, ...]]:
        if attention_chunk_starts is None:
            return first_chunk_index
        if isinstance(attention_chunk_starts, int):
            if not 0 <= attention_chunk_starts <= first_chunk_index:
                raise ValueError(
                    f"attention_chunk_starts = {attention_chunk_starts} is invalid for a call whose first chunk is "
                    f"{first_chunk_index}: one int is the start of every chunk, 0 <= start <= first_chunk_index."
                )
            return attention_chunk_starts
        starts = tuple(int(start) for start in attention_chunk_starts)
        if len(starts) != num_chunks:
            raise ValueError(f"attention_chunk_starts has {len(starts)} entries for {num_chunks} chunks.")
        for offset, start in enumerate(starts):
            if not 0 <= start <= first_chunk_index + offset:
                raise ValueError(
                    f"attention_chunk_starts[{offset}] = {start} is invalid for chunk {first_chunk_index + offset}: a "
                    "chunk may attend to earlier chunks and itself only (0 <= start <= its own index)."
                )
        return starts
