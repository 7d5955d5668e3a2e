"""`magi-convert`: original MAGI-1 checkpoints -> a Hub-ready Diffusers pipeline folder.

Examples::

    magi-convert --source sand-ai/MAGI-1 --variant 4.5B_distill --special-tokens special_tokens.npz \\
        --output magi-4.5b-distill
    magi-convert --source ./MAGI-1 --variant 24B_distill_quant --special-tokens special_tokens.npz \\
        --output magi-24b-fp8
    magi-convert --config my_config.json --checkpoint-dir ckpt/magi/4.5B_base --vae-dir ckpt/vae \\
        --t5-dir ckpt/t5/t5-v1_1-xxl --special-tokens special_tokens.npz --output magi-4.5b
"""

import argparse
import sys
from typing import List, Optional

import torch

from .convert import convert_original_to_diffusers
from .presets import PRESETS

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magi-convert",
        description="Convert original MAGI-1 checkpoints (Sand AI's layout) into a Diffusers pipeline folder.",
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
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
        required=True,
        help="the original special_tokens.npz (example/assets/special_tokens.npz of the original GitHub repository)",
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source is None and args.checkpoint_dir is None:
        build_parser().error("pass --source (the original layout) or --checkpoint-dir with --config")
    if args.source is None and args.config is None:
        build_parser().error("--checkpoint-dir without --source needs --config (or use --source with --variant)")
    if args.dequantize_fp8 and args.dtype is None:
        build_parser().error("--dequantize-fp8 needs --dtype (bfloat16, float16 or float32)")
    try:
        folder = convert_original_to_diffusers(
            args.output,
            source=args.source,
            variant=args.variant,
            special_tokens_path=args.special_tokens,
            config=args.config,
            checkpoint_dir=args.checkpoint_dir,
            vae_dir=args.vae_dir,
            t5_dir=args.t5_dir,
            torch_dtype=_DTYPES[args.dtype] if args.dtype else None,
            dequantize_fp8=args.dequantize_fp8,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            token=args.token,
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"magi-convert: error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
