"""`MagiKVCache`: keys and values of clean chunks, kept between transformer calls.

MAGI-1 generates a video chunk by chunk. Once a chunk is clean, its self-attention keys and values no longer
change, so later chunks read them from this cache instead of recomputing them. The cache is an explicit object
passed to `MagiTransformer3DModel.forward` (like the `Cache` objects of transformers): the caller decides when it
is written (`num_chunks_to_cache`) and which chunks are read (`attention_chunk_starts`).

Storage is per layer (the chunks held one after the other), so dropping chunks that no later call attends to
(`drop_chunks_before`) keeps its size bounded by the attention window instead of growing with video length.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch


class MagiKVCacheLayer:
    """Cached keys/values of one transformer layer: consecutive chunks from absolute index `first_chunk_index` on,
    held as one tensor per kind with the chunks one after the other along the token axis.

    Chunks are addressed by slicing relative to `first_chunk_index` (there is no container keyed by chunk index), so
    that `torch.compile` sees the same structure at every window position and the number of compiled graphs does
    not grow with video length.
    """

    def __init__(self, storage_device: Optional[torch.device] = None):
        self.storage_device = storage_device
        self.first_chunk_index = 0
        self.tokens_per_chunk = 0
        self.keys: Optional[torch.Tensor] = None  # (batch, held_chunks * tokens_per_chunk, kv_heads, head_dim)
        self.values: Optional[torch.Tensor] = None

    @property
    def num_chunks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1] // self.tokens_per_chunk

    @property
    def chunk_indices(self) -> List[int]:
        return list(range(self.first_chunk_index, self.first_chunk_index + self.num_chunks))

    def write(self, first_chunk_index: int, keys: torch.Tensor, values: torch.Tensor, num_chunks: int) -> None:
        """Store `num_chunks` consecutive chunks starting at absolute index `first_chunk_index`, replacing chunks
        held there; they must overlap or follow the chunks held (or the cache must be empty).

        Args:
            keys, values (`torch.Tensor` of shape `(batch, num_chunks * tokens_per_chunk, kv_heads, head_dim)`):
                keys after normalisation and rotary embedding, and values, of the chunks to store.
        """
        if self.storage_device is not None:
            keys = keys.to(self.storage_device, non_blocking=True)
            values = values.to(self.storage_device, non_blocking=True)
        if self.keys is None:
            # `clone` so the cache never keeps the whole projection of the call alive through a view.
            self.first_chunk_index, self.tokens_per_chunk = first_chunk_index, keys.shape[1] // num_chunks
            self.keys, self.values = keys.clone(), values.clone()
            return
        position = first_chunk_index - self.first_chunk_index
        if not 0 <= position <= self.num_chunks:
            raise ValueError(
                f"Cannot write chunk {first_chunk_index} to a KV cache holding chunks {self.chunk_indices}: cached "
                "chunks must be consecutive."
            )
        start, end = position * self.tokens_per_chunk, position * self.tokens_per_chunk + keys.shape[1]
        self.keys = torch.cat([self.keys[:, :start], keys, self.keys[:, end:]], dim=1)
        self.values = torch.cat([self.values[:, :start], values, self.values[:, end:]], dim=1)

    def read(self, start_chunk: int, end_chunk: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of chunks `[start_chunk, end_chunk)`, concatenated along the token axis, on `device`."""
        start, end = start_chunk - self.first_chunk_index, end_chunk - self.first_chunk_index
        if start < 0 or end > self.num_chunks:
            missing = [index for index in range(start_chunk, end_chunk) if index not in self.chunk_indices]
            raise ValueError(
                f"The KV cache has no keys/values for chunk(s) {missing} (it holds {self.chunk_indices}). Earlier "
                "chunks must be written (call the transformer with `num_chunks_to_cache` on their clean pass) before "
                "a later call attends to them; check `first_chunk_index` and `attention_chunk_starts`."
            )
        tokens = slice(start * self.tokens_per_chunk, end * self.tokens_per_chunk)
        return self.keys[:, tokens].to(device, non_blocking=True), self.values[:, tokens].to(device, non_blocking=True)

    def drop_chunks_before(self, chunk_index: int) -> None:
        count = min(max(chunk_index - self.first_chunk_index, 0), self.num_chunks)
        if count == self.num_chunks:
            self.keys = self.values = None
        elif count:
            tokens = count * self.tokens_per_chunk
            self.keys, self.values = self.keys[:, tokens:].clone(), self.values[:, tokens:].clone()
        self.first_chunk_index += count

    def chunks(self) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """`{chunk index: (keys, values)}` of the chunks held (views into the cache)."""
        size = self.tokens_per_chunk
        return {
            index: (self.keys[:, offset * size : (offset + 1) * size], self.values[:, offset * size : (offset + 1) * size])
            for offset, index in enumerate(self.chunk_indices)
        }

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class MagiKVCacheBranchView:
    """A `MagiKVCache` seen by a call whose batch holds `num_branches` guidance branches one after the other (each
    `batch` rows of the cache's batch): every branch reads the same cached chunks, and only the rows of
    `write_branch` are written. Made by `MagiKVCache.branch_view`."""

    def __init__(self, cache: "MagiKVCache", num_branches: int, write_branch: int):
        if not 0 <= write_branch < num_branches:
            raise ValueError(f"write_branch must be in [0, {num_branches}), got {write_branch}.")
        self.cache, self.num_branches, self.write_branch = cache, num_branches, write_branch

    def __len__(self) -> int:
        return len(self.cache)

    def layer(self, index: int) -> "MagiKVCacheLayerBranchView":
        return MagiKVCacheLayerBranchView(self.cache.layer(index), self.num_branches, self.write_branch)


