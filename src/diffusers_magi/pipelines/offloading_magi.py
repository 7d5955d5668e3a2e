"""`MagiOffloadingMixin`: Diffusers' placement entry points (`from_pretrained(device_map=...)`, model, sequential and
group offloading) with the device named in the arguments checked first.

Offloading itself is Diffusers' and accelerate's; the MAGI-1 components are written so that every mode gives the
output of a run without offloading (see `docs/memory.md`). What this mixin adds is a clear error, at the call that
asks for it, when the mode or device cannot work here, instead of a failure deep inside the first generation.
"""

from typing import Dict, List, Optional, Union

import torch

from ..placement import check_device, check_device_map


class MagiOffloadingMixin:
    """Mixed into the MAGI-1 pipelines before `DiffusionPipeline`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""`DiffusionPipeline.from_pretrained`; `device_map="balanced"` (with `max_memory` per GPU) places whole
        components on GPUs. A `device_map` or `max_memory` naming a device this machine lacks is a `ValueError`."""
        check_device_map(kwargs.get("device_map"), kwargs.get("max_memory"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[torch.device, str, None] = None):
        r"""Diffusers' model offloading (`text_encoder -> transformer -> vae`, each moved to `device` while it runs).
        `device="cpu"` runs the same hooks on a machine without accelerator (useful for tests). Called again without
        arguments (as `load_lora_weights` does to re-arm the hooks), it keeps the device of the previous call."""
        if gpu_id is None and device is None:
            device = getattr(self, "_offload_device", None)
        if gpu_id is not None:
            check_device(gpu_id, "gpu_id")
        if device is not None:
            check_device(device, "device")
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[torch.device, str, None] = None):
        r"""Diffusers' sequential offloading: every layer's weights stay on the CPU and move to the accelerator while
        the layer runs. Needs an accelerator. Called again without arguments (as `load_lora_weights` does), it keeps
        the device of the previous call."""
        if gpu_id is None and device is None:
            device = getattr(self, "_offload_device", None)
        if gpu_id is not None:
            check_device(gpu_id, "gpu_id")
        if device is not None and check_device(device, "device").type == "cpu":
            raise ValueError(
                "enable_sequential_cpu_offload(device='cpu') has nothing to offload to: sequential offloading moves each "
                "layer from the CPU to an accelerator while it runs (and Diffusers' `cpu:0` placement for it breaks "
                "accelerate's hooks). On a CPU-only machine run without offloading; to exercise offloading hooks on "
                "the CPU use enable_model_cpu_offload(device='cpu') or enable_group_offload(onload_device='cpu')."
            )
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_group_offload(
        self,
        onload_device: Union[torch.device, str],
        offload_device: Union[torch.device, str] = torch.device("cpu"),
        **kwargs,
    ):
        r"""Diffusers' group offloading (`offload_type="block_level"` or `"leaf_level"`, optionally to disk with
        `offload_to_disk_path`, with CUDA streams via `use_stream=True`) for every component."""
        onload_device = check_device(onload_device, "onload_device")
        offload_device = check_device(offload_device, "offload_device")
        if kwargs.get("offload_type") == "leaf_level" and kwargs.get("offload_to_disk_path") is not None:
            excluded = set(kwargs.get("exclude_modules") or ())
            for name, component in self.components.items():
                tied = _tied_leaf_parameters(component) if name not in excluded else []
                if tied:
                    raise ValueError(
                        f"Leaf-level group offloading to disk would corrupt the {name}'s tied weights {tied}: Diffusers "
                        "writes each leaf's file when it first offloads it, and by the time the second leaf sharing the "
                        "weight is written, the first has already replaced it with an empty placeholder. Use "
                        "offload_type='block_level' with offload_to_disk_path, leaf_level without it, or pass "
                        f"exclude_modules=[{name!r}]."
                    )
        super().enable_group_offload(onload_device, offload_device, **kwargs)


def _tied_leaf_parameters(component) -> List[List[str]]:
    """Names of parameters that several modules of `component` hold (tied weights, e.g. T5's `shared` and
    `encoder.embed_tokens`)."""
    if not isinstance(component, torch.nn.Module):
        return []
    holders: Dict[int, List[str]] = {}
    for module_name, module in component.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module.named_parameters(recurse=False):
            holders.setdefault(id(parameter), []).append(f"{module_name}.{parameter_name}")
    return [names for names in holders.values() if len(names) > 1]
