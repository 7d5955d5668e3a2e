"""`MagiModularPipeline`: the `ModularPipeline` that runs `MagiAutoBlocks`."""

import os

from diffusers.modular_pipelines import ModularPipeline


class MagiModularPipeline(ModularPipeline):
    r"""
    MAGI-1 as a Modular Diffusers pipeline: text-, image- and video-to-video through `MagiAutoBlocks` (the inputs
    select the workflow: `image` for image-to-video, `video` for video-to-video). `from_pretrained` reads the
    components of a converted folder (`model_index.json`) or of a modular repository (`modular_model_index.json`,
    written by `save_pretrained`); a repository with its own saved blocks loads those instead.

    Example:

    ```py
    >>> pipe = MagiModularPipeline.from_pretrained("path/to/MAGI-1-4.5B-distill-diffusers")
    >>> pipe.load_components()
    >>> video = pipe(prompt="a red fox runs through snow", height=480, width=480, output="videos")
    ```
    """

    default_blocks_name = "MagiAutoBlocks"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, trust_remote_code=None, **kwargs):
        """Diffusers' `ModularPipeline.from_pretrained`, plus plain converted folders (only a `model_index.json`):
        Diffusers cannot tell which modular pipeline a third-party `model_index.json` belongs to, so for those this
        class builds itself with `MagiAutoBlocks` and the folder's component specs and guidance config."""
        if pretrained_model_name_or_path is not None:
            pretrained_model_name_or_path = os.fspath(pretrained_model_name_or_path)  # Diffusers expects a str
        if pretrained_model_name_or_path is not None and not _has_modular_index(pretrained_model_name_or_path, kwargs):
            init_kwargs = {name: kwargs.pop(name) for name in ("components_manager", "collection", "workflow") if name in kwargs}
            return cls(pretrained_model_name_or_path=pretrained_model_name_or_path, **init_kwargs, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)


def _has_modular_index(pretrained_model_name_or_path, kwargs) -> bool:
    load_kwargs = {name: kwargs[name] for name in ("cache_dir", "local_files_only", "revision", "token") if name in kwargs}
    modular_config, _ = ModularPipeline._load_pipeline_config(pretrained_model_name_or_path, **load_kwargs)
    return modular_config is not None
