"""Time and peak memory of loading each released MAGI-1 DiT variant from the original layout.

The checkpoints are full-width imitations written as sparse files (`sparse_checkpoints.py`: the real names, shapes,
dtypes and shard layout of each release, `--layers` blocks, zeros as data), so the figures are those of the real
tensors at the real width, per block kept. Each load runs in a fresh process (`load_once.py`) so that peak resident
memory is the load's own: "added RSS" is peak RSS after the load minus RSS before it, "x ckpt" that over the
checkpoint's size (the loader reads one tensor at a time into a meta-initialised model: about 1.0). On a CUDA
machine each variant is also loaded with `device="cuda"` (host memory then holds one tensor at a time).

    python benchmarks/bench_loading.py                      # six variants, 3 blocks each, CPU (+ CUDA if present)
    python benchmarks/bench_loading.py --variants 4.5B_base --layers 2 --devices cpu
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sparse_checkpoints import VARIANTS  # noqa: E402


def load_in_fresh_process(variant: str, layers: int, device: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(HERE / "load_once.py"), variant, str(layers), device], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variant} on {device} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--layers", type=int, default=3, help="blocks kept per variant (at least 3 keeps an fp8 block)"
    )
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()

    print(
        "Loading the original layout (load_original_transformer), "
        f"sparse full-width checkpoints, {args.layers} blocks per variant, each load in a fresh process; "
        f"torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, devices {', '.join(args.devices)}"
    )
    header = (
        f"{'variant':<20} {'device':<6} {'ckpt GB':>8} {'seconds':>8} {'GB/s':>6} {'added RSS GB':>13} {'x ckpt':>7} "
        f"{'device GB':>10}"
    )
    print(header)
    print("-" * len(header))
    for variant in args.variants:
        for device in args.devices:
            record = load_in_fresh_process(variant, args.layers, device)
            size = record["checkpoint_bytes"]
            device_gb = f"{record['device_peak_bytes'] / 1e9:.2f}" if record["device_peak_bytes"] else "-"
            print(
                f"{variant:<20} {device:<6} {size / 1e9:>8.2f} {record['seconds']:>8.2f} "
                f"{size / 1e9 / max(record['seconds'], 1e-9):>6.2f} {record['added_peak_rss_bytes'] / 1e9:>13.2f} "
                f"{record['added_peak_rss_bytes'] / size:>7.3f} {device_gb:>10}"
            )


if __name__ == "__main__":
    main()
