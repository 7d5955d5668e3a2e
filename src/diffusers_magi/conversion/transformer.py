"""Original MAGI-1 DiT checkpoint -> `MagiTransformer3DModel`.

fp8 checkpoints ("distill + fp8_quant") are loaded as the original builds them: in every block but the first and the
last, seven linears are float8 (`MagiFp8Linear`, see `models/fp8_linear_magi.py`). They can also be dequantised at
conversion time into a plain transformer of any float dtype (`dequantize_fp8=True`).
"""

import os
import re
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..models.fp8_linear_magi import FP8_DTYPE, dequantize_fp8_weight
from ..models.transformer_magi import FP8_BLOCK_LINEARS, MagiTransformer3DModel
from .original_checkpoint import open_safetensors_folder, original_weight_folder, read_original_config
from .streaming import ConversionSpec, load_component, plan_component

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


def rename_transformer_tensor(name: str) -> Optional[str]:
    """Our name for the original DiT tensor `name`, or `None` for a name the model does not know."""
    if name in _GLOBAL_KEY_MAP:
        return _GLOBAL_KEY_MAP[name]
    match = _LAYER_KEY_PATTERN.match(name)
    if match and match.group(2) in _LAYER_KEY_MAP:
        layer, module, kind = match.groups()
        return f"blocks.{layer}.{_LAYER_KEY_MAP[module]}.{kind}"
    return None


