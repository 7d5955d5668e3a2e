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

The folder appears complete or not at all: everything is written into a temporary sibling folder that is renamed into
place at the end, and removed on any error.
"""

import os
import shutil
import tempfile
from typing import Optional, Union

from ..pipelines.pipeline_magi import MagiPipeline

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


def check_output_folder(output_dir: Union[str, os.PathLike], overwrite: bool = False) -> str:
    """The absolute output path; raises `FileExistsError` when it exists and is not an empty folder, unless
    `overwrite`. Call it before a long conversion so that a bad path fails first."""
    output_dir = os.path.abspath(str(output_dir))
    occupied = os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir))
    if occupied and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return output_dir


def save_pipeline_folder(
    pipe: MagiPipeline,
    output_dir: Union[str, os.PathLike],
    model_card_text: str,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
) -> str:
    """Save `pipe` as a complete, Hub-ready folder at `output_dir` (see the module docstring); returns its path.

    Args:
        pipe (`MagiPipeline`): the pipeline to save.
        output_dir (`str`): the folder to create.
        model_card_text (`str`): contents of `README.md`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): larger weights are split into shards with an index.
        overwrite (`bool`, defaults to `False`): replace an existing non-empty `output_dir`.
    """
    output_dir = check_output_folder(output_dir, overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        pipe.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        write_wrapper_files(partial)
        with open(os.path.join(partial, "README.md"), "w", encoding="utf-8") as file:
            file.write(model_card_text)
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
