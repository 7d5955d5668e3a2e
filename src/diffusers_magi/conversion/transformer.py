"""Original MAGI-1 DiT checkpoint -> `MagiTransformer3DModel`.

fp8 checkpoints ("distill + fp8_quant") are loaded as the original builds them: in every block but the first and the
last, seven linears are float8 (`MagiFp8Linear`, see `models/fp8_linear_magi.py`). They can also be dequantised at
conversion time into a plain transformer of any float dtype (`dequantize_fp8=True`).
"""

import os
import re
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from ..models.fp8_linear_magi import FP8_DTYPE, dequantize_fp8_weight
from ..models.transformer_magi import FP8_BLOCK_LINEARS, MagiTransformer3DModel
from .original_checkpoint import load_safetensors_folder, original_weight_folder, read_original_config

_DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}

# Original module path -> our module path. `{i}` is the layer index.
_GLOBAL_KEY_MAP = {
    "x_embedder.weight": "patch_embedding.weight",
    "t_embedder.mlp.0.weight": "time_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embedder.linear_2.bias",
    "y_embedder.y_proj_xattn.0.weight": "text_embedder.cross_attention_proj.weight",
    "y_embedder.y_proj_xattn.0.bias": "text_embedder.cross_attention_proj.bias",
    "y_embedder.y_proj_adaln.0.weight": "text_embedder.condition_proj.weight",
    "y_embedder.y_proj_adaln.0.bias": "text_embedder.condition_proj.bias",
    "y_embedder.null_caption_embedding": "caption_tokens.null_caption_embedding",
    "rope.bands": "rope.bands",
    "videodit_blocks.final_layernorm.weight": "norm_out.weight",
    "videodit_blocks.final_layernorm.bias": "norm_out.bias",
    "final_linear.linear.weight": "proj_out.weight",
}
_LAYER_KEY_MAP = {
    "ada_modulate_layer.proj.0": "modulation",
    "self_attention.linear_qkv.layer_norm": "attn.norm",
    "self_attention.linear_qkv.q": "attn.to_q",
    "self_attention.linear_qkv.k": "attn.to_k",
    "self_attention.linear_qkv.v": "attn.to_v",
    "self_attention.linear_qkv.qx": "attn.to_cross_q",
    "self_attention.linear_kv_xattn": "attn.to_cross_kv",
    "self_attention.linear_proj": "attn.to_out",
    "self_attention.q_layernorm": "attn.norm_q",
    "self_attention.k_layernorm": "attn.norm_k",
    "self_attention.q_layernorm_xattn": "attn.norm_cross_q",
    "self_attention.k_layernorm_xattn": "attn.norm_cross_k",
    "self_attn_post_norm": "attn_post_norm",
    "mlp.layer_norm": "ff.norm",
    "mlp.linear_fc1": "ff.linear_in",
    "mlp.linear_fc2": "ff.linear_out",
    "mlp_post_norm": "ff_post_norm",
}
_LAYER_KEY_PATTERN = re.compile(
    r"videodit_blocks\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale|input_scale|smooth_scale)$"
)

# Rows of the original `special_tokens.npz` arrays, in the order of `SPECIAL_TOKEN_NAMES`.
_SPECIAL_TOKEN_ROWS = (
    ("caption_token", 0),
    ("logo_token", 0),
    *(("other_tokens", row) for row in (0, 1, 2, 3, 4)),
    *(("other_tokens", 6 + k) for k in range(1, 9)),
    ("other_tokens", 15),
    ("other_tokens", 16),
)


def transformer_config_from_original(original_config: dict) -> dict:
    """`MagiTransformer3DModel` config from the `model_config` / `engine_config` sections of an original config."""
    model = original_config["model_config"]
    engine = original_config["engine_config"]
    if model.get("model_name", "videodit_ardf") != "videodit_ardf":
        raise ValueError(f"Unsupported original model_name {model['model_name']!r}; expected 'videodit_ardf'.")
    if model["cond_gating_ratio"] != 1.0:
        raise ValueError(
            f"cond_gating_ratio = {model['cond_gating_ratio']} is not supported: the original only runs with 1.0 "
            "(each gate must be as wide as the hidden states)."
        )
    hidden_size = model["hidden_size"]
    return {
        "in_channels": model["in_channels"],
        "out_channels": model["out_channels"],
        "patch_size": (model["t_patch_size"], model["patch_size"], model["patch_size"]),
        "num_layers": model["num_layers"],
        "hidden_size": hidden_size,
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"],
        "attention_head_dim": model["kv_channels"],
        "ffn_dim": model["ffn_hidden_size"],
        "gated_linear_unit": model["gated_linear_unit"],
        "text_dim": model["caption_channels"],
        "text_length": model["caption_max_length"],
        "condition_dim": int(hidden_size * model["cond_hidden_ratio"]),
        "cross_attention_dim": int(hidden_size * model["xattn_cond_hidden_ratio"]),
        "eps": model["layernorm_epsilon"],
        "zero_centered_norm_weights": model["apply_layernorm_1p"],
        "x_rescale_factor": float(model["x_rescale_factor"]),
        "half_channel_vae": model["half_channel_vae"],
        "step_size_conditioning": engine["distill"],
    }


