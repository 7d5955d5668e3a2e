"""One MagiTransformer3DModel call at the real shapes on a GPU: time, achieved TFLOP/s and peak memory for 1-4 chunks
in flight (720x720 by default: 12150 tokens per chunk).

The model has random weights at the real 4.5B (or 24B) shapes, built directly on the device in bfloat16 with the
modules MAGI-1 keeps in float32. Each chunk attends to itself and every earlier chunk of the window (as in sampling)
and sees 120 valid caption tokens. FLOPs are counted once per configuration with `torch.utils.flop_counter` (matrix
multiplications, convolutions and attention kernels: the work that dominates); TFLOP/s = FLOPs / best time. Peak
memory is `torch.cuda.max_memory_allocated` above the weights during the call (on a CPU: the most bytes of tensors
alive at once, counted by `memory_plan.LiveTensorBytes`).

On a GPU machine (the output is a markdown table with the GPU name, to commit as is):

    python benchmarks/bench_gpu.py --preset 4.5B --device cuda
    python benchmarks/bench_gpu.py --preset 4.5B --device cuda --attention-backend flash   # with flash-attn

It also runs on a CPU at a toy size (what the tests do): `python benchmarks/bench_gpu.py --preset tiny --device cpu
--height 64 --width 64 --dtype float32`.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_magi import MagiTransformer3DModel
from memory_plan import TRANSFORMERS, LiveTensorBytes

PRESETS = {
    **TRANSFORMERS,
    "tiny": dict(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=32, ffn_dim=256,
        text_dim=64, text_length=160, condition_dim=32, cross_attention_dim=128,
    ),
}


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of PyTorch's CPU flash-attention kernel (`flop_counter` has no formula for it): two matrix products of
    `queries x keys x head_dim` per head."""
    batch, heads, queries, head_dim = query_shape
    return 4 * batch * heads * queries * key_shape[-2] * head_dim


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def random_model(preset: str, device: torch.device, dtype: torch.dtype) -> MagiTransformer3DModel:
    """The preset's model with random weights, built on `device` in `dtype` except the float32 modules."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MagiTransformer3DModel(**PRESETS[preset])
    finally:
        torch.set_default_dtype(default)
    for name, module in model.named_modules():
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules):
            module.float()
    return model.eval()


def _inputs(model, num_chunks: int, height: int, width: int, text_tokens: int, device, dtype):
    config = model.config
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, model.latent_channels, 6 * num_chunks, height // 8, width // 8, generator=generator, device=device, dtype=dtype)
    captions = torch.randn(1, num_chunks, config.text_length, config.text_dim, generator=generator, device=device, dtype=dtype)
    mask = torch.zeros(1, num_chunks, config.text_length, device=device)
    mask[..., :text_tokens] = 1
    timestep = torch.linspace(0.9, 0.1, num_chunks, device=device)[None]
    return latents, timestep, captions, mask


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="4.5B")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--text-tokens", type=int, default=120, help="valid caption tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--attention-backend", help="a Diffusers attention backend, e.g. flash, _native_cudnn")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(args.preset, device, dtype)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens_per_chunk = 6 * (args.height // 16) * (args.width // 16)
    print(
        f"**{name}** - MagiTransformer3DModel preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"params, {config.num_layers} layers, hidden {config.hidden_size}, {weights / 2**30:.2f} GiB of weights), random "
        f"weights, {args.dtype}, {args.height}x{args.width} ({tokens_per_chunk} tokens per chunk), {args.text_tokens} "
        f"caption tokens per chunk, attention backend {args.attention_backend or 'native (SDPA)'}, torch "
        f"{torch.__version__}, best of {args.repeats}"
    )
    print()
    print("| chunks | tokens | time (ms) | TFLOP | TFLOP/s | peak memory above weights (MiB) |")
    print("|---|---|---|---|---|---|")
    for num_chunks in args.chunks:
        inputs = _inputs(model, num_chunks, args.height, args.width, args.text_tokens, device, dtype)
        call = dict(attention_chunk_starts=[0] * num_chunks)
        with torch.no_grad():
            counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
            with counter:
                model(*inputs, **call)
            if device.type == "cuda":
                _synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model(*inputs, **call)
                peak = torch.cuda.max_memory_allocated(device) - before
            else:
                tracker = LiveTensorBytes([*model.parameters(), *model.buffers(), *inputs])
                with tracker:
                    model(*inputs, **call)
                peak = tracker.peak
            times = []
            for _ in range(args.repeats):
                _synchronize(device)
                start = time.perf_counter()
                model(*inputs, **call)
                _synchronize(device)
                times.append(time.perf_counter() - start)
        best = min(times)
        flops = counter.get_total_flops()
        print(
            f"| {num_chunks} | {num_chunks * tokens_per_chunk} | {1000 * best:.1f} | {flops / 1e12:.3g} | "
            f"{flops / best / 1e12:.3g} | {peak / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
