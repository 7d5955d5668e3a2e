"""Text-to-video with MAGI-1.

    python examples/text_to_video.py --model path/to/converted-magi-4.5b-distill --output fox.mp4
    python examples/text_to_video.py --model tiny-random --height 64 --width 64   # smoke test, no download

`--model` is a folder (or Hub id) written by `magi-convert`, the original layout (`sand-ai/MAGI-1`, see
`diffusers_magi.loading.load_pipeline`), or `tiny-random`: a tiny random pipeline built in memory (a smoke test of the
code path, not a model).
"""

import argparse

import torch
from diffusers.utils import export_to_video

from diffusers_magi.loading import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--prompt", default="A red fox trots through fresh snow at sunrise, the camera follows it slowly.")
parser.add_argument("--height", type=int, default=720)
parser.add_argument("--width", type=int, default=720)
parser.add_argument("--num-frames", type=int, default=96)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="text_to_video.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model).to(device)

video = pipe(
    prompt=args.prompt,
    height=args.height,
    width=args.width,
    num_frames=args.num_frames,
    generator=torch.Generator("cpu").manual_seed(args.seed),
).frames[0]  # (frames, height, width, 3), float in [0, 1]
export_to_video(list(video), args.output, fps=24)
print(f"{len(video)} frames -> {args.output}")
