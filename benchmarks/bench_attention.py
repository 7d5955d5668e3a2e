"""Chunk-causal self-attention of MAGI-1, computed by different backends: equal outputs, timings.

The layouts are calls of the real sampling plan (MagiChunkScheduler defaults): the largest window (a clean re-run
chunk and four noisy chunks) and a window reading an earlier chunk from the KV cache. Each query chunk attends to its
own key range (`ChunkAttentionLayout.key_token_range`):

* `chunk loop`: what `MagiAttnProcessor` runs: one unmasked attention call per query chunk on its exact key range
  (any backend, flash attention included; on the CPU the query heads that share a key/value head run as one longer
  query, `grouped_query_attention`);
* `chunk loop, enable_gqa`: the same loop with SDPA's own grouped-query attention (`enable_gqa=True`);
* `SDPA bool mask` / `SDPA additive mask`: one `scaled_dot_product_attention` over all queries and keys with the
  chunk-causal mask;
* `flex BlockMask`: `flex_attention` with a block mask built from the same rule (eager, and compiled with
  `--compile-flex`; the compile time is reported apart).

Outputs are compared with the chunk loop (max abs difference); a backend that fails on this machine (e.g. a
compiler error) gets a "failed" row. Example (a GPU: `--device cuda --dtype bfloat16`):

    python benchmarks/bench_attention.py [--tokens-per-chunk 384] [--heads 8] [--kv-heads 4] [--head-dim 64]
"""

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from diffusers_magi import MagiChunkScheduler
from diffusers_magi.models.attention_magi import ChunkAttentionLayout, chunk_causal_attention


def plan_layouts(tokens_per_chunk: int):
    """The largest call of the plan and the largest call that reads the cache, as `ChunkAttentionLayout`s."""
    scheduler = MagiChunkScheduler()
    scheduler.set_timesteps(64, 8, 0)
    calls = sorted(scheduler.plan, key=lambda call: (call.num_chunks, call.first_chunk - min(call.attention_starts)))
    largest = max(calls, key=lambda call: call.num_chunks)
    reading = max((call for call in calls if min(call.attention_starts) < call.first_chunk), key=lambda call: call.num_chunks)
    return {
        name: ChunkAttentionLayout(tokens_per_chunk, call.first_chunk, tuple(call.attention_starts))
        for name, call in (("largest window", largest), ("window + cache", reading))
    }


def chunk_causal_mask(layout: ChunkAttentionLayout, device) -> torch.Tensor:
    """`(queries, keys)` boolean mask: True where a query may attend."""
    tokens = layout.tokens_per_chunk
    key_tokens = layout.key_token_range(layout.num_chunks - 1)[1]
    mask = torch.zeros(layout.num_chunks * tokens, key_tokens, dtype=torch.bool, device=device)
    for chunk in range(layout.num_chunks):
        start, end = layout.key_token_range(chunk)
        mask[chunk * tokens : (chunk + 1) * tokens, start:end] = True
    return mask


def backends(layout: ChunkAttentionLayout, device, compile_flex: bool):
    """name -> function(query, key, value) in the `(batch, tokens, heads, head_dim)` layout."""
    mask = chunk_causal_mask(layout, device)
    additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))

    def sdpa(query, key, value, attn_mask):
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        gqa = query.shape[1] != key.shape[1]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask.to(query.dtype) if attn_mask.is_floating_point() else attn_mask, enable_gqa=gqa).transpose(1, 2)

    def loop_with_enable_gqa(query, key, value):
        tokens = layout.tokens_per_chunk
        outputs = []
        for chunk in range(layout.num_chunks):
            start, end = layout.key_token_range(chunk)
            chunk_query = query[:, chunk * tokens : (chunk + 1) * tokens].transpose(1, 2)
            chunk_key, chunk_value = (x[:, start:end].transpose(1, 2) for x in (key, value))
            gqa = chunk_query.shape[1] != chunk_key.shape[1]
            outputs.append(F.scaled_dot_product_attention(chunk_query, chunk_key, chunk_value, enable_gqa=gqa).transpose(1, 2))
        return torch.cat(outputs, dim=1)

    functions = {
        "chunk loop": lambda q, k, v: chunk_causal_attention(q, k, v, layout),
        "chunk loop, enable_gqa": loop_with_enable_gqa,
        "SDPA bool mask": lambda q, k, v: sdpa(q, k, v, mask),
        "SDPA additive mask": lambda q, k, v: sdpa(q, k, v, additive),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return functions

    block_mask = create_block_mask(
        lambda b, h, q_index, kv_index: mask[q_index, kv_index], None, None, *mask.shape, device=str(device)
    )

    def flex(function):
        def run(query, key, value):
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))
            gqa = query.shape[1] != key.shape[1]
            return function(query, key, value, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)

        return run

    # Eager flex attention materialises the scores (PyTorch warns about it); it is here as the reference for the
    # compiled kernel.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    functions["flex BlockMask (eager)"] = flex(flex_attention)
    if compile_flex:
        functions["flex BlockMask (compiled)"] = flex(torch.compile(flex_attention))
    return functions


def _timed(function, *args, repeats: int):
    times, output = [], None
    for _ in range(repeats + 1):  # the first run warms up (and compiles)
        if args[0].device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = function(*args)
        if args[0].device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return output, times[0], min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-chunk", type=int, default=384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile-flex", action="store_true", help="also time flex_attention under torch.compile")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"Chunk-causal attention: {args.tokens_per_chunk} tokens per chunk, {args.heads} query heads, {args.kv_heads} "
        f"key/value heads, head dim {args.head_dim}, device {args.device}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} (first run reported apart)"
    )
    print(f"{'layout':<16} {'backend':<26} {'queries':>8} {'keys':>6} {'first (ms)':>11} {'best (ms)':>10} {'max |diff|':>11}")
    generator = torch.Generator(device=device).manual_seed(0)
    for name, layout in plan_layouts(args.tokens_per_chunk).items():
        queries = layout.num_chunks * args.tokens_per_chunk
        keys = layout.key_token_range(layout.num_chunks - 1)[1]
        query = torch.randn(1, queries, args.heads, args.head_dim, generator=generator, device=device, dtype=dtype)
        key = torch.randn(1, keys, args.kv_heads, args.head_dim, generator=generator, device=device, dtype=dtype)
        value = torch.randn(1, keys, args.kv_heads, args.head_dim, generator=generator, device=device, dtype=dtype)
        reference = None
        with torch.no_grad():
            for backend, function in backends(layout, device, args.compile_flex).items():
                try:
                    output, first, best = _timed(function, query, key, value, repeats=args.repeats)
                except Exception as error:  # a backend this machine cannot run (e.g. a compiler failure)
                    message = str(error).strip().splitlines()[0][:60]
                    print(f"{name:<16} {backend:<26} {queries:>8} {keys:>6}   failed: {type(error).__name__}: {message}")
                    continue
                reference = output if reference is None else reference
                difference = (output.float() - reference.float()).abs().max().item()
                print(
                    f"{name:<16} {backend:<26} {queries:>8} {keys:>6} {1000 * first:>11.1f} {1000 * best:>10.1f}"
                    f" {difference:>11.2e}"
                )


if __name__ == "__main__":
    main()
