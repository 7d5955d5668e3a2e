"""Original MAGI-1 DiT checkpoint -> `MagiTransformer3DModel`."""

import os
import re
from typing import Dict, Optional

import numpy as np
import torch

from ..models.transformer_magi import SPECIAL_TOKEN_NAMES, MagiTransformer3DModel
from .original_checkpoint import load_safetensors_folder, read_original_config

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
_LAYER_KEY_PATTERN = re.compile(r"videodit_blocks\.layers\.(\d+)\.(.+)\.(weight|bias)$")

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


def load_original_transformer(
    config_path: str,
    checkpoint_dir: str,
    special_tokens_path: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
) -> MagiTransformer3DModel:
    """Build a `MagiTransformer3DModel` from an original MAGI-1 config and checkpoint.

    Args:
        config_path (`str`): original three-section config JSON (`model_config`, `runtime_config`, `engine_config`).
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/` (the original's
            `runtime_config.load`, e.g. `ckpt/magi/4.5B_base`).
        special_tokens_path (`str`, *optional*): the original `special_tokens.npz`; its tokens become weights of the
            model. Without it the model holds no special tokens.
        torch_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the transformer blocks; embedders, norms
            and the final projection stay float32 (`_keep_in_fp32_modules`).

    Every tensor must map onto the model and every model tensor must be present; anything else raises.
    """
    original_config = read_original_config(config_path)
    engine = original_config["engine_config"]
    if engine.get("fp8_quant", False):
        raise ValueError(
            "This checkpoint is fp8-quantised (engine_config.fp8_quant); loading fp8 checkpoints is not supported by "
            "load_original_transformer."
        )
    weight_folder = "inference_weight" + (".distill" if engine["distill"] else "")
    original_state_dict = load_safetensors_folder(os.path.join(checkpoint_dir, weight_folder))

    config = transformer_config_from_original(original_config)
    config["use_special_tokens"] = special_tokens_path is not None
    state_dict = convert_transformer_state_dict(original_state_dict)
    if special_tokens_path is not None:
        state_dict["caption_tokens.special_tokens"] = load_special_tokens(special_tokens_path)

    with torch.device("meta"):
        model = MagiTransformer3DModel(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"The original checkpoint lacks tensor(s) the model needs: {missing[:10]} ({len(missing)}).")
    keep_in_fp32 = set(model._keep_in_fp32_modules)
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"Tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but the config implies "
                f"{tuple(expected[name].shape)}."
            )
        dtype = torch.float32 if keep_in_fp32.intersection(name.split(".")) else torch_dtype
        state_dict[name] = tensor.to(dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
