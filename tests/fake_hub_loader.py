"""Run as a script in a fresh process: load a converted MAGI-1 folder the way a user who never imported
`diffusers_magi` would, through the folder's wrapper files, and save the video it generates.

    python fake_hub_loader.py FOLDER MODE OUTPUT

MODE "hub": the folder is served as the Hub repository `magi-test/converted` by mocked `huggingface_hub` calls (no
network), loaded with `DiffusionPipeline.from_pretrained("magi-test/converted", custom_pipeline="pipeline_magi",
trust_remote_code=True)`. MODE "local": the same call on the local folder path.
"""

import os
import sys
import types
from unittest import mock

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines import pipeline_utils
from diffusers.utils import dynamic_modules_utils, hub_utils

REPO_ID = "magi-test/converted"


def serve(folder):
    """Mocks of the Hub calls Diffusers makes, answering from `folder`."""

    def files():
        return [
            os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            for root, _, names in os.walk(folder)
            for name in names
        ]

    def model_info(repo_id, *args, **kwargs):
        assert repo_id == REPO_ID, repo_id
        return types.SimpleNamespace(
            siblings=[types.SimpleNamespace(rfilename=name) for name in files()], sha="0" * 40
        )

    def hf_hub_download(repo_id, filename, *args, subfolder=None, **kwargs):
        assert repo_id == REPO_ID, repo_id
        path = os.path.join(folder, subfolder or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path

    def snapshot_download(repo_id, *args, **kwargs):
        assert repo_id == REPO_ID, repo_id
        return folder

    return [
        mock.patch.object(pipeline_utils, "model_info", model_info),
        mock.patch.object(pipeline_utils, "hf_hub_download", hf_hub_download),
        mock.patch.object(pipeline_utils, "snapshot_download", snapshot_download),
        mock.patch.object(dynamic_modules_utils, "model_info", model_info),
        mock.patch.object(dynamic_modules_utils, "hf_hub_download", hf_hub_download),
        mock.patch.object(hub_utils, "resolve_revision", lambda repo_id, revision=None, **kwargs: revision),
    ]


def main(folder, mode, output):
    dtype = {"transformer": torch.bfloat16, "default": torch.float32}
    assert "diffusers_magi" not in sys.modules
    if mode == "hub":
        patches = serve(folder)
        for patch in patches:
            patch.start()
        pipe = DiffusionPipeline.from_pretrained(
            REPO_ID, custom_pipeline="pipeline_magi", trust_remote_code=True, dtype=dtype
        )
        for patch in patches:
            patch.stop()
    else:
        pipe = DiffusionPipeline.from_pretrained(
            folder, custom_pipeline="pipeline_magi", trust_remote_code=True, dtype=dtype
        )
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        prompt="a red fox runs through the snow",
        height=32,
        width=32,
        num_frames=48,
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames
    torch.save({"frames": frames, "pipeline_class": type(pipe).__name__}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
