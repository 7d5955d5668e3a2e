"""Memory and time of generating 2, 4, 8 and 16 chunks with streaming decode: flat in video length.

A small random-weight pipeline on the CPU (T5, transformer and VAE at toy widths; three-branch guidance) generates
each video with `MagiPipeline.stream`, which decodes every chunk as soon as it is final and keeps only the chunks in
flight; the consumer drops each decoded chunk (as a writer of a video file would after writing it). Every video
length runs in a fresh Python process, so that one run cannot hide another's peak:

* time: wall time of the generation (the best of `--repeats` identical generations, after a one-chunk warm-up in the
  same process: the minimum filters out other processes competing for the CPU), divided by the chunks; the CPU time
  of the process for that generation is printed beside it (on a busy machine wall time grows, CPU time does not). One
  thread by default (`--threads`), as several threads on a shared machine make wall times erratic;
* peak RSS: the process's maximum resident set size (`ru_maxrss`), and its increase over the resident size just
  before the generation;
* peak torch allocations: the most bytes of tensors alive at once during a second, identical generation run under a
  dispatch mode that counts them (`memory_plan.LiveTensorBytes`; weights excluded).

Acceptance (issue 6): peak memory at 16 chunks <= 1.10 x at 2 chunks; time per chunk at 16 chunks <= 1.15 x at 4.

    python benchmarks/bench_long_video.py [--chunks 2 4 8 16] [--size 64] [--steps 8]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from diffusers_magi.tiny_random import tiny_random_pipeline
from memory_plan import LiveTensorBytes

PRESETS = {
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, attention_head_dim=32, ffn_dim=512),
    "tiny": {},  # the 2-layer transformer of the tests
}
MEMORY_BOUND, TIME_BOUND = 1.10, 1.15


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _generate(pipe, num_chunks: int, args) -> int:
    frames = 0
    for chunk in pipe.stream(
        prompt="a red fox runs through the snow at night",
        num_frames=24 * num_chunks,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ):
        frames += chunk.frames.shape[1]  # the chunk is dropped here, as a video writer would after writing it
    return frames


def _worker(args) -> None:
    torch.set_num_threads(args.threads)
    pipe = tiny_random_pipeline(**PRESETS[args.preset])
    pipe.set_progress_bar_config(disable=True)
    _generate(pipe, 1, args)  # warm-up: kernels, thread pools, code pages

    before = _resident_bytes()
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        frames = _generate(pipe, args.worker_chunks, args)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    weights = [tensor for component in pipe.components.values() if isinstance(component, torch.nn.Module) for tensor in (*component.parameters(), *component.buffers())]
    counter = LiveTensorBytes(weights)
    with counter:
        _generate(pipe, args.worker_chunks, args)
    print(
        json.dumps(
            {
                "frames": frames,
                "calls": len(pipe.scheduler.make_plan(args.steps, num_chunks=args.worker_chunks)),
                "seconds": min(seconds),
                "cpu_seconds": cpu_seconds[seconds.index(min(seconds))],
                "peak_rss": peak_rss,
                "rss_increase": peak_rss - before,
                "peak_tensors": counter.peak,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--size", type=int, default=64, help="video height = width in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=8, help="inference steps per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="generations per video length; the best time counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker processes")
    parser.add_argument("--worker-chunks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_chunks is not None:
        _worker(args)
        return

    config = {**tiny_random_pipeline().transformer.config, **PRESETS[args.preset]}
    print(
        f"Long-video benchmark: MagiPipeline.stream, preset {args.preset!r} (transformer {config['num_layers']} layers, "
        f"hidden {config['hidden_size']}, {config['num_attention_heads']} heads), random weights, three-branch guidance"
    )
    print(
        f"  {args.size}x{args.size} px, {args.steps} steps per chunk, window 4, output_type='np' (each chunk decoded "
        f"alone and dropped), device cpu, float32, torch {torch.__version__}, {args.threads} thread(s); "
        f"each row in a fresh process, best time of {args.repeats}"
    )
    print(
        f"{'chunks':>6} {'calls':>6} {'time (s)':>9} {'s/chunk':>8} {'CPU s/chunk':>12} {'peak RSS (MiB)':>15}"
        f" {'RSS increase':>13} {'peak tensors (MiB)':>19}"
    )
    common = ["--preset", args.preset, "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    common += ["--threads", str(args.threads)]
    results = {}
    for chunks in args.chunks:
        command = [sys.executable, __file__, *common, "--worker-chunks", str(chunks)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        results[chunks] = result
        print(
            f"{chunks:>6} {result['calls']:>6} {result['seconds']:>9.2f} {result['seconds'] / chunks:>8.3f}"
            f" {result['cpu_seconds'] / chunks:>12.3f}"
            f" {result['peak_rss'] / 2**20:>15.1f} {result['rss_increase'] / 2**20:>13.1f}"
            f" {result['peak_tensors'] / 2**20:>19.2f}"
        )

    shortest, longest = min(results), max(results)
    reference = 4 if 4 in results else shortest
    checks = [
        (f"peak RSS {longest} / {shortest} chunks", results[longest]["peak_rss"] / results[shortest]["peak_rss"], MEMORY_BOUND),
        (f"peak tensors {longest} / {shortest} chunks", results[longest]["peak_tensors"] / results[shortest]["peak_tensors"], MEMORY_BOUND),
        (
            f"time per chunk {longest} / {reference} chunks",
            (results[longest]["seconds"] / longest) / (results[reference]["seconds"] / reference),
            TIME_BOUND,
        ),
    ]
    for name, ratio, bound in checks:
        print(f"{name}: {ratio:.3f} (bound {bound:.2f}) {'PASS' if ratio <= bound else 'FAIL'}")


if __name__ == "__main__":
    main()
