"""One load in a fresh process (run by `bench_loading.py` and the loading tests): write a sparse full-width checkpoint
of a released variant, load it with `load_original_transformer`, print one JSON line with the checkpoint size, the
resident memory the load added at its peak (peak RSS during the load minus RSS before it) and the time taken.

The peak is the kernel's high-water mark of this process (`VmHWM`), reset just before the load: `getrusage`'s
`ru_maxrss` would not do, since Linux carries the parent's peak over into a child across `exec` (run from a large
pytest process it reported the pytest process's peak, not the load's).

    python benchmarks/load_once.py 4.5B_base 3 cpu
    python benchmarks/load_once.py 4.5B_base 3 convert   # magi-convert's streamed conversion into a folder instead
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sparse_checkpoints import write_sparse_checkpoint  # noqa: E402

from diffusers_magi.conversion import convert_original_to_diffusers, load_original_transformer  # noqa: E402


def status_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (its high-water mark) of this process, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def reset_peak_resident() -> None:
    """Set the high-water mark `VmHWM` to the current resident size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def main(variant: str, num_layers: int, device: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        config, checkpoint_dir, size = write_sparse_checkpoint(variant, Path(root), num_layers=num_layers)
        if device not in ("cpu", "convert"):
            torch.empty(1, device=device)  # the CUDA context is not part of the load
        before = status_bytes("VmRSS")
        reset_peak_resident()
        start = time.perf_counter()
        if device == "convert":
            special_tokens = Path(root) / "special_tokens.npz"
            text_dim = config["model_config"]["caption_channels"]
            np.savez(special_tokens, caption_token=np.zeros((1, text_dim)), logo_token=np.zeros((1, text_dim)),
                     other_tokens=np.zeros((17, text_dim)))  # fmt: skip
            folder = convert_original_to_diffusers(
                Path(root) / "converted",
                config=config,
                checkpoint_dir=checkpoint_dir,
                special_tokens_path=special_tokens,
            )
            model = None
            written = sum(path.stat().st_size for path in (Path(folder) / "transformer").glob("*.safetensors"))
        else:
            model = load_original_transformer(config, checkpoint_dir, device=device)
        if device not in ("cpu", "convert"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM")
        record = {
            "variant": variant,
            "num_layers": num_layers,
            "device": device,
            "checkpoint_bytes": size,
            "added_peak_rss_bytes": peak - before,
            "seconds": seconds,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if device not in ("cpu", "convert") else None,
            "parameter_devices": sorted({str(t.device) for t in model.state_dict().values()}) if model else [],
            "written_bytes": written if model is None else None,
        }
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
