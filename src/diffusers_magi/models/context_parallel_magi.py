"""Ulysses context parallelism for `MagiTransformer3DModel` (head-parallel attention over a sharded sequence).

With Diffusers' `ContextParallelConfig(ulysses_degree=P)` every process holds a contiguous `1 / P` of the tokens of
a transformer call (the model's `_cp_plan` splits them after the patch embedding and gathers them before the final
projection). Everything that works token by token (projections, norms, MLP, gates) runs on the local tokens. Chunk-
causal self-attention needs every token of a chunk's key range, so `MagiAttnProcessor` exchanges (all-to-all)
sequence shards for head groups: each process then holds *all* tokens for `1 / P` of the heads, runs the usual
chunk loop (and reads/writes its head group of the `MagiKVCache`), and the inverse all-to-all returns the local
tokens with all heads. Diffusers' own Ulysses attention cannot be used as is: it attends from the whole local
sequence to the whole gathered sequence in one call, while MAGI-1 gives each chunk its own key range.

Shards may be uneven (`ulysses_anything=True`): Diffusers' sharder then gives the first `S % P` processes one token
more (`torch.tensor_split`), and `SequenceShards` follows the same rule.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig


@dataclass(frozen=True)
class SequenceShards:
    """How the tokens of one transformer call are split over the processes of a context-parallel group.

    Args:
        sizes (`Tuple[int, ...]`): tokens held by each process, in rank order.
        rank (`int`): this process's rank in the group.
    """

    sizes: Tuple[int, ...]
    rank: int

    @property
    def start(self) -> int:
        """Index, in the call's token sequence, of this process's first token."""
        return sum(self.sizes[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.sizes[self.rank]


def context_parallel_config(config: Union[ParallelConfig, ContextParallelConfig, None]) -> Optional[ContextParallelConfig]:
    """The `ContextParallelConfig` inside `config` (a `ParallelConfig` or the config itself), or `None`."""
    if isinstance(config, ParallelConfig):
        return config.context_parallel_config
    return config


def check_context_parallel_config(
    config: Union[ParallelConfig, ContextParallelConfig], num_attention_heads: int, num_key_value_heads: int
) -> None:
    """Raise a clear error for a context-parallel setting the MAGI-1 transformer cannot run."""
    cp_config = context_parallel_config(config)
    if cp_config is None:
        return
    if cp_config.ring_degree != 1:
        raise ValueError(
            f"MagiTransformer3DModel supports Ulysses (head-parallel) context parallelism only, got ring_degree="
            f"{cp_config.ring_degree}; use ContextParallelConfig(ulysses_degree=...) with ring_degree=1."
        )
    degree = cp_config.ulysses_degree
    if num_attention_heads % degree or num_key_value_heads % degree:
        divisors = [d for d in range(2, num_key_value_heads + 1) if num_key_value_heads % d == 0 and num_attention_heads % d == 0]
        choice = f"Choose ulysses_degree from {divisors}." if divisors else "No degree above 1 divides both."
        raise ValueError(
            f"ulysses_degree={degree} must divide the attention heads ({num_attention_heads}) and the key/value heads "
            f"({num_key_value_heads}) of this transformer: every process takes a whole group of heads. {choice}"
        )


def sequence_shards(cp_config: ContextParallelConfig, num_tokens: int) -> SequenceShards:
    """The split of `num_tokens` tokens that Diffusers' context-parallel hooks apply (see the module docstring)."""
    degree = cp_config.ulysses_degree
    if num_tokens % degree and not cp_config.ulysses_anything:
        raise ValueError(
            f"Context parallelism splits the {num_tokens} tokens of this call over ulysses_degree={degree} processes, "
            f"which needs a multiple of {degree}; pass ContextParallelConfig(ulysses_degree={degree}, "
            "ulysses_anything=True) to allow uneven shards."
        )
    base, extra = divmod(num_tokens, degree)
    sizes = tuple(base + (1 if rank < extra else 0) for rank in range(degree))
    return SequenceShards(sizes=sizes, rank=dist.get_rank(cp_config._ulysses_mesh.get_group()))


def _all_to_all(tensor: torch.Tensor, output_sizes: List[int], input_sizes: List[int], group) -> torch.Tensor:
    """`all_to_all_single` along dim 0 with the given split sizes (in rows of dim 0)."""
    output = tensor.new_empty((sum(output_sizes), *tensor.shape[1:]))
    dist.all_to_all_single(output, tensor.contiguous(), output_sizes, input_sizes, group=group)
    return output


def gather_sequence_scatter_heads(tensor: torch.Tensor, shards: SequenceShards, group) -> torch.Tensor:
    """From the local tokens with all heads to all tokens with this process's head group.

    Args:
        tensor (`torch.Tensor` of shape `(batch, local_tokens, heads, head_dim)`)
    Returns:
        `torch.Tensor` of shape `(batch, total_tokens, heads / P, head_dim)`; head group `r` goes to rank `r`.
    """
    batch, tokens, heads, head_dim = tensor.shape
    degree = len(shards.sizes)
    # (P, local_tokens, batch, heads / P, head_dim): block p is sent to rank p.
    blocks = tensor.reshape(batch, tokens, degree, heads // degree, head_dim).permute(2, 1, 0, 3, 4)
    gathered = _all_to_all(blocks.flatten(0, 1), list(shards.sizes), [tokens] * degree, group)
    return gathered.permute(1, 0, 2, 3)


def scatter_sequence_gather_heads(tensor: torch.Tensor, shards: SequenceShards, group) -> torch.Tensor:
    """The inverse of `gather_sequence_scatter_heads`.

    Args:
        tensor (`torch.Tensor` of shape `(batch, total_tokens, heads / P, head_dim)`)
    Returns:
        `torch.Tensor` of shape `(batch, local_tokens, heads, head_dim)`.
    """
    batch, _, local_heads, head_dim = tensor.shape
    degree = len(shards.sizes)
    tokens = shards.sizes[shards.rank]
    received = _all_to_all(tensor.permute(1, 0, 2, 3), [tokens] * degree, list(shards.sizes), group)
    # (P, local_tokens, batch, heads / P, head_dim) -> (batch, local_tokens, heads, head_dim)
    received = received.unflatten(0, (degree, tokens))
    return received.permute(2, 1, 0, 3, 4).reshape(batch, tokens, degree * local_heads, head_dim)
