"""`magi-generate`: MAGI-1 text-, image- and video-to-video from the command line.

    magi-generate --prompt "A red fox trots through fresh snow" --special-tokens-file special_tokens.npz --output fox.mp4
    magi-generate --model path/to/converted-folder --prompt "A red fox trots through fresh snow" --output fox.mp4
    magi-generate --model tiny-random --prompt "smoke test" --height 64 --width 64 --num-frames 48 --output t.mp4

By default the 4.5B distilled checkpoint is loaded from the original Hub repository (`sand-ai/MAGI-1`, converted in
memory); `--model` also takes a folder or Hub id written by `magi-convert`, or `tiny-random`.

The video is written to `--output` while it is generated, chunk by chunk (24 frames each).
"""

import argparse
import os
import sys
from typing import List, Optional

import torch

from .conversion.presets import PRESETS
from .loading import DEFAULT_VARIANT, ORIGINAL_REPO_ID, TINY_RANDOM, is_original_layout

OFFLOAD_MODES = ("none", "model", "sequential", "group")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magi-generate",
        description="Generate a video with MAGI-1 (text-to-video, or image-/video-to-video with --image/--video).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    text = parser.add_argument_group("text")
    text.add_argument("--prompt", help="the prompt of every chunk")
    text.add_argument("--chunk-prompts", metavar="FILE", help="text file with one prompt per line, one per chunk")
    text.add_argument(
        "--chunk-prompt", action="append", metavar="TEXT", help="one chunk's prompt; repeat the flag once per chunk"
    )
    text.add_argument("--negative-prompt", help="replaces the learned null caption (base checkpoints)")
    text.add_argument(
        "--special-tokens", nargs="*", default=["hq", "duration"], help="learned tokens prepended to each caption"
    )
    text.add_argument("--negative-special-tokens", action="store_true", help="the original's NEG_PROMPT tokens")

    inputs = parser.add_argument_group("image / video conditioning")
    inputs.add_argument("--image", help="first frame: image-to-video")
    inputs.add_argument("--video", help="prefix video: video-to-video (continuation)")
    inputs.add_argument("--num-prefix-frames", type=int, default=32, help="frames of --video used as prefix")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=ORIGINAL_REPO_ID,
        help="the original MAGI-1 repository (Hub id or local snapshot, with --variant), a Diffusers folder or Hub id "
        "written by magi-convert, or 'tiny-random' (a tiny random pipeline built in memory: a smoke test of the whole "
        "path, not a model)",
    )
    model.add_argument(
        "--variant",
        choices=sorted(PRESETS),
        help=f"MAGI-1 variant of the original layout (default {DEFAULT_VARIANT} for {ORIGINAL_REPO_ID}); giving it "
        "means --model is in the original layout",
    )
    model.add_argument(
        "--special-tokens-file",
        help="the original special_tokens.npz (example/assets of github.com/SandAI-org/MAGI-1), needed with the "
        "original layout",
    )
    model.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the transformer and VAE (default: bfloat16; float32 for tiny-random)"
    )
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="CPU offloading of the components")
    model.add_argument("--kv-cache-device", help="keep the KV cache on this device (e.g. cpu)")

    video = parser.add_argument_group("video")
    video.add_argument("--height", type=int, default=720)
    video.add_argument("--width", type=int, default=720)
    video.add_argument("--num-frames", type=int, default=96, help="frames to generate (whole 24-frame chunks)")
    video.add_argument("--fps", type=int, default=24, help="frame rate of the output (and of the --video resampling)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, help="steps per chunk (default: the checkpoint's)")
    sampling.add_argument("--guidance-mode", choices=["three_branch", "distilled"], help="default: the checkpoint's")
    sampling.add_argument("--cfg-t-range", type=float, nargs="+", help="noise-band edges (time 0 = noise)")
    sampling.add_argument("--prev-chunk-scales", type=float, nargs="+", help="per band: scale towards earlier chunks")
    sampling.add_argument("--text-scales", type=float, nargs="+", help="per band: scale towards the text")
    sampling.add_argument("--nearly-clean-weight", type=float, help="distilled checkpoints: the nearly-clean blend")
    sampling.add_argument("--seed", type=int, default=0)

    parser.add_argument("--output", default="magi.mp4", help="mp4 file, written while the video is generated")
    return parser


def _fail(parser: argparse.ArgumentParser, message: str):
    parser.error(message)  # exits with status 2 and the usage line


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image and args.video:
        _fail(parser, "--image (image-to-video) and --video (video-to-video) cannot be combined; pass one of them.")
    for flag, path in (("--image", args.image), ("--video", args.video), ("--chunk-prompts", args.chunk_prompts)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            _fail(parser, f"{flag} {path!r} is not a readable file.")
    text_sources = [flag for flag, value in (("--prompt", args.prompt), ("--chunk-prompts", args.chunk_prompts), ("--chunk-prompt", args.chunk_prompt)) if value]
    if len(text_sources) > 1:
        _fail(parser, f"{' and '.join(text_sources)} cannot be combined; pass one.")
    if not text_sources:
        _fail(parser, "pass --prompt (or per-chunk prompts with --chunk-prompts FILE / repeated --chunk-prompt).")
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir) or not os.access(output_dir, os.W_OK):
        _fail(parser, f"--output {args.output!r}: folder {output_dir!r} does not exist or is not writable.")
    if not args.output.lower().endswith(".mp4"):
        _fail(parser, f"--output {args.output!r} must be an .mp4 file.")
    if args.offload != "none" and args.device == "cpu" and args.offload != "group":
        _fail(parser, f"--offload {args.offload} moves components between the CPU and an accelerator; with --device cpu use --offload none.")
    if args.model != TINY_RANDOM and not os.path.isdir(args.model) and os.path.exists(args.model):
        _fail(parser, f"--model {args.model!r} is a file; pass a pipeline folder, a Hub id or 'tiny-random'.")
    if is_original_layout(args.model, args.variant):
        if args.special_tokens_file is None and args.special_tokens:
            _fail(
                parser,
                "the original layout needs --special-tokens-file special_tokens.npz (example/assets of "
                "github.com/SandAI-org/MAGI-1), or --special-tokens with no flags to generate without them.",
            )
        if args.special_tokens_file and not os.path.isfile(args.special_tokens_file):
            _fail(parser, f"--special-tokens-file {args.special_tokens_file!r} is not a readable file.")



def _chunk_prompts(args) -> Optional[List[str]]:
    if args.chunk_prompts:
        with open(args.chunk_prompts, encoding="utf-8") as file:
            return [line.strip() for line in file if line.strip()]
    return args.chunk_prompt


def load_pipeline(args):
    """The T2V / I2V / V2V pipeline the arguments ask for, placed and offloaded as asked."""
    from . import loading
    from .pipelines import MagiImageToVideoPipeline, MagiPipeline, MagiVideoToVideoPipeline

    pipeline_class = MagiImageToVideoPipeline if args.image else MagiVideoToVideoPipeline if args.video else MagiPipeline
    pipe = loading.load_pipeline(
        args.model,
        variant=args.variant,
        special_tokens=args.special_tokens_file,
        torch_dtype=DTYPES[args.dtype] if args.dtype else None,
        pipeline_class=pipeline_class,
    )
    if args.offload == "none":
        pipe.to(args.device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=args.device)
    else:
        pipe.enable_group_offload(
            onload_device=torch.device(args.device), offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        )
    return pipe


def generation_arguments(args) -> dict:
    chunk_prompts = _chunk_prompts(args)
    kwargs = dict(
        prompt=None if chunk_prompts else args.prompt,
        chunk_prompts=chunk_prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        guidance_mode=args.guidance_mode,
        cfg_t_range=args.cfg_t_range,
        prev_chunk_scales=args.prev_chunk_scales,
        text_scales=args.text_scales,
        nearly_clean_weight=args.nearly_clean_weight,
        special_tokens=args.special_tokens,
        negative_special_tokens=args.negative_special_tokens,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        kv_cache_device=args.kv_cache_device,
    )
    if args.image:
        kwargs["image"] = args.image
    if args.video:
        kwargs.update(video=args.video, num_prefix_frames=args.num_prefix_frames, fps=args.fps)
    return kwargs


def main(argv: Optional[List[str]] = None) -> int:
    from tqdm.auto import tqdm

    from .pipelines import write_video_stream

    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    pipe = load_pipeline(args)
    try:
        chunks = pipe.stream(**generation_arguments(args))
    except (ValueError, TypeError) as error:
        _fail(parser, str(error))
    with tqdm(desc="chunks", unit="chunk") as progress:

        def counted(stream):
            for chunk in stream:
                progress.update()
                yield chunk

        write_video_stream(counted(chunks), args.output, fps=args.fps)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
