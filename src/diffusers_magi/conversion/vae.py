# Copyright 2025 The diffusers-magi authors. Licensed under the Apache License, Version 2.0.
"""Convert the original MAGI-1 VAE folder (``ckpt/vae``) into an `AutoencoderMagi`.

The original folder is a Diffusers-style model folder of the ``ViTVAE`` class: ``config.json`` with ``_class_name:
"ViTVAE"``, ``model_type: "vit"`` and a nested ``ddconfig`` of constructor arguments shared by encoder and decoder,
and ``diffusion_pytorch_model.safetensors`` with the original parameter names. Every option and every tensor is
checked: options this implementation does not reproduce and weights it does not know are errors, never ignored.
"""

import json
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..models.autoencoder_magi import AutoencoderMagi
from .original_checkpoint import SafetensorsWeights, open_safetensors_file
from .streaming import ComponentPlan, ConversionSpec, load_component, plan_component

# ddconfig options that change the architecture, with the only value the converter accepts and why.
_REQUIRED_OPTIONS = {
    "double_z": (True, "the encoder must predict mean and logvar"),
    "ln_in_attn": (True, "only the q/k/v-normalised attention (no norm1) is implemented"),
    "with_cls_token": (True, "the original's position-embedding resize assumes a class token"),
    "conv_last_layer": (True, "the original decoder asserts it"),
    "use_rope": (False, "the original's rope branch is dead code that crashes on any input"),
    "use_final_proj": (False, "the extra decoder projection is not implemented"),
    "norm_code": (False, "latent normalisation is not implemented"),
}
# ddconfig options with no effect at inference: dropout rates, and qk_scale, which the original attention ignores.
_INFERENCE_NO_OPS = {"drop_rate", "attn_drop_rate", "drop_path_rate", "qk_scale"}
_SHAPE_OPTIONS = {
    "video_size",
    "video_length",
    "patch_size",
    "patch_length",
    "in_chans",
    "z_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
}
# The original constructor defaults, used for options a ddconfig leaves out.
_ORIGINAL_DEFAULTS = {
    "video_size": 256,
    "video_length": 16,
    "patch_size": 8,
    "patch_length": 4,
    "in_chans": 3,
    "z_chans": 4,
    "double_z": True,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": False,
    "with_cls_token": True,
    "norm_code": False,
    "ln_in_attn": False,
    "conv_last_layer": False,
    "use_rope": False,
    "use_final_proj": False,
}

# (original name pattern, converted name); both halves share the block layout.
_KEY_RULES = [
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"(encoder|decoder)\.(cls_token|pos_embed)", r"\1.\2"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"\1.blocks.\2.attn.to_qkv.\3"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"\1.blocks.\2.attn.to_out.\3"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.norm2\.(weight|bias)", r"\1.blocks.\2.norm.\3"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"\1.blocks.\2.ff.proj_in.\3"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"\1.blocks.\2.ff.proj_out.\3"),
    (r"(encoder|decoder)\.norm\.(weight|bias)", r"\1.norm_out.\2"),
    (r"encoder\.last_layer\.(weight|bias)", r"encoder.proj_out.\1"),
    (r"decoder\.proj_in\.(weight|bias)", r"decoder.proj_in.\1"),
    (r"decoder\.last_layer\.(weight|bias)", r"decoder.conv_out.\1"),
]


