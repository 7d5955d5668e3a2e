"""Attention of the MAGI-1 transformer: chunk-causal self-attention and per-chunk cross-attention, computed in
parallel from one pre-norm.

A transformer call sees a *window* of consecutive latent chunks (each `tokens_per_chunk` tokens). Self-attention is
chunk-causal: the queries of a chunk attend to every token of their own chunk and of a limited number of earlier
chunks, never to later ones. Earlier chunks that are not part of the window come from a `MagiKVCache`.
Cross-attention is per chunk: the queries of a chunk attend to the valid caption tokens of that chunk (padding masked).

Self-attention has two forms, equal to float rounding. The per-chunk loop calls Diffusers' `dispatch_attention_fn`
without a mask on the exact key range of each chunk: the fastest form, and it runs on every attention backend (flash
attention included, which accepts no mask). The chunks-as-batch form makes each chunk a batch row that attends to all
keys through a key-padding mask: one attention call whose graph does not depend on the number of chunks or on chunk
indices, which is what lets `torch.compile` trace one graph for every window (it needs PyTorch SDPA, which applies
masks, and does the masked keys' work too). By default a traced call uses the chunks-as-batch form and an eager call
the loop; `MagiTransformer3DModel.set_chunk_attention` picks one for both (e.g. to compare a compiled run with an
eager one bit for bit). Cross-attention is one call with a key-padding mask on the masking backends.

Under context parallelism (`context_parallel_magi`) a process holds a slice of the call's tokens: self-attention
exchanges it for a head group over all tokens, cross-attention and the per-chunk gates work on the local slice.
"""

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

from .context_parallel_magi import SequenceShards, gather_sequence_scatter_heads, scatter_sequence_gather_heads
from .kv_cache_magi import MagiKVCacheLayer


class MagiLayerNorm(nn.LayerNorm):
    """LayerNorm whose stored weight may be *zero-centred*: the scale used is `1 + weight` (Megatron's
    `apply_layernorm_1p`). It computes in the dtype of its input, like the original, so callers choose the precision
    by casting the input (float32 for the query/key norms, the model dtype for the cross-attention norms)."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered_weight: bool = True):
        super().__init__(dim, eps=eps)
        self.zero_centered_weight = zero_centered_weight
        if zero_centered_weight:
            nn.init.zeros_(self.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_weight else self.weight
        return F.layer_norm(
            hidden_states,
            self.normalized_shape,
            weight.to(hidden_states.dtype),
            self.bias.to(hidden_states.dtype),
            self.eps,
        )


class Float32Linear(nn.Linear):
    """A linear layer that always computes (and returns) float32, whatever the dtype its weights are stored in.

    The original runs the attention output projection under a float32 autocast; this makes that explicit and keeps it
    a module of its own, so offloading and layerwise-casting hooks see it like any other layer."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        if weight.dtype != torch.float32:  # torchao-quantised weights keep their dtype through `.float()`
            weight = weight.dequantize().float()
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(hidden_states.float(), weight, bias)


