"""Writing a converted pipeline as a Hub-ready Diffusers folder, and pushing it to the Hub.

The folder is what `MagiPipeline.save_pretrained` writes (`model_index.json` naming the library `diffusers_magi`,
one subfolder per component, safetensors sharded with an index above `max_shard_size`) plus:

* `README.md`, the model card;
* small wrapper files. Diffusers refuses to download a repository whose `model_index.json` names a library it does not
  know unless `<component>/<library>.py` exists, so `transformer/`, `vae/` and `scheduler/` get a `diffusers_magi.py`
  that imports the class from the installed package; and a root `pipeline_magi.py` that does the same for the
  pipeline, so that `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_magi", trust_remote_code=True)`
  works without importing `diffusers_magi` first. The wrappers contain no implementation: the package must be
  installed.

The folder appears complete or not at all: everything is written into a hidden sibling folder (`.<name>.partial-*`)
that is renamed into place at the end, and removed on any error (a folder left by a killed run is removed by the next
run into the same output). Nothing the user keeps is replaced: an output at, inside or around an input is refused,
and `overwrite` replaces only an empty folder or a previous output (a `model_index.json` naming a MAGI-1 pipeline),
never a file.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import logging

logger = logging.get_logger(__name__)

ROOT_WRAPPER = "pipeline_magi.py"
_COMPONENT_CLASSES = {
    "transformer": "MagiTransformer3DModel",
    "vae": "AutoencoderMagi",
    "scheduler": "MagiChunkScheduler",
}
_COMPONENT_WRAPPER = '''"""Loader shim: lets Diffusers resolve this component (library `diffusers_magi` in
model_index.json) when it downloads the repository. The implementation is the installed `diffusers-magi`
package (`pip install diffusers-magi`)."""

from diffusers_magi import {name}  # noqa: F401
'''
_ROOT_WRAPPER = '''"""Loader shim for
`DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_magi", trust_remote_code=True)`: importing the
installed `diffusers-magi` package (`pip install diffusers-magi`) registers its classes with Diffusers; this file
contains no implementation."""

from diffusers_magi import MagiPipeline  # noqa: F401
'''


def write_wrapper_files(folder: str) -> None:
    """Write the root `pipeline_magi.py`, and `<component>/diffusers_magi.py` for every MAGI component folder
    present."""
    with open(os.path.join(folder, ROOT_WRAPPER), "w", encoding="utf-8") as file:
        file.write(_ROOT_WRAPPER)
    for component, name in _COMPONENT_CLASSES.items():
        if os.path.isdir(os.path.join(folder, component)):
            with open(os.path.join(folder, component, "diffusers_magi.py"), "w", encoding="utf-8") as file:
                file.write(_COMPONENT_WRAPPER.format(name=name))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# The pipelines whose folders `save_pretrained` writes with a `model_index.json` (named here, not imported: the
# conversion package never imports the pipelines). `MagiModularPipeline.save_pretrained` writes a
# `modular_model_index.json` instead, so it has no entry.
PIPELINE_CLASSES = ("MagiPipeline", "MagiImageToVideoPipeline", "MagiVideoToVideoPipeline")


def _indexed_class(folder: str) -> Optional[str]:
    """The `_class_name` of `folder`'s `model_index.json`, or `None` without a readable one."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as file:
            name = json.load(file).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_previous_output(folder: str) -> bool:
    """Whether `folder` is a previous output of this package: its `model_index.json` names one of the MAGI-1
    pipelines (`PIPELINE_CLASSES`). Another Diffusers pipeline's folder (e.g. a `StableDiffusionXLPipeline`) is
    not."""
    return _indexed_class(folder) in PIPELINE_CLASSES


def check_output_folder(
    output_dir: Union[str, os.PathLike],
    overwrite: bool = False,
    inputs: Iterable[Optional[Union[str, os.PathLike]]] = (),
) -> str:
    """The absolute output path, checked before a long conversion so that a bad path fails first and nothing the user
    keeps is ever replaced.

    Raises:
        ValueError: `output_dir` is, lies inside, or contains one of `inputs` (the folders and files read).
        FileExistsError: `output_dir` is a file, or a non-empty folder and not `overwrite`; or `overwrite` is set but
            the folder is neither empty nor a previous output of this package (`is_previous_output`).
        NotADirectoryError: a path above `output_dir` is a file.
        PermissionError: the folder that would hold `output_dir` is not writable.
    """
    output_dir = os.path.abspath(str(output_dir))
    real_output = os.path.realpath(output_dir)
    for source in inputs:
        if source is None or not os.path.exists(str(source)):
            continue
        real_source = os.path.realpath(str(source))
        if _inside(real_output, real_source) or _inside(real_source, real_output):
            relation = (
                "is"
                if real_output == real_source
                else "lies inside"
                if _inside(real_output, real_source)
                else "contains"
            )
            raise ValueError(
                f"The output folder {output_dir} {relation} the input {source}; writing there could destroy the "
                "checkpoint being converted. Pick an output folder outside every input."
            )
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} is a file, not a folder; the converter never replaces files.")
    occupied = os.path.isdir(output_dir) and bool(os.listdir(output_dir))
    if occupied and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if occupied and not is_previous_output(output_dir):
        indexed = _indexed_class(output_dir)
        what = f"its model_index.json names {indexed}" if indexed else "it has no model_index.json naming one"
        raise FileExistsError(
            f"{output_dir} is not empty and is not a previous diffusers-magi output ({what}; a MAGI-1 pipeline is "
            f"one of {', '.join(PIPELINE_CLASSES)}); --overwrite only replaces an empty folder or an earlier "
            "conversion. Empty it or pick another folder."
        )
    existing = os.path.dirname(output_dir)
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise NotADirectoryError(f"Cannot create {output_dir}: {existing} is a file, not a folder.")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write into {existing} (to create {output_dir}): permission denied.")
    return output_dir


