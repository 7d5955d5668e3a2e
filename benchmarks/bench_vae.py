"""Decode time and peak memory of AutoencoderMagi for 1, 2 and 4 latent chunks (6 latent frames = 24 frames each).

Three ways to decode the same latents:

* ``untiled``: one pass over the whole latent video (``disable_tiling()``); attention spans every token at once.
* ``tiled``: the whole latent video in one ``decode`` call with the original pipeline's tile plan (the default).
* ``per-chunk``: what the pipelines do: each chunk is decoded on its own as soon as it is final and turned into uint8
  frames; only the uint8 frames are kept.

Memory is the peak resident set size (``resource.getrusage(...).ru_maxrss``) reached during the first decode minus
the resident size just before it, each measurement in a fresh Python process (so one run cannot hide another's
peak) after a warm-up decode of a 2x2-latent crop. It includes the decoded output. On CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation before the decode. Time is the wall time of a second,
identical decode in that process.

The default is a small random-weight config that runs in seconds on a CPU (the real VAE has width 1024 and 24
layers; ``--preset real``). Example:

    python benchmarks/bench_vae.py [--latent-size 24] [--tile-size 256] [--device cpu] [--dtype float32]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from diffusers_magi import AutoencoderMagi
from diffusers_magi.pipelines.video_processing_magi import video_to_uint8

PRESETS = {
    "small": dict(num_attention_heads=4, attention_head_dim=64, num_layers=2),
    "real": dict(),  # AutoencoderMagi's defaults are the inferred real checkpoint's shapes
}
MODES = ("untiled", "tiled", "per-chunk")
CHUNK_COUNTS = (1, 2, 4)
LATENT_FRAMES_PER_CHUNK = 6


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _decode(model: AutoencoderMagi, latents: torch.Tensor, mode: str) -> int:
    """Decode ``latents`` the way ``mode`` says; return the number of frames produced."""
    with torch.no_grad():
        if mode == "per-chunk":
            chunks = latents.split(LATENT_FRAMES_PER_CHUNK, dim=2)
            frames = [video_to_uint8(model.decode(chunk).sample) for chunk in chunks]
            return sum(f.shape[1] for f in frames)
        return model.decode(latents).sample.shape[2]


def _worker(args) -> None:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = AutoencoderMagi(**PRESETS[args.preset]).to(device=device, dtype=dtype).eval()
    if args.mode == "untiled":
        model.disable_tiling()
    else:
        model.enable_tiling(tile_sample_min_height=args.tile_size, tile_sample_min_width=args.tile_size)
    num_latent_frames = LATENT_FRAMES_PER_CHUNK * args.chunks
    shape = (1, model.config.latent_channels, num_latent_frames, args.latent_size, args.latent_size)
    latents = torch.randn(shape, device=device, dtype=dtype)
    # Load kernels, thread pools and code pages on a tiny input first, so that they do not count as decode memory.
    _decode(model, latents[..., :2, :2], args.mode)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    num_frames = _decode(model, latents, args.mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before

    start = time.perf_counter()
    _decode(model, latents, args.mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"frames": num_frames, "seconds": time.perf_counter() - start, "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--latent-size", type=int, default=24, help="latent height = width (pixels / 8)")
    parser.add_argument("--tile-size", type=int, default=256, help="spatial tile in pixels (the pipeline uses 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        _worker(args)
        return

    with torch.device("meta"):
        config = dict(AutoencoderMagi(**PRESETS[args.preset]).config)
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss)"
    print(f"AutoencoderMagi decode benchmark: preset {args.preset!r}, random weights")
    print("  config: " + ", ".join(f"{k}={v}" for k, v in config.items() if not k.startswith("_")))
    print(
        f"  latents: {LATENT_FRAMES_PER_CHUNK} latent frames per chunk, {args.latent_size}x{args.latent_size} latent"
        f" ({args.latent_size * 8}x{args.latent_size * 8} px); tiles {args.tile_size}x{args.tile_size} px, overlap"
        " 0.25, 12 frames"
    )
    print(
        f"  device {args.device}, dtype {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads;"
        f" memory = {memory} increase during the first decode, time = second decode"
    )
    print(f"{'mode':>10} {'chunks':>6} {'frames':>6} {'time (s)':>9} {'peak (MiB)':>11}")
    common = ["--preset", args.preset, "--latent-size", str(args.latent_size), "--tile-size", str(args.tile_size)]
    common += ["--device", args.device, "--dtype", args.dtype]
    for mode in args.modes:
        for chunks in CHUNK_COUNTS:
            command = [sys.executable, __file__, *common, "--mode", mode, "--chunks", str(chunks)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(
                f"{mode:>10} {chunks:>6} {result['frames']:>6} {result['seconds']:>9.3f}"
                f" {result['peak_bytes'] / 2**20:>11.1f}"
            )


if __name__ == "__main__":
    main()
