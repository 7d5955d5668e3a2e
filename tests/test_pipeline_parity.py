"""The whole chunk-wise sampler against the original: every DiT case of kind `sampler` (except fp8 checkpoints, which
have their own test) is converted by `convert_original_components` and run through the pipeline, with the recorded noise injected as
`latents`, the recorded text embedding and prefix; every yielded chunk, in order, must satisfy
max|ours - reference| / max(1, max|reference|) <= 1e-4 in float32."""

import json

import pytest

from diffusers_magi import MagiImageToVideoPipeline, MagiPipeline, MagiVideoToVideoPipeline
from diffusers_magi import MagiPipeline
from diffusers_magi.conversion.pipeline import convert_original_components

from .conftest import FULL_REFERENCE, relative_max_error
from .reference_cases import DIT_DIR, ENV_FLAG_TO_SPECIAL_TOKEN, Case, dit_case_names

TOLERANCE = 1e-4
SAMPLER_CASES = dit_case_names("sampler")
PIPELINES = {"t2v": MagiPipeline, "i2v": MagiImageToVideoPipeline, "v2v": MagiVideoToVideoPipeline}


def run_recorded_sampler(name: str, output_type: str = "latent"):
    """Run a recorded sampler case through our pipeline; returns (streamed chunks, case)."""
    case = Case(name)
    folder = DIT_DIR / name
    description = case.description
    original = json.loads((folder / "config.json").read_text())
    runtime = original["runtime_config"]
    checkpoint = DIT_DIR / description["checkpoint"]["load_dir"]
    pipe = MagiPipeline(
        **convert_original_components(str(folder / "config.json"), str(checkpoint), str(folder / "special_tokens.npz"))
    )
    pipe = PIPELINES[description.get("mode", "t2v")].from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)

    flags = description["env_flags"]
    special_tokens = [token for flag, token in ENV_FLAG_TO_SPECIAL_TOKEN.items() if flags.get(flag) == "1"]
    kwargs = dict(
        prompt_embeds=case.inputs["caption_embs"][:, 0],
        prompt_attention_mask=case.inputs["emb_masks"],
        latents=case.inputs["noise"],
        height=runtime["video_size_h"],
        width=runtime["video_size_w"],
        num_frames=runtime["num_frames"],
        num_inference_steps=runtime["num_steps"],
        special_tokens=special_tokens,
        negative_special_tokens=flags.get("NEG_PROMPT") == "1",
        output_type=output_type,
    )
    if flags.get("prev_chunks_scale", "unset") != "unset":
        kwargs["nearly_clean_weight"] = float(flags["prev_chunks_scale"])
    if "prefix_video" in case.inputs:
        kwargs["prefix_latents"] = case.inputs["prefix_video"]
    return list(pipe.stream(**kwargs)), case, pipe, kwargs


def test_sampler_cases_are_found(reference_dir):
    assert "e_sampler_t2v_base" in SAMPLER_CASES
    if FULL_REFERENCE:  # image-to-video sampling is in the full set only
        assert "e_sampler_i2v_base" in SAMPLER_CASES


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_sampler_case(reference_dir, name):
    chunks, case, pipe, kwargs = run_recorded_sampler(name)
    recorded = case.description["outputs"]["chunks (in yield order)"]
    assert [chunk.chunk_index for chunk in chunks] == [entry["chunk_index"] for entry in recorded]
    for chunk, entry in zip(chunks, recorded):
        reference = case.outputs[entry["key"]]
        assert chunk.frames.shape == reference.shape
        error = relative_max_error(chunk.frames, reference)
        assert error <= TOLERANCE, f"{name} chunk {chunk.chunk_index}: relative max error {error:.3e}"

    # The non-streaming call returns the same chunks, concatenated along time.
    whole = pipe(**kwargs).frames
    assert whole.shape[2] == sum(chunk.frames.shape[2] for chunk in chunks)
    offset = 0
    for chunk in chunks:
        frames = chunk.frames.shape[2]
        assert (whole[:, :, offset : offset + frames] == chunk.frames).all()
        offset += frames
