# Copyright 2025 The diffusers-magi authors. Licensed under the Apache License, Version 2.0.
"""AutoencoderMagi: the MAGI-1 video VAE (a plain ViT encoder/decoder) as a Diffusers autoencoder.

The model compresses a video 8x in height and width and 4x in time into 16 latent channels. Both halves are ViTs over
one token per latent position plus a class token; the encoder patchifies with a strided Conv3d, the decoder
un-patchifies channel-last and finishes with a 3x3x3 Conv3d over the whole decoded tile.

Encode and decode run tiled by default, with the tile plan of the original MAGI-1 pipeline (256x256-pixel tiles
overlapping by a quarter, 12-frame temporal tiles, no temporal overlap), because that is the only way the original
runs this VAE and the numbers depend on it. ``disable_tiling()`` gives the plain one-shot encode/decode.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from .loading_checks_magi import check_config_types, checked_from_pretrained
from .weight_alignment import own_cpu_weights

# The original encodes a single image by repeating it to four frames (a literal 4, not the temporal patch size) and
# keeping the first latent frame.
IMAGE_REPEAT_FRAMES = 4


def _standardize_last_dim(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free normalisation over the last dim: ``(x - mean) / (std + eps)`` with the biased std.

    Unlike LayerNorm, eps is added to the standard deviation, not to the variance.
    """
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=0)
    return (x - mean) / (std + eps)


def _blend(previous: torch.Tensor, tile: torch.Tensor, dim: int, extent: int) -> torch.Tensor:
    """Cross-fade the first ``extent`` slices of ``tile`` along ``dim`` with the last ones of ``previous``.

    ``tile`` is modified in place and returned. Slice ``k`` becomes ``previous[-extent + k] * (1 - k / extent) +
    tile[k] * (k / extent)``, computed one slice at a time so that the rounding matches the original in any dtype.
    """
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    for k in range(extent):
        tile.select(dim, k).copy_(
            previous.select(dim, k - extent) * (1 - k / extent) + tile.select(dim, k) * (k / extent)
        )
    return tile


def _map_tiles(
    x: torch.Tensor,
    span_fn,
    tile: tuple[int, int, int],
    stride: tuple[int, int, int],
    blend: tuple[int, int, int],
    keep: tuple[int, int, int],
    blend_in_place: bool,
) -> torch.Tensor:
    """Apply ``span_fn`` to overlapping ``tile``-sized boxes of ``x`` ``(B, C, T, H, W)`` and stitch the results.

    Boxes start every ``stride`` (input units). Each result is cross-faded with its previous neighbour in time, then
    height, then width over ``blend`` slices (output units), cropped to its first ``keep`` slices, and the crops are
    concatenated. With ``blend_in_place`` the results themselves are cross-faded, so later tiles read neighbours that
    were already cross-faded; otherwise a copy is, against the neighbours as computed. Temporal slabs are processed
    one after another and the previous one is kept only while it is blended with, so memory is one or two slabs.
    """
    slabs, previous_slab = [], None
    for t in range(0, x.shape[2], stride[0]):
        results = [
            [
                span_fn(x[:, :, t : t + tile[0], i : i + tile[1], j : j + tile[2]])
                for j in range(0, x.shape[4], stride[2])
            ]
            for i in range(0, x.shape[3], stride[1])
        ]
        rows = []
        for i, row in enumerate(results):
            cropped = []
            for j, result in enumerate(row):
                neighbours = [
                    (neighbour, dim, extent)
                    for neighbour, dim, extent in (
                        (previous_slab[i][j] if previous_slab is not None else None, 2, blend[0]),
                        (results[i - 1][j] if i > 0 else None, 3, blend[1]),
                        (row[j - 1] if j > 0 else None, 4, blend[2]),
                    )
                    if neighbour is not None
                ]
                tile_out = result if blend_in_place or not neighbours else result.clone()
                for neighbour, dim, extent in neighbours:
                    _blend(neighbour, tile_out, dim, extent)
                cropped.append(tile_out[:, :, : keep[0], : keep[1], : keep[2]])
            rows.append(torch.cat(cropped, dim=4))
        slabs.append(torch.cat(rows, dim=3))
        previous_slab = results if blend[0] > 0 else None
    return torch.cat(slabs, dim=2)


