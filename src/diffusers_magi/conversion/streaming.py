"""Loading a component from its original weights one tensor at a time, into a model built on the meta device.

A component's conversion is described by a `ConversionSpec` (how original names map onto the model's, how a tensor's
layout changes, which tensors combine into one). `plan_component` runs that conversion on meta tensors made from the
safetensors headers: it finds the missing, unexpected and mis-shaped tensors and the memory the load needs without
reading any data (this is what `inspect_original` and `magi-convert --dry-run` print). `load_component` then reads the
used tensors one at a time, converts and casts each, moves it to its device and assigns it into the meta model, so a
load holds about one copy of the weights (plus one tensor in flight) wherever they go.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from diffusers.utils import logging

from .original_checkpoint import SafetensorsWeights

logger = logging.get_logger(__name__)

Tensors = Dict[str, torch.Tensor]


def _keep(name: str, tensor: torch.Tensor) -> Tuple[str, torch.Tensor]:
    return name, tensor


@dataclass
class ConversionSpec:
    """How the tensors of an original component become the model's.

    Attributes:
        rename (`Callable[[str], Optional[str]]`): original name -> model name, `None` for a name it does not know.
        transform (`Callable`): `(model name, tensor) -> (model name, tensor)`, a per-tensor layout change (it must
            work on meta tensors too).
        group_of (`Callable`, *optional*): model name -> key of a group of tensors that `combine` turns into one, or
            `None`.
        group_members (`Callable`, *optional*): group key -> the set of model names the group needs.
        combine (`Callable`, *optional*): `(key, {name: tensor}) -> (model name, tensor)`.
        dtype_for (`Callable`): `(model name, expected tensor) -> dtype` the model holds it in; `None` keeps the stored
            dtype.
        ignored (`Callable`, *optional*): original names dropped silently (e.g. a T5 decoder).
        optional (`FrozenSet[str]`): model tensors that may be absent (tied weights).
        extra (`Dict[str, torch.Tensor]`): tensors from elsewhere (e.g. the special tokens), added as they are.
    """

    rename: Callable[[str], Optional[str]]
    transform: Callable[[str, torch.Tensor], Tuple[str, torch.Tensor]] = _keep
    group_of: Optional[Callable[[str], Optional[str]]] = None
    group_members: Optional[Callable[[str], FrozenSet[str]]] = None
    combine: Optional[Callable[[str, Tensors], Tuple[str, torch.Tensor]]] = None
    dtype_for: Callable[[str, torch.Tensor], Optional[torch.dtype]] = lambda name, expected: None
    ignored: Optional[Callable[[str], bool]] = None
    optional: FrozenSet[str] = frozenset()
    extra: Tensors = field(default_factory=dict)


@dataclass
class ComponentPlan:
    """What loading one component will read and build, found from the headers alone.

    Attributes:
        component (`str`): `"transformer"`, `"vae"` or `"text_encoder"`.
        source (`str`): the weight folder or file.
        outputs (`Dict[str, torch.Tensor]`): model tensors in the order a load produces them, as meta tensors of
            their final shape and dtype.
        used (`List[str]`): original tensors read.
        missing (`List[str]`): model tensors no original tensor provides.
        unexpected (`List[str]`): original tensors the model does not use (skipped, with a warning).
        ignored (`List[str]`): original tensors dropped silently (e.g. a T5 decoder).
        mis_shaped (`Dict[str, Tuple[tuple, tuple]]`): model name -> (shape from the checkpoint, shape the config
            implies).
        unlisted (`Dict[str, List[str]]`): per shard, tensors its index does not list (not read).
        stored_dtypes (`Dict[str, int]`): number of used original tensors per stored dtype.
        stored_bytes (`int`): bytes read.
        model_bytes (`int`): bytes of the loaded model's weights.
        largest_tensor_bytes (`int`): the largest tensor in flight during the load (read, then cast).
    """

    component: str
    source: str
    outputs: Tensors
    used: List[str]
    missing: List[str]
    unexpected: List[str]
    ignored: List[str]
    mis_shaped: Dict[str, Tuple[tuple, tuple]]
    unlisted: Dict[str, List[str]]
    stored_dtypes: Dict[str, int]
    stored_bytes: int
    model_bytes: int
    largest_tensor_bytes: int

    @property
    def ok(self) -> bool:
        """Whether the component can be loaded (nothing missing or mis-shaped)."""
        return not self.missing and not self.mis_shaped

    @property
    def memory_needed(self) -> int:
        """Bytes a load needs: the model's weights plus the largest tensor in flight."""
        return self.model_bytes + self.largest_tensor_bytes

    def raise_for_errors(self) -> None:
        """Raise a `ValueError` naming the missing and mis-shaped tensors, if any."""
        problems = []
        if self.missing:
            problems.append(f"it lacks tensor(s) the model needs: {self.missing[:10]} ({len(self.missing)} in all)")
        if self.mis_shaped:
            shapes = [
                f"{name} has shape {got}, the config implies {want}" for name, (got, want) in self.mis_shaped.items()
            ]
            problems.append(f"mis-shaped tensor(s): {'; '.join(shapes[:10])} ({len(shapes)} in all)")
        if problems:
            raise ValueError(
                f"The {self.component} weights {self.source} do not fit the config: {'; '.join(problems)}."
            )

    def warn_unexpected(self) -> None:
        """One warning listing the original tensors the model does not use (the original loader skips them too)."""
        if self.unexpected:
            logger.warning(
                f"{self.source} holds {len(self.unexpected)} tensor(s) the {self.component} does not use; they are "
                f"skipped, as the original loader (strict=False) skips them: {self.unexpected[:20]}"
            )


