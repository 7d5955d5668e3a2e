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
import signal
import sys
from typing import List, Optional

import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from .conversion.presets import PRESETS
from .loading import DEFAULT_VARIANT, ORIGINAL_REPO_ID, TINY_RANDOM, is_original_layout
from .pipelines.input_checks_magi import check_cfg_t_range, check_float
from .placement import check_device

SIZE_MULTIPLE = 16  # VAE 8x, transformer patch 2x

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
        "--dtype",
        choices=sorted(DTYPES),
        help="dtype of the transformer and VAE (default: bfloat16; float32 for tiny-random)",
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
    text_sources = [
        flag
        for flag, value in (
            ("--prompt", args.prompt),
            ("--chunk-prompts", args.chunk_prompts),
            ("--chunk-prompt", args.chunk_prompt),
        )
        if value
    ]
    if len(text_sources) > 1:
        _fail(parser, f"{' and '.join(text_sources)} cannot be combined; pass one.")
    if not text_sources:
        _fail(parser, "pass --prompt (or per-chunk prompts with --chunk-prompts FILE / repeated --chunk-prompt).")
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir) or not os.access(output_dir, os.W_OK):
        _fail(parser, f"--output {args.output!r}: folder {output_dir!r} does not exist or is not writable.")
    if not args.output.lower().endswith(".mp4"):
        _fail(parser, f"--output {args.output!r} must be an .mp4 file.")
    check_numbers(parser, args)
    for flag, device in (("--device", args.device), ("--kv-cache-device", args.kv_cache_device)):
        if device is not None:
            try:
                check_device(device, flag, described_as=f"{flag} {device}")
            except ValueError as error:
                _fail(parser, str(error))
    if os.path.isdir(args.output):
        _fail(parser, f"--output {args.output!r} is a folder; name the .mp4 file to write.")
    if args.offload != "none" and args.device == "cpu" and args.offload != "group":
        _fail(
            parser,
            f"--offload {args.offload} moves components between the CPU and an accelerator; with --device cpu use --offload none.",
        )
    if args.model != TINY_RANDOM and not os.path.isdir(args.model) and os.path.exists(args.model):
        _fail(parser, f"--model {args.model!r} is a file; pass a pipeline folder, a Hub id or 'tiny-random'.")
    local_looking = args.model.startswith((".", os.sep, "~")) or args.model.count("/") > 1
    if args.model != TINY_RANDOM and not os.path.exists(args.model) and local_looking:
        _fail(parser, f"--model {args.model!r} does not exist (and is not a Hub id such as sand-ai/MAGI-1).")
    if (
        os.path.isdir(args.model)
        and not is_original_layout(args.model, args.variant)
        and not os.path.isfile(os.path.join(args.model, "model_index.json"))
    ):
        _fail(
            parser,
            f"--model {args.model!r} is a folder without model_index.json: not a pipeline written by magi-convert. For "
            "the original layout (ckpt/magi/...) pass --variant.",
        )
    if is_original_layout(args.model, args.variant):
        if args.special_tokens_file is None and args.special_tokens:
            _fail(
                parser,
                "the original layout needs --special-tokens-file special_tokens.npz (example/assets of "
                "github.com/SandAI-org/MAGI-1), or --special-tokens with no flags to generate without them.",
            )
        if args.special_tokens_file and not os.path.isfile(args.special_tokens_file):
            _fail(parser, f"--special-tokens-file {args.special_tokens_file!r} is not a readable file.")


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sizes, frames, steps and guidance settings, which need no model."""
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % SIZE_MULTIPLE:
            _fail(
                parser,
                f"{flag} {value}: height and width must be positive multiples of {SIZE_MULTIPLE} (VAE 8x, transformer patch 2x).",
            )
    for flag, value in (
        ("--num-frames", args.num_frames),
        ("--fps", args.fps),
        ("--num-prefix-frames", args.num_prefix_frames),
    ):
        if value < 1:
            _fail(parser, f"{flag} must be at least 1, got {value}.")
    if args.steps is not None and args.steps < 1:
        _fail(parser, f"--steps must be at least 1, got {args.steps}.")
    try:
        check_cfg_t_range(args.cfg_t_range)
        for flag, values in (("--prev-chunk-scales", args.prev_chunk_scales), ("--text-scales", args.text_scales)):
            for value in values or ():
                check_float(value, flag)
        check_float(args.nearly_clean_weight, "--nearly-clean-weight", allow_none=True)
    except (TypeError, ValueError) as error:
        _fail(parser, str(error).replace("`cfg_t_range", "`--cfg-t-range"))


def _chunk_prompts(args) -> Optional[List[str]]:
    if args.chunk_prompts:
        with open(args.chunk_prompts, encoding="utf-8") as file:
            return [line.strip() for line in file if line.strip()]
    return args.chunk_prompt


def load_pipeline(args):
    """The T2V / I2V / V2V pipeline the arguments ask for, placed and offloaded as asked."""
    from . import loading
    from .pipelines import MagiImageToVideoPipeline, MagiPipeline, MagiVideoToVideoPipeline

    pipeline_class = (
        MagiImageToVideoPipeline if args.image else MagiVideoToVideoPipeline if args.video else MagiPipeline
    )
    pipe = loading.load_pipeline(
        args.model,
        variant=args.variant,
        special_tokens=args.special_tokens_file,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        pipeline_class=pipeline_class,
        device=args.device if args.offload == "none" else None,  # the original layout is read straight onto it
    )
    if args.offload == "none":
        pipe.to(args.device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=args.device)
    else:
        pipe.enable_group_offload(
            onload_device=torch.device(args.device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
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


def _reason(error: BaseException) -> str:
    """An error in words: a file-system error's reason and file (`No space left on device: out.mp4`, as
    `magi-convert` words it), else its message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    return str(error) or type(error).__name__