def convert_vae_config(original_config: dict) -> dict:
    """Map an original ``config.json`` (``ViTVAE`` + ``ddconfig``) to `AutoencoderMagi` config arguments.

    Raises:
        ValueError: if the folder is not a ``ViTVAE`` of ``model_type`` ``"vit"``, or if ``ddconfig`` has an unknown
            option or an option this implementation does not reproduce.
    """
    if original_config.get("_class_name") != "ViTVAE":
        raise ValueError(
            "expected an original MAGI-1 VAE config with `_class_name: ViTVAE`, got"
            f" {original_config.get('_class_name')!r}."
        )
    if original_config.get("model_type", "vit") != "vit":
        raise ValueError(f"only `model_type: vit` is supported, got {original_config['model_type']!r}.")
    ddconfig = dict(original_config.get("ddconfig", {}))
    unknown = sorted(set(ddconfig) - set(_REQUIRED_OPTIONS) - _INFERENCE_NO_OPS - _SHAPE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown ddconfig options {unknown}; refusing to guess what they do.")
    options = {**_ORIGINAL_DEFAULTS, **ddconfig}
    for name, (required, reason) in _REQUIRED_OPTIONS.items():
        if bool(options[name]) != required:
            raise ValueError(f"ddconfig `{name}: {options[name]}` is not supported ({reason}); it must be {required}.")
    if not isinstance(options["video_size"], int):
        raise ValueError(f"ddconfig `video_size` must be an int, got {options['video_size']!r}.")
    embed_dim, num_heads = options["embed_dim"], options["num_heads"]
    if embed_dim % num_heads != 0:
        raise ValueError(f"ddconfig `embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads}).")
    return {
        "in_channels": options["in_chans"],
        "out_channels": 3,  # the original decoder's last convolution always outputs RGB
        "latent_channels": options["z_chans"],
        "sample_size": options["video_size"],
        "sample_frames": options["video_length"],
        "patch_size": options["patch_size"],
        "patch_size_t": options["patch_length"],
        "num_attention_heads": num_heads,
        "attention_head_dim": embed_dim // num_heads,
        "num_layers": options["depth"],
        "mlp_ratio": float(options["mlp_ratio"]),
        "qkv_bias": bool(options["qkv_bias"]),
    }


def rename_vae_tensor(key: str) -> Optional[str]:
    """The `AutoencoderMagi` name of the original VAE weight `key`, or `None` for a key no rule knows."""
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def convert_vae_state_dict(original_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every original VAE weight to its `AutoencoderMagi` name.

    Raises:
        ValueError: listing every key that no rule knows.
    """
    converted, unknown = {}, []
    for key, tensor in original_state_dict.items():
        renamed = rename_vae_tensor(key)
        if renamed is None:
            unknown.append(key)
        else:
            converted[renamed] = tensor
    if unknown:
        raise ValueError(f"unknown keys in the original VAE weights: {sorted(unknown)}.")
    return converted


def plan_original_vae(
    vae_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Tuple[AutoencoderMagi, SafetensorsWeights, ConversionSpec, ComponentPlan]:
    """`(meta model, weights, spec, plan)` of an original VAE folder, from its config and safetensors header alone."""
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vae_dir} has no config.json; is it the original VAE folder (ckpt/vae)?")
    with open(vae_dir / "config.json", encoding="utf-8") as f:
        config = convert_vae_config(json.load(f))
    weights = open_safetensors_file(vae_dir / "diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        model = AutoencoderMagi(**config)
    spec = ConversionSpec(rename=rename_vae_tensor, dtype_for=lambda name, expected: dtype)
    return model, weights, spec, plan_component("vae", model, weights, spec)


def load_original_vae(
    vae_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: Optional[str | torch.device] = None,
    device_map: Optional[str | dict] = None,
) -> AutoencoderMagi:
    """Build an `AutoencoderMagi` from an original MAGI-1 VAE folder (``config.json`` + safetensors weights), reading
    the weights one tensor at a time into a model built on the meta device.

    Args:
        vae_dir: the original folder, e.g. ``ckpt/vae``.
        dtype: dtype of the returned model's parameters.
        device: where the weights go (default CPU), each tensor straight from the file.
        device_map: `{module prefix: device}` or an accelerate strategy, instead of `device`.

    Returns:
        The model in eval mode; save it with ``save_pretrained`` to get a Diffusers folder.

    Raises:
        ValueError: for an unsupported option, a missing weight, or a weight of the wrong shape (naming it). Weights
            no rule knows are skipped with one warning listing them.
    """
    model, weights, spec, plan = plan_original_vae(vae_dir, dtype)
    return load_component(model, weights, spec, plan, device=device, device_map=device_map)
