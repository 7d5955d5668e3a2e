"""Checks that the devices named in placement arguments (device maps, offloading, KV-cache placement) exist.

Without them a missing device surfaces late and obscurely ("Torch not compiled with CUDA enabled", "invalid device
ordinal", "Cannot access accelerator device when none is available") from deep inside accelerate or PyTorch. These
checks name the argument, the device and what this machine has instead.
"""

from typing import Any, Dict, List, Optional, Union

import torch

# `device_map` strings that name a placement strategy rather than a device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Placements accelerate accepts besides devices.
NON_DEVICE_PLACEMENTS = ("disk", "meta")


def available_devices() -> List[str]:
    """The devices of this machine: `"cpu"` and each accelerator (`"cuda:0"`, ...)."""
    devices = ["cpu"]
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        devices += [f"{kind}:{index}" for index in range(torch.accelerator.device_count())]
    return devices


def check_device(
    device: Union[str, int, torch.device], argument: str, hint: str = "", described_as: Optional[str] = None
) -> torch.device:
    """`device` as a `torch.device`, or a `ValueError` naming `argument` when this machine does not have it.

    An integer means that accelerator index (as in accelerate's device maps). The error starts with `described_as`
    (default: `argument=device`)."""
    if isinstance(device, int):
        kind = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cuda"
        resolved = torch.device(kind, device)
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"{described_as or f'{argument}={device!r}'} is not a device ({error}).") from None
    if resolved.type in ("cpu", "meta"):
        return resolved
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or resolved.type != accelerator.type or (resolved.index or 0) >= torch.accelerator.device_count():
        raise ValueError(
            f"{described_as or f'{argument}={device!r}'} names a device this machine does not have (available: "
            f"{', '.join(available_devices())}).{' ' + hint if hint else ''}"
        )
    return resolved


def check_device_map(device_map: Any, max_memory: Optional[Dict[Any, Any]] = None) -> None:
    """Raise a clear error when a `device_map` (string, device, or `{module: device}`) or the keys of `max_memory`
    name devices this machine does not have."""
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        placements = []
    elif isinstance(device_map, dict):
        placements = [(f"device_map[{name!r}]", device) for name, device in device_map.items()]
    elif device_map is not None:
        placements = [("device_map", device_map)]
    else:
        placements = []
    placements = [(f"{argument}={device!r}", device) for argument, device in placements]
    placements += [(f"max_memory (key {key!r})", key) for key in (max_memory or {})]
    for described_as, device in placements:
        if isinstance(device, str) and device in NON_DEVICE_PLACEMENTS:
            continue
        check_device(
            device,
            "device_map",
            hint="Name only devices this machine has; to plan a multi-GPU placement without the GPUs, call "
            "accelerate's `infer_auto_device_map` on a model built on the meta device.",
            described_as=described_as,
        )
