"""Video continuation with MAGI-1: the first frames of a video are the prefix; the output holds the new frames.

    python examples/video_to_video.py --model path/to/converted-magi --video clip.mp4 --output continued.mp4
    python examples/video_to_video.py --model tiny-random --height 64 --width 64   # smoke test (random clip)
"""

import argparse
import os
import tempfile

import numpy as np
import torch
from diffusers.utils import export_to_video

from diffusers_magi import MagiVideoToVideoPipeline
from diffusers_magi.loading import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--video", help="prefix video (default: a random clip)")
parser.add_argument("--num-prefix-frames", type=int, default=32, help="prefix frames (the original uses 32)")
parser.add_argument("--prompt", default="The waves keep rolling in as the sun sets behind the horizon.")
parser.add_argument("--height", type=int, default=720)
parser.add_argument("--width", type=int, default=720)
parser.add_argument("--num-frames", type=int, default=96)
parser.add_argument("--output", default="video_to_video.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model, pipeline_class=MagiVideoToVideoPipeline).to(device)

video_path = args.video
if video_path is None:
    frames = np.random.default_rng(0).random((args.num_prefix_frames, args.height, args.width, 3))
    video_path = os.path.join(tempfile.mkdtemp(), "prefix.mp4")
    export_to_video(list(frames), video_path, fps=24)

video = pipe(
    video=video_path,
    num_prefix_frames=args.num_prefix_frames,
    prompt=args.prompt,
    height=args.height,
    width=args.width,
    num_frames=args.num_frames,
).frames[0]
export_to_video(list(video), args.output, fps=24)
print(f"{len(video)} new frames -> {args.output}")
