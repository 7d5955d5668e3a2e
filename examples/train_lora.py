"""Fine-tune MAGI-1 with a LoRA on your own clips, then generate with it.

    python examples/train_lora.py --model sand-ai/MAGI-1 --variant 4.5B_base --data clips/ --lora-dir fox-lora \
        --height 480 --width 848 --max-steps 2000 --prompt "a red fox runs through snow"
    python examples/train_lora.py --model tiny-random --data clips/ --height 32 --width 32 --max-steps 4   # smoke test

`--data` is a folder of videos with a same-name `.txt` caption beside each (or a `metadata.jsonl`); see
docs/training.md. Step 1 runs `magi-train-lora` (the same as the command line; on a GPU add `--mixed-precision bf16
--gradient-checkpointing`, as this script does when CUDA is available). Step 2 loads the LoRA into a pipeline with
`load_lora_weights` and renders the prompt with the adapter at `--lora-scale`.
"""

import argparse
import sys

import torch
from diffusers.utils import export_to_video

from diffusers_magi.loading import load_pipeline
from diffusers_magi.training.train_lora import main as train_lora

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-random")
parser.add_argument("--variant", default=None)
parser.add_argument("--data", required=True)
parser.add_argument("--lora-dir", default="magi-lora")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=848)
parser.add_argument("--num-frames", type=int, default=24)
parser.add_argument("--max-steps", type=int, default=500)
parser.add_argument("--prompt", default="a red square moves right")
parser.add_argument("--lora-scale", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="lora_video.mp4")
args = parser.parse_args()

# 1. Train (latents and captions are cached in LORA_DIR/cache, so a second run skips the encoding).
gpu = ["--mixed-precision", "bf16", "--gradient-checkpointing"] if torch.cuda.is_available() else []
code = train_lora(
    [
        "--model",
        args.model,
        *(["--variant", args.variant] if args.variant else []),
        "--data",
        args.data,
        "--output",
        args.lora_dir,
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--num-frames",
        str(args.num_frames),
        "--max-steps",
        str(args.max_steps),
        "--seed",
        str(args.seed),
        *gpu,
    ]
)
if code:
    sys.exit(code)

# 2. Generate with the LoRA.
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(args.model, variant=args.variant).to(device)
pipe.load_lora_weights(args.lora_dir, adapter_name="mine")
video = pipe(
    prompt=args.prompt,
    height=args.height,
    width=args.width,
    num_frames=args.num_frames,
    generator=torch.Generator("cpu").manual_seed(args.seed),
    attention_kwargs={"scale": args.lora_scale},
).frames[0]
export_to_video(list(video), args.output, fps=24)
print(f"{len(video)} frames with the LoRA at scale {args.lora_scale} -> {args.output}")
