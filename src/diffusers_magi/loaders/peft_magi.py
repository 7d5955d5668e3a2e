"""`MagiPeftAdapterMixin`: Diffusers' `PeftAdapterMixin` for `MagiTransformer3DModel`, with LoRA files checked against
the model before PEFT touches it.

Diffusers' mixin gives the transformer `add_adapter`, `set_adapters`, `disable_adapters`, `enable_adapters`,
`delete_adapters`, `load_lora_adapter`, `fuse_lora` / `unfuse_lora` and `unload_lora`. This subclass adds two checks:

* a LoRA state dict for another model (a tensor naming a module this transformer does not have, a tensor whose shape
  does not fit its module, a tensor outside the Diffusers/PEFT format) is a `ValueError` that names the tensor, raised
  before any adapter is injected;
* the float8 linears of fp8 checkpoints (`MagiFp8Linear`, see `FP8_BLOCK_LINEARS`) cannot take an adapter: their
  weight is stored as raw float8 bytes, so an adapter can neither be added to their output through a PEFT layer nor
  fused into their weight. Targeting one (by `add_adapter` or a LoRA file) is a `ValueError` that lists them and says
  how to proceed (load the checkpoint with `dequantize_fp8=True`, or leave those modules out). Every other linear of
  an fp8 checkpoint (the first and last blocks, the gates, the caption projections) takes adapters as usual.
"""

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from diffusers.loaders import PeftAdapterMixin

LORA_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def adapter_incompatible_modules(model: nn.Module) -> List[str]:
    """Names of the modules of `model` that cannot take a LoRA adapter: its float8 linears (`MagiFp8Linear`)."""
    from ..models.fp8_linear_magi import MagiFp8Linear

    return [name for name, module in model.named_modules() if isinstance(module, MagiFp8Linear)]


def _fp8_error(modules: List[str], model: nn.Module) -> ValueError:
    incompatible = adapter_incompatible_modules(model)
    return ValueError(
        f"LoRA adapters cannot go on {modules[:4]}{' ...' if len(modules) > 4 else ''}: in this fp8 checkpoint they are "
        f"float8 linears (MagiFp8Linear), whose raw float8 weights can neither take a PEFT layer nor have an adapter "
        f"fused in. The {len(incompatible)} modules that cannot take an adapter here are the q/k/v, cross-attention "
        "query, attention output and MLP linears of the fp8 blocks (e.g. "
        f"{incompatible[:2]}). Load the checkpoint with `dequantize_fp8=True` (MagiPipeline.from_original, "
        "magi-convert) to use such a LoRA, or target only the other linears (e.g. `attn.to_cross_kv`, `modulation`, "
        "and every linear of the first and last block)."
    )


