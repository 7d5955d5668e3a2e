"""Saving and resuming a `MagiSession`: one safetensors file, tensors in the body and a JSON description in its
header metadata (no pickle; readable with `safetensors.safe_open(path, "pt").metadata()`).

Saved: the settings, the plan position, the chunks in flight, the KV cache and the clean latents of its chunks, the
captions and prompt switches, the unconditional caption, the prefix latents, the initial noise when it was given,
the random generators' states, and a fingerprint of the model (transformer and scheduler configs, a hash of the
learned caption tokens) that a resuming pipeline must match.
"""

import json
import os
import tempfile
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .session_magi import SESSION_FORMAT, SESSION_FORMAT_VERSION, MagiSession, MagiSessionSettings, _model_fingerprint

METADATA_KEY = "magi_session"


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
        "model": session._model_fingerprint,
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
        raise ValueError(f"path {path!r}: the directory {folder!r} does not exist; create it first or choose another path.")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; pass a file path such as {os.path.join(path, 'session.safetensors')!r}.")
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
            details = ", ".join(f"{key}: saved {saved[part].get(key)!r}, here {current[part].get(key)!r}" for key in differing[:5])
            raise ValueError(
                f"The session state {path!r} was saved by a pipeline with a different {part.replace('_', ' ')} "
                f"({details}); resume it with the model that saved it."
            )
    if saved["learned_tokens_sha256"] != current["learned_tokens_sha256"]:
        raise ValueError(
            f"The session state {path!r} was saved by a transformer with different weights (its learned caption tokens "
            "differ); resume it with the model that saved it."
        )
