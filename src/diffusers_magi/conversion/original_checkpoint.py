"""Reading the original MAGI-1 files: the three-section config JSON and safetensors weight folders (one file or
shards listed in an index, each optionally zstd-compressed as `<file>.zst`, as the original loader accepts)."""

import json
import os
from typing import Dict, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

ORIGINAL_CONFIG_SECTIONS = ("model_config", "runtime_config", "engine_config")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def read_original_config(config: Union[str, os.PathLike, dict]) -> Dict[str, dict]:
    """An original MAGI-1 config (`model_config`, `runtime_config`, `engine_config`), from a JSON file or a dict
    (e.g. a preset of `diffusers_magi.conversion.presets`)."""
    if isinstance(config, dict):
        source, content = "the given config dict", config
    else:
        source = str(config)
        with open(config, encoding="utf-8") as file:
            content = json.load(file)
    missing = [section for section in ORIGINAL_CONFIG_SECTIONS if section not in content]
    if missing:
        raise ValueError(
            f"{source} is not an original MAGI-1 config: it lacks the section(s) {missing} (expected "
            f"{list(ORIGINAL_CONFIG_SECTIONS)})."
        )
    return content


def original_weight_folder(engine_config: dict) -> str:
    """Name of the DiT weight folder the original loader reads: `inference_weight[.fp8][.distill]`."""
    name = "inference_weight"
    if engine_config.get("fp8_quant", False):
        name += ".fp8"
    if engine_config.get("distill", False):
        name += ".distill"
    return name


def load_safetensors_folder(folder: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """All tensors of an original weight folder.

    The folder holds `model.safetensors`, or shards listed in `model.safetensors.index.json`; any of these files may
    instead be stored zstd-compressed as `<name>.zst` (needs the `zstandard` package).

    Raises:
        FileNotFoundError: the folder, or a shard the index lists, is missing.
        ValueError: a file is not a readable safetensors file (e.g. truncated), or a shard does not hold exactly the
            tensors the index assigns to it.
    """
    folder = str(folder)
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no `weight_map` (tensor name -> shard file).")
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            shard_tensors = load_safetensors_file(os.path.join(folder, shard), listed_in=index_path)
            expected = {name for name, file_name in weight_map.items() if file_name == shard}
            if set(shard_tensors) != expected:
                raise ValueError(
                    f"Shard {os.path.join(folder, shard)} does not hold the tensors {index_path} assigns to it "
                    f"(missing: {sorted(expected - set(shard_tensors))[:5]}, not listed: "
                    f"{sorted(set(shard_tensors) - expected)[:5]})."
                )
            state_dict.update(shard_tensors)
        return state_dict
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(single_path) or os.path.isfile(single_path + ".zst"):
        return load_safetensors_file(single_path)
    raise FileNotFoundError(
        f"{folder} holds none of {SAFETENSORS_SINGLE}, {SAFETENSORS_SINGLE}.zst or {SAFETENSORS_INDEX}; is it the "
        "right weight folder?"
    )


def load_safetensors_file(path: Union[str, os.PathLike], listed_in: str = None) -> Dict[str, torch.Tensor]:
    """Tensors of the safetensors file `path`, or of `path + ".zst"` when only the compressed file exists.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: the file is not a valid safetensors (or zstd) file, e.g. truncated.
    """
    path = str(path)
    compressed = path + ".zst"
    if not os.path.isfile(path) and os.path.isfile(compressed):
        data = _decompress_zstd(compressed)
        try:
            return load_safetensors_bytes(data)
        except SafetensorError as error:
            raise ValueError(f"{compressed} does not decompress to a valid safetensors file ({error}).") from error
    if not os.path.isfile(path):
        where = f" (listed in {listed_in})" if listed_in else ""
        raise FileNotFoundError(f"Weight file {path}{where} is missing, and so is {compressed}.")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a valid safetensors file (truncated or corrupt download?): {error}"
        ) from error


def _decompress_zstd(path: str) -> bytes:
    try:
        import zstandard
    except ImportError as error:
        raise ImportError(
            f"{path} is zstd-compressed; reading it needs the `zstandard` package: `pip install zstandard` (or "
            "`pip install diffusers-magi[zstd]`), or decompress it first with `zstd -d`."
        ) from error
    with open(path, "rb") as file:
        try:
            return zstandard.ZstdDecompressor().stream_reader(file).read()
        except zstandard.ZstdError as error:
            raise ValueError(f"{path} is not a valid zstd file (truncated or corrupt download?): {error}") from error
