"""`magi-train-lora`: train a LoRA on the MAGI-1 transformer with the chunk-wise flow-matching objective.

    magi-train-lora --model sand-ai/MAGI-1 --variant 4.5B_base --data clips/ --output my-lora \\
        --height 480 --width 848 --num-frames 48 --mixed-precision bf16 --gradient-checkpointing --max-steps 2000
    accelerate launch --multi_gpu --num_processes 4 -m diffusers_magi.training.train_lora --model ...  # data parallel
    magi-train-lora --model tiny-random --data clips/ --output out --resolution 64 --max-steps 40  # CPU smoke run

Steps: check the arguments, the data and `--target-modules` (against a meta-device transformer built from the
model's config) before anything is loaded -> load the transformer, T5 only when `--cache-dir` lacks a clip, and the
VAE only then or for validation videos -> encode what the cache lacks (latents and T5 captions), then free T5 and the VAE (the VAE stays on the CPU when
it decodes validation videos) -> add a PEFT LoRA to the transformer -> train (`MagiChunkwiseFlowMatching`) -> write
`pytorch_lora_weights.safetensors` to `--output`, which `pipe.load_lora_weights(output)` loads. See
`docs/training.md`.

Reproducibility: the LoRA's initial weights are a function of `--seed`, and the clip and the random draws of the
objective (times, dropout, noise) of every sample are functions of `--seed` and the sample's position in the run. So
resuming from a checkpoint (LoRA weights, optimizer and learning-rate state, step) continues the exact loss sequence of
an uninterrupted run, and `--batch-size`, `--gradient-accumulation-steps` and the number of processes only regroup the
same samples (accumulating 2 x 1 clip equals batches of 2 clips up to float rounding when every clip has the same
number of loss chunks, since the loss is the mean over the loss chunks of a micro-batch).
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .data_magi import (
    check_clip_lengths,
    check_num_frames,
    clip_cache_files,
    encode_clips,
    encode_prompt_cached,
    find_clips,
    MagiCachedClips,
    prompt_cache_file,
)
from .objective_magi import CHUNK_TIME_MODES, TIME_DISTRIBUTIONS, MagiChunkwiseFlowMatching

DEFAULT_TARGET_MODULES = "to_q,to_k,to_v,to_cross_q,to_cross_kv,to_out,linear_in,linear_out"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SIZE_MULTIPLE = 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magi-train-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="sand-ai/MAGI-1",
        help="tiny-random, a converted folder, a Hub id, or the original layout (with --variant).",
    )
    model.add_argument("--variant", default=None, help="variant of the original layout, e.g. 4.5B_base.")
    model.add_argument(
        "--special-tokens-file", default=None, help="the original special_tokens.npz (original layout)."
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", required=True, help="folder of videos with same-name .txt captions, or with a metadata.jsonl."
    )
    data.add_argument("--output", required=True, help="folder for the LoRA, checkpoints, validation videos and log.")
    data.add_argument("--cache-dir", default=None, help="latent and caption cache (unset: OUTPUT/cache).")
    data.add_argument("--resolution", type=int, default=None, help="square size in pixels (or --height and --width).")
    data.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16 (unset: 480).")
    data.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16 (unset: 848).")
    data.add_argument("--num-frames", type=int, default=24, help="frames per clip, a multiple of 24 (one chunk).")
    data.add_argument("--fps", type=int, default=24, help="frame rate clips are resampled to.")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=32)
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (unset: the rank, scale 1).")
    lora.add_argument("--target-modules", default=DEFAULT_TARGET_MODULES, help="comma-separated module names.")
    train = parser.add_argument_group("training")
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--lr-warmup-steps", type=int, default=0)
    train.add_argument("--max-steps", type=int, default=1000, help="optimisation steps.")
    train.add_argument("--batch-size", type=int, default=1, help="clips per process and micro-step.")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW (must be installed).")
    train.add_argument("--seed", type=int, default=0)
    objective = parser.add_argument_group("objective")
    objective.add_argument("--chunk-times", choices=CHUNK_TIME_MODES, default="trajectory")
    objective.add_argument("--time-distribution", choices=TIME_DISTRIBUTIONS, default="uniform")
    objective.add_argument("--caption-dropout", type=float, default=0.1)
    objective.add_argument("--unconditional-dropout", type=float, default=0.05)
    objective.add_argument(
        "--num-prefix-frames",
        type=int,
        default=0,
        help="leading latent frames kept clean as conditioning, out of the loss: 1 = image-to-video (the first frame), 6 = one chunk (video-to-video).",
    )
    checkpoints = parser.add_argument_group("checkpoints, validation, logging")
    checkpoints.add_argument(
        "--checkpointing-steps", type=int, default=500, help="save a checkpoint every N steps (0: never)."
    )
    checkpoints.add_argument(
        "--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' (in OUTPUT)."
    )
    checkpoints.add_argument(
        "--validation-prompt", default=None, help="render a short video at every checkpoint and at the end."
    )
    checkpoints.add_argument("--validation-num-frames", type=int, default=24)
    checkpoints.add_argument(
        "--validation-inference-steps",
        type=int,
        default=None,
        help="validation steps (unset: the pipeline's default).",
    )
    checkpoints.add_argument(
        "--log-file", default=None, help="JSON lines, one per optimisation step (unset: OUTPUT/train_log.jsonl)."
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every argument error, before anything is loaded."""
    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise ValueError("Pass either --resolution or --height/--width, not both.")
    if args.resolution is not None:
        args.height = args.width = args.resolution
    args.height = 480 if args.height is None else args.height
    args.width = 848 if args.width is None else args.width
    for name in ("resolution", "height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % SIZE_MULTIPLE):
            raise ValueError(
                f"--{name} must be a positive multiple of {SIZE_MULTIPLE} (VAE 8x, patch 2x), got {value}."
            )
    check_num_frames(args.num_frames)
    if args.validation_prompt is not None:
        check_num_frames(args.validation_num_frames)
    for name in ("rank", "max_steps", "batch_size", "gradient_accumulation_steps", "fps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("checkpointing_steps", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}.")
    latent_frames = args.num_frames // 4
    if not 0 <= args.num_prefix_frames < latent_frames:
        raise ValueError(
            f"--num-prefix-frames must be in [0, {latent_frames}) for --num-frames {args.num_frames} ({latent_frames} latent "
            "frames): at least one frame is trained."
        )
    args.target_modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    if not args.target_modules:
        raise ValueError("--target-modules names no module.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes.") from None


def transformer_config(model: str, variant: Optional[str]) -> dict:
    """The `MagiTransformer3DModel` config of `--model` / `--variant`, read without loading a weight: the tiny
    random config, the original variant's preset, or the `transformer/config.json` of a converted folder or Hub id."""
    from ..loading import DEFAULT_VARIANT, TINY_RANDOM, is_original_layout
    from ..models.transformer_magi import MagiTransformer3DModel

    if model == TINY_RANDOM:
        from ..tiny_random import tiny_transformer_config

        return tiny_transformer_config()
    if is_original_layout(model, variant):
        from ..conversion.presets import preset
        from ..conversion.transformer import transformer_config_from_original

        return transformer_config_from_original(preset(variant or DEFAULT_VARIANT))
    return MagiTransformer3DModel.load_config(model, subfolder="transformer")


def check_target_modules(config: dict, target_modules: Sequence[str]) -> None:
    """Every `--target-modules` entry must name a module of the transformer of `config` (PEFT matches a name or a
    dotted suffix of one); checked on a model built on the meta device, before any weight is loaded."""
    from ..models.transformer_magi import MagiTransformer3DModel

    with torch.device("meta"):
        transformer = MagiTransformer3DModel.from_config(config)
    names = [name for name, _ in transformer.named_modules()]
    for target in target_modules:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            linears = {
                name.rsplit(".", 1)[-1]
                for name, module in transformer.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d))
            }
            raise ValueError(
                f"--target-modules: {target!r} names no module of the transformer; its linear layers are named "
                f"{sorted(linears)} (or a dotted path such as 'attn.to_q', 'blocks.0.ff.linear_in')."
            )