def _converted(
    items: Iterable[Tuple[str, torch.Tensor]], spec: ConversionSpec, expected: Tensors
) -> Iterator[Tuple[str, List[str], Optional[str], Any]]:
    """The conversion as a stream of `(kind, original names, model name, tensor)`, `kind` being `"tensor"`,
    `"unexpected"`, `"ignored"` or `"incomplete"` (a group missing members; the tensor slot holds the absent names).
    The same code runs on meta tensors (planning) and on real ones (loading)."""
    groups: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    for original, tensor in items:
        if spec.ignored is not None and spec.ignored(original):
            yield "ignored", [original], None, None
            continue
        renamed = spec.rename(original)
        if renamed is None:
            yield "unexpected", [original], None, None
            continue
        name, tensor = spec.transform(renamed, tensor)
        key = spec.group_of(name) if spec.group_of is not None else None
        if key is not None:
            parts = groups.setdefault(key, {})
            parts[name] = (original, tensor)
            if set(parts) >= spec.group_members(key):
                del groups[key]
                out_name, out = spec.combine(key, {part: value for part, (_, value) in parts.items()})
                originals = [source for source, _ in parts.values()]
                yield ("tensor" if out_name in expected else "unexpected"), originals, out_name, out
            continue
        yield ("tensor" if name in expected else "unexpected"), [original], name, tensor
    for key, parts in groups.items():
        yield "incomplete", [source for source, _ in parts.values()], key, sorted(spec.group_members(key) - set(parts))
    for name, tensor in spec.extra.items():
        yield "tensor", [], name, tensor


def _target(tensor: torch.Tensor, name: str, spec: ConversionSpec, expected: Tensors) -> Optional[torch.dtype]:
    dtype = spec.dtype_for(name, expected[name])
    return tensor.dtype if dtype is None else dtype


def plan_component(
    component: str, model: torch.nn.Module, weights: SafetensorsWeights, spec: ConversionSpec
) -> ComponentPlan:
    """Plan loading `weights` into `model` (built on the meta device) with `spec`, from the headers alone."""
    expected = model.state_dict()
    outputs, used, unexpected, ignored, mis_shaped, missing = {}, [], [], [], {}, []
    largest = 0
    items = ((name, entry.meta()) for name, entry in weights.entries.items())
    for kind, originals, name, tensor in _converted(items, spec, expected):
        if kind == "ignored":
            ignored += originals
        elif kind == "unexpected":
            unexpected += originals
        elif kind == "incomplete":
            used += originals
            missing += tensor
        else:
            used += originals
            if tuple(tensor.shape) != tuple(expected[name].shape):
                mis_shaped[name] = (tuple(tensor.shape), tuple(expected[name].shape))
                continue
            out = tensor.to(_target(tensor, name, spec, expected))
            outputs[name] = out
            read = sum(weights.entries[original].nbytes for original in originals)
            copied = out.dtype != tensor.dtype or len(originals) > 1 or name in spec.extra
            largest = max(largest, read + (out.numel() * out.element_size() if copied else 0))
    missing += sorted(set(expected) - set(outputs) - set(mis_shaped) - set(spec.optional))
    stored_dtypes = Counter(str(weights.entries[name].dtype).replace("torch.", "") for name in used)
    return ComponentPlan(
        component=component,
        source=weights.source,
        outputs=outputs,
        used=used,
        missing=sorted(set(missing)),
        unexpected=unexpected,
        ignored=ignored,
        mis_shaped=mis_shaped,
        unlisted=weights.unlisted,
        stored_dtypes=dict(sorted(stored_dtypes.items())),
        stored_bytes=sum(weights.entries[name].nbytes for name in used),
        model_bytes=sum(t.numel() * t.element_size() for t in outputs.values()),
        largest_tensor_bytes=largest,
    )