def convert_transformer_state_dict(original: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename every tensor of an original DiT state dict; unknown names raise a `ValueError`."""
    converted, unknown = {}, []
    for name, tensor in original.items():
        if name in _GLOBAL_KEY_MAP:
            converted[_GLOBAL_KEY_MAP[name]] = tensor
            continue
        match = _LAYER_KEY_PATTERN.match(name)
        if match and match.group(2) in _LAYER_KEY_MAP:
            layer, module, kind = match.groups()
            converted[f"blocks.{layer}.{_LAYER_KEY_MAP[module]}.{kind}"] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Unexpected tensor(s) in the original checkpoint: {unknown[:10]} ({len(unknown)} in all).")
    return converted


def load_special_tokens(special_tokens_path: str) -> torch.Tensor:
    """The learned special tokens of the original `special_tokens.npz`, float16-rounded as the original uses them,
    as a float32 tensor of shape `(len(SPECIAL_TOKEN_NAMES), channels)`."""
    with np.load(special_tokens_path, allow_pickle=False) as table:
        missing = {array for array, _ in _SPECIAL_TOKEN_ROWS} - set(table.files)
        if missing:
            raise ValueError(f"{special_tokens_path} lacks the array(s) {sorted(missing)} of MAGI-1's special tokens.")
        rows = [torch.from_numpy(np.asarray(table[array][row])) for array, row in _SPECIAL_TOKEN_ROWS]
    return torch.stack(rows).to(torch.float16).to(torch.float32)


def params_dtype_from_original(original_config: dict) -> torch.dtype:
    """The original's `model_config.params_dtype` (the dtype the original runs the blocks in) as a torch dtype."""
    name = original_config["model_config"].get("params_dtype", "torch.float32")
    if name not in _DTYPES:
        raise ValueError(f"model_config.params_dtype {name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def fp8_layers_from_original(original_config: dict) -> List[int]:
    """Blocks the original quantises when `engine_config.fp8_quant` is set: all but the first and the last."""
    if not original_config["engine_config"].get("fp8_quant", False):
        return []
    return list(range(1, original_config["model_config"]["num_layers"] - 1))


def convert_fp8_tensors(state_dict: Dict[str, torch.Tensor], fp8_layers: List[int]) -> Dict[str, torch.Tensor]:
    """Bring the quantised linears of a renamed fp8 state dict into `MagiFp8Linear`'s layout: the `(1, N, K)`
    float8_e4m3fn `weight` becomes the `(N, K)` uint8 `fp8_weight` (same bytes), `smooth_scale` `(1, K)` becomes
    `(K,)`. Raises a `ValueError` naming the tensor when a quantised linear is not stored as float8."""
    converted = dict(state_dict)
    for layer in fp8_layers:
        for path, per_channel in FP8_BLOCK_LINEARS:
            prefix = f"blocks.{layer}.{path}"
            weight = converted.pop(f"{prefix}.weight", None)
            if weight is None:
                continue  # reported as missing by the caller
            if weight.dtype != FP8_DTYPE:
                raise ValueError(
                    f"{prefix}.weight is {weight.dtype}, but an fp8_quant checkpoint stores block {layer}'s quantised "
                    f"linears as {FP8_DTYPE}; is engine_config.fp8_quant right for this checkpoint?"
                )
            converted[f"{prefix}.fp8_weight"] = weight.reshape(weight.shape[-2:]).view(torch.uint8)
            if per_channel and f"{prefix}.smooth_scale" in converted:
                converted[f"{prefix}.smooth_scale"] = converted[f"{prefix}.smooth_scale"].reshape(-1)
    return converted


def dequantize_fp8_state_dict(state_dict: Dict[str, torch.Tensor], fp8_layers: List[int]) -> Dict[str, torch.Tensor]:
    """Replace every `MagiFp8Linear` of a converted state dict by the float64 weight of an equivalent plain linear
    (`dequantize_fp8_weight`); the caller casts it to the target dtype."""
    dequantized = dict(state_dict)
    for layer in fp8_layers:
        for path, per_channel in FP8_BLOCK_LINEARS:
            prefix = f"blocks.{layer}.{path}"
            dequantized[f"{prefix}.weight"] = dequantize_fp8_weight(
                dequantized.pop(f"{prefix}.fp8_weight"),
                dequantized.pop(f"{prefix}.weight_scale"),
                dequantized.pop(f"{prefix}.input_scale"),
                dequantized.pop(f"{prefix}.smooth_scale") if per_channel else None,
            )
    return dequantized


def load_original_transformer(
    config: Union[str, os.PathLike, dict],
    checkpoint_dir: Union[str, os.PathLike],
    special_tokens_path: Optional[Union[str, os.PathLike]] = None,
    torch_dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
) -> MagiTransformer3DModel:
    """Build a `MagiTransformer3DModel` from an original MAGI-1 config and checkpoint.

    Args:
        config (`str`, `os.PathLike` or `dict`): original three-section config (`model_config`, `runtime_config`,
            `engine_config`), as a JSON path or a dict (e.g. `diffusers_magi.conversion.presets.PRESETS[...]`).
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/` (the original's
            `runtime_config.load`, e.g. `ckpt/magi/4.5B_base`).
        special_tokens_path (`str`, *optional*): the original `special_tokens.npz`; its tokens become weights of the
            model. Without it the model holds no special tokens.
        torch_dtype (`torch.dtype`, *optional*): dtype of the transformer blocks; defaults to the config's
            `params_dtype` (what the original runs). Embedders, norms, the final projection and fp8 scales stay
            float32 (`_keep_in_fp32_modules`); float8 weights stay float8.
        dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, turn every float8 linear into a plain linear
            of `torch_dtype` holding its dequantised weight, instead of keeping float8 weights and arithmetic.

    Every tensor must map onto the model and every model tensor must be present; anything else raises a `ValueError`.
    """
    original_config = read_original_config(config)
    if torch_dtype is None:
        torch_dtype = params_dtype_from_original(original_config)
    if torch_dtype not in _DTYPES.values():
        raise TypeError(f"torch_dtype must be one of {list(_DTYPES.values())}, got {torch_dtype!r}.")
    fp8_layers = fp8_layers_from_original(original_config)
    weight_folder = os.path.join(checkpoint_dir, original_weight_folder(original_config["engine_config"]))
    state_dict = convert_transformer_state_dict(load_safetensors_folder(weight_folder))
    state_dict = convert_fp8_tensors(state_dict, fp8_layers)
    if dequantize_fp8:
        state_dict = dequantize_fp8_state_dict(state_dict, fp8_layers)

    model_config = transformer_config_from_original(original_config)
    model_config["use_special_tokens"] = special_tokens_path is not None
    model_config["fp8_layers"] = fp8_layers if fp8_layers and not dequantize_fp8 else None
    if special_tokens_path is not None:
        state_dict["caption_tokens.special_tokens"] = load_special_tokens(special_tokens_path)

    with torch.device("meta"):
        model = MagiTransformer3DModel(**model_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"The original checkpoint {weight_folder} lacks tensor(s) the model needs: {missing[:10]} ({len(missing)} "
            "in all)."
        )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"Unexpected tensor(s) in {weight_folder} for this config: {unexpected[:10]}.")
    keep_in_fp32 = set(model._keep_in_fp32_modules)
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"Tensor {name} has shape {tuple(tensor.shape)} in the checkpoint {weight_folder} but the config "
                f"implies {tuple(expected[name].shape)}."
            )
        if expected[name].dtype == torch.uint8:
            dtype = torch.uint8
        elif keep_in_fp32.intersection(name.split(".")):
            dtype = torch.float32
        else:
            dtype = torch_dtype
        # A fresh copy: tensors read from a file are views into it and may start at any 8-byte boundary; the CPU
        # kernels' results can depend on that alignment, so every loader must hand the model freshly allocated tensors.
        state_dict[name] = tensor.to(dtype, copy=True)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