def _position_embedding_for_grid(
    pos_embed: torch.Tensor, pos_grid: tuple[int, int, int], grid: tuple[int, int, int]
) -> torch.Tensor:
    """Return the learned position embedding ``(1, 1 + prod(pos_grid), D)`` adapted to a token grid ``(T, H, W)``.

    The class-token entry is kept; the grid part is resized trilinearly (``align_corners=False``) when the grid
    differs from the one it was trained on.
    """
    if tuple(grid) == tuple(pos_grid):
        return pos_embed
    grid_embed = pos_embed[:, 1:].reshape(1, *pos_grid, -1).permute(0, 4, 1, 2, 3)
    grid_embed = F.interpolate(grid_embed, size=tuple(grid), mode="trilinear", align_corners=False)
    grid_embed = grid_embed.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid), -1)
    return torch.cat([pos_embed[:, :1], grid_embed], dim=1)


class MagiVAEAttnProcessor:
    """Full self-attention with per-head standardised queries, keys and values, through Diffusers' dispatcher."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "MagiVAEAttention", hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, N, 3 * D) -> (B, N, 3, heads, head_dim); q, k and v are each standardised over head_dim.
        qkv = attn.to_qkv(hidden_states).unflatten(-1, (3, attn.heads, -1))
        qkv = _standardize_last_dim(qkv, attn.eps)
        query, key, value = qkv.unbind(dim=2)
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return attn.to_out(hidden_states.flatten(2))


class MagiVAEAttention(nn.Module, AttentionModuleMixin):
    """Self-attention of the MAGI VAE: fused q/k/v projection, parameter-free q/k/v normalisation, no mask."""

    _default_processor_cls = MagiVAEAttnProcessor
    _available_processors = [MagiVAEAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, eps: float = 1e-5, processor=None):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states``: ``(B, N, D)`` -> ``(B, N, D)``."""
        return self.processor(self, hidden_states)


class MagiVAEFeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, inner_dim)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(inner_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(hidden_states)))


