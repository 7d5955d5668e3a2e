"""The original T5 folder (`ckpt/t5/t5-v1_1-xxl`) -> transformers `T5EncoderModel` + tokenizer, read safely.

The original repository ships the T5 encoder as PyTorch pickles (`pytorch_model-0000k-of-0000n.bin` with
`pytorch_model.bin.index.json`). Unpickling can run arbitrary code, so `.bin` files are read only with
`torch.load(..., weights_only=True)`, which accepts tensors and plain containers and refuses anything that would
import a module or call a function; such a file is an error, never loaded. Safetensors files (one or sharded) are read
as they are. The converter writes the encoder back as safetensors.
"""

import json
import os
import pickle
from typing import Dict

import torch
from diffusers.utils import logging

from .original_checkpoint import SafetensorsWeights, TensorEntry, open_safetensors_folder
from .streaming import ConversionSpec, load_component, plan_component

logger = logging.get_logger(__name__)

PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Tensors of a full encoder-decoder T5 checkpoint that an encoder does not use.
_DECODER_PREFIXES = ("decoder.", "lm_head.")


def load_pickled_weights(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of one PyTorch pickle file, loaded with `weights_only=True`.

    Raises:
        ValueError: the file holds anything but tensors and plain containers (e.g. a reference to a module or a
            callable: loading it would execute code), or it is not a readable PyTorch file (e.g. truncated).
    """
    try:
        try:  # memory-mapped: data is read only when a tensor is used
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state_dict = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: it is a pickle that would import or call code beyond plain tensors, so only a "
            f"trusted process should open it ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable PyTorch weight file (truncated or corrupt download?): {error}"
        ) from error
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(value) for value in state_dict.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict).")
    return state_dict


class PickledWeights(SafetensorsWeights):
    """The tensors of PyTorch pickle shards (`weights_only=True`), known by shape and dtype from memory-mapped loads
    (no data is read for that); `read` yields a private copy of each tensor, one shard mapped at a time."""

    def read(self, names=None):
        wanted = set(self.entries if names is None else names)
        by_file = {}
        for name in wanted:
            by_file.setdefault(self.entries[name].path, []).append(name)
        for path in sorted(by_file):
            state_dict = load_pickled_weights(path)
            for name in sorted(by_file[path]):
                yield name, state_dict.pop(name).clone()
            del state_dict


def _pickle_entries(path: str) -> Dict[str, TensorEntry]:
    return {
        name: TensorEntry(name, tuple(tensor.shape), tensor.dtype, path, 0, tensor.numel() * tensor.element_size())
        for name, tensor in load_pickled_weights(path).items()
    }


def open_t5_weights(t5_dir: str) -> SafetensorsWeights:
    """The tensors of a T5 folder, from the headers: safetensors (`model.safetensors[.index.json]`) if present, else
    PyTorch pickles (`pytorch_model.bin[.index.json]`) loaded with `weights_only=True`."""
    if os.path.isfile(os.path.join(t5_dir, "model.safetensors")) or os.path.isfile(
        os.path.join(t5_dir, "model.safetensors.index.json")
    ):
        return open_safetensors_folder(t5_dir)
    index_path = os.path.join(t5_dir, PICKLE_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        entries = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(t5_dir, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"Shard {shard_path} listed in {index_path} is missing.")
            shard_entries = _pickle_entries(shard_path)
            expected = {name for name, file_name in weight_map.items() if file_name == shard}
            absent = sorted(expected - set(shard_entries))
            if absent:
                raise ValueError(f"Shard {shard_path} lacks tensor(s) {index_path} assigns to it: {absent[:5]}.")
            entries.update({name: entry for name, entry in shard_entries.items() if name in expected})
        return PickledWeights(t5_dir, entries)
    single_path = os.path.join(t5_dir, PICKLE_SINGLE)
    if os.path.isfile(single_path):
        return PickledWeights(t5_dir, _pickle_entries(single_path))
    raise FileNotFoundError(
        f"{t5_dir} holds no T5 weights (model.safetensors[.index.json] or {PICKLE_SINGLE}[.index.json])."
    )


def plan_original_text_encoder(t5_dir: str):
    """`(meta T5EncoderModel, weights, spec, plan)` of the original T5 folder, from its config and weight headers."""
    from transformers import T5Config, T5EncoderModel

    config_path = os.path.join(t5_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{t5_dir} has no config.json; is it the T5 folder (ckpt/t5/t5-v1_1-xxl)?")
    config = T5Config.from_json_file(config_path)
    if config.model_type != "t5":
        raise ValueError(f"{config_path} describes a {config.model_type!r} model, expected a T5 encoder.")
    weights = open_t5_weights(t5_dir)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    expected = model.state_dict()
    spec = ConversionSpec(
        rename=lambda name: name if name in expected else None,
        ignored=lambda name: name.startswith(_DECODER_PREFIXES),
        optional=frozenset(tied),
    )
    plan = plan_component("text_encoder", model, weights, spec)
    if plan.ignored:
        logger.info("Dropping %d decoder tensors of the T5 checkpoint (only the encoder is used).", len(plan.ignored))
    return model, weights, spec, plan


def load_original_text_encoder(t5_dir: str, device=None, device_map=None):
    """T5 encoder and tokenizer of the original T5 folder.

    The encoder is built on the meta device from the folder's `config.json` (model type `t5`) and filled one tensor at
    a time with its weights in their stored dtype (each straight to `device` or its `device_map` entry); decoder
    tensors of a full encoder-decoder checkpoint are dropped, other unknown tensors are skipped with a warning, a
    missing tensor or a wrong shape raises a `ValueError` naming it. The tokenizer is read with `AutoTokenizer` (no
    remote code).

    Returns:
        `(T5EncoderModel, tokenizer)`, the encoder in eval mode.
    """
    model, weights, spec, plan = plan_original_text_encoder(t5_dir)
    model = load_component(model, weights, spec, plan, device=device, device_map=device_map)
    return model, load_original_tokenizer(t5_dir)


def load_original_tokenizer(t5_dir: str):
    """The T5 tokenizer of the original T5 folder, read with `AutoTokenizer` (no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(t5_dir)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"Could not read the T5 tokenizer of {t5_dir}: {error}\nThe original ships it as spiece.model, which "
            "needs the `sentencepiece` and `protobuf` packages: `pip install sentencepiece protobuf` (in a clone of "
            'diffusers-magi: `pip install -e ".[convert]"`).'
        ) from error