class MagiKVCacheLayerBranchView:
    """One layer of a `MagiKVCacheBranchView`."""

    def __init__(self, layer: MagiKVCacheLayer, num_branches: int, write_branch: int):
        self.layer, self.num_branches, self.write_branch = layer, num_branches, write_branch

    def write(self, first_chunk_index: int, keys: torch.Tensor, values: torch.Tensor, num_chunks: int) -> None:
        rows = keys.shape[0] // self.num_branches
        branch = slice(self.write_branch * rows, (self.write_branch + 1) * rows)
        self.layer.write(first_chunk_index, keys[branch], values[branch], num_chunks)

    def read(self, start_chunk: int, end_chunk: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layer.read(start_chunk, end_chunk, device)
        repeats = (self.num_branches,) + (1,) * (keys.ndim - 1)
        return keys.repeat(repeats), values.repeat(repeats)


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

    def branch_view(self, num_branches: int, write_branch: int) -> MagiKVCacheBranchView:
        """This cache for a transformer call whose batch stacks `num_branches` guidance branches (each with this
        cache's batch size): all branches read the cached chunks, only `write_branch` writes (batched guidance)."""
        return MagiKVCacheBranchView(self, num_branches, write_branch)

    def copy(self) -> "MagiKVCache":
        """An independent copy (the tensors cloned), e.g. to branch a generation."""
        copied = MagiKVCache(len(self.layers), storage_device=self.layers[0].storage_device if self.layers else None)
        copied.load_state_dict(self.state_dict())
        return copied

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The cached tensors by name, `layers.<layer>.<chunk>.keys` / `.values` (for saving a generation)."""
        state = {}
        for number, layer in enumerate(self.layers):
            for index, (keys, values) in layer.chunks().items():
                state[f"layers.{number}.{index}.keys"] = keys
                state[f"layers.{number}.{index}.values"] = values
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the contents by those of a `state_dict()` (copied; moved to the storage device, if set)."""
        self.layers = [MagiKVCacheLayer(layer.storage_device) for layer in self.layers]
        chunks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            _, number, index, kind = name.split(".")
            chunks.setdefault((int(number), int(index)), {})[kind] = tensor
        for (number, index), tensors in sorted(chunks.items()):
            self.layers[number].write(index, tensors["keys"], tensors["values"], num_chunks=1)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors, all layers together."""
        return sum(layer.nbytes() for layer in self.layers)
