"""Ulysses context parallelism (Diffusers' `ContextParallelConfig` + the transformer's `_cp_plan`) on CPU: two
processes talking over gloo give the output of one process bit for bit, for single transformer calls (even and
uneven shards, KV-cache reads and writes; each process caches its head group) and for a whole generation; bad
settings fail with clear errors. (On GPUs, expect float rounding differences: GEMMs over fewer rows may block
differently.)

The CPU's float32 GEMM does that too: with MKL on an x86 CPU, `F.linear(x[:5], w)` (128 input features) is not bit
for bit `F.linear(x, w)[:5]` for a 9-row `x` (MKL takes another kernel for a few rows; which row counts are affected
depends on the CPU and on the number of input features). Under context parallelism every linear layer sees only its
process's rows, so the single-call test evaluates linear layers row by row in both runs (`_row_by_row_linear`): each
output row then comes from the same kernel call whatever the number of rows, and the comparison checks the sharding,
all-to-all and gather exactly on any CPU. The generation test runs the model's own kernels.

Each worker builds the same tiny models from the same seed, computes the single-process result first, then enables
context parallelism and recomputes. Diffusers 0.42 derives each rank's device as `rank % accelerator count`, which
divides by zero on a machine without accelerator; the workers therefore report one accelerator to it. Gloo cannot
all-gather shards of different sizes, so the workers give Diffusers' uneven gather a padded form (NCCL gathers uneven
shards natively). Everything else (device mesh, hooks, all-to-all) is the code path that runs on GPUs with NCCL.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig
from diffusers.hooks import context_parallel as context_parallel_hooks
from diffusers.models._modeling_parallel import gather_size_by_comm

from diffusers_magi import MagiKVCache

from .tiny_models import tiny_pipeline, tiny_transformer

WORLD_SIZE = 2
_LINEAR = torch.nn.functional.linear


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    context_parallel_hooks._all_gather_anything = _all_gather_padded
    torch.set_num_threads(1)


def _all_gather_padded(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Diffusers' uneven all-gather (`ulysses_anything`) for gloo, whose `all_gather` needs equal sizes (NCCL's does
    not): pad every shard to the largest, gather, trim."""
    sizes = gather_size_by_comm(tensor.shape[dim], group)
    padding = [0, 0] * (tensor.ndim - 1 - dim) + [0, max(sizes) - tensor.shape[dim]]
    padded = torch.nn.functional.pad(tensor, padding).contiguous()
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([shard.narrow(dim, 0, size) for shard, size in zip(gathered, sizes)], dim=dim)