def _base_layer(module: nn.Module) -> nn.Module:
    """The original layer of a module that PEFT may already have wrapped."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def check_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], prefix: Optional[str]) -> None:
    """Raise a `ValueError` naming the first tensor of `state_dict` that does not fit `model`.

    Args:
        model (`nn.Module`): the model the LoRA is for.
        state_dict (`Dict[str, torch.Tensor]`): LoRA tensors in the Diffusers/PEFT format
            (`<prefix>.<module path>.lora_A.weight`, `.lora_B.weight`, optionally `.lora_B.bias`).
        prefix (`str`, *optional*): prefix of every key (`"transformer"` in pipeline LoRA files); `None`: none.
    """
    model_name = type(model).__name__
    expected_start = f"{prefix}." if prefix else ""
    ranks: Dict[str, Dict[str, int]] = {}
    incompatible = set(adapter_incompatible_modules(model))
    fp8_targets = []
    for key, tensor in state_dict.items():
        if not key.startswith(expected_start):
            raise ValueError(
                f"LoRA tensor {key!r} is not for the transformer: the LoRA tensors of a MAGI-1 pipeline start with "
                f"{expected_start!r} (file written by `save_lora_weights`). This LoRA file is for a different model."
            )
        name = key[len(expected_start) :]
        suffix = next((suffix for suffix in LORA_TENSOR_SUFFIXES if name.endswith(suffix)), None)
        if suffix is None:
            raise ValueError(
                f"LoRA tensor {key!r} is not in the Diffusers/PEFT LoRA format (`<module>.lora_A.weight`, "
                "`<module>.lora_B.weight`, `<module>.lora_B.bias`); this LoRA file is for a different model or trainer."
            )
        path = name[: -len(suffix)]
        try:
            module = _base_layer(model.get_submodule(path))
        except AttributeError:
            raise ValueError(
                f"LoRA tensor {key!r} targets the module {path!r}, which this {model_name} does not have (its linears "
                "are named like 'blocks.0.attn.to_q', 'blocks.0.ff.linear_in'); this LoRA was made for a different "
                "model."
            ) from None
        if path in incompatible:
            fp8_targets.append(path)
            continue
        if isinstance(module, nn.Linear):
            in_size, out_size = module.in_features, module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            in_size, out_size = module.in_channels, module.out_channels
        else:
            raise ValueError(
                f"LoRA tensor {key!r} targets {path!r}, a {type(module).__name__}, which cannot take a LoRA adapter "
                "(only linear and convolution layers can); this LoRA was made for a different model."
            )
        if suffix == ".lora_A.weight":
            rank, fits, expected = (
                tensor.shape[0],
                tensor.ndim >= 2 and tensor.shape[1] == in_size,
                f"(rank, {in_size})",
            )
        elif suffix == ".lora_B.weight":
            rank = tensor.shape[1] if tensor.ndim >= 2 else -1
            fits, expected = tensor.ndim >= 2 and tensor.shape[0] == out_size, f"({out_size}, rank)"
        else:
            rank, fits, expected = None, tuple(tensor.shape) == (out_size,), f"({out_size},)"
        if not fits:
            raise ValueError(
                f"LoRA tensor {key!r} has shape {tuple(tensor.shape)}, but {path!r} of this {model_name} is "
                f"{in_size} -> {out_size}, so it must be {expected}; this LoRA was made for a different model (or "
                "model size)."
            )
        if rank is not None:
            ranks.setdefault(path, {})[suffix] = rank
    for path, found in ranks.items():
        if len(found) != 2 or len(set(found.values())) != 1:
            key = f"{expected_start}{path}{next(iter(found))}"
            raise ValueError(
                f"LoRA tensor {key!r} has no matching partner: {path!r} needs both lora_A.weight and lora_B.weight with "
                f"the same rank, found {found}."
            )
    if fp8_targets:
        raise _fp8_error(list(dict.fromkeys(fp8_targets)), model)


class MagiPeftAdapterMixin(PeftAdapterMixin):
    """Diffusers' `PeftAdapterMixin` with LoRA tensors and adapter targets checked against the MAGI-1 transformer
    (see the module docstring)."""

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        r"""Diffusers' `add_adapter`; a `ValueError` when `adapter_config.target_modules` matches a float8 linear of an
        fp8 checkpoint (which cannot take an adapter)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        incompatible = adapter_incompatible_modules(self)
        if incompatible and not isinstance(getattr(adapter_config, "target_modules", None), str):
            targeted = [name for name in incompatible if check_target_module_exists(adapter_config, name)]
            if targeted:
                raise _fp8_error(targeted, self)
        super().add_adapter(adapter_config, adapter_name)

    def load_lora_adapter(
        self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap: bool = False, **kwargs
    ):
        r"""Diffusers' `load_lora_adapter` (a local folder, Hub id, file or state dict); the tensors are checked first
        and a LoRA for another model is a `ValueError` that names the offending tensor."""
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            from diffusers.loaders.lora_base import _fetch_state_dict

            download = {
                name: kwargs.pop(name, None)
                for name in (
                    "weight_name",
                    "local_files_only",
                    "cache_dir",
                    "proxies",
                    "token",
                    "revision",
                    "subfolder",
                )
            }
            state_dict, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
                use_safetensors=kwargs.pop("use_safetensors", None) is not False,
                force_download=kwargs.pop("force_download", False),
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
                **download,
            )
            if kwargs.get("metadata") is None:
                kwargs["metadata"] = metadata
            pretrained_model_name_or_path_or_dict = state_dict
        check_lora_state_dict(self, pretrained_model_name_or_path_or_dict, prefix)
        return super().load_lora_adapter(
            pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap, **kwargs
        )
