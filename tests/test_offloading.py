"""Offloading the whole MAGI-1 pipeline (T5, transformer, VAE) on CPU gives the output of a run without offloading:
model offloading, sequential offloading (through accelerate's `cpu_offload`, the hooks `enable_sequential_cpu_offload`
installs; see `test_sequential_offload_on_cpu_is_a_clear_error`), group offloading at block and leaf level, in memory
and on disk, and the KV cache kept on the CPU. Offload modes or devices this machine cannot do fail at once with clear
errors.

On a CPU "offloading" moves weights between CPU tensors, so these tests check the hooks and every place where the
pipeline reads weights (learned caption tokens, input devices), not transfer speed; `docs/memory.md` has the GPU
recipes.
"""

import accelerate
import pytest
import torch

from .tiny_models import tiny_pipeline

CPU = torch.device("cpu")
KWARGS = dict(prompt="a cat runs", num_frames=48, height=32, width=32)


def _run(pipe, output_type="latent", **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), output_type=output_type, **KWARGS, **kwargs).frames


@pytest.fixture(scope="module")
def reference():
    pipe = tiny_pipeline()
    return {"latent": _run(pipe), "pt": _run(pipe, "pt")}


def test_model_cpu_offload_equals_no_offload(reference):
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(_run(pipe, "pt"), reference["pt"])
    assert torch.equal(_run(pipe), reference["latent"])  # the hooks are re-armed for a second call


def test_sequential_offload_hooks_equal_no_offload(reference):
    """Every component with accelerate's per-layer offload hooks: weights live on the meta device between calls, so
    this also checks that the pipeline never reads a weight outside a module call."""
    pipe = tiny_pipeline()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            accelerate.cpu_offload(component, CPU)
    assert pipe.transformer.caption_tokens.null_caption_embedding.device.type == "meta"
    assert pipe.text_encoder.device.type == "meta" and pipe.vae.device.type == "meta"
    assert torch.equal(_run(pipe, "pt"), reference["pt"])


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_in_memory_equals_no_offload(reference, offload_type):
    pipe = tiny_pipeline()
    extra = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    pipe.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=offload_type, **extra)
    assert torch.equal(_run(pipe, "pt"), reference["pt"])
    assert torch.equal(_run(pipe), reference["latent"])


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_to_disk_equals_no_offload(reference, tmp_path, offload_type):
    """Weights come back from safetensors files at 8-byte-aligned addresses, where the CPU's vectorised GEMM rounds
    differently from 64-byte-aligned memory (a model whose weights are copied to such addresses, without offloading,
    differs from itself by the same ~1e-6). So the latents agree to float32 rounding, not bit for bit. T5 ties two
    weights, which leaf-level disk offloading cannot hold (see the error test below), so it stays in memory there."""
    pipe = tiny_pipeline()
    if offload_type == "block_level":
        pipe.enable_group_offload(
            onload_device=CPU, offload_type=offload_type, num_blocks_per_group=1, offload_to_disk_path=tmp_path
        )
    else:
        pipe.enable_group_offload(
            onload_device=CPU, offload_type=offload_type, offload_to_disk_path=tmp_path, exclude_modules=["text_encoder"]
        )
    assert any(tmp_path.iterdir())  # the weights really went to disk
    for _ in range(2):
        torch.testing.assert_close(_run(pipe), reference["latent"], rtol=1e-5, atol=1e-5)


def test_kv_cache_on_cpu_with_group_offload_equals_no_offload(reference):
    pipe = tiny_pipeline()
    pipe.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    assert torch.equal(_run(pipe, kv_cache_device="cpu"), reference["latent"])


def test_learned_caption_tokens_are_read_through_their_own_offload_group(tmp_path):
    """Block-level group offloading gives `caption_tokens` a group of its own: calling it places the tokens, and
    what it returns stays valid once the group is offloaded again (to disk: the parameters become placeholders)."""
    pipe = tiny_pipeline()
    expected = pipe.transformer.caption_tokens()
    expected = (expected.null_caption_embedding.clone(), expected.special_tokens.clone())
    pipe.transformer.enable_group_offload(
        onload_device=CPU, offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=tmp_path
    )
    hook = pipe.transformer.caption_tokens._diffusers_hook.get_hook("group_offloading")
    assert hook.group.onload_leader is pipe.transformer.caption_tokens
    tokens = pipe.transformer.caption_tokens()
    assert torch.equal(tokens.null_caption_embedding, expected[0]) and torch.equal(tokens.special_tokens, expected[1])