def remove_leftovers(output_dir: str) -> List[str]:
    """Remove the hidden `.<name>.partial-*` / `.<name>.previous-*` folders a killed run into `output_dir` left next
    to it; returns what was removed."""
    parent, name = os.path.split(output_dir)
    removed = []
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith((f".{name}.partial-", f".{name}.previous-")) and os.path.isdir(
                os.path.join(parent, entry)
            ):
                shutil.rmtree(os.path.join(parent, entry))
                removed.append(os.path.join(parent, entry))
    if removed:
        logger.warning(f"Removed {len(removed)} unfinished folder(s) of an earlier interrupted run: {removed}")
    return removed


def write_folder_atomically(
    output_dir: Union[str, os.PathLike], write: Callable[[str], None], overwrite: bool = False, inputs: Iterable = ()
) -> str:
    """Run `write(folder)` into a hidden sibling folder of `output_dir`, then rename it into place (replacing a
    previous output when `overwrite`); on any error the partial folder is removed and nothing else changes."""
    output_dir = check_output_folder(output_dir, overwrite, inputs)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(output_dir)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        write(partial)
        if os.path.lexists(output_dir):
            previous = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.previous-", dir=parent)
            os.replace(output_dir, os.path.join(previous, "folder"))
            os.replace(partial, output_dir)
            shutil.rmtree(previous)
        else:
            os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output_dir


def save_pipeline_folder(
    pipe: Union[DiffusionPipeline, Dict[str, Any]],
    output_dir: Union[str, os.PathLike],
    model_card_text: str,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    streamed_components: Optional[Dict[str, Callable[[str], None]]] = None,
    inputs: Iterable = (),
) -> str:
    """Save `pipe` as a complete, Hub-ready folder at `output_dir` (see the module docstring); returns its path.

    Args:
        pipe (`MagiPipeline` or `dict`): the pipeline to save, or its keyword arguments (components and settings, as
            `convert_original_components` returns them; `model_index.json` is then written from them).
        output_dir (`str`): the folder to create.
        model_card_text (`str`): contents of `README.md`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): larger weights are split into shards with an index.
        overwrite (`bool`, defaults to `False`): replace an existing output of this converter (see
            `check_output_folder`).
        streamed_components (`dict`, *optional*): component name -> function writing that component's subfolder,
            for components held on the meta device whose weights are streamed from the original files
            (`convert_original_to_diffusers`); the others are saved with their `save_pretrained`.
        inputs: folders and files the conversion reads; an output at, inside or around one is refused.
    """
    streamed_components = streamed_components or {}

    def write(folder: str) -> None:
        if streamed_components or isinstance(pipe, dict):
            components = _write_model_index(pipe, folder)
            for name, component in components.items():
                if name in streamed_components:
                    os.makedirs(os.path.join(folder, name))
                    streamed_components[name](os.path.join(folder, name))
                elif component is not None:
                    component.save_pretrained(os.path.join(folder, name))
        else:
            pipe.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        write_wrapper_files(folder)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
            file.write(model_card_text)

    return write_folder_atomically(output_dir, write, overwrite, inputs)


def _write_model_index(pipe: Union[DiffusionPipeline, Dict[str, Any]], folder: str) -> Dict[str, Any]:
    """Write `model_index.json` of `pipe` (a pipeline, or its keyword arguments) and return its components. From
    keyword arguments the index is the one `MagiPipeline.save_config` writes: each component as `[library, class]`
    (`diffusers_magi` for this package's classes), then the pipeline's settings."""
    if not isinstance(pipe, dict):
        pipe.save_config(folder)
        return pipe.components
    index: Dict[str, Any] = {"_class_name": "MagiPipeline", "_diffusers_version": diffusers.__version__}
    components = {name: pipe.get(name) for name in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer")}
    for name, component in components.items():
        if component is None:
            index[name] = [None, None]
            continue
        library = type(component).__module__.split(".")[0]
        index[name] = [library, type(component).__name__]
    index.update({name: value for name, value in pipe.items() if name not in components})
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as file:
        json.dump(dict(sorted(index.items())), file, indent=2, sort_keys=True)
        file.write("\n")
    return components


def push_folder_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload MAGI-1 pipeline converted with diffusers-magi",
) -> str:
    """Create the model repository `repo_id` if needed and upload `folder` to it with `huggingface_hub`; returns the
    URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
    )
    return str(getattr(commit, "commit_url", commit))