def converted_tensors(
    model: torch.nn.Module, weights: SafetensorsWeights, spec: ConversionSpec, plan: ComponentPlan
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Read the tensors `plan` uses one at a time and yield each converted model tensor, cast to its final dtype, in
    the order of `plan.outputs`."""
    expected = model.state_dict()
    for kind, _, name, tensor in _converted(weights.read(plan.used), spec, expected):
        if kind != "tensor":
            continue  # cannot happen for a plan without errors
        dtype = _target(tensor, name, spec, expected)
        # A fresh tensor of its own even when the dtype does not change (an extra tensor may be shared with others).
        yield name, tensor.to(dtype) if tensor.dtype != dtype else tensor


def _device_for(name: str, device_map: Dict[str, Union[str, torch.device]]) -> torch.device:
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ValueError(f"device_map places no module holding {name}; add an entry for it (or '' for the rest).")
    return torch.device(device_map[best])


def resolve_device_map(
    model: torch.nn.Module, plan: ComponentPlan, device=None, device_map=None, max_memory=None
) -> Dict[str, torch.device]:
    """One `{module prefix: device}` map from `device` or `device_map` (a dict, or an accelerate strategy such as
    `"auto"` planned on the meta model with the planned dtypes). `"disk"` placements are refused: a streamed load
    writes nothing; convert the checkpoint with `magi-convert` and load the folder with
    `from_pretrained(device_map=...)` to spill to disk."""
    from ..placement import DEVICE_MAP_STRATEGIES, check_device, check_device_map

    if device is not None and device_map is not None:
        raise ValueError("Pass `device` or `device_map`, not both.")
    if device_map is None:
        return {"": check_device(device if device is not None else "cpu", "device")}
    check_device_map(device_map, max_memory)
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        _assign_all(model, plan.outputs)  # meta tensors of the final dtypes, so the planner counts the right sizes
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map != "sequential" and max_memory is None:
            max_memory = get_balanced_memory(
                model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    elif not isinstance(device_map, dict):
        device_map = {"": device_map}
    if "disk" in device_map.values():
        raise ValueError(
            "device_map places modules on 'disk', which a load from the original layout cannot do (it writes "
            "nothing); convert the checkpoint with magi-convert and load the folder with "
            "from_pretrained(device_map=...)."
        )
    return {
        prefix: torch.device(place) if not isinstance(place, int) else check_device(place, "device_map")
        for prefix, place in device_map.items()
    }


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise ValueError(f"{type(model).__name__} has no parameter or buffer {name}.")


def _assign_all(model: torch.nn.Module, tensors: Tensors) -> None:
    for name, tensor in tensors.items():
        _assign(model, name, tensor)


def load_component(
    model: torch.nn.Module,
    weights: SafetensorsWeights,
    spec: ConversionSpec,
    plan: ComponentPlan,
    device=None,
    device_map=None,
    max_memory=None,
) -> torch.nn.Module:
    """Fill `model` (built on the meta device) with the weights `plan` reads, one tensor at a time, each sent straight
    to its device (`device`, default CPU, or by `device_map`); returns the model in eval mode, dispatched with
    accelerate hooks when the map names more than one device.

    Raises:
        ValueError: `plan` has missing or mis-shaped tensors, or a model tensor is left on the meta device.
    """
    plan.raise_for_errors()
    plan.warn_unexpected()
    placement = resolve_device_map(model, plan, device=device, device_map=device_map, max_memory=max_memory)
    for name, tensor in converted_tensors(model, weights, spec, plan):
        _assign(model, name, tensor.to(_device_for(name, placement)))
        del tensor
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise ValueError(f"The {plan.component} weights {plan.source} lack {left[:10]} ({len(left)} in all).")
    if len(set(placement.values())) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={prefix: str(place) for prefix, place in placement.items()})
    return model.eval()
