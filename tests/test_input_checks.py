"""`pipelines/input_checks_magi.py`: every bad input of issue 15's list gets a TypeError / ValueError naming the
argument; the memory estimate bounds what a real transformer call allocates, and `check_generation_fits` refuses an
oversized request with the estimate, the limit and the advice (unless `allow_oversized`)."""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from diffusers_magi.pipelines import input_checks_magi as checks

from .conftest import REPO_ROOT
from .tiny_models import tiny_transformer, tiny_transformer_inputs


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(height="32"), TypeError, r"`height` must be an int, got '32' \(str\)"),
        (dict(height=32.0), TypeError, r"`height` must be an int, got 32.0 \(float\) \(e.g. height=32\)"),
        (dict(width=True), TypeError, r"`width` must be an int, got True \(bool\)"),
        (dict(num_frames=0), ValueError, "`num_frames` must be at least 1"),
        (dict(num_inference_steps=4.0), TypeError, "`num_inference_steps` must be an int, got 4.0"),
        (dict(num_inference_steps=0), ValueError, "`num_inference_steps` must be at least 1"),
    ],
)
def test_sizes_and_steps(kwargs, error, message):
    with pytest.raises(error, match=message):
        checks.check_generation_sizes(**kwargs)


def test_good_sizes_pass():
    checks.check_generation_sizes(height=32, width=np.int64(48), num_frames=24, num_inference_steps=4)
    checks.check_generation_sizes()  # all defaults


def test_num_videos_per_prompt():
    with pytest.raises(ValueError, match="`num_videos_per_prompt` must be at least 1, got 0"):
        checks.check_num_videos_per_prompt(0)
    with pytest.raises(TypeError, match="`num_videos_per_prompt` must be an int"):
        checks.check_num_videos_per_prompt(2.0)
    checks.check_num_videos_per_prompt(2)


def test_tensors_not_numpy_and_finite():
    with pytest.raises(TypeError, match=r"`latents` must be a torch.Tensor, got a numpy array; pass torch.from_numpy"):
        checks.check_tensor(np.zeros((1, 2)), "latents")
    with pytest.raises(TypeError, match="`prompt_embeds` must be a torch.Tensor, got list"):
        checks.check_tensor([[0.0]], "prompt_embeds")
    checks.check_tensor(None, "latents")
    for name, bad in (
        ("latents", float("nan")),
        ("prompt_embeds", float("inf")),
        ("negative_prompt_embeds", -math.inf),
    ):
        tensor = torch.zeros(2, 3)
        tensor[1, 2] = bad
        with pytest.raises(ValueError, match=rf"`{name}` holds 1 non-finite value"):
            checks.check_finite(tensor, name)
    checks.check_finite(torch.zeros(2, 3), "latents")
    checks.check_finite(torch.empty(2, 3, device="meta"), "latents")  # nothing to read
    checks.check_finite(torch.zeros(2, dtype=torch.long), "ids")


def test_generators_follow_the_diffusers_rule():
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    checks.check_generators(generators, 2)
    checks.check_generators(None, 3)
    checks.check_generators(generators[0], 3)
    with pytest.raises(ValueError, match="list of generators of length 2, but requested an effective batch size of 3"):
        checks.check_generators(generators, 3)
    with pytest.raises(TypeError, match=r"`generator\[1\]` must be a torch.Generator"):
        checks.check_generators([generators[0], 7], 2)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        checks.check_generators(0, 1)


