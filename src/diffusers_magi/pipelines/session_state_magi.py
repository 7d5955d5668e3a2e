"""Saving and resuming a `MagiSession`: one safetensors file, tensors in the body and a JSON description in its
header metadata (no pickle; readable with `safetensors.safe_open(path, "pt").metadata()`).

Saved: the settings, the plan position, the chunks in flight, the KV cache and the clean latents of its chunks, the
captions and prompt switches, the unconditional caption, the prefix latents, the initial noise when it was given,
the random generators' states, the pipeline class, and a fingerprint of the model (transformer and scheduler
configs, a hash of the learned caption tokens, and `weights_fingerprint` of the transformer) that a resuming pipeline
must match.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .session_magi import SESSION_FORMAT, SESSION_FORMAT_VERSION, MagiSession, MagiSessionSettings, _model_fingerprint

METADATA_KEY = "magi_session"
# `weights_fingerprint` reads at most FINGERPRINT_RUNS runs of FINGERPRINT_RUN_LENGTH consecutive values per tensor.
FINGERPRINT_RUNS = 64
FINGERPRINT_RUN_LENGTH = 32
_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def save_session_state(session: MagiSession, path: Union[str, os.PathLike]) -> str:
    path = _check_save_path(path)
    tensors: Dict[str, torch.Tensor] = {
        "captions.embeds": session._caption_embeds,
        "captions.masks": session._caption_masks,
        "switches.rows": torch.stack([rows for _, rows in session._caption_switches]),
        "negative.embeds": session._negative[0],
        "negative.masks": session._negative[1],
    }
    if session._prefix_latents is not None:
        tensors["prefix_latents"] = session._prefix_latents
    if session._latents is not None:
        tensors["latents"] = session._latents
    if session._recache_rows is not None:
        tensors["recache.rows"] = session._recache_rows
    tensors.update({f"chunk_latents.{chunk}": value for chunk, value in session._chunk_latents.items()})
    tensors.update({f"cached_latents.{chunk}": value for chunk, value in session._cached_latents.items()})
    tensors.update({f"kv_cache.{name}": value for name, value in session._cache.state_dict().items()})
    tensors.update({f"generators.{number}": g.get_state() for number, g in enumerate(session._generators)})
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}

    settings = asdict(session.settings)
    try:
        json.dumps(settings["attention_kwargs"])
    except TypeError as error:
        raise TypeError(
            f"attention_kwargs {session.settings.attention_kwargs!r} cannot be saved as JSON ({error}); start the "
            "session with JSON-serialisable attention_kwargs (numbers, strings, lists, dicts) to save it."
        ) from None
    description = {
        "format": SESSION_FORMAT,
        "version": SESSION_FORMAT_VERSION,
        "pipeline_class": type(session.pipeline).__name__,
        "settings": settings,
        "call_index": session._call_index,
        "next_new_chunk": session._next_new_chunk,
        "chunks_done": session._chunks_done,
        "switch_chunks": [first_chunk for first_chunk, _ in session._caption_switches],
        "generator_devices": [str(g.device) for g in session._generators],
        "callback_on_step_end_tensor_inputs": session.callback_on_step_end_tensor_inputs,
        "model": {
            **session._model_fingerprint,
            "transformer_weights": weights_fingerprint(session.pipeline.transformer),
        },
    }
    folder = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(prefix=".magi-session-", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={METADATA_KEY: json.dumps(description)})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def load_session_state(
    pipeline,
    path: Union[str, os.PathLike],
    callback_on_step_end: Optional[Callable] = None,
    callback_on_step_end_tensor_inputs: Optional[Sequence[str]] = None,
) -> MagiSession:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} is not a file; pass the file `session.save(path)` wrote.")
    try:
        with safe_open(path, framework="pt") as state:
            metadata = state.metadata() or {}
            tensors = {name: state.get_tensor(name) for name in state.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(
            f"path {path!r} is not a complete session state (corrupt or truncated file: {error}); resume from another "
            "saved state or start a new session."
        ) from None
    try:
        description = json.loads(metadata[METADATA_KEY])
        if description.get("format") != SESSION_FORMAT:
            raise KeyError("format")
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"path {path!r} is a safetensors file but not a saved MAGI-1 session state.") from None
    if description["version"] != SESSION_FORMAT_VERSION:
        raise ValueError(
            f"path {path!r} holds a session state of format version {description['version']}; this diffusers-magi "
            f"reads version {SESSION_FORMAT_VERSION}."
        )
    if description["pipeline_class"] != type(pipeline).__name__:
        raise ValueError(
            f"The session state {path!r} was saved by a {description['pipeline_class']}, not a "
            f"{type(pipeline).__name__}; resume it with that class ({description['pipeline_class']}.from_pipe(pipe)"
            ".resume_session(path))."
        )
    _check_model(pipeline, description["model"], path)

    device = pipeline._execution_device
    settings = description["settings"]
    settings["latent_size"] = tuple(settings["latent_size"])
    settings["special_tokens"] = tuple(settings["special_tokens"])
    settings = MagiSessionSettings(**settings)

    def tensor(name):
        return tensors[name].to(device)

    generators = []
    for number, generator_device in enumerate(description["generator_devices"]):
        try:
            generator = torch.Generator(device=generator_device)
        except RuntimeError:
            raise ValueError(
                f"The saved session drew its noise with a generator on {generator_device!r}, which this machine does "
                "not have; resume it on a machine with that device."
            ) from None
        generator.set_state(tensors[f"generators.{number}"])
        generators.append(generator)

    switch_rows = tensors["switches.rows"].to(device)
    session = MagiSession(
        pipeline,
        settings,
        captions=(tensor("captions.embeds"), tensor("captions.masks")),
        caption_switches=[(first, switch_rows[number]) for number, first in enumerate(description["switch_chunks"])],
        negative=(tensor("negative.embeds"), tensor("negative.masks")),
        prefix_latents=tensor("prefix_latents") if "prefix_latents" in tensors else None,
        generators=generators,
        latents=tensors["latents"] if "latents" in tensors else None,
        callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs
        or description["callback_on_step_end_tensor_inputs"],
    )
    session._chunk_latents = _indexed(tensors, "chunk_latents.", device)
    session._cached_latents = _indexed(tensors, "cached_latents.", device)
    session._cache.load_state_dict(
        {name[len("kv_cache.") :]: value.to(device) for name, value in tensors.items() if name.startswith("kv_cache.")}
    )
    session._recache_rows = tensors["recache.rows"].to(device) if "recache.rows" in tensors else None
    session._call_index = description["call_index"]
    session._next_new_chunk = description["next_new_chunk"]
    session._chunks_done = description["chunks_done"]
    return session


def _indexed(tensors: Dict[str, torch.Tensor], prefix: str, device) -> Dict[int, torch.Tensor]:
    return {int(name[len(prefix) :]): value.to(device) for name, value in tensors.items() if name.startswith(prefix)}


def _check_save_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"path {path!r}: the directory {folder!r} does not exist; create it first or choose another path."
        )
    if os.path.isdir(path):
        raise ValueError(
            f"path {path!r} is a directory; pass a file path such as {os.path.join(path, 'session.safetensors')!r}."
        )
    if os.path.exists(path) and not _is_session_file(path):
        raise ValueError(
            f"path {path!r} exists and is not a saved session state; refusing to overwrite it. Choose another path."
        )
    return path


def _is_session_file(path: str) -> bool:
    try:
        with safe_open(path, framework="pt") as state:
            return METADATA_KEY in (state.metadata() or {})
    except Exception:
        return False


def _check_model(pipeline, saved: Dict[str, Any], path: str) -> None:
    current = _model_fingerprint(pipeline, pipeline.transformer.caption_tokens())
    for part in ("transformer_config", "scheduler_config"):
        keys = sorted(set(saved[part]) | set(current[part]))
        differing = [key for key in keys if saved[part].get(key) != current[part].get(key)]
        if differing:
            details = ", ".join(
                f"{key}: saved {saved[part].get(key)!r}, here {current[part].get(key)!r}" for key in differing[:5]
            )
            raise ValueError(
                f"The session state {path!r} was saved by a pipeline with a different {part.replace('_', ' ')} "
                f"({details}); resume it with the model that saved it."
            )
    if "transformer_weights" in saved:  # states saved before the weights fingerprint existed have none
        _check_weights(saved["transformer_weights"], weights_fingerprint(pipeline.transformer), path)
    if saved["learned_tokens_sha256"] != current["learned_tokens_sha256"]:
        raise ValueError(
            f"The session state {path!r} was saved by a transformer with different weights (its learned caption tokens "
            "differ); resume it with the model that saved it."
        )


def _check_weights(saved: Dict[str, Any], current: Dict[str, Any], path: str) -> None:
    if saved["sha256"] == current["sha256"]:
        return
    saved_tensors, current_tensors = saved["tensors"], current["tensors"]
    differences = [f"{name} missing here" for name in saved_tensors if name not in current_tensors]
    differences += [f"{name} not in the saved model" for name in current_tensors if name not in saved_tensors]
    for name in saved_tensors.keys() & current_tensors.keys():
        (saved_dtype, saved_shape, saved_digest), (dtype, shape, digest) = saved_tensors[name], current_tensors[name]
        if (saved_dtype, saved_shape) != (dtype, shape):
            differences.append(f"{name}: saved {saved_dtype} {saved_shape}, here {dtype} {shape}")
        elif saved_digest != digest:
            differences.append(f"{name}: values differ")
    more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
    raise ValueError(
        f"The session state {path!r} was saved by a transformer with different weights: the transformer's weights "
        f"differ (fingerprint saved {saved['sha256'][:16]}, here {current['sha256'][:16]}: "
        f"{'; '.join(sorted(differences)[:5])}{more}); resume it with the weights that saved it."
    )


def weights_fingerprint(model: torch.nn.Module) -> Dict[str, Any]:
    """A cheap fingerprint of a model's weights: for every parameter and persistent buffer, a SHA-256 of its name,
    dtype, shape and a fixed sample of its values (`FINGERPRINT_RUNS` evenly spaced runs of
    `FINGERPRINT_RUN_LENGTH` consecutive values of the flattened tensor, their bytes in the tensor's own dtype, so
    float8 or quantised weights too); and one SHA-256 over all of them.

    The values are read where they are kept: on the model's devices, in accelerate's offload maps for weights on
    the meta device (sequential offloading), in Diffusers' group-offloading files for groups offloaded to disk;
    tensor subclasses (torchao) through their inner tensors. A few thousand values per tensor, copied to the CPU:
    well under a second for a 4.5B transformer on a GPU.

    Returns:
        `dict`: `{"sha256": ..., "tensors": {name: [dtype, shape, sha256 of that tensor (16 hex digits)]}}`.
    """
    disk_files = _disk_offloaded_tensors(model)
    tensors = {}
    for name, tensor, stored in _named_stored_weights(model, disk_files):
        digest = hashlib.sha256(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(_sample_bytes(stored))
        tensors[name] = [str(tensor.dtype).replace("torch.", ""), list(tensor.shape), digest.hexdigest()[:16]]
    overall = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {"sha256": overall, "tensors": tensors}


def _named_stored_weights(model: torch.nn.Module, disk_files) -> Iterator[Tuple[str, torch.Tensor, Any]]:
    """`(name, tensor, stored values)` for every parameter and persistent buffer; the stored values are the tensor
    itself, or what offloading keeps in its place: a CPU tensor, or `(file, key)` of a group-offloading file."""
    for module_name, module in model.named_modules():
        local = list(module._parameters.items()) + [
            (name, buffer)
            for name, buffer in module._buffers.items()
            if name not in module._non_persistent_buffers_set
        ]
        for local_name, tensor in local:
            if tensor is None:
                continue
            name = f"{module_name}.{local_name}" if module_name else local_name
            if id(tensor) in disk_files:
                yield name, tensor, disk_files[id(tensor)]
            elif tensor.device.type == "meta":
                yield name, tensor, _accelerate_offloaded(module, local_name, name)
            elif hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (torchao): its inner tensors
                inner_names, _ = tensor.__tensor_flatten__()
                for inner in inner_names:
                    yield f"{name}:{inner}", getattr(tensor, inner), getattr(tensor, inner)
            else:
                yield name, tensor, tensor


def _accelerate_offloaded(module: torch.nn.Module, local_name: str, name: str) -> torch.Tensor:
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):
        weights_map = getattr(candidate, "weights_map", None)
        if weights_map is not None and local_name in weights_map:
            return weights_map[local_name]
    raise ValueError(
        f"The transformer's {name} is on the meta device and no offloading hook holds its values; load the weights "
        "(or enable offloading through the pipeline) before saving or resuming a session."
    )


def _disk_offloaded_tensors(model: torch.nn.Module) -> Dict[int, Tuple[str, str]]:
    """`id(tensor) -> (file, key)` for the tensors of Diffusers offloading groups that are offloaded to disk (their
    parameters then hold empty placeholders; the values are in the group's safetensors file)."""
    files = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        group = getattr(hook, "group", None)
        if group is not None and group.offload_to_disk_path is not None and group._is_offloaded_to_disk:
            files.update(
                {id(tensor): (group.safetensors_file_path, key) for tensor, key in group.tensor_to_key.items()}
            )
    return files


def _sample_bytes(stored) -> bytes:
    """The bytes of the fixed sample of a tensor's values (see `weights_fingerprint`)."""
    if isinstance(stored, tuple):
        values = _safetensors_bytes(*stored)  # (numel, itemsize) uint8, memory-mapped
    else:
        flat, size = stored.detach().reshape(-1), stored.element_size()
        # Any dtype, by its bytes: an integer view of the same element size needs no kernel for the dtype.
        values = (
            flat.view(_SAME_SIZE_INTEGER[size])
            if size in _SAME_SIZE_INTEGER
            else flat.contiguous().view(torch.uint8).reshape(-1, size)
        )
    count = values.shape[0]
    if count > FINGERPRINT_RUNS * FINGERPRINT_RUN_LENGTH:
        spacing = count // FINGERPRINT_RUNS
        values = values[: FINGERPRINT_RUNS * spacing].reshape(FINGERPRINT_RUNS, spacing, *values.shape[1:])
        values = values[:, :FINGERPRINT_RUN_LENGTH]
    if isinstance(values, torch.Tensor):
        values = values.contiguous().cpu().numpy()
    return np.ascontiguousarray(values).tobytes()


def _safetensors_bytes(path: str, key: str) -> np.ndarray:
    """One tensor of a safetensors file as a memory-mapped `(numel, itemsize)` uint8 array (only the pages sampled
    are read)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        entry = json.loads(file.read(header_size))[key]
    start, end = entry["data_offsets"]
    numel = int(np.prod(entry["shape"], dtype=np.int64))
    if end == start:
        return np.zeros((0, 1), np.uint8)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size + start, shape=(end - start,))
    return data.reshape(numel, (end - start) // numel)
