"""Reading the original MAGI-1 files: the three-section config JSON and (optionally sharded) safetensors folders."""

import json
import os
from typing import Dict

import torch
from safetensors.torch import load_file

ORIGINAL_CONFIG_SECTIONS = ("model_config", "runtime_config", "engine_config")


def read_original_config(config_path: str) -> Dict[str, dict]:
    """Read an original MAGI-1 config JSON (`model_config`, `runtime_config`, `engine_config`)."""
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    missing = [section for section in ORIGINAL_CONFIG_SECTIONS if section not in config]
    if missing:
        raise ValueError(
            f"{config_path} is not an original MAGI-1 config: it lacks the section(s) {missing} (expected "
            f"{list(ORIGINAL_CONFIG_SECTIONS)})."
        )
    return config


def load_safetensors_folder(folder: str) -> Dict[str, torch.Tensor]:
    """All tensors of a folder holding `model.safetensors`, or shards listed in `model.safetensors.index.json`."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single_path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"Shard {shard_path} listed in {index_path} is missing.")
            shard_tensors = load_file(shard_path)
            expected = {name for name, file_name in weight_map.items() if file_name == shard}
            if set(shard_tensors) != expected:
                raise ValueError(
                    f"Shard {shard_path} does not hold the tensors {index_path} assigns to it (missing: "
                    f"{sorted(expected - set(shard_tensors))[:5]}, extra: {sorted(set(shard_tensors) - expected)[:5]})."
                )
            state_dict.update(shard_tensors)
        return state_dict
    if os.path.isfile(single_path):
        return load_file(single_path)
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json.")