def test_cfg_t_range():
    checks.check_cfg_t_range([0.0, 0.0217, 0.1, 0.3, 0.999])
    with pytest.raises(ValueError, match=r"`cfg_t_range\[2\]` must be finite, got nan"):
        checks.check_cfg_t_range([0.0, 0.1, float("nan")])
    with pytest.raises(ValueError, match="non-decreasing"):
        checks.check_cfg_t_range([0.0, 0.3, 0.1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        checks.check_cfg_t_range([0.0, 1.5])
    with pytest.raises(TypeError, match="list of floats"):
        checks.check_cfg_t_range("0.1")


def test_scaling_factor():
    checks.check_scaling_factor(0.18215)
    with pytest.raises(ValueError, match="scaling_factor is 0"):
        checks.check_scaling_factor(0.0)
    with pytest.raises(ValueError, match="must be finite"):
        checks.check_scaling_factor(float("nan"))


def test_prompt_embeds_length():
    checks.check_prompt_embeds_length(torch.zeros(1, 40, 32), 40)
    with pytest.raises(
        ValueError, match=r"`prompt_embeds` must have shape \(batch, 40, text_dim\).*got \(1, 39, 32\)"
    ):
        checks.check_prompt_embeds_length(torch.zeros(1, 39, 32), 40)
    checks.check_prompt_embeds_length(torch.zeros(1, 3, 40, 32), 40)  # per chunk
    with pytest.raises(ValueError, match=r"got \(1, 2, 39, 32\)"):
        checks.check_prompt_embeds_length(torch.zeros(1, 2, 39, 32), 40)


def test_callback_outputs():
    shape = (1, 16, 6, 4, 4)
    assert checks.check_callback_outputs({}, "cb", {"latents": shape}) == {}
    checks.check_callback_outputs({"latents": torch.zeros(shape)}, "cb", {"latents": shape})
    with pytest.raises(TypeError, match=r"must return a dict .* got NoneType"):
        checks.check_callback_outputs(None, "cb", {"latents": shape})
    with pytest.raises(ValueError, match=r"returned `latents` of shape \(1, 16, 6, 4\); it must keep the shape"):
        checks.check_callback_outputs({"latents": torch.zeros(shape[:-1])}, "cb", {"latents": shape})
    with pytest.raises(ValueError, match="non-finite"):
        checks.check_callback_outputs({"latents": torch.full(shape, float("nan"))}, "cb", {"latents": shape})


CONFIG_4_5B = dict(
    num_layers=34,
    hidden_size=3072,
    num_attention_heads=24,
    num_key_value_heads=8,
    attention_head_dim=128,
    ffn_dim=12288,
    in_channels=16,
    patch_size=(1, 2, 2),
)


def _memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO_ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module
    spec.loader.exec_module(module)
    return module


def test_estimate_bounds_a_real_transformer_call():
    """The estimate of one call's activations (CPU: attention scores materialised) is at least what a real call of
    the tiny transformer allocates (counted tensor by tensor), and not wildly more."""
    memory_plan = _memory_plan()
    model = tiny_transformer().eval()
    inputs = tiny_transformer_inputs()  # 2 chunks of 4x4 latents = 32x32 pixels, no cache
    counter = memory_plan.LiveTensorBytes(memory_plan._existing(model, *inputs))
    with torch.no_grad(), counter:
        model(*inputs)
    estimate = checks.estimate_generation_memory(
        model.config, {}, batch_size=1, height=32, width=32, window_chunks=2, kv_cache_chunks=0,
        dtype=torch.float32, fused_attention=False,
    )  # fmt: skip
    bound = estimate.transformer_activations + estimate.attention_scores
    assert counter.peak <= bound <= 4 * counter.peak


def test_estimate_grows_with_the_request():
    config = CONFIG_4_5B
    vae = dict(latent_channels=16, patch_size=8, patch_size_t=4)
    small = checks.estimate_generation_memory(config, vae, 1, 480, 848, 4, 8)
    assert small.kv_cache == 8 * checks.kv_chunk_bytes(config, checks.tokens_per_chunk(config, 480, 848))
    assert checks.tokens_per_chunk(config, 480, 848) == 6 * 30 * 53
    huge = checks.estimate_generation_memory(config, vae, 1, 100000, 100000, 4, 8)
    assert huge.total > 1000 * small.total
    offloaded = checks.estimate_generation_memory(config, vae, 1, 480, 848, 4, 8, kv_cache_on_device=False)
    assert offloaded.kv_cache * 34 == small.kv_cache
    three = checks.estimate_generation_memory(config, vae, 2, 480, 848, 4, 8, guidance_branches=3)
    assert three.kv_cache == 6 * small.kv_cache


def test_check_generation_fits():
    config = CONFIG_4_5B
    estimate = checks.estimate_generation_memory(config, {}, 1, 100000, 100000, 4, 8)
    with pytest.raises(ValueError) as error:
        checks.check_generation_fits(estimate, "cpu")
    message = str(error.value)
    assert "needs about" in message and "available RAM" in message and "KV cache" in message
    assert "smaller height/width" in message and "allow_oversized=True" in message
    checks.check_generation_fits(estimate, "cpu", allow_oversized=True)
    checks.check_generation_fits(10, "cpu")  # ten bytes fit
    with pytest.raises(
        ValueError, match=r"free memory on cuda:0 is 1.0 GiB.*kv_cache_device.*enable_model_cpu_offload"
    ):
        checks.check_generation_fits(2 * checks.GiB, "cuda:0", limit_bytes=checks.GiB)
    assert 0 < checks.available_memory("cpu")


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_refusal_names_every_knob(device):
    """Size, frames and batch everywhere; on an accelerator also the KV cache's device and the offloading that would
    move less than the current one (none, or only what is not on yet)."""

    def message(**kwargs):
        with pytest.raises(ValueError) as error:
            checks.check_generation_fits(2 * checks.GiB, device, limit_bytes=checks.GiB, **kwargs)
        return str(error.value)

    for offloading in checks.OFFLOADING_MODES:
        text = message(offloading=offloading)
        assert f"(offloading: {offloading})" in text
        for knob in ("height/width", "num_frames", "num_videos_per_prompt", "allow_oversized=True"):
            assert knob in text, (knob, text)
        on_accelerator = device != "cpu"
        assert ("kv_cache_device='cpu'" in text) == on_accelerator
        assert ("enable_model_cpu_offload()" in text) == (on_accelerator and offloading == "none")
        assert ("enable_group_offload" in text) == (on_accelerator and offloading in ("none", "model"))
    assert "kv_cache_device" not in message(kv_cache_on_device=False)
    with pytest.raises(ValueError, match="`offloading` must be one of"):
        checks.check_generation_fits(1, device, offloading="cpu")


def _bytes(module):
    return sum(
        t.numel() * t.element_size() for t in {id(t): t for t in module.state_dict(keep_vars=True).values()}.values()
    )


def test_weights_moved_in_follow_the_offloading():
    """No offloading moves nothing in (the weights are already allocated); model offloading moves whole models, the
    VAE (last of the offload sequence, never moved out by a successor) plus the larger of text encoder and
    transformer; group offloading one block plus the top-level weights. Weights already on the device are not
    counted: on the CPU nothing is moved in."""
    from diffusers_magi.tiny_random import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    transformer, vae, text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
    assert checks.offloading_mode(pipe.components) == "none"
    assert checks.weights_moved_in(pipe.components, "cuda") == 0

    pipe.enable_model_cpu_offload(device="cpu")
    assert checks.offloading_mode(pipe.components) == "model"
    expected = _bytes(vae) + max(_bytes(text_encoder), _bytes(transformer))
    assert checks.weights_moved_in(pipe.components, "cuda") == expected
    assert checks.weights_moved_in(pipe.components, "cpu") == 0
    pipe.remove_all_hooks()

    pipe = tiny_random_pipeline()
    transformer = pipe.transformer
    transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    assert checks.offloading_mode(pipe.components) == "group"
    # groups moved in one at a time: each block, and each module the model names as a block of its own
    blocks = [getattr(transformer, name) for name in transformer._group_offload_block_modules]
    for child in transformer.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks.extend(child)
    top_level = _bytes(transformer) - sum(_bytes(block) for block in blocks)
    assert checks.weights_moved_in(pipe.components, "cuda") == top_level + max(_bytes(block) for block in blocks)
    assert checks.weights_moved_in(pipe.components, "cpu") == 0


def test_weights_moved_in_with_sequential_offloading():
    """accelerate's sequential offloading (weights on the meta device, moved in per module): the heaviest chain of a
    module's own weights and those of the modules it runs inside."""
    from accelerate import cpu_offload

    model = tiny_transformer()
    own = {
        name: sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
        for name, m in model.named_modules()
    }
    chains = {
        name: sum(size for other, size in own.items() if other == "" or name == other or name.startswith(other + "."))
        for name in own
    }
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert checks.offloading_mode({"transformer": model}) == "sequential"
    assert checks.weights_moved_in({"transformer": model}, "cuda") == max(chains.values()) > 0
