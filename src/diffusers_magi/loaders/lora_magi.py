"""`MagiLoraLoaderMixin`: LoRA loading for the MAGI-1 pipelines (text-, image- and video-to-video), transformer only.

Built on Diffusers' `LoraBaseMixin`, like Diffusers' `WanLoraLoaderMixin`: `load_lora_weights`, `save_lora_weights`,
`fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `set_adapters`, `get_active_adapters`, `disable_lora`,
`enable_lora`, `delete_adapters`, `get_list_adapters`. LoRA files are Diffusers' `pytorch_lora_weights.safetensors`
with keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, from a local folder, a file or a Hub id; what
`magi-train-lora` writes. A `lora_scale` for one call is `attention_kwargs={"scale": s}`, as in Diffusers pipelines.

Which modules can take an adapter: every linear of the transformer except the float8 linears of fp8 checkpoints
(see `diffusers_magi.loaders.peft_magi`).

Offloading: a LoRA loads into a pipeline with model, sequential or group offloading already on. Model and group
offloading are re-armed by Diffusers; accelerate's per-layer hooks (sequential offloading) are taken off here and put
back on the same components with the same execution device, so the new LoRA layers are offloaded like the others.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, remove_hook_from_module
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, TRANSFORMER_NAME
from diffusers.utils import logging
from diffusers.utils.peft_utils import require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args

logger = logging.get_logger(__name__)


def _sequential_offload_settings(component: torch.nn.Module) -> Optional[Tuple[torch.device, bool]]:
    """`(execution_device, offload_buffers)` of the per-layer offload hooks accelerate's `cpu_offload` put on
    `component` (what `enable_sequential_cpu_offload` installs), or `None` when it has none."""
    for module in component.modules():
        attached = getattr(module, "_hf_hook", None)
        for hook in getattr(attached, "hooks", [attached]):
            if isinstance(hook, AlignDevicesHook) and hook.offload:
                return hook.execution_device, hook.offload_buffers
    return None


def _remove_sequential_offload(pipeline) -> Dict[str, Tuple[torch.device, bool]]:
    """Take accelerate's per-layer offload hooks off every component of `pipeline` that has them (their weights come
    back from the offloaded copy); returns, per component name, the settings to put them back with.

    Diffusers' `load_lora_adapter` would remove them too, but re-arms them with `pipeline.enable_sequential_cpu_offload()`:
    on every component, on the device of the pipeline's last `enable_sequential_cpu_offload` call, not on the device
    of the hooks it removed (which fails for hooks put on with `accelerate.cpu_offload` directly)."""
    if pipeline.hf_device_map is not None:
        return {}
    removed = {}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            settings = _sequential_offload_settings(component)
            if settings is not None:
                remove_hook_from_module(component, recurse=True)
                removed[name] = settings
    return removed


class MagiLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load LoRA layers into the [`MagiTransformer3DModel`] of [`MagiPipeline`], [`MagiImageToVideoPipeline`] and
    [`MagiVideoToVideoPipeline`].

    Examples:

    ```py
    >>> pipe.load_lora_weights("path/to/lora_folder", adapter_name="style")  # or a Hub id
    >>> video = pipe(prompt, attention_kwargs={"scale": 0.8}).frames[0]  # the adapter at 0.8 for this call
    >>> pipe.set_adapters(["style", "motion"], adapter_weights=[1.0, 0.5])
    >>> pipe.fuse_lora(lora_scale=1.0)  # fold the active adapters into the weights (`unfuse_lora` undoes it)
    ```
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]], **kwargs
    ):
        r"""
        The LoRA tensors of a folder, file, Hub id or state dict, without loading them into a model.

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): a Hub id, a local folder holding
                `pytorch_lora_weights.safetensors` (or the file named by `weight_name`), or a state dict.
            kwargs: `weight_name`, `subfolder`, `cache_dir`, `force_download`, `proxies`, `local_files_only`,
                `token`, `revision`, `use_safetensors`, `return_lora_metadata` (return `(state_dict, metadata)`).
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        if any("dora_scale" in key for key in state_dict):
            logger.warning("DoRA scales are not supported; the `dora_scale` tensors of this checkpoint are ignored.")
            state_dict = {key: value for key, value in state_dict.items() if "dora_scale" not in key}
        return (state_dict, metadata) if return_lora_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Load a LoRA into the transformer as the adapter `adapter_name` (default: `default_0`, `default_1`, ...) and
        activate it.

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): see `lora_state_dict`.
            adapter_name (`str`, *optional*): name of the adapter, for `set_adapters` and `delete_adapters`.
            hotswap (`bool`, defaults to `False`): replace the weights of the already loaded adapter `adapter_name`
                in place (see Diffusers' `load_lora_weights`).
            kwargs: `low_cpu_mem_usage`, and the download arguments of `lora_state_dict`.

        Raises:
            `ValueError`: the file is for another model (a tensor naming a module this transformer lacks, or of the
                wrong shape; the message names the tensor), or it targets float8 linears of an fp8 checkpoint.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        sequentially_offloaded = _remove_sequential_offload(self)
        try:
            self.load_lora_into_transformer(
                state_dict,
                transformer=self.transformer,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        finally:
            for name, (execution_device, offload_buffers) in sequentially_offloaded.items():
                cpu_offload(getattr(self, name), execution_device, offload_buffers=offload_buffers)

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: Dict[str, torch.Tensor],
        transformer,
        adapter_name: Optional[str] = None,
        _pipeline=None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: Optional[dict] = None,
    ):
        r"""Load the `transformer.`-prefixed tensors of `state_dict` into `transformer` (see `load_lora_weights`)."""
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        transformer_lora_layers: Optional[Dict[str, Union[torch.nn.Module, torch.Tensor]]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Optional[dict] = None,
    ):
        r"""
        Write `pytorch_lora_weights.safetensors` (keys prefixed `transformer.`) to `save_directory`.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write to (created if missing).
            transformer_lora_layers (`dict`): the adapter's tensors, e.g.
                `peft.get_peft_model_state_dict(pipe.transformer)`.
            transformer_lora_adapter_metadata (`dict`, *optional*): the adapter's `LoraConfig` as a dict
                (`pipe.transformer.peft_config["default"].to_dict()`), stored so that rank and alpha load back exactly.
            is_main_process, weight_name, save_function, safe_serialization: as in Diffusers.
        """
        if not transformer_lora_layers:
            raise ValueError("Pass `transformer_lora_layers` (e.g. `get_peft_model_state_dict(pipe.transformer)`).")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: List[str] = ["transformer"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Optional[List[str]] = None,
        **kwargs,
    ):
        r"""Fold the active adapters (or `adapter_names`), times `lora_scale`, into the transformer's weights; the
        adapters stay loaded (`unfuse_lora` restores the base weights)."""
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: List[str] = ["transformer"], **kwargs):
        r"""Undo `fuse_lora`: subtract the fused adapters from the transformer's weights again."""
        super().unfuse_lora(components=components, **kwargs)
