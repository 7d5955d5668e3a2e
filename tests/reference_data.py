"""Where the parity tests find the data recorded from the original MAGI-1 code.

Two sources, same layout (`dit/`, `vae/`, `text/`, `original_configs/`):

* the full reference set in `../shared/reference` beside the repository, when it is there (the extended run);
* otherwise the in-repository subset `tests/data/reference/` (described in `tests/data/README.md`), unpacked once
  into a cache folder under the system temporary directory.

The subset is built from the full set with `python -m tests.reference_data --build`. Each file is stored xz-compressed
as `<name>.xz`; in a `.safetensors` file the bytes of each float32 tensor are first
regrouped by byte position (all first bytes, then all second bytes, ...), which lets xz compress random weights about
8 % better. Unpacking restores the selected files byte for byte, except the values the subset's cases never read,
which are stored as zeros (`ZEROED_TENSORS`, `CAPTION_PADDING`; listed per file in `subset_changes.json` with the
sha256 of the full-set file and of the tensors kept as recorded, which the VAE tests check).
"""

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_REFERENCE_DIR = (REPO_ROOT / ".." / "shared" / "reference").resolve()
SUBSET_DIR = REPO_ROOT / "tests" / "data" / "reference"

# Tensor names an outputs file keeps in the subset (the compared outputs; debugging intermediates stay in the full
# set).
CALL_OUTPUTS = r"call\d+\.out"
SAMPLER_OUTPUTS = r"chunk\d+|final_latent"
# The intermediates of `f_forward_fp8` that the bit-exact fp8 tests read: every float8 linear's input, activation
# codes and output, the first block's attention inputs and output, each block's output and gate logits.
FP8_INTERMEDIATES = (
    r"call0\.debug\.(fp8\..*"
    r"|layer0\.(query_after_norm_rope|key_value_after_norm_rope|self_attention\.0)"
    r"|layer\d+|layer\d+\.ada_modulate_layer)"
)
# Relative path (file or folder) of the full set -> None (copied whole) or a regular expression over tensor names.
SUBSET_SELECTION: Dict[str, Optional[str]] = {
    # The float32 base checkpoint (forward, KV cache and base sampler cases) and the fp8 distilled checkpoint (fp8
    # forward and distilled sampler cases); the float32 distill checkpoint is only in the full set.
    "dit/README.md": None,
    "dit/checkpoints/tiny45_base": None,
    "dit/checkpoints/tiny45_distill_fp8": None,
    "dit/a_forward_single_chunk/case.json": None,
    "dit/a_forward_single_chunk/inputs.safetensors": None,
    "dit/a_forward_single_chunk/outputs.safetensors": CALL_OUTPUTS,
    "dit/c_dispatcher_kv_cache/case.json": None,
    "dit/c_dispatcher_kv_cache/inputs.safetensors": None,
    # Every call's outputs (each guidance pass too) and the KV cache contents after the last call.
    "dit/c_dispatcher_kv_cache/outputs.safetensors": r"call\d+\.(out|inner\d\.out)|call5\.kv_cache\.layer\d+",
    **{
        f"dit/{case}/{file}": SAMPLER_OUTPUTS if file == "outputs.safetensors" else None
        for case in ("e_sampler_t2v_base", "e_sampler_t2v_distill_fp8")
        for file in ("case.json", "config.json", "special_tokens.npz", "inputs.safetensors", "outputs.safetensors")
    },
    "dit/f_forward_fp8/case.json": None,
    "dit/f_forward_fp8/inputs.safetensors": None,
    "dit/f_forward_fp8/outputs.safetensors": CALL_OUTPUTS + "|" + FP8_INTERMEDIATES,
    "dit/schedules": None,
    "original_configs": None,
    "text/README.md": None,
    "text/generation.json": None,
    "text/special_tokens_layout.json": None,
    "text/tiny_special_tokens.npz": None,
    "text/cases/text_special_token_constants": None,
    "text/cases/text_t2v_pad_hq_duration_4chunks": None,
    "vae/README.md": None,
    "vae/generation.json": None,
    "vae/tiny_vae_a": None,
    "vae/cases/vae_a_decode_latent_1x16x2x4x4": None,
    "vae/cases/vae_a_tiled_decode_1x16x6x6x6_tile32": None,
}

# Values the subset's cases never read, stored as zeros (random float32 does not compress; zeros do):
# * the encoder of the VAE checkpoint (the subset's VAE cases decode; encoding parity is proven on the full set);
# * the caption tokens of the padding (mask 0) in the DiT cases' captions: the model attends to valid tokens
#   only (`tests/test_transformer_parity.py::test_padding_tokens_have_no_influence` checks our side on whatever
#   set is present, and parity with the recorded outputs, computed from random padding, holds on both sets).
ZEROED_TENSORS = {"vae/tiny_vae_a/diffusion_pytorch_model.safetensors": r"encoder\..*"}
CAPTION_PADDING = {"caption_bank": "mask_bank", "caption_embs": "emb_masks"}  # captions -> their masks
# What the build changed, with the sha256 of each changed file in the full set and of the tensors kept as recorded.
SUBSET_CHANGES_FILE = "subset_changes.json"