def apply_rotary_emb(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` channels of each head ("rotate half" pairing, not interleaved); the
    remaining channels pass through unchanged.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch, tokens, heads, head_dim)`)
        cos, sin (`torch.Tensor` of shape `(tokens, rotary_dim // 2)`)
    """
    half = cos.shape[-1]
    first, second, rest = hidden_states[..., :half], hidden_states[..., half : 2 * half], hidden_states[..., 2 * half :]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos, rest], dim=-1)


@dataclass(frozen=True)
class ChunkAttentionLayout:
    """Which keys the queries of each chunk of a transformer call attend to.

    Chunks are numbered from the start of the video (absolute indices). The call holds the chunks
    `first_chunk_index ... first_chunk_index + num_chunks - 1`; chunk `c` attends to chunks
    `attention_chunk_starts[c - first_chunk_index] ... c` (one int: the same start for every chunk, and `num_chunks`
    must be given). Chunks before `first_chunk_index` are read from the KV cache. The first `num_chunks_to_cache`
    chunks of the call are written to the cache.

    Under context parallelism, `shards` says which slice of the call's tokens this process holds (`None`: all).

    Set at construction, so that compiled code never reads the per-chunk tuple (whose length and values
    `torch.compile` would specialise on): `num_chunks`, `num_cached_chunks` (plain ints) and `key_start_offsets`
    (`None` when every chunk attends from the first cached chunk on, else a `(num_chunks,)` int64 tensor: the first
    key token of each chunk's range).
    """

    tokens_per_chunk: int
    first_chunk_index: int
    attention_chunk_starts: Union[int, Tuple[int, ...]]
    num_chunks_to_cache: int = 0
    shards: Optional[SequenceShards] = None
    num_chunks: Optional[int] = None
    num_cached_chunks: int = field(init=False)
    key_start_offsets: Optional[torch.Tensor] = field(init=False, compare=False)

    def __post_init__(self):
        starts = self.attention_chunk_starts
        if isinstance(starts, int):
            if self.num_chunks is None:
                raise ValueError("num_chunks is required when attention_chunk_starts is one int.")
            first_cached_chunk, offsets = min(starts, self.first_chunk_index), None
        else:
            object.__setattr__(self, "num_chunks", len(starts))
            first_cached_chunk = min(min(starts), self.first_chunk_index)
            offsets = [(start - first_cached_chunk) * self.tokens_per_chunk for start in starts]
            offsets = torch.tensor(offsets) if any(offsets) else None
        object.__setattr__(self, "num_cached_chunks", self.first_chunk_index - first_cached_chunk)
        object.__setattr__(self, "key_start_offsets", offsets)

    @property
    def first_cached_chunk(self) -> int:
        """Earliest chunk read from the cache (`first_chunk_index` when nothing is read)."""
        return self.first_chunk_index - self.num_cached_chunks

    def chunk_start(self, chunk: int) -> int:
        """Earliest chunk that chunk `chunk` (0-based within the call) attends to."""
        starts = self.attention_chunk_starts
        return starts if isinstance(starts, int) else starts[chunk]

    def local_chunk_segments(self) -> Tuple[Tuple[int, int, int], ...]:
        """`(chunk, start, end)` for each chunk (0-based within the call) with tokens in this process's slice:
        its tokens are `[start, end)` of the local hidden states. Without context parallelism: whole chunks."""
        tokens = self.tokens_per_chunk
        if self.shards is None:
            return tuple((chunk, chunk * tokens, (chunk + 1) * tokens) for chunk in range(self.num_chunks))
        offset, local_end = self.shards.start, self.shards.end
        return tuple(
            (chunk, max(chunk * tokens, offset) - offset, min((chunk + 1) * tokens, local_end) - offset)
            for chunk in range(self.num_chunks)
            if chunk * tokens < local_end and (chunk + 1) * tokens > offset
        )

    def key_token_range(self, chunk: int) -> Tuple[int, int]:
        """Token range `[start, end)` of the keys of chunk `chunk` (0-based within the call), in the concatenation
        `[cached chunks from first_cached_chunk ; chunks of the call]`."""
        start = (self.chunk_start(chunk) - self.first_cached_chunk) * self.tokens_per_chunk
        end = (self.first_chunk_index - self.first_cached_chunk + chunk + 1) * self.tokens_per_chunk
        return start, end


def compact_attention_starts(starts: Sequence[int]) -> Union[int, Tuple[int, ...]]:
    """`attention_chunk_starts` as one int when every chunk has the same start (the form `torch.compile` traces
    without specialising on the number of chunks), else as a tuple."""
    starts = tuple(starts)
    return starts[0] if starts and all(start == starts[0] for start in starts) else starts


def _active_backend():
    """The backend Diffusers' `dispatch_attention_fn` uses when none is named."""
    return _AttentionBackendRegistry.get_active_backend()[0]


def _attention_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[AttentionBackendName]]:
    """Inputs and backend of an attention call. On CPU, bfloat16/float16 inputs are upcast to float32 (callers round
    the result back once) and PyTorch SDPA runs its math kernel on them: `softmax(q k^T * scale) @ v` in float32, as
    MAGI-1's reference evaluation on CPU computes it. (torch's reduced-precision CPU kernels round the probabilities
    to the input dtype; its float32 CPU flash kernel sums blockwise with an online softmax, which rounds differently,
    and bfloat16 outputs and float8 activations amplify that.) The math kernel holds the scores of one query chunk
    over its key range at once. Other devices, float32 inputs and other backends are left as they are."""
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return query, key, value, backend
    backend = backend or _active_backend()
    if AttentionBackendName(backend) == AttentionBackendName.NATIVE:
        backend = AttentionBackendName._NATIVE_MATH
    return query.float(), key.float(), value.float(), backend