class MagiVAETransformerBlock(nn.Module):
    """``x + attn(x)`` (no norm before attention: q/k/v are normalised inside), then ``x + ff(norm(x))``."""

    def __init__(self, dim: int, num_attention_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.attn = MagiVAEAttention(dim, num_attention_heads, qkv_bias=qkv_bias)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.ff = MagiVAEFeedForward(dim, int(dim * mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(hidden_states)
        return hidden_states + self.ff(self.norm(hidden_states))


class _MagiVAETrunk(nn.Module):
    """Class token, learned position embedding, transformer blocks and final LayerNorm shared by both halves."""

    def __init__(
        self,
        dim: int,
        pos_grid: tuple[int, int, int],
        num_layers: int,
        num_attention_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ):
        super().__init__()
        self.pos_grid = pos_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(pos_grid), dim))
        self.blocks = nn.ModuleList(
            [MagiVAETransformerBlock(dim, num_attention_heads, mlp_ratio, qkv_bias) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-5)

    def run_trunk(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``tokens``: ``(B, T*H*W, D)`` in (t, h, w) order -> ``(B, 1 + T*H*W, D)``, class token first, after the
        blocks and the final norm."""
        hidden_states = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        hidden_states = hidden_states + _position_embedding_for_grid(self.pos_embed, self.pos_grid, grid)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.norm_out(hidden_states)


class MagiVAEEncoder(_MagiVAETrunk):
    """``(B, C_in, T, H, W)`` video -> ``(B, 2 * latent_channels, T/pt, H/p, W/p)`` posterior moments (mean, logvar).

    Frames beyond a multiple of ``pt`` and pixels beyond a multiple of ``p`` are dropped by the patch convolution;
    ``AutoencoderMagi`` rejects such inputs before they get here.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        dim: int,
        patch_size: int,
        patch_size_t: int,
        pos_grid: tuple[int, int, int],
        num_layers: int,
        num_attention_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ):
        super().__init__(dim, pos_grid, num_layers, num_attention_heads, mlp_ratio, qkv_bias)
        kernel = (patch_size_t, patch_size, patch_size)
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel)
        self.proj_out = nn.Linear(dim, 2 * latent_channels)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        batch_size = sample.shape[0]
        tokens = self.patch_embed(sample)
        grid = tuple(tokens.shape[2:])
        hidden_states = self.run_trunk(tokens.flatten(2).transpose(1, 2), grid)
        # Project before dropping the class token, as the original (the same GEMM shape keeps bf16 results bit-equal).
        moments = self.proj_out(hidden_states)[:, 1:]
        return moments.reshape(batch_size, *grid, -1).permute(0, 4, 1, 2, 3)


class MagiVAEDecoder(_MagiVAETrunk):
    """``(B, latent_channels, T, H, W)`` latents -> ``(B, C_out, T*pt, H*p, W*p)`` video (not clamped).

    Each token's ``D``-vector is read as a ``(pt, p, p, D / (pt*p*p))`` block with channels fastest, placed at its
    position, and one 3x3x3 convolution maps the ``D / (pt*p*p)`` channels to ``C_out`` over the whole output.
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        dim: int,
        patch_size: int,
        patch_size_t: int,
        pos_grid: tuple[int, int, int],
        num_layers: int,
        num_attention_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ):
        super().__init__(dim, pos_grid, num_layers, num_attention_heads, mlp_ratio, qkv_bias)
        self.patch_size = patch_size
        self.patch_size_t = patch_size_t
        self.unpatch_channels = dim // (patch_size_t * patch_size * patch_size)
        self.proj_in = nn.Linear(latent_channels, dim)
        self.conv_out = nn.Conv3d(self.unpatch_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch_size, channels, num_frames, height, width = latents.shape
        tokens = self.proj_in(latents.permute(0, 2, 3, 4, 1).reshape(batch_size, -1, channels))
        hidden_states = self.run_trunk(tokens, (num_frames, height, width))[:, 1:]
        p, pt = self.patch_size, self.patch_size_t
        # (B, T, H, W, pt, p, p, C) -> (B, C, T, pt, H, p, W, p) -> (B, C, T*pt, H*p, W*p)
        hidden_states = hidden_states.reshape(batch_size, num_frames, height, width, pt, p, p, self.unpatch_channels)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output_shape = (batch_size, self.unpatch_channels, num_frames * pt, height * p, width * p)
        return self.conv_out(hidden_states.reshape(output_shape))


class AutoencoderMagi(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    The MAGI-1 VAE: a ViT encoder/decoder with 8x spatial and 4x temporal compression into 16 latent channels.

    Videos are ``(batch, channels, frames, height, width)`` in ``[-1, 1]``; latents are ``(batch, latent_channels,
    frames / patch_size_t, height / patch_size, width / patch_size)``. Multiply latents by ``scaling_factor`` before
    handing them to the transformer and divide before decoding. A single frame encodes as four repeated frames (one
    latent frame); a single latent frame decodes to one frame.

    Tiling is **on** by default with the original MAGI-1 pipeline's plan (see [`~AutoencoderMagi.enable_tiling`]),
    so ``encode``/``decode`` give the numbers of the original's prefix encode and per-chunk decode. Call
    ``disable_tiling()`` for a one-shot pass over the whole input (the original ``ViTVAE.encode``/``decode``).

    Args:
        in_channels (`int`, defaults to 3): channels of the input video.
        out_channels (`int`, defaults to 3): channels of the decoded video.
        latent_channels (`int`, defaults to 16): latent channels; the encoder predicts twice as many (mean, logvar).
        sample_size (`int`, defaults to 256): height and width (pixels) of the video the position embedding was
            learned for; other sizes resize it trilinearly.
        sample_frames (`int`, defaults to 16): number of frames the position embedding was learned for.
        patch_size (`int`, defaults to 8): spatial compression.
        patch_size_t (`int`, defaults to 4): temporal compression.
        num_attention_heads (`int`, defaults to 16): heads per attention layer.
        attention_head_dim (`int`, defaults to 64): channels per head; the width is heads * head_dim.
        num_layers (`int`, defaults to 24): transformer blocks in the encoder and, separately, in the decoder.
        mlp_ratio (`float`, defaults to 4.0): width multiplier of the feed-forward layers.
        qkv_bias (`bool`, defaults to `True`): whether the fused q/k/v projection has a bias.
        scaling_factor (`float`, defaults to 0.18215): latents are multiplied by it for the transformer.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["MagiVAETransformerBlock"]
    _group_offload_block_modules = ["encoder", "decoder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        sample_size: int = 256,
        sample_frames: int = 16,
        patch_size: int = 8,
        patch_size_t: int = 4,
        num_attention_heads: int = 16,
        attention_head_dim: int = 64,
        num_layers: int = 24,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        scaling_factor: float = 0.18215,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        voxels_per_token = patch_size_t * patch_size * patch_size
        if dim % voxels_per_token != 0:
            raise ValueError(
                f"num_attention_heads * attention_head_dim = {dim} must be a multiple of patch_size_t * patch_size**2"
                f" = {voxels_per_token}: the decoder reads each token as a {patch_size_t}x{patch_size}x{patch_size}"
                " block of channels."
            )
        if sample_size % patch_size != 0 or sample_frames % patch_size_t != 0:
            raise ValueError(
                f"sample_size ({sample_size}) must be a multiple of patch_size ({patch_size}) and sample_frames"
                f" ({sample_frames}) a multiple of patch_size_t ({patch_size_t})."
            )
        pos_grid = (sample_frames // patch_size_t, sample_size // patch_size, sample_size // patch_size)
        trunk = dict(
            dim=dim,
            patch_size=patch_size,
            patch_size_t=patch_size_t,
            pos_grid=pos_grid,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
        )
        self.encoder = MagiVAEEncoder(in_channels=in_channels, latent_channels=latent_channels, **trunk)
        self.decoder = MagiVAEDecoder(latent_channels=latent_channels, out_channels=out_channels, **trunk)

        self.spatial_compression_ratio = patch_size
        self.temporal_compression_ratio = patch_size_t

        # Slicing runs one batch element at a time.
        self.use_slicing = False
        self.use_tiling = True
        self.tile_sample_min_height = 256
        self.tile_sample_min_width = 256
        self.tile_sample_min_num_frames = 12
        self.spatial_tile_overlap_factor = 0.25
        self.temporal_tile_overlap_factor = 0.0

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`ModelMixin.from_pretrained`, then every CPU weight gets 64-byte aligned memory of its own
        (`weight_alignment.own_cpu_weights`), so that results do not depend on where the loader put the weights. A
        tensor the weight files lack is an error naming it (`loading_checks_magi.checked_from_pretrained`)."""
        model = checked_from_pretrained(cls, super().from_pretrained, *args, **kwargs)
        return own_cpu_weights(model) if not isinstance(model, tuple) else (own_cpu_weights(model[0]), model[1])

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """`ConfigMixin.from_config`, with a `TypeError` naming any config field of the wrong type."""
        check_config_types(cls, config if isinstance(config, dict) else {}, kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_min_num_frames: int | None = None,
        spatial_tile_overlap_factor: float | None = None,
        temporal_tile_overlap_factor: float | None = None,
    ) -> None:
        r"""
        Encode and decode in overlapping tiles, one temporal slab of tiles at a time (the default).

        Tiles are ``(num_frames, height, width)`` pixel boxes (latent boxes ``/ (patch_size_t, patch_size,
        patch_size)`` for decoding) starting every ``size * (1 - overlap)``; each tile is cross-faded with its earlier
        neighbours in time, height and width over ``int(latent_tile * overlap)`` latents (encode) or ``int(tile *
        overlap)`` pixels (decode) and cropped to its stride. As in the original, encoding cross-fades with
        neighbours that were already cross-faded themselves, decoding with the neighbours as decoded. With no temporal
        overlap, temporal tiles are independent, so memory does not grow with the number of frames beyond the output.

        The defaults are the original MAGI-1 pipeline's: 256x256 pixels, spatial overlap 0.25, no temporal overlap,
        and 12-frame temporal tiles (``fps // 2`` at 24 fps; 3 latent frames when decoding). A last temporal tile of
        one latent frame decodes to one frame, so a 4-latent-frame chunk decodes to 12 + 1 frames, as in the original.

        Args:
            tile_sample_min_height (`int`, *optional*): tile height in pixels, a multiple of ``patch_size``.
            tile_sample_min_width (`int`, *optional*): tile width in pixels, a multiple of ``patch_size``.
            tile_sample_min_num_frames (`int`, *optional*): tile length in frames, a multiple of ``patch_size_t``.
            spatial_tile_overlap_factor (`float`, *optional*): fraction of a tile shared with its neighbour, in [0, 1).
            temporal_tile_overlap_factor (`float`, *optional*): the same in time, in [0, 1).
        """
        requested = {
            "tile_sample_min_height": tile_sample_min_height,
            "tile_sample_min_width": tile_sample_min_width,
            "tile_sample_min_num_frames": tile_sample_min_num_frames,
            "spatial_tile_overlap_factor": spatial_tile_overlap_factor,
            "temporal_tile_overlap_factor": temporal_tile_overlap_factor,
        }
        plan = {name: getattr(self, name) if value is None else value for name, value in requested.items()}
        p, pt = self.config.patch_size, self.config.patch_size_t
        for name in ("spatial_tile_overlap_factor", "temporal_tile_overlap_factor"):
            if not 0 <= plan[name] < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {plan[name]}.")
        for name, overlap, multiple in (
            ("tile_sample_min_height", plan["spatial_tile_overlap_factor"], p),
            ("tile_sample_min_width", plan["spatial_tile_overlap_factor"], p),
            ("tile_sample_min_num_frames", plan["temporal_tile_overlap_factor"], pt),
        ):
            size = plan[name]
            if size <= 0 or size % multiple != 0:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {size}.")
            # Encoding steps through pixels, decoding through latents: both strides must land on latent positions.
            if int(size * (1 - overlap)) % multiple != 0 or int(size // multiple * (1 - overlap)) == 0:
                raise ValueError(
                    f"`{name}`={size} with overlap {overlap} gives a tile stride of {int(size * (1 - overlap))},"
                    f" which must be a positive multiple of {multiple} so that tiles start on latent positions;"
                    " choose a size and overlap such as 256 and 0.25."
                )
        for name, value in plan.items():
            setattr(self, name, value)
        self.use_tiling = True

    # ------------------------------------------------------------------ input checks

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(
                f"`x` must be a video of shape (batch, channels, frames, height, width), got shape {tuple(x.shape)};"
                " add a frame axis with `x.unsqueeze(2)` for images."
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`x` has {x.shape[1]} channels but this VAE takes {self.config.in_channels}; pass (batch, channels,"
                " frames, height, width) with values in [-1, 1]."
            )
        p = self.config.patch_size
        if x.shape[3] % p != 0 or x.shape[4] % p != 0:
            raise ValueError(
                f"`x` height and width must be multiples of {p}, got {x.shape[3]}x{x.shape[4]}; resize or crop to"
                f" {x.shape[3] // p * p}x{x.shape[4] // p * p}."
            )
        num_frames = x.shape[2]
        if not self._encodable_num_frames(num_frames):
            usable = next(n for n in range(num_frames, 0, -1) if self._encodable_num_frames(n))
            raise ValueError(
                f"`x` has {num_frames} frames, split into encoded spans of {self._temporal_spans(num_frames)} frames,"
                f" but each span must have 1 frame or a multiple of patch_size_t={self.config.patch_size_t}; trim"
                f" the video to {usable} frames."
            )

    def _temporal_spans(self, num_frames: int) -> list[int]:
        """Frame counts of the spans ``encode`` feeds to the encoder: the temporal tiles, or the whole input."""
        if not self.use_tiling:
            return [num_frames]
        tile, stride, _, _ = self._tile_plan(for_encode=True)
        return [min(tile[0], num_frames - start) for start in range(0, num_frames, stride[0])]

    def _encodable_num_frames(self, num_frames: int) -> bool:
        pt = self.config.patch_size_t
        return all(span == 1 or span % pt == 0 for span in self._temporal_spans(num_frames))

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5:
            raise ValueError(
                f"`z` must be latents of shape (batch, {self.config.latent_channels}, frames, height, width), got"
                f" shape {tuple(z.shape)}."
            )
        if z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"`z` has {z.shape[1]} channels but this VAE's latents have {self.config.latent_channels}; pass"
                " (batch, latent_channels, frames, height, width) latents divided by `scaling_factor`."
            )

    # ------------------------------------------------------------------ one-shot passes

    def _encode_span(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior moments of one span (a tile, or the whole input): a single frame is encoded as 4 frames."""
        if x.shape[2] == 1:
            return self.encoder(x.expand(-1, -1, IMAGE_REPEAT_FRAMES, -1, -1))[:, :, :1]
        return self.encoder(x)

    def _decode_span(self, z: torch.Tensor) -> torch.Tensor:
        """Video of one span: a single latent frame decodes to ``patch_size_t`` frames of which the first is kept."""
        if z.shape[2] == 1:
            return self.decoder(z)[:, :, :1]
        return self.decoder(z)

    # ------------------------------------------------------------------ tiled passes

    def _tile_plan(self, for_encode: bool) -> tuple[tuple[int, int, int], ...]:
        """(tile, stride) in input units and (blend, keep) in output units, each as (frames, height, width).

        Encoding tiles pixels and blends latents; decoding tiles latents and blends pixels. The rounding (``int`` of
        size times overlap) is the original ``TileProcessor``'s.
        """
        p, pt = self.config.patch_size, self.config.patch_size_t
        spatial, temporal = self.spatial_tile_overlap_factor, self.temporal_tile_overlap_factor
        overlaps = (temporal, spatial, spatial)
        pixel_tile = (self.tile_sample_min_num_frames, self.tile_sample_min_height, self.tile_sample_min_width)
        latent_tile = (pixel_tile[0] // pt, pixel_tile[1] // p, pixel_tile[2] // p)
        tile, output_tile = (pixel_tile, latent_tile) if for_encode else (latent_tile, pixel_tile)
        stride = tuple(int(size * (1 - overlap)) for size, overlap in zip(tile, overlaps))
        blend = tuple(int(size * overlap) for size, overlap in zip(output_tile, overlaps))
        keep = tuple(size - extent for size, extent in zip(output_tile, blend))
        return tile, stride, blend, keep

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        r"""
        Posterior moments of ``x`` ``(B, C, T, H, W)`` computed tile by tile with the plan of ``enable_tiling``.

        Returns ``(B, 2 * latent_channels, T', H / p, W / p)``. As in the original, tiles are cross-faded in place, so
        a tile reads neighbours that were already cross-faded with their own neighbours.
        """
        return _map_tiles(x, self._encode_span, *self._tile_plan(for_encode=True), blend_in_place=True)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Decode latents ``z`` ``(B, latent_channels, T, H, W)`` tile by tile with the plan of ``enable_tiling``.

        Returns ``(B, out_channels, T', H * p, W * p)``. As in the original, each tile is cross-faded with its
        neighbours as decoded (not as cross-faded).
        """
        decoded = _map_tiles(z, self._decode_span, *self._tile_plan(for_encode=False), blend_in_place=False)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    # ------------------------------------------------------------------ public API

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiled_encode(x) if self.use_tiling else self._encode_span(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.tiled_decode(z).sample if self.use_tiling else self._decode_span(z)

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        r"""
        Encode a batch of videos into latent distributions.

        Args:
            x (`torch.Tensor`): videos ``(B, in_channels, T, H, W)`` in ``[-1, 1]``; ``T`` is 1 (an image) or a
                multiple of ``patch_size_t`` (per temporal tile when tiling), ``H`` and ``W`` multiples of
                ``patch_size``.
            return_dict (`bool`, *optional*, defaults to `True`): return an `AutoencoderKLOutput` instead of a tuple.

        Returns:
            `AutoencoderKLOutput` whose ``latent_dist`` is a `DiagonalGaussianDistribution` over ``(B,
            latent_channels, T', H / p, W / p)`` (logvar clamped to [-30, 20]). MAGI-1 uses ``latent_dist.mode()``.
        """
        self._check_video(x)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(x_slice) for x_slice in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Decode a batch of latents.

        Args:
            z (`torch.Tensor`): latents ``(B, latent_channels, T, H, W)``, already divided by ``scaling_factor``.
            return_dict (`bool`, *optional*, defaults to `True`): return a `DecoderOutput` instead of a tuple.

        Returns:
            `DecoderOutput` with ``sample`` ``(B, out_channels, T', H * p, W * p)``, not clamped. ``T' = T *
            patch_size_t`` except that a span of a single latent frame (the whole input, or the last temporal tile)
            yields one frame.
        """
        self._check_latents(z)
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(z_slice) for z_slice in z.split(1)])
        else:
            decoded = self._decode(z)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Encode then decode ``sample`` ``(B, in_channels, T, H, W)``.

        Args:
            sample (`torch.Tensor`): input videos in ``[-1, 1]``.
            sample_posterior (`bool`, *optional*, defaults to `False`): sample the posterior instead of its mode.
            return_dict (`bool`, *optional*, defaults to `True`): return a `DecoderOutput` instead of a tuple.
            generator (`torch.Generator`, *optional*): generator for the posterior sample.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
