"""Eager vs `torch.compile` (inductor) time of a whole generation on the CPU at a small size.

A small random-weight pipeline (latent output, no VAE) generates the same video eagerly, then with the transformer's
repeated blocks compiled (`compile_repeated_blocks(fullgraph=True)`, the default) or the whole transformer
(`--whole-model`). The first compiled generation includes compilation; the second is the steady-state time. Torch's
default `recompile_limit` (8) holds every graph of a generation; `--recompile-limit` changes it.

    python benchmarks/bench_compile.py [--chunks 3] [--steps 8] [--latent-size 8] [--whole-model]
"""

import argparse
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from diffusers_magi.tiny_random import tiny_random_pipeline

PRESETS = {
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, attention_head_dim=32, ffn_dim=512),
    "tiny": {},
}


def _generate(pipe, args):
    start = time.perf_counter()
    frames = pipe(
        "a red fox runs through the snow at night",
        num_frames=24 * args.chunks,
        height=8 * args.latent_size,
        width=8 * args.latent_size,
        num_inference_steps=args.steps,
        guidance_mode=args.guidance_mode,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    return frames, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance-mode", default="three_branch", choices=["three_branch", "distilled"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--whole-model", action="store_true", help="torch.compile the whole transformer")
    parser.add_argument("--recompile-limit", type=int, default=torch._dynamo.config.recompile_limit)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = args.recompile_limit
    pipe = tiny_random_pipeline(with_vae=False, **PRESETS[args.preset])
    pipe.set_progress_bar_config(disable=True)
    what = "torch.compile(transformer)" if args.whole_model else "transformer.compile_repeated_blocks"
    print(
        f"preset {args.preset}, {args.latent_size}x{args.latent_size} latents, {args.chunks} chunks, {args.steps} steps, "
        f"{args.guidance_mode} guidance, {torch.get_num_threads()} threads, {what}(fullgraph=True, backend="
        f"{args.backend!r}), recompile_limit {args.recompile_limit}, torch {torch.__version__}"
    )
    _generate(pipe, args)  # warm-up
    eager, eager_seconds = _generate(pipe, args)
    if args.whole_model:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=args.backend)
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=args.backend)
    counters.clear()
    _, first_seconds = _generate(pipe, args)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled, compiled_seconds = _generate(pipe, args)
    difference = (compiled - eager).abs().max().item()
    print()
    print("| run | seconds | vs eager |")
    print("|---|---|---|")
    print(f"| eager | {eager_seconds:.3f} | 1.00x |")
    print(f"| compiled, first generation (compiles {graphs} graphs, {breaks} graph breaks) | {first_seconds:.3f} | {first_seconds / eager_seconds:.2f}x |")
    print(f"| compiled | {compiled_seconds:.3f} | {compiled_seconds / eager_seconds:.2f}x |")
    print()
    print(f"max abs difference compiled vs eager: {difference:.3g} (relative {difference / eager.abs().max().item():.3g})")


if __name__ == "__main__":
    main()