def grouped_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    backend=None,
) -> torch.Tensor:
    """`dispatch_attention_fn` where several query heads share each key/value head (grouped-query attention).

    On the CPU the `heads // kv_heads` query heads of each key/value head run as one query that many times longer:
    every query row attends on its own, so the outputs are the same (bit for bit with torch's CPU kernels), and
    torch's CPU flash kernel runs that 3-14 % faster than with `enable_gqa` at MAGI-1's chunk sizes
    (`benchmarks/bench_attention.py`). Elsewhere the backend's own `enable_gqa` is used.

    Args:
        query (`torch.Tensor` of shape `(batch, tokens, heads, head_dim)`)
        key, value (`torch.Tensor` of shape `(batch, key_tokens, kv_heads, head_dim)`)
        attn_mask (`torch.Tensor`, *optional*): a mask that does not depend on the query position, e.g. a key-padding
            mask of shape `(batch, 1, 1, key_tokens)`.
    Returns:
        `torch.Tensor` of the shape of `query`.
    """
    batch_size, tokens, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if heads == kv_heads or query.device.type != "cpu":
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, enable_gqa=heads != kv_heads, backend=backend
        )
    group = heads // kv_heads
    folded = query.unflatten(2, (kv_heads, group)).permute(0, 3, 1, 2, 4).reshape(batch_size, -1, kv_heads, head_dim)
    output = dispatch_attention_fn(folded, key, value, attn_mask=attn_mask, backend=backend)
    return output.unflatten(1, (group, tokens)).permute(0, 2, 3, 1, 4).reshape(batch_size, tokens, heads, head_dim)


CHUNK_ATTENTION_FORMS = ("per_chunk", "chunks_as_batch")


def chunk_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: ChunkAttentionLayout,
    backend=None,
    form: Optional[str] = None,
) -> torch.Tensor:
    """Self-attention of each query chunk over its own key range.

    Args:
        query (`torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, heads, head_dim)`)
        key, value (`torch.Tensor` of shape `(batch, key_tokens, kv_heads, head_dim)`):
            cached chunks followed by the chunks of the call, as described by `layout.key_token_range`.
        form (`str`, *optional*): `"per_chunk"` or `"chunks_as_batch"` (see the module docstring); by default the
            chunks-as-batch form while `torch.compile` traces on a masking backend, the per-chunk loop otherwise.
    Returns:
        `torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, heads, head_dim)`.
    """
    dtype = query.dtype
    query, key, value, backend = _attention_inputs(query, key, value, backend)
    if form is None:
        form = "chunks_as_batch" if torch.compiler.is_compiling() and _applies_sdpa_masks(backend) else "per_chunk"
    if form == "chunks_as_batch":
        if not _applies_sdpa_masks(backend):
            raise ValueError(
                f"The chunks-as-batch self-attention needs a backend that applies masks (PyTorch SDPA: native, "
                f"_native_math, _native_efficient), not {AttentionBackendName(backend or _active_backend()).value!r}; "
                "use set_chunk_attention('per_chunk') or set_chunk_attention(None) with this backend."
            )
        return _chunks_as_batch_attention(query, key, value, layout, backend).to(dtype)
    return _per_chunk_attention(query, key, value, layout, backend).to(dtype)


def _per_chunk_attention(query, key, value, layout: ChunkAttentionLayout, backend) -> torch.Tensor:
    """`chunk_causal_attention` as a loop over query chunks, each on its exact key range without a mask (any
    backend)."""
    tokens = layout.tokens_per_chunk
    outputs = []
    for chunk in range(layout.num_chunks):
        key_start, key_end = layout.key_token_range(chunk)
        outputs.append(
            grouped_query_attention(
                query[:, chunk * tokens : (chunk + 1) * tokens],
                key[:, key_start:key_end],
                value[:, key_start:key_end],
                backend=backend,
            )
        )
    return torch.cat(outputs, dim=1)


