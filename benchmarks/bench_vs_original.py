"""Time per video of diffusers-magi against the original MAGI-1 code on the CPU: same weights, inputs and noise.

The default `--preset issue` is issue 13's case: hidden 512, 8 layers (8 heads, 2 query groups, head dim 64, ffn
2048, caption channels 512), 16x16 latents (128x128 video), 96 frames = 4 chunks of 6 latent frames, 8 steps,
window 4, 2 threads. `--preset tiny` is the reference data's tiny45 size (2 layers, hidden 256, 4x4 latents): seconds.

It needs a checkout of the original code, `--original PATH` (`git clone https://github.com/SandAI-org/MAGI-1`), and
einops; the original runs on the CPU through `original_on_cpu.py` (plain torch stand-ins for its CUDA-only packages,
the same operations the port uses; see there). Each video (text encoder and VAE excluded on both sides):

* original: `torch.manual_seed(seed); list(generate_per_chunk(model=dit, prefix_video=None, caption_embs=...,
  emb_masks=...))` with `PAD_HQ=1 PAD_DURATION=1` (the environment flags of the reference data's sampler cases) and
  the DiT from its own `get_dit(MagiConfig.from_json(config))`;
* port: `MagiPipeline(**convert_original_components(config, load_dir, special_tokens))` called with the same caption
  embedding as `prompt_embeds` / `prompt_attention_mask`, `special_tokens=("hq", "duration")` and the original's
  initial noise (its first draw after the seed) as `latents`; base guidance once with the branches one by one
  (`batch_guidance_branches=False`) and once batched.

Both read the same special tokens: the checkout's `example/assets/special_tokens.npz` cut to the caption channels
(the file holds the real T5 width, 4096).

Steps:

1. Random checkpoints in the original layout (`<load>/inference_weight[.distill]/model.safetensors`) and their
   three-section configs, in a temporary folder: the original's `VideoDiTModel` is built and its tensors drawn with
   the reference data's init rules (linear N(0, 1/fan_in), biases and zero-centred norm weights N(0, 0.1^2), plain
   LayerNorm weights 1 + N(0, 0.1^2), null caption N(0, 0.5^2), rope bands default x exp(0.1 N(0, 1))).
   The configs are the built-in 4.5B base / distill presets (the released runtime settings: cfg_t_range, scales,
   kv ranges, clean_t, window 4, chunk width 6, shortcut mode) with the sizes above, 8 steps, float32 weights and
   `kv_offload` off (on a CPU the cache is in host memory either way; the original's pinned buffer needs CUDA).
2. Parity: every clean chunk of every port run must satisfy max|port - original| / max(1, max|original|) <= 1e-4
   (the rule of tests/test_pipeline_parity.py); otherwise the benchmark prints the errors and exits with status 1.
3. Timing: after one warm-up run of each row (the one checked for parity), `--repeats` rounds run the rows
   interleaved (original, port, port, original, ...) in this one process. The table gives each row's best round and
   its ratio to the original's best, and the ratio round by round (a row's time over the original's time in the same
   round): its median and range. The machine's speed drifts less within one round than across the whole run.

    python benchmarks/bench_vs_original.py --original ../MAGI-1 [--preset issue|tiny] [--threads 2] [--repeats 3]
"""

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy
import original_on_cpu
import torch
from safetensors.torch import save_file

from diffusers_magi import MagiPipeline
from diffusers_magi.conversion.pipeline import convert_original_components
from diffusers_magi.conversion.presets import preset

# Original `model_config` sizes and the video height = width of each preset.
PRESETS = {
    "issue": {
        "model": {
            "num_layers": 8,
            "hidden_size": 512,
            "ffn_hidden_size": 2048,
            "num_attention_heads": 8,
            "num_query_groups": 2,
            "kv_channels": 64,
            "caption_channels": 512,
        },
        "video_size": 128,
    },
    "tiny": {
        "model": {
            "num_layers": 2,
            "hidden_size": 256,
            "ffn_hidden_size": 512,
            "num_attention_heads": 16,
            "num_query_groups": 4,
            "kv_channels": 16,
            "caption_channels": 64,
        },
        "video_size": 32,
    },
}
NUM_FRAMES, NUM_STEPS = 96, 8
ENV_FLAGS = {"PAD_HQ": "1", "PAD_DURATION": "1"}  # the original's special-token switches, read at run time
UNSET_FLAGS = (
    "PAD_STATIC",
    "PAD_DYNAMIC",
    "PAD_BORDERNESS",
    "PAD_THREE_D_MODEL",
    "PAD_TWO_D_ANIME",
    "NEG_PROMPT",
    "prev_chunks_scale",
)
SPECIAL_TOKENS = ("hq", "duration")
CAPTION_TOKENS = 23
TOLERANCE = 1e-4
MISSING_CHECKOUT = (
    "error: --original PATH must name a checkout of the original MAGI-1 code ({problem}); get one with "
    "`git clone https://github.com/SandAI-org/MAGI-1` and pass its folder"
)


