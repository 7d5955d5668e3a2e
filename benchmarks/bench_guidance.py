"""Time of a whole generation with batched vs one-by-one guidance branches, base (three-branch) and distilled guidance.

`batch_guidance_branches=True` (the pipeline's default) runs the conditional and the earlier-chunks-only passes of
three-branch guidance as one transformer call on a doubled batch (the unconditional pass, which attends to each chunk
alone, stays a call of its own): fewer, larger matrix products. Distilled guidance has one pass, so both rows of it
time the same work.

The default is the issue's CPU case: a random-weight transformer with hidden 512 and 8 layers, 16x16 latents
(128x128 video), 8 steps, 4 chunks, 2 threads; no VAE (latent output), the tiny T5. Each row is the best of
`--repeats` generations after a warm-up. It needs nothing but this package; to time the same case against the
original MAGI-1 code (same weights and noise, parity checked first), run `benchmarks/bench_vs_original.py`.

    python benchmarks/bench_guidance.py [--chunks 4] [--steps 8] [--threads 2] [--repeats 3]
"""

import argparse
import time

import torch

from diffusers_magi.tiny_random import tiny_random_pipeline

PRESETS = {
    "issue": dict(
        num_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, attention_head_dim=64, ffn_dim=2048,
        condition_dim=128, cross_attention_dim=512,
    ),
    "tiny": {},
}


def _generate(pipe, args, guidance_mode, batch_guidance_branches):
    return pipe(
        "a red fox runs through the snow at night",
        num_frames=24 * args.chunks,
        height=8 * args.latent_size,
        width=8 * args.latent_size,
        num_inference_steps=args.steps,
        guidance_mode=guidance_mode,
        batch_guidance_branches=batch_guidance_branches,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    parser.add_argument("--latent-size", type=int, default=16, help="latent height = width")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = tiny_random_pipeline(with_vae=False, **PRESETS[args.preset])
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    print(
        f"preset {args.preset} (hidden {config.hidden_size}, {config.num_layers} layers), {args.latent_size}x"
        f"{args.latent_size} latents, {args.chunks} chunks, {args.steps} steps, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, best of {args.repeats}"
    )
    print()
    print("| guidance | branches | seconds per video | vs one by one | max abs difference |")
    print("|---|---|---|---|---|")
    for mode, label in (("three_branch", "base (three-branch)"), ("distilled", "distilled")):
        results = {}
        for flag in (False, True):
            output = _generate(pipe, args, mode, flag)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                _generate(pipe, args, mode, flag)
                times.append(time.perf_counter() - start)
            results[flag] = (min(times), output)
        for flag in (False, True):
            seconds, output = results[flag]
            difference = (output - results[False][1]).abs().max().item()
            print(
                f"| {label} | {'batched' if flag else 'one by one'} | {seconds:.3f} | {seconds / results[False][0]:.2f}x "
                f"| {difference:.2e} |"
            )


if __name__ == "__main__":
    main()
