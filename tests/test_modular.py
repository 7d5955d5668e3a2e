"""Modular Diffusers blocks (`diffusers_magi.modular`): `MagiModularPipeline` equals the classic pipelines bit for
bit (text-, image- and video-to-video, base and distilled guidance, chunk prompts), a block can be swapped, the
blocks describe themselves, and saving blocks or a modular repository and loading them back (offline) gives the
same output."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers.modular_pipelines import ModularPipeline, ModularPipelineBlocks, PipelineState

from diffusers_magi import MagiImageToVideoPipeline, MagiVideoToVideoPipeline
from diffusers_magi.modular import MagiAutoBlocks, MagiDecodeStep, MagiModularPipeline

from .tiny_models import tiny_pipeline

LATENT = dict(height=32, width=32, num_inference_steps=8, output_type="latent")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def classic():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def folder(classic, tmp_path_factory):
    path = tmp_path_factory.mktemp("converted")
    classic.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def modular(folder):
    pipe = MagiModularPipeline.from_pretrained(folder)
    pipe.load_components()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt="a cat", num_frames=72),
        dict(prompt="a cat", num_frames=48, guidance_mode="distilled"),
        dict(chunk_prompts={0: "a cat", 1: "a dog"}, num_frames=48, negative_prompt="blurry"),
        dict(prompt="a cat", num_frames=24, output_type="np"),
    ],
    ids=["three_branch", "distilled", "chunk_prompts", "decoded"],
)
def test_text_to_video_equals_the_classic_pipeline(classic, modular, kwargs):
    kwargs = {**LATENT, **kwargs}
    expected = classic(generator=_generator(), **kwargs).frames
    videos = modular(generator=_generator(), output="videos", **kwargs)
    assert (torch.equal(videos, expected) if torch.is_tensor(expected) else np.array_equal(videos, expected))


def test_image_and_video_to_video_equal_the_classic_pipelines(classic, modular, tmp_path):
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    kwargs = dict(prompt="a boat", num_frames=48, **LATENT)
    expected = MagiImageToVideoPipeline.from_pipe(classic)(image=image, generator=_generator(), **kwargs).frames
    assert torch.equal(modular(image=image, generator=_generator(), output="videos", **kwargs), expected)

    path = str(tmp_path / "prefix.mp4")
    rng = np.random.default_rng(1)
    imageio.mimwrite(path, [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(16)], fps=24)
    expected = MagiVideoToVideoPipeline.from_pipe(classic)(video=path, num_prefix_frames=8, generator=_generator(), **kwargs).frames
    videos = modular(video=path, num_prefix_frames=8, generator=_generator(), output="videos", **kwargs)
    assert torch.equal(videos, expected)


def test_a_custom_block_replaces_one_of_ours(classic, folder):
    class HalveDecodeStep(MagiDecodeStep):
        """A user's own decode: decodes as usual, then halves the frames."""

        def __call__(self, components, state: PipelineState):
            components, state = super().__call__(components, state)
            state.set("videos", state.get("videos") / 2)
            return components, state

    blocks = MagiAutoBlocks()
    blocks.sub_blocks["decode"] = HalveDecodeStep()
    pipe = blocks.init_pipeline(str(folder))
    pipe.load_components()
    kwargs = dict(prompt="a cat", num_frames=24, **LATENT)
    expected = classic(generator=_generator(), **kwargs).frames
    assert torch.equal(pipe(generator=_generator(), output="videos", **kwargs), expected / 2)


def test_blocks_describe_their_inputs_and_outputs():
    blocks = MagiAutoBlocks()
    described = str(blocks)
    for name in ("input", "prefix", "text_encoder", "prepare", "denoise", "decode", "transformer", "guidance_mode"):
        assert name in described
    doc = blocks.doc
    for name in ("prompt", "chunk_prompts", "num_frames", "generator", "image", "video", "videos"):
        assert name in doc
    assert [type(block).__name__ for block in blocks.get_execution_blocks(image="x").sub_blocks.values()][1] == "MagiImageEncoderStep"
    assert "prefix" not in blocks.get_execution_blocks(prompt="a cat").sub_blocks


def test_saved_blocks_and_a_saved_modular_repository_load_back_offline(classic, modular, folder, tmp_path):
    kwargs = dict(prompt="a cat", num_frames=48, **LATENT)
    expected = classic(generator=_generator(), **kwargs).frames

    MagiAutoBlocks().save_pretrained(tmp_path / "blocks")
    loaded = ModularPipelineBlocks.from_pretrained(str(tmp_path / "blocks"), trust_remote_code=True)
    assert type(loaded).__name__ == "MagiAutoBlocks"
    pipe = loaded.init_pipeline(str(folder))
    pipe.load_components()
    assert torch.equal(pipe(generator=_generator(), output="videos", **kwargs), expected)

    modular.save_pretrained(str(tmp_path / "repo"))
    assert (tmp_path / "repo" / "modular_model_index.json").is_file()
    reloaded = MagiModularPipeline.from_pretrained(tmp_path / "repo")
    reloaded.load_components()
    assert torch.equal(reloaded(generator=_generator(), output="videos", **kwargs), expected)
    assert isinstance(ModularPipeline.from_pretrained(str(tmp_path / "repo")), ModularPipeline)
