"""Time one MagiTransformer3DModel forward with 1-4 chunks in flight.

The default is a small random-weight config that runs in seconds on a laptop CPU (the real 4.5B model has
hidden 3072, 34 layers, 24 heads); pass `--device cuda --dtype bfloat16 --preset 4.5B` on a GPU machine for the real
shapes. Each chunk attends to itself and to every earlier chunk of the window, as in sampling.

    python benchmarks/bench_transformer.py [--latent-size 32] [--repeats 3]
"""

import argparse
import time

import torch

from diffusers_magi import MagiTransformer3DModel

PRESETS = {
    "small": dict(
        num_layers=4,
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        attention_head_dim=64,
        ffn_dim=2048,
        text_dim=256,
        condition_dim=128,
        cross_attention_dim=512,
    ),
    "4.5B": dict(),  # the defaults of MagiTransformer3DModel are the 4.5B shapes
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--latent-size", type=int, default=32, help="latent height = width (video pixels / 8)")
    parser.add_argument("--text-tokens", type=int, default=120, help="valid caption tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = PRESETS[args.preset]
    model = MagiTransformer3DModel(**config).to(args.device).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    text_dim, text_length = model.config.text_dim, model.config.text_length
    size = args.latent_size
    tokens_per_chunk = 6 * (size // 2) ** 2

    print(
        f"MagiTransformer3DModel preset={args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, {model.config.num_layers} layers, hidden {model.config.hidden_size}), latent {size}x{size} "
        f"(video {8 * size}px), {tokens_per_chunk} tokens/chunk, {args.text_tokens} caption tokens/chunk, "
        f"device={args.device}, dtype={args.dtype}, threads={torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'chunks':>6} {'tokens':>8} {'ms':>10} {'tokens/s':>10}")
    for num_chunks in (1, 2, 3, 4):
        latents = torch.randn(1, 16, 6 * num_chunks, size, size, device=args.device, dtype=dtype)
        timestep = torch.linspace(0.9, 0.1, num_chunks, device=args.device)[None]
        captions = torch.randn(1, num_chunks, text_length, text_dim, device=args.device, dtype=dtype)
        mask = torch.zeros(1, num_chunks, text_length, device=args.device)
        mask[..., : args.text_tokens] = 1
        starts = [0] * num_chunks
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):  # the first run warms up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(latents, timestep, captions, mask, attention_chunk_starts=starts)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        best = min(times[1:])
        tokens = num_chunks * tokens_per_chunk
        print(f"{num_chunks:>6} {tokens:>8} {1000 * best:>10.1f} {tokens / best:>10.0f}")


if __name__ == "__main__":
    main()
