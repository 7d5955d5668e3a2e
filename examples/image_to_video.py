"""Image-to-video with MAGI-1: the image becomes the first frame and the video continues from it.

    python examples/image_to_video.py --model path/to/converted-magi --image first_frame.jpg --output i2v.mp4
    python examples/image_to_video.py --model tiny-random --height 64 --width 64   # smoke test (random image)
"""

import argparse

import numpy as np
import PIL.Image
import torch
from diffusers.utils import export_to_video

from diffusers_magi import MagiImageToVideoPipeline
from diffusers_magi.loading import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--image", help="first frame (default: a random image)")
parser.add_argument("--prompt", default="The camera slowly pulls back as leaves drift across the scene.")
parser.add_argument("--height", type=int, default=720)
parser.add_argument("--width", type=int, default=720)
parser.add_argument("--num-frames", type=int, default=96)
parser.add_argument("--output", default="image_to_video.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model, pipeline_class=MagiImageToVideoPipeline).to(device)

image = args.image or PIL.Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8))
video = pipe(
    image=image,
    prompt=args.prompt,
    height=args.height,
    width=args.width,
    num_frames=args.num_frames,
    resize_mode="crop",  # cover the output size and centre-crop ("fit" stretches, "pad" adds borders)
).frames[0]
export_to_video(list(video), args.output, fps=24)
print(f"{len(video)} frames -> {args.output}")
