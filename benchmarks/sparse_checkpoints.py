"""Full-width imitations of the six released MAGI-1 DiT checkpoints, without their weights.

The manifests in `tests/data/real_manifests/` list every tensor (name, shape, dtype) of each release, recorded from
the original model code. `write_sparse_checkpoint` writes a safetensors header with those names, shapes and dtypes
and truncates each file to its full length: the data is a sparse hole of zeros (no disk used), yet every reader sees a
file of the real size. Only `num_layers` blocks are kept (the first two and the last, renumbered), so a "4.5B" file of
three blocks is about 0.8 GB at the real width, with the real fp8 layout in its middle block. The shard counts are
those of the releases (4.5B: 2 shards with an index, 24B: 6, 24B fp8: 3, 4.5B fp8: one `model.safetensors`).
"""

import copy
import gzip
import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_manifests"
VARIANTS = ("4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant")
RELEASED_SHARDS = {
    "4.5B_base": 2, "4.5B_distill": 2, "4.5B_distill_quant": 1,
    "24B_base": 6, "24B_distill": 6, "24B_distill_quant": 3,
}  # fmt: skip
_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3", "uint8": "U8"}
_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "U8": 1}
_LAYER = re.compile(r"videodit_blocks\.layers\.(\d+)\.(.+)$")


def load_manifest(variant: str) -> dict:
    with gzip.open(MANIFEST_DIR / f"{variant}.json.gz", "rt", encoding="utf-8") as file:
        return json.load(file)


def kept_tensors(manifest: dict, num_layers: int) -> Dict[str, Tuple[List[int], str]]:
    """The manifest's tensors for a model of `num_layers` blocks: the first `num_layers - 1` blocks and the last one
    (so the fp8 layout, which spares the first and the last block, keeps its shape), renumbered `0 .. num_layers-1`."""
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, manifest["tensors"]) if m})
    keep = layers[: num_layers - 1] + layers[-1:] if num_layers > 1 else layers[:1]
    renumber = {old: new for new, old in enumerate(keep)}
    tensors = {}
    for name, (shape, dtype) in manifest["tensors"].items():
        match = _LAYER.match(name)
        if match is None:
            tensors[name] = (shape, dtype)
        elif int(match.group(1)) in renumber:
            tensors[f"videodit_blocks.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = (shape, dtype)
    return tensors


def _write_sparse_file(path: Path, tensors: Dict[str, Tuple[List[int], str]]) -> int:
    header, offset = {}, 0
    for name in sorted(tensors):
        shape, dtype = tensors[name]
        code = _DTYPE_NAMES[dtype]
        size = _DTYPE_BYTES[code]
        for extent in shape:
            size *= extent
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_sparse_checkpoint(
    variant: str, root: Path, num_layers: int = 3, edit: Optional[Callable[[dict], None]] = None
) -> Tuple[dict, Path, int]:
    """Write `<root>/<variant>/<weight folder>/` as released (shards + index, or one file), sparse, with
    `num_layers` blocks at the real width. `edit`, if given, changes the `{name: (shape, dtype)}` table in place first
    (to imitate a broken release).

    Returns:
        `(original config with num_layers set, checkpoint folder holding the weight folder, total bytes of the files)`.
    """
    from diffusers_magi.conversion.presets import preset

    manifest = load_manifest(variant)
    config = copy.deepcopy(preset(variant))
    config["model_config"]["num_layers"] = num_layers
    checkpoint_dir = Path(root) / variant
    folder = checkpoint_dir / manifest["weight_folder"]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = kept_tensors(manifest, num_layers)
    if edit is not None:
        edit(tensors)
    num_shards = RELEASED_SHARDS[variant]
    total = 0
    if num_shards == 1:
        total = _write_sparse_file(folder / "model.safetensors", tensors)
    else:
        names, weight_map = sorted(tensors), {}
        for shard in range(num_shards):
            file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[shard::num_shards]}
            total += _write_sparse_file(folder / file_name, part)
            weight_map.update({name: file_name for name in part})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return config, checkpoint_dir, total


def file_bytes(folder: Path) -> int:
    """Apparent size of the weight files under `folder` (what the checkpoint would occupy)."""
    return sum(os.path.getsize(path) for path in Path(folder).rglob("*.safetensors*") if path.suffix != ".json")