def resolve_checkpoint(output: Path, resume: Optional[str]) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        if not checkpoints:
            raise ValueError(f"--resume-from-checkpoint latest: {output} holds no checkpoint-* folder.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"--resume-from-checkpoint {resume!r} is not a checkpoint folder (no training_state.json).")
    return path


def clip_indices(position: int, batch_size: int, num_clips: int, seed: int) -> List[int]:
    """Clips of the `batch_size` samples starting at sample `position` of the run: each pass over the data is a
    permutation drawn from `seed` and the pass number, so the order is a function of the position alone."""
    indices = []
    for sample in range(position, position + batch_size):
        epoch, offset = divmod(sample, num_clips)
        order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(order[offset]))
    return indices


def sample_generators(position: int, batch_size: int, seed: int) -> List[torch.Generator]:
    """One generator per sample of the batch starting at sample `position` of the run, seeded from `seed` and the
    sample's position: a sample's noise, times and dropout do not depend on how the samples of a step are split into
    batches, accumulation micro-steps and processes."""
    return [
        torch.Generator().manual_seed(seed * 1_000_003 + sample) for sample in range(position, position + batch_size)
    ]


def _collate(dataset: MagiCachedClips, indices: Sequence[int], device) -> dict:
    items = [dataset[index] for index in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def _average_gradients(parameters: Sequence[torch.Tensor], accelerator) -> None:
    """Average the gradients of `parameters` over the processes (what DDP does, once per optimisation step)."""
    if accelerator.num_processes == 1:
        return
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    flat = accelerator.reduce(torch.cat([grad.flatten() for grad in grads]), reduction="mean")
    for grad, chunk in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(chunk.view_as(grad))


def _save_lora(pipe_class, folder: Path, transformer) -> None:
    from peft import get_peft_model_state_dict

    pipe_class.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def _write_model_card(output: Path, args: argparse.Namespace) -> None:
    card = f"""---
library_name: diffusers
tags: [lora, text-to-video, magi-1, diffusers-magi]
base_model: {args.model}
---
# MAGI-1 LoRA

Trained with `magi-train-lora` (diffusers-magi) on `{args.model}`{f" ({args.variant})" if args.variant else ""}:
rank {args.rank}, alpha {args.lora_alpha}, modules {", ".join(args.target_modules)}, {args.max_steps} steps at
{args.height}x{args.width}, {args.num_frames} frames.

```py
import diffusers_magi
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/converted-magi")
pipe.load_lora_weights("path/or/hub-id/of/this/lora")
```
"""
    (output / "README.md").write_text(card, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        clips = find_clips(args.data)
        check_clip_lengths(clips, args.num_frames, args.fps)
        check_target_modules(transformer_config(args.model, args.variant), args.target_modules)
        if args.lora_alpha is None:
            args.lora_alpha = float(args.rank)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        checkpoint = resolve_checkpoint(output, args.resume_from_checkpoint)
        train(args, clips, output, checkpoint)
    except ValueError as error:
        print(f"magi-train-lora: error: {error}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace, clips, output: Path, checkpoint: Optional[Path]) -> None:
    from accelerate import Accelerator
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import export_to_video
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from ..loading import load_pipeline

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision
    )
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    model_id = f"{args.model}:{args.variant}"

    # 1. Cache latents and captions. Process 0 encodes what the cache lacks (the VAE, then T5, on the accelerator only
    # while they encode); T5 and the VAE are loaded only for that, and the VAE is kept (on the CPU) only to decode the
    # validation videos, so a run whose cache is complete never loads T5.
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = clip_cache_files(clips, cache_dir, args.height, args.width, args.num_frames, args.fps, model_id)
    prompt_file = (
        prompt_cache_file(args.validation_prompt, cache_dir, model_id) if args.validation_prompt is not None else None
    )
    cached = all(path.is_file() for path in files) and (prompt_file is None or prompt_file.is_file())
    encodes = accelerator.is_main_process and not cached
    validates = accelerator.is_main_process and args.validation_prompt is not None
    pipe = load_pipeline(
        args.model,
        variant=args.variant,
        special_tokens=args.special_tokens_file,
        dtype=weight_dtype,
        with_text_encoder=encodes,
        with_vae=encodes or validates,
    )
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    needed = ("vae", "text_encoder", "tokenizer") if encodes else ("vae",) if validates else ()
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"--model {args.model!r} has no {', '.join(missing)}; training encodes the clips (and decodes the "
            "validation videos) with them."
        )
    if encodes:
        encode_clips(pipe, clips, cache_dir, args.height, args.width, args.num_frames, args.fps, model_id, device)
        if prompt_file is not None:
            encode_prompt_cached(pipe, args.validation_prompt, cache_dir, model_id, device)
    accelerator.wait_for_everyone()
    validation_caption = load_file(prompt_file) if prompt_file is not None else None
    pipe.register_modules(text_encoder=None, tokenizer=None, **({} if validates else {"vae": None}))
    dataset = MagiCachedClips(files, transformer.config.text_length)

    # 2. LoRA on the frozen transformer.
    transformer.requires_grad_(False)
    transformer.to(device)
    torch.manual_seed(args.seed)  # the LoRA's initial weights: the same in every process and every run of a seed
    transformer.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=args.target_modules
        )
    )
    cast_training_params(transformer, torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    parameters = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate)
    warmup = args.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    objective = MagiChunkwiseFlowMatching.from_scheduler(
        pipe.scheduler,
        chunk_times=args.chunk_times,
        time_distribution=args.time_distribution,
        caption_dropout=args.caption_dropout,
        unconditional_dropout=args.unconditional_dropout,
    )

    global_step = 0
    if checkpoint is not None:
        lora = load_file(checkpoint / LORA_WEIGHT_NAME)
        set_peft_model_state_dict(
            transformer, {key.removeprefix("transformer."): value for key, value in lora.items()}
        )
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.bin", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.bin", weights_only=True))
        global_step = json.loads((checkpoint / "training_state.json").read_text())["step"]
    # Only the optimizer is prepared (mixed-precision scaling); the LoRA gradients are averaged over processes by
    # `_average_gradients`, so a step may run several transformer calls (rows with different attention ranges).
    optimizer = accelerator.prepare(optimizer)

    log_path = Path(args.log_file) if args.log_file else output / "train_log.jsonl"
    if accelerator.is_main_process:
        # A fresh run starts an empty log; a resumed one keeps the steps up to its checkpoint.
        kept = (
            [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= global_step]
            if checkpoint is not None and log_path.is_file()
            else []
        )
        log_path.write_text("".join(f"{line}\n" for line in kept))

    def validate(step: int) -> None:
        if validation_caption is None or not accelerator.is_main_process:
            return
        transformer.eval()
        pipe.vae.to(device)
        with torch.no_grad():
            frames = pipe(
                prompt_embeds=validation_caption["prompt_embeds"][None].to(device),
                prompt_attention_mask=validation_caption["prompt_attention_mask"][None].to(device),
                height=args.height,
                width=args.width,
                num_frames=args.validation_num_frames,
                num_inference_steps=args.validation_inference_steps,
                generator=torch.Generator("cpu").manual_seed(args.seed),
            ).frames[0]
        pipe.vae.to("cpu")
        (output / "validation").mkdir(exist_ok=True)
        export_to_video(list(frames), str(output / "validation" / f"step-{step:06d}.mp4"), fps=args.fps)
        transformer.train()

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        folder = output / f"checkpoint-{step}"
        _save_lora(type(pipe), folder, transformer)
        torch.save(optimizer.state_dict(), folder / "optimizer.bin")
        torch.save(lr_scheduler.state_dict(), folder / "scheduler.bin")
        (folder / "training_state.json").write_text(json.dumps({"step": step, "seed": args.seed}))

    # 3. Train.
    progress = tqdm(
        total=args.max_steps,
        initial=global_step,
        desc="magi-train-lora",
        disable=not accelerator.is_local_main_process,
    )
    transformer.train()
    samples_per_step = args.batch_size * accelerator.num_processes
    while global_step < args.max_steps:
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            micro_step = global_step * args.gradient_accumulation_steps + micro
            position = (micro_step * accelerator.num_processes + accelerator.process_index) * args.batch_size
            batch = _collate(dataset, clip_indices(position, args.batch_size, len(dataset), args.seed), device)
            generators = sample_generators(position, args.batch_size, args.seed)
            with accelerator.accumulate(transformer):
                with accelerator.autocast():
                    result = objective(
                        transformer,
                        batch["latents"],
                        batch["prompt_embeds"],
                        batch["prompt_attention_mask"],
                        num_prefix_frames=args.num_prefix_frames,
                        generator=generators,
                    )
                accelerator.backward(result.loss)
                if accelerator.sync_gradients:
                    _average_gradients(parameters, accelerator)
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(result.loss.detach())
        lr_scheduler.step()
        global_step += 1
        loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        if not math.isfinite(loss):
            raise ValueError(
                f"The loss became {loss} at step {global_step}; lower --learning-rate or use --mixed-precision bf16."
            )
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if accelerator.is_main_process:
            with log_path.open("a") as log:
                log.write(
                    json.dumps(
                        {
                            "step": global_step,
                            "loss": loss,
                            "lr": lr_scheduler.get_last_lr()[0],
                            "samples": global_step * samples_per_step * args.gradient_accumulation_steps,
                        }
                    )
                    + "\n"
                )
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and global_step < args.max_steps:
            save_checkpoint(global_step)
            validate(global_step)
    progress.close()

    # 4. The LoRA (what `pipe.load_lora_weights(output)` reads), a last checkpoint and validation.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_lora(type(pipe), output, transformer)
        _write_model_card(output, args)
        if args.checkpointing_steps:
            save_checkpoint(global_step)
    validate(global_step)
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
