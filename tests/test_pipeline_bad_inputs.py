"""Bad requests to the pipelines fail before any heavy work with a clear error naming the argument (issue: errors
before work): wrong types, non-finite tensors, batch/generator mismatches, callback misuse, impossible memory."""

import math
import time

import numpy as np
import pytest
import torch

from diffusers_magi import MagiImageToVideoPipeline

from .tiny_models import tiny_pipeline

KWARGS = dict(prompt="a cat", height=32, width=32, num_frames=24, num_inference_steps=8, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _nan(shape):
    tensor = torch.zeros(shape)
    tensor.view(-1)[0] = math.nan
    return tensor


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(height="32"), TypeError, "height"),
        (dict(height=32.0), TypeError, "height"),
        (dict(num_inference_steps=8.0), TypeError, "num_inference_steps"),
        (dict(num_frames=True), TypeError, "num_frames"),
        (dict(latents=np.zeros((1, 16, 6, 4, 4), dtype=np.float32)), TypeError, "latents"),
        (dict(latents=_nan((1, 16, 6, 4, 4))), ValueError, "latents"),
        (dict(num_videos_per_prompt=0), ValueError, "num_videos_per_prompt"),
        (dict(generator=[torch.Generator(), torch.Generator()]), ValueError, "generators"),
        (dict(cfg_t_range=[0.0, math.nan, 0.1, 0.3, 0.999]), ValueError, "cfg_t_range"),
    ],
    ids=[
        "height_str",
        "height_float",
        "steps_float",
        "frames_bool",
        "numpy_latents",
        "nan_latents",
        "no_videos",
        "generators",
        "nan_cfg",
    ],
)
def test_bad_arguments_are_refused_before_work(pipe, overrides, error, message):
    with pytest.raises(error, match=message):
        pipe(**{**KWARGS, **overrides})


def test_bad_embeddings_are_refused(pipe):
    embeds, mask = pipe.encode_prompt(["a cat"])
    base = {k: v for k, v in KWARGS.items() if k != "prompt"}
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(prompt_embeds=_nan(embeds.shape), prompt_attention_mask=mask, **base)
    with pytest.raises(ValueError, match="text_length"):
        pipe(prompt_embeds=embeds[:, :10], prompt_attention_mask=mask[:, :10], **base)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(prompt="a cat", negative_prompt_embeds=_nan(embeds.shape), negative_prompt_attention_mask=mask, **base)


def test_bad_prefix_latents_are_refused(pipe):
    i2v = MagiImageToVideoPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="prefix_latents"):
        i2v(prefix_latents=_nan((1, 16, 1, 4, 4)), **KWARGS)
    with pytest.raises(TypeError, match="prefix_latents"):
        i2v(prefix_latents=np.zeros((1, 16, 1, 4, 4)), **KWARGS)


@pytest.mark.parametrize(
    "callback, error, message",
    [
        (lambda pipe, i, t, tensors: None, TypeError, "must return a dict"),
        (lambda pipe, i, t, tensors: {"latents": tensors["latents"][:, :, :1]}, ValueError, "shape"),
        (lambda pipe, i, t, tensors: {"latents": tensors["latents"] * math.nan}, ValueError, "NaN"),
    ],
    ids=["not_a_dict", "wrong_shape", "nan"],
)
def test_bad_callback_results_are_refused(pipe, callback, error, message):
    with pytest.raises(error, match=message):
        pipe(callback_on_step_end=callback, **KWARGS)


def test_vae_scaling_factor_zero_is_refused():
    pipe = tiny_pipeline()
    pipe.vae.register_to_config(scaling_factor=0.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        pipe(**KWARGS)


def test_a_request_that_cannot_fit_is_refused_at_once(pipe):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="GiB") as refused:
        pipe(**{**KWARGS, "height": 100000, "width": 100000})
    assert time.perf_counter() - start < 5  # refused from the estimate, nothing allocated
    assert "allow_oversized" in str(refused.value) and "height" in str(refused.value)
    # A request that fits runs; allow_oversized skips the check (here it would still fit).
    assert pipe(allow_oversized=True, **KWARGS).frames.shape == (1, 16, 6, 4, 4)


class _Estimated(Exception):
    pass


def _estimate_of_a_call(pipe, monkeypatch):
    """What `check_generation_fits` receives for `pipe(**KWARGS)` on a (faked) CUDA device; stops the call there."""
    from diffusers_magi.pipelines import input_checks_magi as checks

    seen = {}

    def record(estimate, device, **kwargs):
        seen.update(estimate=estimate, device=device, **kwargs)
        raise _Estimated

    monkeypatch.setattr(checks, "check_generation_fits", record)
    with pytest.raises(_Estimated):
        pipe(**KWARGS)
    return seen


def _bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_the_memory_check_counts_the_weights_offloading_moves_in(monkeypatch):
    """On CUDA the free memory already excludes resident weights: without offloading none are added; with model
    offloading the VAE and the larger of transformer and text encoder are (they are moved in during the call)."""
    from diffusers_magi import MagiPipeline

    monkeypatch.setattr(MagiPipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    pipe = tiny_pipeline()
    plain = _estimate_of_a_call(pipe, monkeypatch)
    assert plain["offloading"] == "none" and plain["estimate"].weights == 0
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks of model offloading; the device is faked above
    offloaded = _estimate_of_a_call(pipe, monkeypatch)
    expected = _bytes(pipe.vae) + max(_bytes(pipe.transformer), _bytes(pipe.text_encoder))
    assert offloaded["offloading"] == "model" and offloaded["estimate"].weights == expected > 0
    assert offloaded["estimate"].total == plain["estimate"].total + expected
    assert offloaded["device"] == torch.device("cuda") and offloaded["kv_cache_on_device"]


def test_the_refusal_names_frames_and_the_offloading_to_change(monkeypatch):
    from diffusers_magi import MagiPipeline
    from diffusers_magi.pipelines import input_checks_magi as checks

    monkeypatch.setattr(MagiPipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(checks, "available_memory", lambda device: checks.GiB)
    pipe = tiny_pipeline()
    request = {**KWARGS, "height": 4096, "width": 4096}
    with pytest.raises(ValueError) as refused:
        pipe(**request)
    message = str(refused.value)
    assert "free memory on cuda is 1.0 GiB (offloading: none)" in message
    for knob in ("height/width", "num_frames", "num_videos_per_prompt", "kv_cache_device='cpu'"):
        assert knob in message, (knob, message)
    assert "pipe.enable_model_cpu_offload()" in message
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError) as refused:
        pipe(**request)
    message = str(refused.value)
    assert "(offloading: model)" in message and "weights moved in" in message
    assert "enable_group_offload(...) or enable_sequential_cpu_offload() instead of model offloading" in message
