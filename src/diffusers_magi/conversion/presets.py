"""Built-in original configs of the six released MAGI-1 variants, so that converting them needs no config JSON.

Each preset is the three-section config of the original repository's example config for that variant
(`example/<4.5B|24B>/<variant>_config.json` of SandAI-org/MAGI-1): `model_config` (architecture), `runtime_config`
(sampling defaults) and `engine_config` (distill / fp8 switches, parallelism). Only the three path fields of
`runtime_config` differ: the examples hold paths local to the original scripts, the presets hold the folders of the
original Hub repository (`sand-ai/MAGI-1`) relative to its root.

`VARIANT_NOTES` adds what the original README says about each variant (the hardware it was released for).
"""

import copy
from typing import Dict

ORIGINAL_REPO_ID = "sand-ai/MAGI-1"
T5_FOLDER = "ckpt/t5/t5-v1_1-xxl"
VAE_FOLDER = "ckpt/vae"

_MODEL_4_5B = {
    "model_name": "videodit_ardf",
    "num_layers": 34,
    "hidden_size": 3072,
    "ffn_hidden_size": 12288,
    "num_attention_heads": 24,
    "num_query_groups": 8,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-06,
    "apply_layernorm_1p": True,
    "x_rescale_factor": 1,
    "half_channel_vae": False,
    "params_dtype": "torch.bfloat16",
    "patch_size": 2,
    "t_patch_size": 1,
    "in_channels": 16,
    "out_channels": 16,
    "cond_hidden_ratio": 0.25,
    "caption_channels": 4096,
    "caption_max_length": 800,
    "xattn_cond_hidden_ratio": 1.0,
    "cond_gating_ratio": 1.0,
    "gated_linear_unit": False,
}
_MODEL_24B = {
    **_MODEL_4_5B,
    "num_layers": 48,
    "hidden_size": 6144,
    "ffn_hidden_size": 16384,
    "num_attention_heads": 48,
    "x_rescale_factor": 0.1,
    "half_channel_vae": True,
    "in_channels": 32,
    "out_channels": 32,
    "gated_linear_unit": True,
}
_RUNTIME = {
    "cfg_number": 3,
    "cfg_t_range": [0.0, 0.0217, 0.1, 0.3, 0.999],
    "prev_chunk_scales": [1.5, 1.5, 1.5, 1.0, 1.0],
    "text_scales": [7.5, 7.5, 7.5, 0.0, 0.0],
    "noise2clean_kvrange": [5, 4, 3, 2],
    "clean_chunk_kvrange": 1,
    "clean_t": 0.9999,
    "seed": 1234,
    "num_frames": 96,
    "video_size_h": 720,
    "video_size_w": 720,
    "num_steps": 64,
    "window_size": 4,
    "fps": 24,
    "chunk_width": 6,
    "load": None,
    "t5_pretrained": T5_FOLDER,
    "t5_device": "cpu",
    "vae_pretrained": VAE_FOLDER,
    "scale_factor": 0.18215,
    "temporal_downsample_factor": 4,
}
_ENGINE = {
    "distributed_backend": "nccl",
    "distributed_timeout_minutes": 15,
    "pp_size": 1,
    "cp_size": 1,
    "cp_strategy": "cp_ulysses",
    "ulysses_overlap_degree": 1,
    "fp8_quant": False,
    "distill_nearly_clean_chunk_threshold": 0.3,
    "shortcut_mode": "8,16,16",
    "distill": False,
    "kv_offload": True,
    "enable_cuda_graph": False,
}
# (size, kind) -> (runtime overrides, engine overrides)
_VARIANTS = {
    ("4.5B", "base"): ({}, {}),
    ("4.5B", "distill"): ({"cfg_number": 1}, {"distill": True}),
    ("4.5B", "distill_quant"): ({"cfg_number": 1}, {"distill": True, "fp8_quant": True}),
    ("24B", "base"): ({"num_steps": 32}, {}),
    ("24B", "distill"): ({"cfg_number": 1, "num_steps": 16}, {"distill": True}),
    ("24B", "distill_quant"): ({"cfg_number": 1, "num_steps": 16}, {"distill": True, "fp8_quant": True}),
}
_SIZE_RUNTIME = {"4.5B": {}, "24B": {"video_size_w": 1280, "t5_device": "cuda"}}
_SIZE_ENGINE = {"4.5B": {}, "24B": {"cp_size": 8}}
_SIZE_MODEL = {"4.5B": _MODEL_4_5B, "24B": _MODEL_24B}


def _build_presets() -> Dict[str, dict]:
    presets = {}
    for (size, kind), (runtime, engine) in _VARIANTS.items():
        name = f"{size}_{kind}"
        presets[name] = {
            "model_config": copy.deepcopy(_SIZE_MODEL[size]),
            "runtime_config": {
                **copy.deepcopy(_RUNTIME),
                **_SIZE_RUNTIME[size],
                **runtime,
                "load": f"ckpt/magi/{name}",
            },
            "engine_config": {**_ENGINE, **_SIZE_ENGINE[size], **engine},
        }
    return presets


# Variant name (the folder name under `ckpt/magi/` of the original Hub repository) -> original config.
PRESETS: Dict[str, dict] = _build_presets()

# Hardware the original README lists for each variant.
VARIANT_NOTES: Dict[str, str] = {
    "4.5B_base": "RTX 4090 x 1",
    "4.5B_distill": "RTX 4090 x 1",
    "4.5B_distill_quant": "RTX 4090 x 1",
    "24B_base": "H100/H800 x 8",
    "24B_distill": "H100/H800 x 8",
    "24B_distill_quant": "H100/H800 x 4 or RTX 4090 x 8",
}


def preset(variant: str) -> dict:
    """A copy of the original config of `variant` (one of `PRESETS`)."""
    if variant not in PRESETS:
        raise ValueError(
            f"Unknown MAGI-1 variant {variant!r}; the built-in presets are {sorted(PRESETS)}. For another checkpoint "
            "pass its original config JSON."
        )
    return copy.deepcopy(PRESETS[variant])
