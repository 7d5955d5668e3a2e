"""Diffusers' step caches on the chunk-wise MAGI-1 loop: fraction of block work skipped, speed-up and output difference.

Each cache is enabled with settings that skip (`SETTINGS`; the ones docs/performance.md recommends as a start) on a
small random-weight pipeline, and a whole generation (latent output, no VAE) is compared with the uncached one.
"Skipped" counts the attention and MLP computations that did not run, as a fraction of those of the uncached
generation (a first-block-cache skip drops both of every block after the first; attention caches drop attention
only). With random weights the differences say nothing about quality, only that the cache worked and how much.

    python benchmarks/bench_caches.py [--steps 32] [--chunks 3] [--guidance-mode three_branch]
"""

import argparse
import time

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from diffusers_magi.models.attention_magi import MagiAttnProcessor
from diffusers_magi.models.transformer_magi import MagiFeedForward
from diffusers_magi.tiny_random import tiny_random_pipeline

PRESETS = {
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, attention_head_dim=32, ffn_dim=512),
    "tiny": {},
}


def settings(steps: int):
    """Skipping settings per cache (`current_timestep_callback` constant: the skip ranges below cover all times)."""
    always = lambda: 500  # noqa: E731
    return {
        "FirstBlockCache": FirstBlockCacheConfig(threshold=0.1),
        "PyramidAttentionBroadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001), current_timestep_callback=always
        ),
        "FasterCache": FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=always,
            is_guidance_distilled=True,
            spatial_attention_block_identifiers=("blocks.*attn",),
        ),
        "TaylorSeer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, cache_identifiers=[r"blocks\.\d+\.attn"]),
        "MagCache": MagCacheConfig(threshold=0.06, max_skip_steps=2, num_inference_steps=steps, mag_ratios=[1.0] * steps),
    }


class WorkCounter:
    """Counts attention and MLP computations (calls of `MagiAttnProcessor` and `MagiFeedForward`)."""

    def __enter__(self):
        self.count = 0
        self._originals = (MagiAttnProcessor.__call__, MagiFeedForward.forward)
        attention, feed_forward = self._originals

        def counted_attention(processor, *args, **kwargs):
            self.count += 1
            return attention(processor, *args, **kwargs)

        def counted_feed_forward(module, *args, **kwargs):
            self.count += 1
            return feed_forward(module, *args, **kwargs)

        MagiAttnProcessor.__call__, MagiFeedForward.forward = counted_attention, counted_feed_forward
        return self

    def __exit__(self, *exc):
        MagiAttnProcessor.__call__, MagiFeedForward.forward = self._originals


def _generate(pipe, args):
    return pipe(
        "a red fox runs through the snow at night",
        num_frames=24 * args.chunks,
        height=8 * args.latent_size,
        width=8 * args.latent_size,
        num_inference_steps=args.steps,
        guidance_mode=args.guidance_mode,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def _timed(pipe, args):
    _generate(pipe, args)  # warm-up (and the hooks' first call)
    with WorkCounter() as counter:
        start = time.perf_counter()
        output = _generate(pipe, args)
        seconds = time.perf_counter() - start
    return output, seconds, counter.count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--guidance-mode", default="three_branch", choices=["three_branch", "distilled"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--caches", nargs="+", default=list(settings(1)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"preset {args.preset}, {args.latent_size}x{args.latent_size} latents, {args.chunks} chunks, {args.steps} steps "
        f"({args.steps // 4} calls per window), {args.guidance_mode} guidance, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print()
    print("| cache | skipped work | seconds | speed-up | max abs difference | relative difference |")
    print("|---|---|---|---|---|---|")
    pipe = tiny_random_pipeline(with_vae=False, **PRESETS[args.preset])
    pipe.set_progress_bar_config(disable=True)
    reference, reference_seconds, reference_work = _timed(pipe, args)
    print(f"| none | 0% | {reference_seconds:.3f} | 1.00x | 0 | 0 |")
    for name in args.caches:
        pipe = tiny_random_pipeline(with_vae=False, **PRESETS[args.preset])
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.enable_cache(settings(args.steps)[name])
        output, seconds, work = _timed(pipe, args)
        difference = (output - reference).abs().max().item()
        print(
            f"| {name} | {1 - work / reference_work:.0%} | {seconds:.3f} | {reference_seconds / seconds:.2f}x | "
            f"{difference:.3g} | {difference / reference.abs().max().item():.3g} |"
        )


if __name__ == "__main__":
    main()
