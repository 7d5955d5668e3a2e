"""Checks that make a bad saved folder fail at load, naming what is wrong, instead of at the first call.

* `check_config_types`: every config field a model's `__init__` annotates must have that type (`num_layers: "two"`
  would otherwise surface as "'str' object cannot be interpreted as an integer" from deep inside the constructor).
* `checked_from_pretrained`: `ModelMixin.from_pretrained` with `output_loading_info=True`; any tensor the model needs
  that the weight files lack is an error naming it (Diffusers only logs it, and leaves such a tensor on the meta
  device, or randomly initialised, until the first call fails).
"""

import inspect
import typing
from typing import Any, Callable, Mapping, Union

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