def original_config(variant: str, preset_name: str, load_dir: Path) -> dict:
    config = preset(f"4.5B_{variant}")
    config["model_config"].update(PRESETS[preset_name]["model"], params_dtype="torch.float32")
    size = PRESETS[preset_name]["video_size"]
    config["runtime_config"].update(
        num_frames=NUM_FRAMES,
        num_steps=NUM_STEPS,
        video_size_h=size,
        video_size_w=size,
        load=str(load_dir),
        t5_pretrained=None,
        vae_pretrained=None,
    )
    config["engine_config"].update(distributed_backend="gloo", kv_offload=False)
    return config


def random_weights(model: torch.nn.Module, seed: int) -> dict:
    """The reference data's init rules (see the module docstring), by tensor name and module type."""
    generator = torch.Generator().manual_seed(seed)
    plain_norms = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
    }
    weights = {}
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if name == "rope.bands":
            value = parameter.detach() * torch.exp(0.1 * noise)
        elif name == "y_embedder.null_caption_embedding":
            value = 0.5 * noise
        elif name in plain_norms:
            value = 1 + 0.1 * noise
        elif parameter.dim() == 1:  # biases and zero-centred norm weights (scale 1 + w)
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(parameter[0].numel())
        weights[name] = value.to(parameter.dtype).contiguous()
    return weights


def write_checkpoint(original, variant: str, preset_name: str, root: Path, seed: int) -> Path:
    """Config and random weights of `variant` in the original layout under `root`; returns the config path."""
    load_dir = root / variant
    config = original_config(variant, preset_name, load_dir)
    config_path = root / f"{variant}_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    with original_on_cpu.cpu_runtime():
        model = original.VideoDiTModel(original.MagiConfig.from_json(str(config_path)))
    subfolder = "inference_weight.distill" if variant == "distill" else "inference_weight"
    (load_dir / subfolder).mkdir(parents=True)
    save_file(random_weights(model, seed), str(load_dir / subfolder / "model.safetensors"))
    return config_path


def relative_max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / max(1.0, reference.abs().max().item())).item()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help="folder of a checkout of SandAI-org/MAGI-1")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.original is None:
        sys.exit(MISSING_CHECKOUT.format(problem="none given"))
    if not original_on_cpu.is_checkout(args.original):
        sys.exit(MISSING_CHECKOUT.format(problem=f"{args.original!r} has no {original_on_cpu.ENTRY_FILE}"))
    return args


def write_special_tokens(checkout, caption_channels: int, path: Path) -> Path:
    """The original's learned special tokens cut to the first `caption_channels` channels (its file holds the real
    T5 width, 4096), for both the original and the port."""
    with numpy.load(Path(checkout) / original_on_cpu.SPECIAL_TOKENS_FILE) as tokens:
        numpy.savez(path, **{name: tokens[name][:, :caption_channels] for name in tokens.files})
    return path


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        caption_channels = PRESETS[args.preset]["model"]["caption_channels"]
        special_tokens = write_special_tokens(args.original, caption_channels, root / "special_tokens.npz")
        try:
            original = original_on_cpu.import_original(args.original, special_tokens)
        except ModuleNotFoundError as error:
            sys.exit(f"error: the original MAGI-1 code needs the package {error.name!r} (pip install {error.name})")
        original.logger.setLevel(logging.WARNING)
        original_on_cpu.init_single_process(original)
        torch.set_num_threads(args.threads)
        for flag in UNSET_FLAGS:
            os.environ.pop(flag, None)
        os.environ.update(ENV_FLAGS)
        benchmark(original, args, root)