def _not_cached(error: BaseException) -> Optional[str]:
    """Why the model could be neither downloaded nor found in the local cache, or `None` for another error.
    `from_original` raises huggingface_hub's `LocalEntryNotFoundError` itself (its last line says why); Diffusers'
    `from_pretrained` wraps it in an `OSError` caused by the error that kept it from the Hub (offline mode, no
    connection), which is the reason then."""
    links, seen = [error], set()
    while links:
        link = links.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        if isinstance(link, LocalEntryNotFoundError):
            if link is not error and error.__cause__ is not None:
                return str(error.__cause__).strip().splitlines()[0]
            return str(link).strip().splitlines()[-1]
        links += [link.__cause__, link.__context__]
    return None


def _error(message: str, code: int = 1) -> int:
    print(f"magi-generate: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    from huggingface_hub.errors import HfHubHTTPError
    from tqdm.auto import tqdm

    from .pipelines import write_video_stream

    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    errors = (ValueError, TypeError, OSError, RuntimeError, ImportError, HfHubHTTPError)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # finish the mp4 on SIGTERM too
    try:
        try:
            pipe = load_pipeline(args)
        except errors as error:
            reason = _not_cached(error)
            if reason is not None:  # offline, or the Hub unreachable, and nothing cached
                return _error(
                    f"could not download {args.model} and it is not in the local cache ({reason}). Connect to the "
                    f"internet, or pass --model path/to/folder (written by magi-convert), or --model {TINY_RANDOM} "
                    "for a smoke test."
                )
            return _error(f"could not load --model {args.model}: {_reason(error)}")
        except KeyboardInterrupt:
            return _error("interrupted while loading the model; nothing was written", 130)
        written = [0]
        with tqdm(desc="chunks", unit="chunk") as progress:

            def chunk_written(count: int) -> None:
                written[0] = count
                progress.update()

            try:
                chunks = pipe.stream(**generation_arguments(args))
            except (ValueError, TypeError) as error:  # arguments the model or the inputs reject
                _fail(parser, str(error))
            failure = None
            try:
                write_video_stream(chunks, args.output, fps=args.fps, on_chunk_written=chunk_written)
            except (KeyboardInterrupt, *errors) as error:
                failure = error
        if failure is not None:  # reported after the progress bar is closed
            interrupted = isinstance(failure, KeyboardInterrupt)
            what = "interrupted" if interrupted else _reason(failure)
            if written[0] == 0:
                return _error(f"{what} before the first chunk; no video was written", 130 if interrupted else 1)
            return _error(
                f"{what}; {args.output} holds the first {written[0]} whole chunk(s)", 130 if interrupted else 1
            )
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    print(f"wrote {args.output} ({written[0]} chunks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