def _chunks_as_batch_attention(query, key, value, layout: ChunkAttentionLayout, backend) -> torch.Tensor:
    """`chunk_causal_attention` with the chunks as batch rows: each row attends to all keys through a key-padding
    mask that ends at its own chunk (and starts at its `layout.key_start_offsets`). Only tensor shapes and data
    describe the window, so `torch.compile` traces one graph for every window width and chunk index. The keys and
    values are copied once per chunk of the call.

    Args:
        query (`torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, heads, head_dim)`)
        key, value (`torch.Tensor` of shape `(batch, key_tokens, kv_heads, head_dim)`): cached chunks, then the call's.
    Returns:
        `torch.Tensor` of the shape of `query`.
    """
    tokens = layout.tokens_per_chunk
    batch_size, query_tokens = query.shape[:2]
    key_tokens = key.shape[1]
    num_chunks = query_tokens // tokens
    positions = torch.arange(key_tokens, device=query.device)
    ends = torch.arange(1, num_chunks + 1, device=query.device) * tokens + (key_tokens - query_tokens)
    mask = positions < ends[:, None]  # (chunks, keys)
    if layout.key_start_offsets is not None:
        mask = mask & (positions >= layout.key_start_offsets.to(query.device)[:, None])
    rows = batch_size * num_chunks
    mask = mask[None].expand(batch_size, -1, -1).reshape(rows, 1, 1, key_tokens)

    def per_chunk(tensor):
        return tensor[:, None].expand(-1, num_chunks, -1, -1, -1).reshape(rows, key_tokens, *tensor.shape[2:])

    output = grouped_query_attention(
        query.reshape(rows, tokens, *query.shape[2:]),
        per_chunk(key),
        per_chunk(value),
        attn_mask=mask,
        backend=backend,
    )
    return output.reshape(batch_size, query_tokens, *output.shape[2:])


def _applies_sdpa_masks(backend) -> bool:
    """Whether `backend` (`None`: the active one) is PyTorch SDPA, which applies any boolean mask."""
    return AttentionBackendName(backend or _active_backend()).value in ("native", "_native_math", "_native_efficient")


def _takes_key_padding_mask(backend) -> bool:
    """Whether `backend` (`None`: the active one) applies a boolean key-padding mask: PyTorch SDPA and the varlen
    kernels (which turn the mask into sequence lengths) do; flash, sage and the fused `_native_flash` reject masks,
    xformers ignores boolean ones."""
    name = AttentionBackendName(backend or _active_backend()).value
    return name in ("native", "_native_math", "_native_efficient", "_native_cudnn") or "varlen" in name


def per_chunk_cross_attention(
    query: torch.Tensor,
    text_keys: torch.Tensor,
    text_values: torch.Tensor,
    text_mask: torch.Tensor,
    layout: ChunkAttentionLayout,
    backend=None,
) -> torch.Tensor:
    """Cross-attention of each chunk's queries over that chunk's valid caption tokens.

    Args:
        query (`torch.Tensor` of shape `(batch, tokens, heads, head_dim)`): the call's tokens, or this process's slice
            of them under context parallelism (`layout.local_chunk_segments`).
        text_keys, text_values (`torch.Tensor` of shape `(batch, num_chunks, text_length, kv_heads, head_dim)`):
            caption tokens of every (batch row, chunk), padding included.
        text_mask (`torch.Tensor` of shape `(batch, num_chunks, text_length)`, bool): the valid caption tokens.
    Returns:
        `torch.Tensor` of the shape of `query`. A chunk whose caption has no valid token gets zeros (an attention over
        nothing), as the original's varlen kernel returns.
    """
    dtype = query.dtype
    if not _takes_key_padding_mask(backend):
        return _gathered_cross_attention(query, text_keys, text_values, text_mask, layout, backend)
    query, text_keys, text_values, backend = _attention_inputs(query, text_keys, text_values, backend)
    if layout.shards is None:  # whole chunks: one call with the (batch row, chunk) pairs as its batch
        batch_size, num_chunks = text_mask.shape[:2]
        mask = text_mask.flatten(0, 1)
        attention = grouped_query_attention(
            query.unflatten(1, (num_chunks, -1)).flatten(0, 1),
            text_keys.flatten(0, 1),
            text_values.flatten(0, 1),
            attn_mask=mask[:, None, None, :],
            backend=backend,
        )
        attention = torch.where(mask.any(dim=-1)[:, None, None, None], attention, 0.0)
        return attention.unflatten(0, (batch_size, num_chunks)).flatten(1, 2).to(dtype)
    outputs = []
    for chunk, start, end in layout.local_chunk_segments():
        mask = text_mask[:, chunk]
        attention = grouped_query_attention(
            query[:, start:end],
            text_keys[:, chunk],
            text_values[:, chunk],
            attn_mask=mask[:, None, None, :],
            backend=backend,
        )
        outputs.append(torch.where(mask.any(dim=-1)[:, None, None, None], attention, 0.0))
    return torch.cat(outputs, dim=1).to(dtype)


