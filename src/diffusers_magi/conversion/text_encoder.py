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

from .original_checkpoint import load_safetensors_folder

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
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
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


def load_t5_state_dict(t5_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of a T5 folder: safetensors (`model.safetensors[.index.json]`) if present, else PyTorch pickles
    (`pytorch_model.bin[.index.json]`) loaded with `weights_only=True`."""
    if os.path.isfile(os.path.join(t5_dir, "model.safetensors")) or os.path.isfile(
        os.path.join(t5_dir, "model.safetensors.index.json")
    ):
        return load_safetensors_folder(t5_dir)
    index_path = os.path.join(t5_dir, PICKLE_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(t5_dir, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"Shard {shard_path} listed in {index_path} is missing.")
            tensors = load_pickled_weights(shard_path)
            expected = {name for name, file_name in weight_map.items() if file_name == shard}
            if set(tensors) != expected:
                raise ValueError(
                    f"Shard {shard_path} does not hold the tensors {index_path} assigns to it (missing: "
                    f"{sorted(expected - set(tensors))[:5]}, not listed: {sorted(set(tensors) - expected)[:5]})."
                )
            state_dict.update(tensors)
        return state_dict
    single_path = os.path.join(t5_dir, PICKLE_SINGLE)
    if os.path.isfile(single_path):
        return load_pickled_weights(single_path)
    raise FileNotFoundError(
        f"{t5_dir} holds no T5 weights (model.safetensors[.index.json] or {PICKLE_SINGLE}[.index.json])."
    )


def load_original_text_encoder(t5_dir: str):
    """T5 encoder and tokenizer of the original T5 folder.

    The encoder is built from the folder's `config.json` (model type `t5`) and filled with its weights in their stored
    dtype; decoder tensors of a full encoder-decoder checkpoint are dropped, any other unknown tensor, a missing
    tensor or a wrong shape raises a `ValueError`. The tokenizer is read with `AutoTokenizer` (no remote code).

    Returns:
        `(T5EncoderModel, tokenizer)`, the encoder in eval mode.
    """
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    config_path = os.path.join(t5_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{t5_dir} has no config.json; is it the T5 folder (ckpt/t5/t5-v1_1-xxl)?")
    config = T5Config.from_json_file(config_path)
    if config.model_type != "t5":
        raise ValueError(f"{config_path} describes a {config.model_type!r} model, expected a T5 encoder.")
    state_dict = load_t5_state_dict(t5_dir)
    dropped = [name for name in state_dict if name.startswith(_DECODER_PREFIXES)]
    if dropped:
        logger.info("Dropping %d decoder tensors of the T5 checkpoint (only the encoder is used).", len(dropped))
        state_dict = {name: tensor for name, tensor in state_dict.items() if not name.startswith(_DECODER_PREFIXES)}

    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict) - set(tied))
    if unexpected or missing:
        raise ValueError(
            f"The T5 weights of {t5_dir} do not match its config.json (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]})."
        )
    wrong = {name: tuple(t.shape) for name, t in state_dict.items() if t.shape != expected[name].shape}
    if wrong:
        raise ValueError(f"T5 tensors of {t5_dir} with shapes that do not match its config.json: {wrong}.")
    model.load_state_dict({name: tensor.clone() for name, tensor in state_dict.items()}, strict=False, assign=True)
    model.tie_weights()
    meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if meta:
        raise ValueError(f"The T5 weights of {t5_dir} lack {meta[:5]}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"Could not read the T5 tokenizer of {t5_dir}: {error}\nThe original ships it as spiece.model, which "
            'needs the `sentencepiece` and `protobuf` packages: pip install "diffusers-magi[convert]".'
        ) from error
    return model.eval(), tokenizer
