"""`magi-convert`: original MAGI-1 checkpoints -> a Hub-ready Diffusers pipeline folder.

Examples::

    magi-convert --source sand-ai/MAGI-1 --variant 4.5B_distill --special-tokens special_tokens.npz \\
        --output magi-4.5b-distill
    magi-convert --source ./MAGI-1 --variant 24B_distill_quant --special-tokens special_tokens.npz \\
        --output magi-24b-fp8
    magi-convert --config my_config.json --checkpoint-dir ckpt/magi/4.5B_base --vae-dir ckpt/vae \\
        --t5-dir ckpt/t5/t5-v1_1-xxl --special-tokens special_tokens.npz --output magi-4.5b
    magi-convert --source ./MAGI-1 --variant 24B_base --dry-run     # headers only: what a conversion would find

Every argument is checked before anything is read; every error is one line `magi-convert: error: ...` with exit
code 1 (2 for bad flags), and a failed or interrupted run leaves no partial output.
"""

import argparse
import os
import sys
from typing import List, Optional

import torch

from .convert import convert_original_to_diffusers
from .hub_folder import check_output_folder
from .inspect import inspect_original
from .presets import PRESETS

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magi-convert",
        description="Convert original MAGI-1 checkpoints (Sand AI's layout) into a Diffusers pipeline folder.",
    )
    parser.add_argument("--output", help="folder to write (must not exist or be empty); not needed with --dry-run")
    parser.add_argument(
        "--source",
        help="local copy of the original Hub repository layout (ckpt/magi/..., ckpt/vae, ckpt/t5), or a Hub "
        "repository id such as sand-ai/MAGI-1",
    )
    parser.add_argument(
        "--variant",
        help=f"checkpoint folder under ckpt/magi/; also picks the built-in config ({', '.join(PRESETS)}) unless "
        "--config is given",
    )
    parser.add_argument(
        "--special-tokens",
        help="the original special_tokens.npz (example/assets/special_tokens.npz of the original GitHub repository); "
        "required unless --dry-run",
    )
    parser.add_argument("--config", help="an original config JSON to use instead of the built-in preset")
    parser.add_argument("--checkpoint-dir", help="DiT folder holding inference_weight[.fp8][.distill]/")
    parser.add_argument("--vae-dir", help="original VAE folder (default: <source>/ckpt/vae)")
    parser.add_argument("--t5-dir", help="T5 folder (default: <source>/ckpt/t5/t5-v1_1-xxl)")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        help="dtype of the transformer blocks (default: the config's params_dtype, bfloat16 for released checkpoints)",
    )
    parser.add_argument(
        "--dequantize-fp8",
        action="store_true",
        help="fp8 checkpoints: write plain --dtype linears with the dequantised weights instead of float8 weights",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="shard weights above this size (default: 5GB)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder that is empty or an earlier conversion (its model_index.json names a "
        "MAGI-1 pipeline); never a file or other content",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read only the safetensors headers of a local original layout and report, per component, the tensors "
        "found, missing, unexpected and mis-shaped, dtypes, sizes and memory needed; exit 0 if it would succeed",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    return parser


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that needs no weights: flags that go together, and that every named path exists."""
    if args.source is None and args.checkpoint_dir is None:
        parser.error("pass --source (the original layout) or --checkpoint-dir with --config")
    if args.source is None and args.config is None:
        parser.error("--checkpoint-dir without --source needs --config (or use --source with --variant)")
    if args.dequantize_fp8 and args.dtype is None:
        parser.error("--dequantize-fp8 needs --dtype (bfloat16, float16 or float32)")
    if not args.dry_run and args.output is None:
        parser.error("--output is required (or pass --dry-run to only check the checkpoint)")
    if not args.dry_run and args.special_tokens is None:
        parser.error(
            "--special-tokens special_tokens.npz is required (example/assets of github.com/SandAI-org/MAGI-1)"
        )
    for flag, path in (("--special-tokens", args.special_tokens), ("--config", args.config)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path!r} is not a readable file")
    for flag, path in (
        ("--checkpoint-dir", args.checkpoint_dir),
        ("--vae-dir", args.vae_dir),
        ("--t5-dir", args.t5_dir),
    ):
        if path is not None and not os.path.isdir(path):
            parser.error(f"{flag} {path!r} is not a folder")
    looks_local = args.source is not None and (
        os.path.isabs(args.source) or args.source.startswith(".") or args.source.count("/") != 1
    )
    if args.source is not None and not os.path.isdir(args.source) and (looks_local or args.dry_run):
        what = "--dry-run reads a local copy of the original layout" if args.dry_run else "it is not a Hub id either"
        parser.error(f"--source {args.source!r} is not a folder ({what})")
    if args.variant is None and args.config is None:
        parser.error(f"pass --variant ({', '.join(PRESETS)}) or --config")
    try:
        from accelerate.utils import convert_file_size_to_int

        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        parser.error(f"--max-shard-size {args.max_shard_size!r} is not a size such as 5GB, 500MB or 1000000")


def _named_inputs(args: argparse.Namespace) -> List[str]:
    """The local inputs the flags name (a Hub id is none); the folders of a `--source` layout lie inside it."""
    source = args.source if args.source is not None and os.path.isdir(args.source) else None
    named = (source, args.checkpoint_dir, args.vae_dir, args.t5_dir, args.config, args.special_tokens)
    return [path for path in named if path is not None]


def _error_line(error: BaseException) -> str:
    """One line for a conversion error: the message, or for a file-system error its reason and file."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    errors = (ValueError, TypeError, OSError, ImportError, RuntimeError, HfHubHTTPError)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    try:
        if args.output is not None:  # before any work: an output that may not be written, or would destroy an input
            check_output_folder(args.output, args.overwrite, _named_inputs(args))
        if args.dry_run:
            report = inspect_original(
                args.source,
                variant=args.variant,
                config=args.config,
                checkpoint_dir=args.checkpoint_dir,
                vae_dir=args.vae_dir,
                t5_dir=args.t5_dir,
                special_tokens_path=args.special_tokens,
                dtype=dtype,
                dequantize_fp8=args.dequantize_fp8,
            )
            print(report)
            return 0 if report.ok else 1
        folder = convert_original_to_diffusers(
            args.output,
            source=args.source,
            variant=args.variant,
            special_tokens_path=args.special_tokens,
            config=args.config,
            checkpoint_dir=args.checkpoint_dir,
            vae_dir=args.vae_dir,
            t5_dir=args.t5_dir,
            dtype=dtype,
            dequantize_fp8=args.dequantize_fp8,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            token=args.token,
        )
    except errors as error:
        print(f"magi-convert: error: {_error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("magi-convert: interrupted; no output was written", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