def tensors_sha256(tensors: Dict[str, "torch.Tensor"]) -> str:
    """sha256 over the names and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _zero_unread_values(name: str, tensors: Dict[str, "torch.Tensor"]) -> Optional[dict]:
    """Zero (in place) what the subset's cases never read of file `name`; returns a record of it, or None."""
    zeroed_names = sorted(key for key in tensors if re.fullmatch(ZEROED_TENSORS.get(name, r"(?!)"), key))
    for key in zeroed_names:
        tensors[key] = torch.zeros_like(tensors[key])
    padded = [] if not name.startswith("dit/") else sorted(key for key in CAPTION_PADDING if key in tensors)
    for key in padded:
        caption, mask = tensors[key], tensors[CAPTION_PADDING[key]] != 0  # (rows, [chunks,] tokens, dim), (rows, tokens)
        tensors[key] = caption * mask.reshape(len(mask), *[1] * (caption.ndim - 3), mask.shape[1], 1)
    if not zeroed_names and not padded:
        return None
    kept = {key: value for key, value in tensors.items() if key not in zeroed_names and key not in padded}
    return {"zeroed_tensors": zeroed_names, "zeroed_caption_padding": padded, "kept_tensors_sha256": tensors_sha256(kept)}


def _float32_ranges(data: bytes):
    """(start, end) byte ranges of the float32 tensors of a safetensors file."""
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    base = 8 + header_size
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"] == "F32":
            start, end = entry["data_offsets"]
            yield base + start, base + end


def _regroup_bytes(data: bytes, inverse: bool = False) -> bytes:
    out = bytearray(data)
    for start, end in _float32_ranges(data):
        values = np.frombuffer(data, np.uint8, count=end - start, offset=start)
        out[start:end] = (values.reshape(4, -1).T if inverse else values.reshape(-1, 4).T).tobytes()
    return bytes(out)


def _subset_files(source: Path):
    for relative, keep in SUBSET_SELECTION.items():
        path = source / relative
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the reference set")
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                yield file.relative_to(source).as_posix(), file, keep


def build_subset(source: Path = FULL_REFERENCE_DIR, destination: Path = SUBSET_DIR) -> int:
    """Write the subset from the full set (replacing `destination`); returns its size in bytes."""
    from safetensors.torch import load, save

    if destination.exists():
        shutil.rmtree(destination)
    changes = {}
    for name, file, keep in _subset_files(source):
        content = file.read_bytes()
        if name.endswith(".safetensors"):
            tensors = load(content)
            if keep is not None:
                tensors = {key: value for key, value in tensors.items() if re.fullmatch(keep, key)}
                if not tensors:
                    raise ValueError(f"{file}: no tensor matches {keep!r}")
            change = _zero_unread_values(name, tensors)
            if change is not None:
                changes[name] = {"full_set_sha256": hashlib.sha256(content).hexdigest(), **change}
            if keep is not None or change is not None:
                content = save(dict(sorted(tensors.items())))
        path = destination / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            content = _regroup_bytes(content)
        path.with_name(path.name + ".xz").write_bytes(lzma.compress(content, preset=9 | lzma.PRESET_EXTREME))
    (destination / SUBSET_CHANGES_FILE).write_text(json.dumps(changes, indent=1, sort_keys=True) + "\n")
    return sum(path.stat().st_size for path in destination.rglob("*") if path.is_file())


def subset_changes(root: Path) -> Dict[str, dict]:
    """What the subset build zeroed, per file (`{}` for the full set)."""
    path = root / SUBSET_CHANGES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _stored_files(folder: Path):
    return sorted(path for path in folder.rglob("*") if path.is_file())


def unpacked_subset(folder: Path = SUBSET_DIR) -> Path:
    """The subset unpacked into `<tmp>/diffusers-magi-reference-<content hash>` (once; safe with parallel workers)."""
    digest = hashlib.sha256()
    for path in _stored_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    target = Path(tempfile.gettempdir()) / f"diffusers-magi-reference-{digest.hexdigest()[:16]}"
    if (target / ".complete").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
    for path in _stored_files(folder):
        relative = path.relative_to(folder)
        content = path.read_bytes()
        if path.suffix == ".xz":
            relative = relative.with_suffix("")
            content = lzma.decompress(content)
            if relative.suffix == ".safetensors":
                content = _regroup_bytes(content, inverse=True)
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).write_bytes(content)
    (staging / ".complete").touch()
    try:
        os.rename(staging, target)
    except OSError:  # another worker finished first
        shutil.rmtree(staging)
    return target


def reference_root() -> Path:
    """The full set when present, else the unpacked in-repository subset."""
    if FULL_REFERENCE_DIR.is_dir():
        return FULL_REFERENCE_DIR
    if not SUBSET_DIR.is_dir():
        raise FileNotFoundError(
            f"neither the full reference set ({FULL_REFERENCE_DIR}) nor the in-repository subset ({SUBSET_DIR}) "
            "is present; the subset is part of the repository, restore it with `git checkout -- tests/data`"
        )
    return unpacked_subset()


def main():
    parser = argparse.ArgumentParser(description="Build the in-repository subset of the reference data.")
    parser.add_argument("--build", action="store_true", help=f"write {SUBSET_DIR.relative_to(REPO_ROOT)}/")
    parser.add_argument("--source", type=Path, default=FULL_REFERENCE_DIR, help="the full reference folder")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    size = build_subset(args.source.resolve())
    print(f"wrote {SUBSET_DIR} ({size / 1e6:.2f} MB) from {args.source}")


if __name__ == "__main__":
    main()