@pytest.mark.parametrize(
    "enable, error, match",
    [
        (lambda p: p.enable_group_offload(onload_device=CPU, offload_type="leaf_level", use_stream=True), ValueError, "use_stream=False"),
        (lambda p: p.enable_model_cpu_offload(device="cuda"), ValueError, r"device='cuda' names a device this machine does not have \(available: cpu"),
        (lambda p: p.enable_model_cpu_offload(gpu_id=1), ValueError, "gpu_id=1 names a device"),
        (lambda p: p.enable_sequential_cpu_offload(device="cuda:0"), ValueError, "device='cuda:0' names a device"),
        (lambda p: p.enable_group_offload(onload_device="cuda"), ValueError, "onload_device='cuda' names a device"),
        (lambda p: p.enable_group_offload(onload_device=CPU, offload_device="xpu:2"), ValueError, "offload_device='xpu:2'"),
    ],
    ids=["stream-on-cpu", "model-missing-device", "model-missing-gpu-id", "sequential-missing", "group-missing", "group-offload-missing"],
)
def test_offload_modes_this_machine_cannot_do_fail_clearly(enable, error, match):
    if torch.accelerator.is_available():
        pytest.skip("checks the errors of a machine without accelerator")
    with pytest.raises(error, match=match):
        enable(tiny_pipeline())


def test_sequential_offload_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"nothing to offload to.*enable_model_cpu_offload\(device='cpu'\)"):
        tiny_pipeline().enable_sequential_cpu_offload(device="cpu")


def test_leaf_level_disk_offload_of_tied_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"text_encoder's tied weights \[\['shared.weight', 'encoder.embed_tokens.weight'\]\]"):
        tiny_pipeline().enable_group_offload(onload_device=CPU, offload_type="leaf_level", offload_to_disk_path=tmp_path)


def test_kv_cache_device_must_exist():
    if torch.accelerator.is_available():
        pytest.skip("checks the errors of a machine without accelerator")
    with pytest.raises(ValueError, match="kv_cache_device='cuda:1' names a device"):
        _run(tiny_pipeline(), kv_cache_device="cuda:1")


def _fp8_transformer():
    """A tiny transformer with a float8 block (as the converted `distill_quant` checkpoints), random float8 weights."""
    from diffusers_magi.models.fp8_linear_magi import MagiFp8Linear

    from .tiny_models import tiny_transformer

    model = tiny_transformer(num_layers=3, fp8_layers=[1])
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, MagiFp8Linear):
            weight = torch.randn(module.fp8_weight.shape, generator=generator) * 100
            module.fp8_weight.data = weight.to(torch.float8_e4m3fn).view(torch.uint8)
            module.weight_scale.data = torch.tensor([0.01])
            module.input_scale.data = torch.full_like(module.input_scale, 0.02)
    return model


@pytest.mark.parametrize("mode", ["block_level", "leaf_level", "sequential"])
def test_fp8_checkpoint_blocks_offload_like_the_others(mode):
    inputs = (torch.randn(1, 16, 12, 4, 4), torch.tensor([[0.3, 0.8]]), torch.randn(1, 2, 40, 32), torch.ones(1, 2, 40))
    with torch.no_grad():
        reference = _fp8_transformer()(*inputs).sample
        model = _fp8_transformer()
        if mode == "sequential":
            accelerate.cpu_offload(model, CPU)
        else:
            extra = dict(num_blocks_per_group=1) if mode == "block_level" else {}
            model.enable_group_offload(onload_device=CPU, offload_type=mode, **extra)
        assert torch.equal(model(*inputs).sample, reference)


@pytest.mark.parametrize("mode", ["sequential", "group"])
def test_image_to_video_encodes_the_image_under_offloading(mode):
    """The VAE *encodes* the image of image-to-video too: its inputs must reach it when its weights are offloaded."""
    import numpy as np
    import PIL.Image

    from diffusers_magi import MagiImageToVideoPipeline

    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    kwargs = dict(image=image, prompt="a cat runs", num_frames=24, height=32, width=32, output_type="latent")
    reference = MagiImageToVideoPipeline.from_pipe(tiny_pipeline())(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe = MagiImageToVideoPipeline.from_pipe(tiny_pipeline())
    if mode == "sequential":
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                accelerate.cpu_offload(component, CPU)
    else:
        pipe.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames, reference)