def benchmark(original, args, root: Path):
    models, pipes = {}, {}
    for variant, seed in (("base", 1001), ("distill", 1002)):
        config_path = write_checkpoint(original, variant, args.preset, root, seed)
        with original_on_cpu.cpu_runtime():
            models[variant] = original.get_dit(original.MagiConfig.from_json(str(config_path)))
        if any(parameter.is_meta for parameter in models[variant].parameters()):
            raise RuntimeError(f"the original left tensors of {config_path} unloaded")
        pipes[variant] = MagiPipeline(
            **convert_original_components(str(config_path), str(root / variant), str(original.special_tokens_path))
        )
        pipes[variant].set_progress_bar_config(disable=True)
    config = original_config("base", args.preset, root)
    runtime, model_config = config["runtime_config"], config["model_config"]

    seed = runtime["seed"]
    chunk_width = runtime["chunk_width"]
    num_chunks = math.ceil(runtime["num_frames"] // runtime["temporal_downsample_factor"] / chunk_width)
    size = runtime["video_size_h"]
    latent_shape = (1, model_config["in_channels"], num_chunks * chunk_width, size // 8, size // 8)
    text_shape = (1, 1, model_config["caption_max_length"], model_config["caption_channels"])
    caption = 0.5 * torch.randn(text_shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, model_config["caption_max_length"], dtype=torch.int64)
    mask[:, :CAPTION_TOKENS] = 1
    torch.manual_seed(seed)
    noise = torch.randn(latent_shape)  # the original's first draw after its seed

    def run_original(variant):
        with original_on_cpu.cpu_runtime():
            torch.manual_seed(seed)
            chunks = original.generate_per_chunk(
                model=models[variant], prefix_video=None, caption_embs=caption, emb_masks=mask
            )
            return torch.cat(list(chunks), dim=2)

    def run_port(variant, batch_branches=True):
        return pipes[variant](
            prompt_embeds=caption[:, 0],
            prompt_attention_mask=mask,
            latents=noise,
            height=size,
            width=size,
            num_frames=runtime["num_frames"],
            num_inference_steps=runtime["num_steps"],
            special_tokens=SPECIAL_TOKENS,
            batch_guidance_branches=batch_branches,
            output_type="latent",
        ).frames

    sections = {
        "base (three-branch)": [
            ("original", lambda: run_original("base")),
            ("port, branches one by one", lambda: run_port("base", batch_branches=False)),
            ("port, branches batched", lambda: run_port("base", batch_branches=True)),
        ],
        "distilled": [("original", lambda: run_original("distill")), ("port", lambda: run_port("distill"))],
    }

    print(
        f"preset {args.preset}: hidden {model_config['hidden_size']}, {model_config['num_layers']} layers, "
        f"{model_config['num_attention_heads']} heads / {model_config['num_query_groups']} query groups x "
        f"{model_config['kv_channels']}, ffn {model_config['ffn_hidden_size']}, caption channels "
        f"{model_config['caption_channels']}; {size // 8}x{size // 8} latents ({size}x{size} video), "
        f"{runtime['num_frames']} frames = {num_chunks} chunks of {chunk_width} latent frames, {runtime['num_steps']} "
        f"steps, window {runtime['window_size']}; float32"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds "
        f"after a warm-up; original: {Path(args.original).resolve()} (commit {original.commit})"
    )
    print()
    results, failures = {}, []
    for section, rows in sections.items():
        reference = None
        for label, run in rows:  # the warm-up, checked for parity
            output = run()
            if reference is None:
                reference, errors = output, [0.0]
            else:
                errors = [
                    relative_max_error(output[:, :, i : i + chunk_width], reference[:, :, i : i + chunk_width])
                    for i in range(0, reference.shape[2], chunk_width)
                ]
            results[section, label] = [[], max(errors)]
            if max(errors) > TOLERANCE:
                failures.append(f"{section}, {label}: relative max error per chunk {[f'{e:.2e}' for e in errors]}")
        if failures:
            break
        for _ in range(args.repeats):
            for label, run in rows:
                start = time.perf_counter()
                run()
                results[section, label][0].append(time.perf_counter() - start)
    if failures:
        print(f"PARITY FAILED (tolerance {TOLERANCE:.0e}, max|port - original| / max(1, max|original|)):")
        print("\n".join(failures))
        sys.exit(1)

    print(f"parity: every clean chunk within {TOLERANCE:.0e} of the original (relative max error)")
    print()
    print("| guidance | run | seconds per video | vs original | per round: median (range) | relative max error |")
    print("|---|---|---|---|---|---|")
    for section, rows in sections.items():
        original_rounds = results[section, rows[0][0]][0]
        for label, _ in rows:
            rounds, error = results[section, label]
            ratios = sorted(seconds / original for seconds, original in zip(rounds, original_rounds))
            print(
                f"| {section} | {label} | {min(rounds):.3f} | {min(rounds) / min(original_rounds):.2f}x | "
                f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) | {error:.1e} |"
            )


if __name__ == "__main__":
    main()
