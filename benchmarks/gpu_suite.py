"""One command for a CUDA machine: precision, attention backends, MFU of one transformer call, end-to-end frames per
second and offloaded peak memory of MAGI-1, written as JSON and a markdown table named after the GPU.

Sections (all with random weights at the real shapes; `--sections` picks some):

* `precision`: a 3-layer model at the real 4.5B width, bfloat16 vs float32 (same weights), one window of 2 chunks.
* `attention`: every installed Diffusers attention backend (native SDPA, flash, sage, xformers, ...) against native
  SDPA on that bfloat16 model; equal within bfloat16 tolerance (`--backend-tolerance`).
* `transformer_call`: one call of the 4.5B and 24B transformers (layers reduced with `--layers-24b`, stated in the
  table) at 720x720 with 1-4 chunks in flight, each attending to every earlier chunk of the window: time, FLOPs,
  TFLOP/s and MFU. FLOPs: linear layers and convolutions counted by `torch.utils.flop_counter`, attention counted
  analytically from the window layout (4 * queries * keys * head_dim per head, masked caption padding included, as
  it is computed), so every backend, flash and sage included, is counted the same way. MFU = TFLOP/s / the device's
  dense bfloat16 peak (`PEAK_TFLOPS` by GPU name, or `--peak-tflops`).
* `end_to_end`: the 4.5B distill pipeline (transformer + VAE; captions given as embeddings, so no T5) at 480p and 720p,
  `--e2e-chunks` chunks of 24 frames, 8 steps: generated frames per second, with and without
  `compile_repeated_blocks` and fp8 linears (the released "distill + fp8_quant" layout: every block but the first
  and last).
* `offload_memory`: peak GPU memory of that pipeline at 720p with `enable_model_cpu_offload()` (the 24 GB claim).

    python benchmarks/gpu_suite.py                       # CUDA, about 8 minutes on one H100
    python benchmarks/gpu_suite.py --device cpu --tiny   # smoke test at toy sizes (what the tests run)

Output: `<output-dir>/gpu_suite_<gpu>.json` and `.md` (default `benchmarks/results`), the markdown also printed.
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

from bench_gpu import PRESETS, random_model
from diffusers_magi import AutoencoderMagi, MagiChunkScheduler, MagiPipeline
from diffusers_magi.models.fp8_linear_magi import FP8_DTYPE, MagiFp8Linear
from memory_plan import SMALL_VAE, LiveTensorBytes

# Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first pattern found
# in the device name wins.
PEAK_TFLOPS = [
    (r"B200", 2250.0),
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100|H800", 989.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"RTX 6000 Ada", 364.0),
    (r"4090", 165.0),
    (r"A10G", 70.0),
    (r"L4\b", 121.0),
    (r"A6000", 155.0),
]
BACKENDS = ["native", "_native_cudnn", "_native_efficient", "_native_flash", "flash", "flash_varlen", "_flash_3", "sage", "xformers"]
TINY = dict(
    num_layers=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=32, ffn_dim=256,
    text_dim=64, text_length=160, condition_dim=32, cross_attention_dim=128,
)


def peak_tflops(name: str, override=None):
    if override is not None:
        return override
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, name)), None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _window_inputs(model, num_chunks, height, width, text_tokens, device, dtype, seed=0):
    config = model.config
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(1, model.latent_channels, 6 * num_chunks, height // 8, width // 8, generator=generator)
    captions = torch.randn(1, num_chunks, config.text_length, config.text_dim, generator=generator)
    mask = torch.zeros(1, num_chunks, config.text_length)
    mask[..., :text_tokens] = 1
    timestep = torch.linspace(0.9, 0.1, num_chunks)[None]
    inputs = (latents.to(device, dtype), timestep.to(device), captions.to(device, dtype), mask.to(device))
    return inputs, dict(attention_chunk_starts=[0] * num_chunks)


def attention_flops(config, num_chunks: int, tokens_per_chunk: int) -> int:
    """Self-attention (chunk c attends to chunks 0..c of the window) and cross-attention (every query over the padded
    caption, as computed) of one call: 4 * queries * keys * head_dim per head and layer."""
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    self_keys = sum((chunk + 1) * tokens_per_chunk for chunk in range(num_chunks))
    per_layer = 4 * heads * head_dim * tokens_per_chunk * (self_keys + num_chunks * config.text_length)
    return config.num_layers * per_layer


def matmul_flops(model, inputs, call) -> int:
    """FLOPs of the matrix products and convolutions of one call (`flop_counter`, attention kernels excluded)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs, **call)
    counts = counter.get_flop_counts().get("Global", {})
    return sum(flops for op, flops in counts.items() if "attention" not in str(op))


