"""Chunk-wise prompts: each 24-frame chunk follows its own text, for scene transitions within one video.

A schedule `{first_chunk: prompt}` holds each prompt until the next key; a list gives one prompt per chunk. Earlier
chunks are not affected by later prompts, and later chunks see the earlier frames, so the scene stays continuous.

    python examples/chunk_prompts.py --model path/to/converted-magi --output story.mp4
    python examples/chunk_prompts.py --model tiny-random --height 64 --width 64
"""

import argparse

import torch
from diffusers.utils import export_to_video

from diffusers_magi.loading import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--height", type=int, default=720)
parser.add_argument("--width", type=int, default=720)
parser.add_argument("--output", default="chunk_prompts.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model).to(device)

schedule = {
    0: "A quiet pine forest at dawn, mist between the trees.",
    2: "Sunlight breaks through the mist and birds take off from the branches.",
    4: "The camera rises above the treetops, revealing a lake in the valley.",
}
video = pipe(chunk_prompts=schedule, num_frames=24 * 6, height=args.height, width=args.width).frames[0]
export_to_video(list(video), args.output, fps=24)
print(f"{len(video)} frames, prompts changing at chunks {sorted(schedule)} -> {args.output}")
