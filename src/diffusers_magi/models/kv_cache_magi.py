"""`MagiKVCache`: keys and values of clean chunks, kept between transformer calls.

MAGI-1 generates a video chunk by chunk. Once a chunk is clean, its self-attention keys and values no longer
change, so later chunks read them from this cache instead of recomputing them. The cache is an explicit object
passed to `MagiTransformer3DModel.forward` (like the `Cache` objects of transformers): the caller decides when it
is written (`num_chunks_to_cache`) and which chunks are read (`attention_chunk_starts`).

Storage is per layer and per chunk, so dropping chunks that no later call attends to (`drop_chunks_before`) keeps
its size bounded by the attention window instead of growing with video length.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch


class MagiKVCacheLayer:
    """Cached keys/values of one transformer layer, indexed by absolute chunk index."""

    def __init__(self, storage_device: Optional[torch.device] = None):
        self.storage_device = storage_device
        self._chunks: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def chunk_indices(self) -> List[int]:
        return sorted(self._chunks)

    def write(self, first_chunk_index: int, keys: torch.Tensor, values: torch.Tensor, num_chunks: int) -> None:
        """Store `num_chunks` consecutive chunks starting at absolute index `first_chunk_index`.

        Args:
            keys, values (`torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, kv_heads, head_dim)`):
                keys after normalisation and rotary embedding, and values, of the chunks to store.
        """
        tokens_per_chunk = keys.shape[1] // num_chunks
        for offset in range(num_chunks):
            token_slice = slice(offset * tokens_per_chunk, (offset + 1) * tokens_per_chunk)
            chunk_keys, chunk_values = keys[:, token_slice], values[:, token_slice]
            if self.storage_device is not None:
                chunk_keys = chunk_keys.to(self.storage_device, non_blocking=True)
                chunk_values = chunk_values.to(self.storage_device, non_blocking=True)
            # `clone` so the cache never keeps the whole projection of the call alive through a view.
            self._chunks[first_chunk_index + offset] = (chunk_keys.clone(), chunk_values.clone())

    def read(self, start_chunk: int, end_chunk: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of chunks `[start_chunk, end_chunk)`, concatenated along the token axis, on `device`."""
        missing = [index for index in range(start_chunk, end_chunk) if index not in self._chunks]
        if missing:
            raise ValueError(
                f"The KV cache has no keys/values for chunk(s) {missing} (it holds {self.chunk_indices}). Earlier "
                "chunks must be written (call the transformer with `num_chunks_to_cache` on their clean pass) before "
                "a later call attends to them; check `first_chunk_index` and `attention_chunk_starts`."
            )
        keys = torch.cat([self._chunks[index][0] for index in range(start_chunk, end_chunk)], dim=1)
        values = torch.cat([self._chunks[index][1] for index in range(start_chunk, end_chunk)], dim=1)
        return keys.to(device, non_blocking=True), values.to(device, non_blocking=True)

    def drop_chunks_before(self, chunk_index: int) -> None:
        for index in [index for index in self._chunks if index < chunk_index]:
            del self._chunks[index]


class MagiKVCache:
    """Per-layer cache of the self-attention keys/values of clean chunks.

    Args:
        num_layers (`int`): number of transformer layers (`transformer.config.num_layers`).
        storage_device (`torch.device` or `str`, *optional*):
            where cached tensors live between calls, e.g. `"cpu"` to keep the cache out of GPU memory (the original's
            `kv_offload`). Each layer moves its chunks to the compute device when it reads them. By default they stay
            where they were computed.

    Example:
        ```py
        cache = MagiKVCache(transformer.config.num_layers)
        # clean pass of chunk 0: store its keys/values
        transformer(clean_chunk0, timestep, text, mask, first_chunk_index=0, kv_cache=cache, num_chunks_to_cache=1)
        # chunk 1 attends to chunk 0 through the cache
        transformer(noisy_chunk1, timestep, text, mask, first_chunk_index=1, attention_chunk_starts=[0], kv_cache=cache)
        ```
    """

    def __init__(self, num_layers: int, storage_device: Optional[Union[str, torch.device]] = None):
        storage_device = torch.device(storage_device) if storage_device is not None else None
        self.layers = [MagiKVCacheLayer(storage_device) for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> MagiKVCacheLayer:
        return self.layers[index]

    @property
    def chunk_indices(self) -> List[int]:
        """Absolute indices of the chunks held (the same for every layer once a call has completed)."""
        return self.layers[0].chunk_indices if self.layers else []

    def drop_chunks_before(self, chunk_index: int) -> None:
        """Forget every chunk with an index below `chunk_index` (no later call may attend to them)."""
        for layer in self.layers:
            layer.drop_chunks_before(chunk_index)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors, all layers together."""
        return sum(
            keys.numel() * keys.element_size() + values.numel() * values.element_size()
            for layer in self.layers
            for keys, values in layer._chunks.values()
        )
