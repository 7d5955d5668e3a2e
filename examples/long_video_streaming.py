"""A long video, streamed: each 24-frame chunk is written to the mp4 as soon as it is final, and memory does not
grow with the number of chunks.

    python examples/long_video_streaming.py --model path/to/converted-magi --num-chunks 40 --output long.mp4
    python examples/long_video_streaming.py --model tiny-random --height 64 --width 64 --num-chunks 6
"""

import argparse
import time

import torch

from diffusers_magi import write_video_stream
from diffusers_magi.loading import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--prompt", default="A drone glides over an endless mountain range, clouds drifting below.")
parser.add_argument("--num-chunks", type=int, default=20, help="24 frames each")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--output", default="long_video.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model).to(device)
pipe.set_progress_bar_config(disable=True)

chunks = pipe.stream(
    prompt=args.prompt,
    height=args.height,
    width=args.width,
    num_frames=24 * args.num_chunks,
    kv_cache_device="cpu",  # keep the cached keys/values of earlier chunks off the GPU
)
start = time.perf_counter()


def report(stream):
    for chunk in stream:
        print(f"chunk {chunk.chunk_index:3d} ready after {time.perf_counter() - start:7.1f} s")
        yield chunk


write_video_stream(report(chunks), args.output, fps=24)
print(f"{24 * args.num_chunks} frames -> {args.output}")