def _relative_error(ours, reference):
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1)).item()


def section_precision(args, device):
    preset = TINY if args.tiny else dict(PRESETS["4.5B"], num_layers=3)
    size = 64 if args.tiny else args.precision_size
    reference = _preset_model(preset, device, torch.float32)
    model = _preset_model(preset, device, torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    inputs, call = _window_inputs(reference, 2, size, size, 120 if not args.tiny else 20, device, torch.float32)
    with torch.no_grad():
        expected = reference(*inputs, **call).sample
        bf16_inputs = (inputs[0].bfloat16(), inputs[1], inputs[2].bfloat16(), inputs[3])
        got = model(*bf16_inputs, **call).sample
    del reference
    return {"layers": model.config.num_layers, "hidden": model.config.hidden_size, "size": size, "relative_error": _relative_error(got, expected)}, (model, bf16_inputs, call)


def _preset_model(preset, device, dtype):
    PRESETS["_suite"] = preset
    try:
        return random_model("_suite", device, dtype)
    finally:
        del PRESETS["_suite"]


def section_attention(args, device, model, inputs, call):
    rows = []
    with torch.no_grad():
        model.set_attention_backend("native")
        reference = model(*inputs, **call).sample
        for backend in BACKENDS:
            try:
                model.set_attention_backend(backend)
                error = _relative_error(model(*inputs, **call).sample, reference)
                rows.append({"backend": backend, "relative_error": error, "ok": error <= args.backend_tolerance})
            except Exception as exc:  # not installed, or not for this device / dtype
                rows.append({"backend": backend, "relative_error": None, "ok": None, "note": f"{type(exc).__name__}: {str(exc)[:80]}"})
        model.set_attention_backend("native")
    return rows


def section_transformer_call(args, device, peak):
    rows = []
    presets = {"tiny": TINY} if args.tiny else {"4.5B": PRESETS["4.5B"], "24B": dict(PRESETS["24B"], num_layers=args.layers_24b)}
    size = 64 if args.tiny else 720
    for name, preset in presets.items():
        model = _preset_model(preset, device, args.dtype)
        tokens_per_chunk = 6 * (size // 16) * (size // 16)
        for num_chunks in args.chunks:
            inputs, call = _window_inputs(model, num_chunks, size, size, 120, device, args.dtype)
            flops = matmul_flops(model, inputs, call) + attention_flops(model.config, num_chunks, tokens_per_chunk)
            with torch.no_grad():
                seconds = _best_time(lambda: model(*inputs, **call), device, args.repeats)
            tflops = flops / seconds / 1e12
            rows.append({
                "model": name, "layers": model.config.num_layers, "size": f"{size}x{size}", "chunks": num_chunks,
                "tokens": num_chunks * tokens_per_chunk, "ms": 1000 * seconds, "tflop": flops / 1e12, "tflops": tflops,
                "mfu": tflops / peak if peak else None,
            })
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _pipeline(args, device, fp8: bool):
    preset = dict(TINY) if args.tiny else dict(PRESETS["4.5B"])
    preset["step_size_conditioning"] = True  # distill
    if fp8:
        preset["fp8_layers"] = list(range(1, preset.get("num_layers", 34) - 1))
    transformer = _preset_model(preset, device, args.dtype)
    for module in transformer.modules():
        if isinstance(module, MagiFp8Linear):  # random float8 weights (the default is all zeros)
            weight = (torch.randn(module.out_features, module.in_features, device=device) * 0.05).to(FP8_DTYPE)
            module.fp8_weight.data.copy_(weight.view(torch.uint8))
    vae = AutoencoderMagi(**(dict(SMALL_VAE, sample_size=32, sample_frames=8) if args.tiny else {})).to(device, args.dtype).eval()
    return MagiPipeline(transformer=transformer, scheduler=MagiChunkScheduler(), vae=vae, guidance_mode="distilled")


def _generate(pipe, height, width, num_chunks, device, dtype):
    config = pipe.transformer.config
    embeds = torch.randn(1, config.text_length, config.text_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mask = torch.zeros(1, config.text_length, device=device)
    mask[:, :120] = 1
    return pipe(
        prompt_embeds=embeds, prompt_attention_mask=mask, num_frames=24 * num_chunks, height=height, width=width,
        num_inference_steps=8, output_type="pt", generator=torch.Generator().manual_seed(0),
    ).frames


def section_end_to_end(args, device):
    rows = []
    resolutions = {"toy": (32, 32)} if args.tiny else {"480p": (480, 848), "720p": (720, 1280)}
    for fp8 in (False, True):
        for compiled in (False, True):
            pipe = _pipeline(args, device, fp8)
            pipe.set_progress_bar_config(disable=True)
            if compiled:
                torch._dynamo.reset()
                pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
            for name, (height, width) in resolutions.items():
                with torch._dynamo.config.patch(recompile_limit=64):
                    _generate(pipe, height, width, 1, device, args.dtype)  # warm-up (and compilation)
                    _sync(device)
                    start = time.perf_counter()
                    frames = _generate(pipe, height, width, args.e2e_chunks, device, args.dtype)
                    _sync(device)
                seconds = time.perf_counter() - start
                rows.append({"resolution": name, "compile": compiled, "fp8": fp8, "frames": frames.shape[1], "seconds": seconds, "fps": frames.shape[1] / seconds})
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def section_offload_memory(args, device):
    pipe = _pipeline(args, torch.device("cpu"), fp8=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device=device)
    height, width = (32, 32) if args.tiny else (720, 1280)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _generate(pipe, height, width, args.e2e_chunks, device, args.dtype)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        tracker = LiveTensorBytes([])
        with tracker:
            _generate(pipe, height, width, args.e2e_chunks, device, args.dtype)
        peak = tracker.peak
    return {"resolution": f"{height}x{width}", "chunks": args.e2e_chunks, "peak_gib": peak / 2**30}


def markdown(result) -> str:
    lines = [f"**{result['device']}** - torch {result['torch']}, {result['dtype']}, peak {result['peak_tflops']} TFLOP/s (dense bf16), random weights", ""]
    if "precision" in result:
        p = result["precision"]
        lines += [f"bf16 vs float32, {p['layers']} layers at hidden {p['hidden']}, {p['size']}x{p['size']}, 2 chunks: relative error {p['relative_error']:.3g}", ""]
    if "attention" in result:
        lines += ["| attention backend | relative error vs native | within tolerance |", "|---|---|---|"]
        for row in result["attention"]:
            error = f"{row['relative_error']:.3g}" if row["relative_error"] is not None else row.get("note", "")
            lines.append(f"| {row['backend']} | {error} | {row['ok'] if row['ok'] is not None else 'n/a'} |")
        lines.append("")
    if "transformer_call" in result:
        lines += ["| model (layers) | size | chunks | tokens | ms | TFLOP | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
        for r in result["transformer_call"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['model']} ({r['layers']}) | {r['size']} | {r['chunks']} | {r['tokens']} | {r['ms']:.1f} | {r['tflop']:.3g} | {r['tflops']:.3g} | {mfu} |")
        lines.append("")
    if "end_to_end" in result:
        lines += ["| 4.5B distill | compile | fp8 | frames | seconds | frames/s |", "|---|---|---|---|---|---|"]
        for r in result["end_to_end"]:
            lines.append(f"| {r['resolution']} | {r['compile']} | {r['fp8']} | {r['frames']} | {r['seconds']:.2f} | {r['fps']:.2f} |")
        lines.append("")
    if "offload_memory" in result:
        m = result["offload_memory"]
        lines += [f"4.5B distill with model offload at {m['resolution']}, {m['chunks']} chunks: peak memory {m['peak_gib']:.2f} GiB", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke test, e.g. on a CPU)")
    parser.add_argument("--sections", nargs="+", default=["precision", "attention", "transformer_call", "end_to_end", "offload_memory"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--layers-24b", type=int, default=24, help="layers of the 24B model in the transformer call")
    parser.add_argument("--precision-size", type=int, default=480)
    parser.add_argument("--backend-tolerance", type=float, default=2e-2)
    parser.add_argument("--e2e-chunks", type=int, default=2)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (default: PEAK_TFLOPS)")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_tflops(name, args.peak_tflops)
    result = {"device": name, "torch": torch.__version__, "dtype": str(args.dtype).replace("torch.", ""), "peak_tflops": peak, "tiny": args.tiny}
    if "precision" in args.sections or "attention" in args.sections:
        result["precision"], (model, inputs, call) = section_precision(args, device)
        if "attention" in args.sections:
            result["attention"] = section_attention(args, device, model, inputs, call)
        del model
    if "transformer_call" in args.sections:
        result["transformer_call"] = section_transformer_call(args, device, peak)
    if "end_to_end" in args.sections:
        result["end_to_end"] = section_end_to_end(args, device)
    if "offload_memory" in args.sections:
        result["offload_memory"] = section_offload_memory(args, device)
    text = markdown(result)
    print(text)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = "gpu_suite_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    (output / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (output / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