def _gathered_cross_attention(query, text_keys, text_values, text_mask, layout, backend) -> torch.Tensor:
    """`per_chunk_cross_attention` for backends without masks: each (batch row, chunk) attends to its valid caption
    tokens, gathered (data-dependent shapes: `torch.compile` breaks the graph here; use a masking backend, e.g. the
    default SDPA, to compile)."""
    dtype = query.dtype
    query, text_keys, text_values, backend = _attention_inputs(query, text_keys, text_values, backend)
    output = torch.zeros_like(query)
    for batch_index in range(query.shape[0]):
        for chunk, start, end in layout.local_chunk_segments():
            valid = text_mask[batch_index, chunk]
            if not valid.any():
                continue
            output[batch_index, start:end] = grouped_query_attention(
                query[batch_index : batch_index + 1, start:end],
                text_keys[batch_index : batch_index + 1, chunk][:, valid],
                text_values[batch_index : batch_index + 1, chunk][:, valid],
                backend=backend,
            )[0]
    return output.to(dtype)


class MagiAttnProcessor:
    """Computes MAGI-1's parallel self- and cross-attention for one `MagiAttention` module.

    `_parallel_config` is set by `MagiTransformer3DModel.enable_parallelism`; with it, self-attention runs on this
    process's head group over all tokens (Ulysses all-to-all, see `context_parallel_magi`), so the KV cache holds
    that head group only.
    """

    _attention_backend = None
    _parallel_config = None
    _chunk_attention = None  # the self-attention form (`chunk_causal_attention`), set by `set_chunk_attention`

    def __call__(
        self,
        attn: "MagiAttention",
        hidden_states: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        layout: ChunkAttentionLayout,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        kv_cache: Optional[MagiKVCacheLayer] = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        normed = attn.norm(hidden_states)

        # Self-attention: q/k norm and rotary embedding in float32, attention in the model dtype.
        query = attn.to_q(normed).unflatten(-1, (attn.heads, attn.head_dim))
        key = attn.to_k(normed).unflatten(-1, (attn.kv_heads, attn.head_dim))
        value = attn.to_v(normed).unflatten(-1, (attn.kv_heads, attn.head_dim))
        query = apply_rotary_emb(attn.norm_q(query.float()), *rotary_emb).to(dtype)
        key = apply_rotary_emb(attn.norm_k(key.float()), *rotary_emb).to(dtype)
        if layout.shards is not None:
            group = self._parallel_config.context_parallel_config._ulysses_mesh.get_group()
            query, key, value = (gather_sequence_scatter_heads(x, layout.shards, group) for x in (query, key, value))

        if layout.num_chunks_to_cache:
            cached_tokens = layout.num_chunks_to_cache * layout.tokens_per_chunk
            kv_cache.write(
                layout.first_chunk_index, key[:, :cached_tokens], value[:, :cached_tokens], layout.num_chunks_to_cache
            )
        if layout.num_cached_chunks:
            cached_key, cached_value = kv_cache.read(layout.first_cached_chunk, layout.first_chunk_index, key.device)
            key = torch.cat([cached_key, key], dim=1)
            value = torch.cat([cached_value, value], dim=1)
        self_attention = chunk_causal_attention(
            query, key, value, layout, backend=self._attention_backend, form=self._chunk_attention
        )
        del query, key, value  # tensors of the size of the call are freed as soon as they are dead
        if layout.shards is not None:
            self_attention = scatter_sequence_gather_heads(self_attention, layout.shards, group)

        # Cross-attention on the caption tokens, in the model dtype.
        cross_query = attn.norm_cross_q(attn.to_cross_q(normed).unflatten(-1, (attn.heads, attn.head_dim)))
        del normed
        text_key_value = attn.to_cross_kv(text_states).unflatten(-1, (attn.kv_heads, 2 * attn.head_dim))
        text_keys, text_values = text_key_value.chunk(2, dim=-1)
        text_keys = attn.norm_cross_k(text_keys)
        cross_attention = per_chunk_cross_attention(
            cross_query, text_keys, text_values, text_mask, layout, backend=self._attention_backend
        )
        del cross_query

        # The output projection reads [self | cross] in `output_groups` interleaved groups (group g of the self
        # channels, then group g of the cross channels, ...): the checkpoints were trained with the projection split
        # over 8 tensor-parallel ranks. One stack builds that order.
        self_groups, cross_groups = (
            branch.flatten(2).unflatten(-1, (attn.output_groups, -1)) for branch in (self_attention, cross_attention)
        )
        del self_attention, cross_attention
        combined = torch.stack([self_groups, cross_groups], dim=-2).flatten(-3)
        del self_groups, cross_groups
        return attn.to_out(combined)


class MagiAttention(nn.Module, AttentionModuleMixin):
    """Self-attention (grouped-query, QK-norm, 3D rotary embedding, chunk-causal with KV cache) and cross-attention
    to the caption, both from one pre-norm, with a shared output projection.

    Args:
        hidden_size (`int`): width of the hidden states.
        heads (`int`): number of query heads.
        kv_heads (`int`): number of key/value heads (grouped-query attention).
        head_dim (`int`): channels per head.
        cross_attention_dim (`int`): width of the projected caption tokens.
        eps (`float`): epsilon of the norms.
        zero_centered_norm_weight (`bool`): whether the q/k norms store `scale - 1`.
        output_groups (`int`): groups of the [self | cross] re-ordering before the output projection.
    """

    _default_processor_cls = MagiAttnProcessor
    _available_processors = [MagiAttnProcessor]

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        cross_attention_dim: int,
        eps: float = 1e-6,
        zero_centered_norm_weight: bool = True,
        output_groups: int = 8,
        processor: Optional[MagiAttnProcessor] = None,
    ):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.output_groups = output_groups

        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.to_q = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.to_k = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.to_cross_q = nn.Linear(hidden_size, heads * head_dim, bias=False)
        # One projection of the caption tokens, laid out per key/value head as [key | value].
        self.to_cross_kv = nn.Linear(cross_attention_dim, 2 * kv_heads * head_dim, bias=False)
        self.norm_q = MagiLayerNorm(head_dim, eps, zero_centered_norm_weight)
        self.norm_k = MagiLayerNorm(head_dim, eps, zero_centered_norm_weight)
        self.norm_cross_q = MagiLayerNorm(head_dim, eps, zero_centered_norm_weight)
        self.norm_cross_k = MagiLayerNorm(head_dim, eps, zero_centered_norm_weight)
        self.to_out = Float32Linear(2 * heads * head_dim, hidden_size, bias=False)

        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        layout: ChunkAttentionLayout,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        kv_cache: Optional[MagiKVCacheLayer] = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, hidden_size)`): the call's
                tokens, or this process's slice of them under context parallelism (`layout.shards`).
            rotary_emb (`(cos, sin)`, each of shape `(tokens, rotary_dim // 2)`): for the tokens of `hidden_states`.
            layout (`ChunkAttentionLayout`): which keys each chunk attends to.
            text_states (`torch.Tensor` of shape `(batch, num_chunks, text_length, cross_attention_dim)`): projected
                caption tokens of every (batch row, chunk), padding included.
            text_mask (`torch.Tensor` of shape `(batch, num_chunks, text_length)`, bool): the valid caption tokens.
            kv_cache (`MagiKVCacheLayer`, *optional*): this layer's cache.
        Returns:
            `torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, hidden_size)`, float32.
        """
        return self.processor(self, hidden_states, rotary_emb, layout, text_states, text_mask, kv_cache)
