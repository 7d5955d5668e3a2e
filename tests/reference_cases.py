"""Reading the DiT reference cases recorded from the original MAGI-1 code (`<reference>/dit/`, `reference_data.py`).

Tests discover cases by their `kind` in `case.json`, so any case folder of a known kind (including ones added later:
other configs, other seeds, non-square latents) is checked by the same rules.
"""

import json
from functools import lru_cache
from typing import Dict, List

import torch
from safetensors.torch import load_file

from diffusers_magi.conversion import load_original_transformer

from .conftest import REFERENCE_DIR

DIT_DIR = REFERENCE_DIR / "dit"
# PAD_* environment flags of the original -> `special_tokens` flags of the pipelines.
ENV_FLAG_TO_SPECIAL_TOKEN = {
    "PAD_STATIC": "static_first_frames",
    "PAD_DYNAMIC": "dynamic_first_frames",
    "PAD_BORDERNESS": "borderness",
    "PAD_HQ": "hq",
    "PAD_THREE_D_MODEL": "three_d_model",
    "PAD_TWO_D_ANIME": "two_d_anime",
    "PAD_DURATION": "duration",
}


def dit_case_names(*kinds: str, fp8: bool = False) -> List[str]:
    """Names of the DiT case folders of the given kinds (fp8 checkpoints only when `fp8`)."""
    if not DIT_DIR.is_dir():
        return []
    names = []
    for case_json in sorted(DIT_DIR.glob("*/case.json")):
        description = json.loads(case_json.read_text())
        if description.get("kind") in kinds and is_fp8_case(description) == fp8:
            names.append(case_json.parent.name)
    return names


def is_fp8_case(description: dict) -> bool:
    checkpoint = description.get("checkpoint")
    if not checkpoint:
        return False
    config = json.loads((DIT_DIR / checkpoint["config"]).read_text())
    return bool(config["engine_config"].get("fp8_quant", False))


def original_config(name: str) -> dict:
    """The original three-section config of the checkpoint a case was recorded with."""
    description = json.loads((DIT_DIR / name / "case.json").read_text())
    return json.loads((DIT_DIR / description["checkpoint"]["config"]).read_text())


@lru_cache(maxsize=None)
def original_transformer(config_relative_path: str):
    config_path = DIT_DIR / config_relative_path
    return load_original_transformer(str(config_path), str(config_path.parent))


class Case:
    """Inputs, outputs and description of one DiT reference case."""

    def __init__(self, name: str):
        self.folder = DIT_DIR / name
        self.name = name
        self.inputs: Dict[str, torch.Tensor] = load_file(str(self.folder / "inputs.safetensors"))
        self.outputs: Dict[str, torch.Tensor] = load_file(str(self.folder / "outputs.safetensors"))
        self.description = json.loads((self.folder / "case.json").read_text())
        self.original_config = json.loads((DIT_DIR / self.description["checkpoint"]["config"]).read_text())

    @property
    def transformer(self):
        return original_transformer(self.description["checkpoint"]["config"])

    def calls(self) -> List[dict]:
        return self.description["calls"]

    def tensor(self, descriptor: dict) -> torch.Tensor:
        return self.inputs[descriptor["key"]]

    def captions(self, call: dict):
        """(rows, L, C) captions and (rows, L) masks of a call, from the caption bank."""
        rows = self.tensor(call["args"]["y_rows"])
        return self.inputs["caption_bank"][rows], self.inputs["mask_bank"][rows]

    def tokens_per_chunk(self, x: torch.Tensor, num_chunks: int) -> int:
        patch = self.original_config["model_config"]["patch_size"]
        return (x.shape[2] // num_chunks) * (x.shape[3] // patch) * (x.shape[4] // patch)


def attention_starts(kv_range: torch.Tensor, slice_point: int, tokens_per_chunk: int) -> List[int]:
    """`attention_chunk_starts` from the original's token `kv_range` (one row per chunk, batch row 0)."""
    starts = []
    for chunk, (start, end) in enumerate(kv_range.tolist()):
        assert end == (slice_point + chunk + 1) * tokens_per_chunk, "key ranges end at their own chunk"
        assert start % tokens_per_chunk == 0, "key ranges start at a chunk boundary"
        starts.append(start // tokens_per_chunk)
    return starts


def step_size(kwargs: dict):
    """Shortcut step size the original derives for distilled models: `num_steps / 4 * 2`, except for 12 steps where
    it is `4 / distill_interval * 2` (reference README, "Details the data pins down")."""
    if kwargs["num_steps"] == 12:
        return 4 / kwargs["distill_interval"]["tensor0d"] * 2
    return kwargs["num_steps"] / 4 * 2


def run_forward_call(case: Case, call: dict, transformer) -> torch.Tensor:
    """Replay one recorded direct `VideoDiTModel.forward` call (no KV cache) on `transformer`; returns its output."""
    args, kwargs = call["args"], call["kwargs"]
    assert args.get("inference_params") is None, "forward cases run without a KV cache"
    x, t = case.tensor(args["x"]), case.tensor(args["t"])
    batch_size, num_chunks = t.shape
    captions, masks = case.captions(call)
    tokens = case.tokens_per_chunk(x, num_chunks)
    kv_range = case.tensor(args["kv_range"])
    # With a batch of several elements the original uses kv_range[0] (relative) for every element.
    starts = attention_starts(kv_range[:num_chunks] if batch_size == 1 else kv_range[:1], 0, tokens)
    distilled = bool(case.original_config["engine_config"]["distill"])
    with torch.no_grad():
        return transformer(
            x,
            t,
            captions.reshape(batch_size, num_chunks, *captions.shape[1:]),
            masks.reshape(batch_size, num_chunks, -1),
            first_chunk_index=kwargs.get("slice_point", 0),
            attention_chunk_starts=starts,
            caption_dropped=case.tensor(args["caption_dropout_mask"]),
            step_size=step_size(kwargs) if distilled else None,
        ).sample
