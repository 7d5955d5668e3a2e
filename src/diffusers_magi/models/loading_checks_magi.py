"""Checks that make a bad saved folder fail at load, naming what is wrong, instead of at the first call.

* `check_config_types`: every config field a model's `__init__` annotates must have that type (`num_layers: "two"`
  would otherwise surface as "'str' object cannot be interpreted as an integer" from deep inside the constructor).
* `checked_from_pretrained`: `ModelMixin.from_pretrained` with `output_loading_info=True`; any tensor the model needs
  that the weight files lack is an error naming it (Diffusers only logs it, and leaves such a tensor on the meta
  device, or randomly initialised, until the first call fails).
* `check_transformers_weights`: the same for the transformers components of a loaded pipeline (the T5 text encoder):
  transformers initialises a tensor its folder lacks randomly and only logs a load report, so the pipeline would
  encode prompts with random weights; the saved tensor names (safetensors headers) are compared after the load.
"""

import inspect
import json
import os
import re
import typing
from typing import Any, Callable, List, Mapping, Set, Union

_NONE = type(None)


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is _NONE:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.List, typing.Tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        arguments = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
        return all(_matches(item, arguments[0]) for item in value) if len(set(arguments)) == 1 else True
    return True  # types this check does not know are left to the constructor


def _describe(annotation: Any) -> str:
    return (
        str(annotation).replace("typing.", "")
        if typing.get_origin(annotation)
        else getattr(annotation, "__name__", str(annotation))
    )


def check_config_types(cls: type, config: Mapping[str, Any], overrides: Mapping[str, Any] = ()) -> None:
    """Raise a `TypeError` naming the field when a value of `config` (or of `overrides`, keyword arguments that
    replace config values) does not have the type `cls.__init__` annotates for it."""
    hints = typing.get_type_hints(cls.__init__)
    values = {**dict(config), **dict(overrides)}
    for name, annotation in hints.items():
        if name in values and name != "return" and not _matches(values[name], annotation):
            value = values[name]
            raise TypeError(
                f"{cls.__name__} config field `{name}` must be {_describe(annotation)}, got {value!r} "
                f"({type(value).__name__}); fix it in the folder's config.json."
            )


def checked_from_pretrained(cls: type, from_pretrained: Callable, pretrained_model_name_or_path, **kwargs):
    """Run `from_pretrained` (the parent class's) and raise a `ValueError` naming every tensor the model needs that
    the weight files do not hold."""
    wants_info = kwargs.pop("output_loading_info", False)
    model, info = from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        where = pretrained_model_name_or_path
        if kwargs.get("subfolder"):
            where = f"{where} (subfolder {kwargs['subfolder']!r})"
        raise ValueError(
            f"The weights of {cls.__name__} in {where} lack {len(missing)} tensor(s) the model needs: {missing[:10]}. "
            "The folder is incomplete or was written for another config; convert or download it again."
        )
    return (model, info) if wants_info else model


def _saved_tensor_names(folder: str) -> Set[str]:
    """Names of the tensors in `folder`'s safetensors weights (the index's weight map, else the files' headers);
    empty when it holds none (e.g. pickled `pytorch_model.bin` weights, which this check does not read)."""
    from safetensors import safe_open

    names: Set[str] = set()
    entries = sorted(os.listdir(folder))
    for entry in entries:
        if entry.endswith(".safetensors.index.json"):
            with open(os.path.join(folder, entry), encoding="utf-8") as file:
                names.update(json.load(file).get("weight_map", {}))
    if not names:
        for entry in entries:
            if entry.endswith(".safetensors"):
                with safe_open(os.path.join(folder, entry), framework="pt") as file:
                    names.update(file.keys())
    return names


def _missing_saved_tensors(model: Any) -> List[str]:
    """Tensors of the transformers model `model` that the folder it was loaded from (`model.name_or_path`) does not
    hold. A tensor shared by several names (T5's `shared` / `encoder.embed_tokens`) needs one of them; names the class
    allows to be missing (`_keys_to_ignore_on_load_missing`) are left out; a quantized model (whose files store other
    tensors) and a folder without safetensors weights are not checked."""
    from transformers import PreTrainedModel

    folder = getattr(model, "name_or_path", None)
    if not isinstance(model, PreTrainedModel) or not folder or not os.path.isdir(str(folder)):
        return []
    if getattr(model, "hf_quantizer", None) is not None:
        return []
    saved = _saved_tensor_names(str(folder))
    if not saved:
        return []
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None
    saved |= {name[len(prefix) :] for name in saved if prefix and name.startswith(prefix)}
    aliases = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        aliases.setdefault(id(tensor), set()).add(name)
    by_name = {name: aliases[id(tensor)] for name, tensor in tensors}
    ignored = [re.compile(pattern) for pattern in model._keys_to_ignore_on_load_missing or ()]
    return sorted(
        name
        for name in model.state_dict()
        if not by_name.get(name, {name}) & saved and not any(pattern.search(name) for pattern in ignored)
    )


def check_transformers_weights(components: Mapping[str, Any]) -> None:
    """Raise a `ValueError` naming every tensor a transformers component of a loaded pipeline (the T5 text encoder)
    needs that its saved folder does not hold (transformers would have initialised it randomly, with a warning)."""
    for name, component in components.items():
        missing = _missing_saved_tensors(component)
        if missing:
            raise ValueError(
                f"The weights of {type(component).__name__} in {component.name_or_path} (the pipeline's {name}) lack "
                f"{len(missing)} tensor(s) the model needs: {missing[:10]}; transformers would have initialised them "
                "randomly. The folder is incomplete or was written for another config; convert or download it again."
            )