def _row_by_row_linear(input: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`F.linear` one row at a time, each row a fresh (equally aligned) copy: a row's result does not depend on how
    many rows the call has (see the module docstring)."""
    rows = input.reshape(-1, input.shape[-1])
    output = torch.cat([_LINEAR(row[None].clone(), weight, bias) for row in rows])
    return output.reshape(*input.shape[:-1], weight.shape[0])


def _transformer_calls(model, chunk_frames: int, height: int, width: int):
    """Three calls as the sampler makes them: a window of two chunks, the clean re-run of chunk 0 writing the cache
    while chunk 1 and 2 are denoised (chunk 2 attends back to chunk 0), then chunk 2 alone reading chunks 0-1."""
    generator = torch.Generator().manual_seed(1)
    cache = MagiKVCache(model.config.num_layers)
    captions = torch.randn(1, 3, 40, 32, generator=generator)
    mask = torch.ones(1, 3, 40)
    mask[:, 1, 25:] = 0
    outputs = []
    calls = [
        dict(chunks=2, timestep=[0.2, 0.1], first_chunk_index=0, attention_chunk_starts=None, num_chunks_to_cache=0),
        dict(chunks=3, timestep=[1.0, 0.5, 0.3], first_chunk_index=0, attention_chunk_starts=[0, 0, 0], num_chunks_to_cache=2),
        dict(chunks=1, timestep=[0.6], first_chunk_index=2, attention_chunk_starts=[0], num_chunks_to_cache=0),
    ]
    for call in calls:
        chunks = call.pop("chunks")
        first = call["first_chunk_index"]
        latents = torch.randn(1, 16, chunks * chunk_frames, height, width, generator=generator)
        with torch.no_grad():
            outputs.append(
                model(
                    latents,
                    torch.tensor(call.pop("timestep")),
                    captions[:, first : first + chunks],
                    mask[:, first : first + chunks],
                    kv_cache=cache,
                    **call,
                ).sample
            )
    return outputs, cache


def _transformer_worker(rank: int, port: int, out_dir: str, chunk_frames: int, height: int, width: int, anything: bool):
    _init(rank, port)
    torch.nn.functional.linear = _row_by_row_linear  # in this worker process only, for both runs
    model = tiny_transformer()
    reference, reference_cache = _transformer_calls(model, chunk_frames, height, width)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD_SIZE, ulysses_anything=anything))
    parallel, cache = _transformer_calls(model, chunk_frames, height, width)
    # This rank's cache holds its key/value head group (heads rank * kv/P ... ) of every cached chunk, all tokens.
    local_heads = model.config.num_key_value_heads // WORLD_SIZE
    heads = slice(rank * local_heads, (rank + 1) * local_heads)
    cache_matches = []
    for layer, reference_layer in zip(cache.layers, reference_cache.layers):
        for index in reference_layer.chunk_indices:
            keys, values = layer.read(index, index + 1, torch.device("cpu"))
            reference_keys, reference_values = reference_layer.read(index, index + 1, torch.device("cpu"))
            cache_matches.append(
                (keys - reference_keys[:, :, heads]).abs().max().item() + (values - reference_values[:, :, heads]).abs().max().item()
            )
    torch.save(
        {"reference": reference, "parallel": parallel, "cache_error": max(cache_matches), "cache_chunks": cache.chunk_indices},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _pipeline_worker(rank: int, port: int, out_dir: str):
    _init(rank, port)
    pipe = tiny_pipeline()
    kwargs = dict(prompt="a cat runs", num_frames=72, height=32, width=32, num_inference_steps=8, output_type="latent")
    reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD_SIZE))
    parallel = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.save({"reference": reference, "parallel": parallel}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(worker, tmp_path, *args):
    mp.spawn(worker, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "chunk_frames, height, width, anything",
    [
        (6, 4, 4, False),  # 24 tokens per chunk: the shards are whole chunks
        (3, 2, 6, True),  # 9 tokens per chunk: uneven shards that cut chunks in two
    ],
    ids=["even", "uneven"],
)
def test_context_parallel_transformer_equals_one_process(tmp_path, chunk_frames, height, width, anything):
    results = _spawn(_transformer_worker, tmp_path, chunk_frames, height, width, anything)
    for result in results:
        for parallel, reference in zip(result["parallel"], result["reference"]):
            assert torch.equal(parallel, reference)
        assert result["cache_chunks"] == [0, 1]
        assert result["cache_error"] == 0
    # Every process returns the gathered output, identical across processes.
    for parallel, other in zip(results[0]["parallel"], results[1]["parallel"]):
        assert torch.equal(parallel, other)


@pytest.mark.slow
def test_context_parallel_generation_equals_one_process(tmp_path):
    results = _spawn(_pipeline_worker, tmp_path)
    for result in results:
        assert result["parallel"].shape == (1, 16, 18, 4, 4)
        assert torch.equal(result["parallel"], result["reference"])
    assert torch.equal(results[0]["parallel"], results[1]["parallel"])


@pytest.mark.parametrize(
    "overrides, config, match",
    [
        (dict(num_key_value_heads=1), ContextParallelConfig(ulysses_degree=2), r"ulysses_degree=2 must divide.*\(1\).*No degree above 1"),
        (dict(num_attention_heads=6, num_key_value_heads=3), ContextParallelConfig(ulysses_degree=2), r"Choose ulysses_degree from \[3\]"),
        ({}, ContextParallelConfig(ring_degree=2), "Ulysses .* only, got ring_degree=2"),
    ],
)
def test_context_parallel_settings_the_model_cannot_run_fail_clearly(overrides, config, match):
    model = tiny_transformer(**overrides)
    with pytest.raises(ValueError, match=match):
        model.enable_parallelism(config=config)
    assert model._parallel_config is None  # nothing was applied


def _uneven_without_anything_worker(rank: int, port: int, out_dir: str):
    _init(rank, port)
    model = tiny_transformer()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD_SIZE))
    try:
        model(torch.randn(1, 16, 3, 2, 6), torch.tensor([0.5]), torch.randn(1, 1, 40, 32), torch.ones(1, 1, 40))
        message = None
    except ValueError as error:
        message = str(error)
    torch.save({"message": message}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_tokens_need_ulysses_anything(tmp_path):
    for result in _spawn(_uneven_without_anything_worker, tmp_path):
        assert "the 9 tokens of this call over ulysses_degree=2" in result["message"]
        assert "ulysses_anything=True" in result["message"]