def convert_transformer_state_dict(original: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename every tensor of an original DiT state dict; unknown names raise a `ValueError`."""
    converted, unknown = {}, []
    for name, tensor in original.items():
        renamed = rename_transformer_tensor(name)
        if renamed is None:
            unknown.append(name)
        else:
            converted[renamed] = tensor
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


_FP8_LINEARS = dict(FP8_BLOCK_LINEARS)
_FP8_PART_PATTERN = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|fp8_weight|weight_scale|input_scale|smooth_scale)$")


def _fp8_linear_of(name: str, fp8_layers: List[int]) -> Optional[Tuple[str, bool]]:
    """`(prefix, per_channel)` when `name` is a tensor of a quantised linear, else `None`."""
    match = _FP8_PART_PATTERN.match(name)
    if match is None or int(match.group(1)) not in fp8_layers or match.group(2) not in _FP8_LINEARS:
        return None
    return f"blocks.{match.group(1)}.{match.group(2)}", _FP8_LINEARS[match.group(2)]


def convert_fp8_tensor(name: str, tensor: torch.Tensor, fp8_layers: List[int]) -> Tuple[str, torch.Tensor]:
    """One renamed tensor in `MagiFp8Linear`'s layout: a quantised linear's `(1, N, K)` float8_e4m3fn `weight`
    becomes the `(N, K)` uint8 `fp8_weight` (same bytes), `smooth_scale` `(1, K)` becomes `(K,)`; others are unchanged.
    Raises a `ValueError` naming the tensor when a quantised linear is not stored as float8. Works on meta tensors."""
    linear = _fp8_linear_of(name, fp8_layers)
    if linear is None:
        return name, tensor
    prefix, per_channel = linear
    if name == f"{prefix}.weight":
        if tensor.dtype != FP8_DTYPE:
            layer = prefix.split(".")[1]
            raise ValueError(
                f"{prefix}.weight is {tensor.dtype}, but an fp8_quant checkpoint stores block {layer}'s quantised "
                f"linears as {FP8_DTYPE}; is engine_config.fp8_quant right for this checkpoint?"
            )
        return f"{prefix}.fp8_weight", tensor.reshape(tensor.shape[-2:]).view(torch.uint8)
    if per_channel and name == f"{prefix}.smooth_scale":
        return name, tensor.reshape(-1)
    return name, tensor


def _fp8_parts(prefix: str, per_channel: bool) -> frozenset:
    parts = ["fp8_weight", "weight_scale", "input_scale"] + (["smooth_scale"] if per_channel else [])
    return frozenset(f"{prefix}.{part}" for part in parts)


def _dequantized(prefix: str, parts: Dict[str, torch.Tensor]) -> Tuple[str, torch.Tensor]:
    """The float64 weight of the plain linear equivalent to the quantised linear `prefix` (the caller casts it)."""
    return f"{prefix}.weight", dequantize_fp8_weight(
        parts[f"{prefix}.fp8_weight"],
        parts[f"{prefix}.weight_scale"],
        parts[f"{prefix}.input_scale"],
        parts.get(f"{prefix}.smooth_scale"),
    )


def transformer_conversion_spec(
    fp8_layers: List[int],
    dequantize_fp8: bool,
    dtype: torch.dtype,
    keep_in_fp32_modules: List[str],
    special_tokens: Optional[torch.Tensor] = None,
) -> ConversionSpec:
    """The `ConversionSpec` of an original DiT checkpoint: renaming, the fp8 layout (or its dequantisation) and the
    dtypes the model holds (float8 stays float8, `_keep_in_fp32_modules` float32, the rest `dtype`)."""
    keep_in_fp32 = set(keep_in_fp32_modules)

    def dtype_for(name: str, expected: torch.Tensor) -> torch.dtype:
        if expected.dtype == torch.uint8:
            return torch.uint8
        return torch.float32 if keep_in_fp32.intersection(name.split(".")) else dtype

    def group_of(name: str) -> Optional[str]:
        linear = _fp8_linear_of(name, fp8_layers)
        return None if linear is None else linear[0]

    spec = ConversionSpec(
        rename=rename_transformer_tensor,
        transform=lambda name, tensor: convert_fp8_tensor(name, tensor, fp8_layers),
        dtype_for=dtype_for,
        extra={} if special_tokens is None else {"caption_tokens.special_tokens": special_tokens},
    )
    if dequantize_fp8:
        spec.group_of = group_of
        spec.group_members = lambda prefix: _fp8_parts(prefix, _FP8_LINEARS[prefix.split(".", 2)[2]])
        spec.combine = _dequantized
    return spec


def _transformer_model_config(original_config: dict, use_special_tokens: bool, dequantize_fp8: bool) -> dict:
    fp8_layers = fp8_layers_from_original(original_config)
    model_config = transformer_config_from_original(original_config)
    model_config["use_special_tokens"] = use_special_tokens
    model_config["fp8_layers"] = fp8_layers if fp8_layers and not dequantize_fp8 else None
    return model_config


def plan_original_transformer(
    config: Union[str, os.PathLike, dict],
    checkpoint_dir: Union[str, os.PathLike],
    special_tokens_path: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
):
    """Everything `load_original_transformer` needs before reading a weight: `(meta model, weights, spec, plan)`,
    from the config and the safetensors headers alone (see `streaming.plan_component`)."""
    original_config = read_original_config(config)
    if dtype is None:
        dtype = params_dtype_from_original(original_config)
    if dtype not in _DTYPES.values():
        raise TypeError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype!r}.")
    weights = open_safetensors_folder(
        os.path.join(checkpoint_dir, original_weight_folder(original_config["engine_config"]))
    )
    special_tokens = load_special_tokens(special_tokens_path) if special_tokens_path is not None else None
    with torch.device("meta"):
        model = MagiTransformer3DModel(
            **_transformer_model_config(original_config, special_tokens_path is not None, dequantize_fp8)
        )
    spec = transformer_conversion_spec(
        fp8_layers_from_original(original_config),
        dequantize_fp8,
        dtype,
        model._keep_in_fp32_modules,
        special_tokens,
    )
    return model, weights, spec, plan_component("transformer", model, weights, spec)


def load_original_transformer(
    config: Union[str, os.PathLike, dict],
    checkpoint_dir: Union[str, os.PathLike],
    special_tokens_path: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    device_map: Optional[Union[str, dict]] = None,
    max_memory: Optional[dict] = None,
) -> MagiTransformer3DModel:
    """Build a `MagiTransformer3DModel` from an original MAGI-1 config and checkpoint.

    The weights are read one tensor at a time into a model built on the meta device, so the load needs about one copy
    of the weights (in their final dtypes) plus the largest tensor; with `device` or `device_map` each tensor goes
    straight to its device and host memory holds one tensor at a time.

    Args:
        config (`str`, `os.PathLike` or `dict`): original three-section config (`model_config`, `runtime_config`,
            `engine_config`), as a JSON path or a dict (e.g. `diffusers_magi.conversion.presets.PRESETS[...]`).
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/` (the original's
            `runtime_config.load`, e.g. `ckpt/magi/4.5B_base`).
        special_tokens_path (`str`, *optional*): the original `special_tokens.npz`; its tokens become weights of the
            model. Without it the model holds no special tokens.
        dtype (`torch.dtype`, *optional*): dtype of the transformer blocks; defaults to the config's
            `params_dtype` (what the original runs). Embedders, norms, the final projection and fp8 scales stay
            float32 (`_keep_in_fp32_modules`); float8 weights stay float8.
        dequantize_fp8 (`bool`, defaults to `False`): for fp8 checkpoints, turn every float8 linear into a plain linear
            of `dtype` holding its dequantised weight, instead of keeping float8 weights and arithmetic.
        device (`str` or `torch.device`, *optional*): where every weight goes (default CPU).
        device_map (`str` or `dict`, *optional*): `{module prefix: device}` or an accelerate strategy (`"auto"`,
            `"balanced"`, ...; with `max_memory`); a map over several devices dispatches the model with accelerate
            hooks. Blocks are never split.
        max_memory (`dict`, *optional*): per-device memory limits for a `device_map` strategy.

    Tensors of the checkpoint the model does not use are skipped with one warning listing them (as the original
    loader, which loads with `strict=False`); a missing or mis-shaped tensor raises a `ValueError` naming it, before
    any weight is read.
    """
    model, weights, spec, plan = plan_original_transformer(
        config, checkpoint_dir, special_tokens_path, dtype=dtype, dequantize_fp8=dequantize_fp8
    )
    return load_component(model, weights, spec, plan, device=device, device_map=device_map, max_memory=max_memory)
