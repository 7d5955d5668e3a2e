"""LoRA adapters on the MAGI-1 transformer through Diffusers' loaders (`MagiLoraLoaderMixin`, `MagiPeftAdapterMixin`).

The LoRA files here are built independently of PEFT (random `lora_A` / `lora_B` tensors in the Diffusers format, no
metadata, so alpha = rank and each adapted linear gets `dW = B @ A`): the expected "merged" models are computed from
these tensors directly, not from PEFT's own merge.
"""

import accelerate
import pytest
import torch
from safetensors.torch import save_file

from diffusers_magi import MagiImageToVideoPipeline, MagiTransformer3DModel, MagiVideoToVideoPipeline
from diffusers_magi.loaders import adapter_incompatible_modules

from .tiny_models import tiny_pipeline

CPU = torch.device("cpu")
KWARGS = dict(prompt="a cat runs", num_frames=48, height=32, width=32, output_type="latent")
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_cross_kv", "attn.to_out", "ff.linear_in", "ff.linear_out")


def _run(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **KWARGS, **kwargs).frames


def _lora(transformer, seed, rank=4, targets=TARGETS, blocks=None, std=0.1):
    """A LoRA state dict (keys `transformer.<module>.lora_A/B.weight`) with random non-zero tensors."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for block in blocks if blocks is not None else range(transformer.config.num_layers):
        for target in targets:
            linear = transformer.blocks[block].get_submodule(target)
            linear = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
            prefix = f"transformer.blocks.{block}.{target}"
            state_dict[f"{prefix}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * std
            state_dict[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * std
    return state_dict


def _merged_pipeline(loras_and_weights, **overrides):
    """A fresh tiny pipeline whose adapted linears hold `W + sum_i w_i * B_i @ A_i` (computed here, in float64)."""
    pipe = tiny_pipeline(**overrides)
    with torch.no_grad():
        for state_dict, weight in loras_and_weights:
            for key in state_dict:
                if key.endswith(".lora_A.weight"):
                    path = key[len("transformer.") : -len(".lora_A.weight")]
                    linear = pipe.transformer.get_submodule(path)
                    delta = state_dict[key.replace("lora_A", "lora_B")].double() @ state_dict[key].double()
                    linear.weight.copy_((linear.weight.double() + weight * delta).to(linear.weight.dtype))
    return pipe


@pytest.fixture(scope="module")
def base():
    return _run(tiny_pipeline())


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    save_file(_lora(tiny_pipeline().transformer, seed=1), folder / "pytorch_lora_weights.safetensors")
    return folder


def test_image_to_video_takes_the_lora():
    import numpy as np
    import PIL.Image

    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    pipe = MagiImageToVideoPipeline.from_pipe(tiny_pipeline())
    base = pipe(image=image, generator=torch.Generator().manual_seed(0), **{**KWARGS, "num_frames": 24}).frames
    pipe.load_lora_weights(_lora(pipe.transformer, seed=1), adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    adapted = pipe(image=image, generator=torch.Generator().manual_seed(0), **{**KWARGS, "num_frames": 24}).frames
    assert (adapted - base).abs().max() > 1e-2


def test_video_to_video_takes_the_lora(tmp_path):
    """The prefix video is encoded and continued by the adapted transformer; unloading gives the base video back."""
    import imageio.v2 as imageio
    import numpy as np

    path = str(tmp_path / "prefix.mp4")
    rng = np.random.default_rng(0)
    imageio.mimwrite(path, [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(16)], fps=24)
    pipe = MagiVideoToVideoPipeline.from_pipe(tiny_pipeline())

    def run():
        kwargs = {**KWARGS, "num_frames": 24}
        return pipe(video=path, num_prefix_frames=8, generator=torch.Generator().manual_seed(0), **kwargs).frames

    base = run()
    pipe.load_lora_weights(_lora(pipe.transformer, seed=1), adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    adapted = run()
    assert adapted.shape == base.shape == (1, 16, 10, 4, 4)
    assert (adapted - base).abs().max() > 1e-2
    pipe.unload_lora_weights()
    assert torch.equal(run(), base)


def test_adapter_changes_output_and_equals_the_merged_weights(base, lora_file):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    adapted = _run(pipe)
    assert (adapted - base).abs().max() > 1e-2
    merged = _run(_merged_pipeline([(_lora(pipe.transformer, seed=1), 1.0)]))
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_save_then_load_into_a_fresh_pipeline_is_bit_identical(tmp_path, lora_file):
    from peft import get_peft_model_state_dict

    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file, adapter_name="style")
    expected = _run(pipe)
    pipe.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="style"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["style"].to_dict(),
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = tiny_pipeline()
    fresh.load_lora_weights(tmp_path)
    assert torch.equal(_run(fresh), expected)


def test_unload_and_disable_restore_the_base_output_bit_for_bit(base, lora_file):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    adapted = _run(pipe)
    pipe.disable_lora()
    assert torch.equal(_run(pipe), base)
    pipe.enable_lora()
    assert torch.equal(_run(pipe), adapted)
    pipe.transformer.disable_adapters()
    assert torch.equal(_run(pipe), base)
    pipe.transformer.enable_adapters()
    pipe.unload_lora_weights()
    assert torch.equal(_run(pipe), base)
    assert not getattr(pipe.transformer, "peft_config", {})


def test_fuse_equals_unfused_and_unfuse_restores_the_weights(lora_file):
    pipe = tiny_pipeline()
    weights = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_file, adapter_name="style")
    unfused = _run(pipe)
    pipe.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(_run(pipe), unfused, rtol=1e-5, atol=1e-5)
    pipe.unfuse_lora()
    assert pipe.get_list_adapters() == {"transformer": ["style"]}  # the adapter stays loaded
    for name, tensor in pipe.transformer.state_dict().items():
        base_name = name.replace(".base_layer", "")
        if "lora_" not in name:
            torch.testing.assert_close(tensor, weights[base_name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_run(pipe), unfused, rtol=1e-5, atol=1e-5)


def test_fuse_with_lora_scale_equals_the_scaled_merge(lora_file):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    pipe.fuse_lora(lora_scale=0.5)  # a fused layer runs only its (merged) base weights
    merged = _merged_pipeline([(_lora(pipe.transformer, seed=1), 0.5)])
    torch.testing.assert_close(_run(pipe), _run(merged), rtol=1e-5, atol=1e-5)


def test_two_adapters_with_weights_equal_the_weighted_merge():
    pipe = tiny_pipeline()
    first, second = _lora(pipe.transformer, seed=1), _lora(pipe.transformer, seed=2, rank=2)
    pipe.load_lora_weights(first, adapter_name="a")
    pipe.load_lora_weights(second, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    assert sorted(pipe.get_active_adapters()) == ["a", "b"]
    both = _run(pipe)
    merged = _run(_merged_pipeline([(first, 0.7), (second, -0.4)]))
    torch.testing.assert_close(both, merged, rtol=1e-5, atol=1e-5)
    pipe.fuse_lora(adapter_names=["a", "b"])
    torch.testing.assert_close(_run(pipe), merged, rtol=1e-5, atol=1e-5)
    pipe.unfuse_lora()
    pipe.delete_adapters("b")
    pipe.set_adapters(["a"], adapter_weights=[0.7])
    assert pipe.get_list_adapters() == {"transformer": ["a"]}
    torch.testing.assert_close(_run(pipe), _run(_merged_pipeline([(first, 0.7)])), rtol=1e-5, atol=1e-5)


def test_lora_scale_through_attention_kwargs(base, lora_file):
    """`attention_kwargs={"scale": s}` reaches the transformer from the pipeline call (through the guidance passes)
    and scales the adapter for that call only, as in Diffusers pipelines."""
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    adapted = _run(pipe)
    assert torch.equal(_run(pipe, attention_kwargs={"scale": 0.0}), base)
    half = _run(pipe, attention_kwargs={"scale": 0.5})
    merged = _run(_merged_pipeline([(_lora(pipe.transformer, seed=1), 0.5)]))
    torch.testing.assert_close(half, merged, rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(pipe), adapted)  # the scale does not outlive the call


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda sd: {**sd, "transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99)},
            r"'transformer\.blocks\.0\.attn\.to_q\.lora_A\.weight' has shape \(4, 99\).*64 -> 64",
        ),
        (
            lambda sd: {**sd, "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)},
            r"'transformer\.blocks\.0\.attn\.to_q\.lora_B\.weight' has shape \(128, 4\)",
        ),
        (
            lambda sd: {**sd, "transformer.blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 64)},
            r"'transformer\.blocks\.7\.attn\.to_q\.lora_A\.weight' targets the module 'blocks\.7\.attn\.to_q'.*does not have",
        ),
        (
            lambda sd: {**sd, "transformer.blocks.0.attn.to_qkv.lora_A.weight": torch.zeros(4, 64)},
            r"'transformer\.blocks\.0\.attn\.to_qkv\.lora_A\.weight' targets the module",
        ),
        (
            lambda sd: {**sd, "unet.down_blocks.0.proj.lora_A.weight": torch.zeros(4, 8)},
            r"'unet\.down_blocks\.0\.proj\.lora_A\.weight' is not for the transformer",
        ),
        (
            lambda sd: {**sd, "transformer.blocks.0.attn.to_q.lora_down.weight": torch.zeros(4, 64)},
            r"'transformer\.blocks\.0\.attn\.to_q\.lora_down\.weight' is not in the Diffusers/PEFT LoRA format",
        ),
        (
            lambda sd: {**sd, "transformer.blocks.0.attn.norm_q.lora_A.weight": torch.zeros(4, 16)},
            r"'transformer\.blocks\.0\.attn\.norm_q\.lora_A\.weight' targets 'blocks\.0\.attn\.norm_q', a MagiLayerNorm",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "transformer.blocks.1.ff.linear_in.lora_B.weight"},
            r"'transformer\.blocks\.1\.ff\.linear_in\.lora_A\.weight' has no matching partner",
        ),
    ],
    ids=[
        "wrong-in-features",
        "wrong-out-features",
        "missing-block",
        "unknown-module",
        "other-model-prefix",
        "other-format",
        "not-a-linear",
        "missing-partner",
    ],
)
def test_lora_for_a_different_model_is_a_clear_error(tmp_path, edit, match):
    pipe = tiny_pipeline()
    save_file(edit(_lora(pipe.transformer, seed=1)), tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match=match):
        pipe.load_lora_weights(tmp_path)
    assert not getattr(pipe.transformer, "peft_config", {})  # nothing was injected


def test_transformer_load_lora_adapter_checks_files_too(tmp_path):
    transformer = tiny_pipeline().transformer
    save_file(
        {"transformer.blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 64)},
        tmp_path / "pytorch_lora_weights.safetensors",
    )
    with pytest.raises(ValueError, match=r"'transformer\.blocks\.9\.attn\.to_q\.lora_A\.weight' targets the module"):
        transformer.load_lora_adapter(tmp_path, prefix="transformer")


# --------------------------------------------------------------------------------------------------------------------
# fp8 checkpoints, offloading, bfloat16
# --------------------------------------------------------------------------------------------------------------------
def _fp8_pipeline(dtype=torch.float32):
    """A tiny pipeline whose middle block is float8 (as the converted `distill_quant` checkpoints), random weights;
    the transformer's other weights in `dtype`."""
    from diffusers_magi.models.fp8_linear_magi import MagiFp8Linear

    pipe = tiny_pipeline(num_layers=3, fp8_layers=[1])
    generator = torch.Generator().manual_seed(1)
    for module in pipe.transformer.modules():
        if isinstance(module, MagiFp8Linear):
            module.fp8_weight.data = (
                (torch.randn(module.fp8_weight.shape, generator=generator) * 100)
                .to(torch.float8_e4m3fn)
                .view(torch.uint8)
            )
            module.weight_scale.data = torch.tensor([0.01])
            module.input_scale.data = torch.full_like(module.input_scale, 0.02)
    pipe.transformer.to(dtype)
    return pipe


def test_fp8_linears_cannot_take_an_adapter_and_say_so():
    from peft import LoraConfig

    pipe = _fp8_pipeline()
    incompatible = adapter_incompatible_modules(pipe.transformer)
    assert incompatible == [
        f"blocks.1.{path}"
        for path in (
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_cross_q",
            "attn.to_out",
            "ff.linear_in",
            "ff.linear_out",
        )
    ]
    with pytest.raises(
        ValueError, match=r"cannot go on \['blocks\.1\.attn\.to_q'.*float8 linears.*dequantize_fp8=True"
    ):
        pipe.load_lora_weights(_lora(pipe.transformer, seed=1))
    with pytest.raises(ValueError, match=r"cannot go on \['blocks\.1\.attn\.to_q'"):
        pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))


def test_fp8_checkpoint_takes_adapters_on_its_other_linears():
    """Blocks 0 and 2 (kept in the model dtype by fp8 checkpoints) and the caption key/value projection of every
    block take the adapter; the output equals the merged weights.

    In float64: the float8 block quantises its activations, so a float32 rounding difference between the adapted
    and the merged path (~1e-6) upstream of it can move an activation to the next float8 value and the output by
    ~0.05, depending on the CPU's matmul kernels; in float64 the two paths agree to far less than a float8 step."""
    pipe = _fp8_pipeline(torch.float64)
    base = _run(pipe)
    state_dict = {
        **_lora(pipe.transformer, seed=1, blocks=[0, 2]),
        **_lora(pipe.transformer, seed=2, targets=["attn.to_cross_kv", "modulation"], blocks=[1]),
    }
    pipe.load_lora_weights(state_dict)
    adapted = _run(pipe)
    assert (adapted - base).abs().max() > 1e-2
    merged = _fp8_pipeline(torch.float64)
    with torch.no_grad():
        for key in state_dict:
            if key.endswith("lora_A.weight"):
                linear = merged.transformer.get_submodule(key[len("transformer.") : -len(".lora_A.weight")])
                linear.weight += state_dict[key.replace("lora_A", "lora_B")].double() @ state_dict[key].double()
    torch.testing.assert_close(adapted, _run(merged), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def adapted_reference(lora_file):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    return _run(pipe)


def test_lora_with_model_cpu_offload(lora_file, adapted_reference):
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.load_lora_weights(lora_file)  # loaded while the offload hooks are on
    assert torch.equal(_run(pipe), adapted_reference)
    assert torch.equal(_run(pipe), adapted_reference)


def _sequential_offload(pipe):
    """Accelerate's per-layer offload hooks on every component, executing on the CPU: what
    `enable_sequential_cpu_offload(device=...)` installs (which refuses `device='cpu'`, see `tests/test_offloading.py`)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            accelerate.cpu_offload(component, CPU)


def test_lora_with_sequential_offload_hooks(lora_file, adapted_reference):
    """The LoRA loaded first, then the per-layer offload hooks over the adapted transformer: the LoRA layers' weights
    are offloaded to the meta device like every other layer."""
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_file)
    _sequential_offload(pipe)
    assert pipe.transformer.blocks[0].attn.to_q.lora_A["default_0"].weight.device.type == "meta"
    assert torch.equal(_run(pipe), adapted_reference)


def test_lora_loaded_after_sequential_offload(base, lora_file, adapted_reference):
    """Diffusers' order: sequential offloading on, then `load_lora_weights`. The hooks are taken off, the LoRA is
    loaded, and the hooks go back on the same components with the same execution device (Diffusers' own re-arming
    calls `enable_sequential_cpu_offload()` without it); the new LoRA layers are offloaded too. Unloading restores the
    base output with the hooks still on."""
    pipe = tiny_pipeline()
    _sequential_offload(pipe)
    pipe.load_lora_weights(lora_file)
    to_q = pipe.transformer.blocks[0].attn.to_q
    assert to_q.lora_A["default_0"].weight.device.type == "meta" and to_q.base_layer.weight.device.type == "meta"
    assert pipe.text_encoder.device.type == "meta" and pipe.vae.device.type == "meta"
    assert torch.equal(_run(pipe), adapted_reference)
    assert torch.equal(_run(pipe), adapted_reference)
    pipe.unload_lora_weights()
    assert isinstance(pipe.transformer.blocks[0].attn.to_q, torch.nn.Linear)
    assert pipe.transformer.blocks[0].attn.to_q.weight.device.type == "meta"
    assert torch.equal(_run(pipe), base)


def test_bad_lora_after_sequential_offload_leaves_the_hooks_on(tmp_path, base):
    pipe = tiny_pipeline()
    _sequential_offload(pipe)
    state_dict = {**_lora(pipe.transformer, seed=1), "transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 9)}
    with pytest.raises(ValueError, match=r"'transformer\.blocks\.0\.attn\.to_q\.lora_A\.weight' has shape \(4, 9\)"):
        pipe.load_lora_weights(state_dict)
    assert pipe.transformer.blocks[0].attn.to_q.weight.device.type == "meta"
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_lora_with_group_offload(lora_file, adapted_reference, offload_type):
    pipe = tiny_pipeline()
    extra = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    pipe.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=offload_type, **extra)
    pipe.load_lora_weights(lora_file)  # Diffusers re-applies group offloading over the adapted model
    assert torch.equal(_run(pipe), adapted_reference)


def test_lora_on_fp8_checkpoint_with_group_offload():
    state_dict = _lora(_fp8_pipeline().transformer, seed=1, blocks=[0, 2])
    pipe = _fp8_pipeline()
    pipe.load_lora_weights(state_dict)
    expected = _run(pipe)
    offloaded = _fp8_pipeline()
    offloaded.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    offloaded.load_lora_weights(state_dict)
    assert torch.equal(_run(offloaded), expected)


def test_lora_in_bfloat16(tmp_path, lora_file):
    """A transformer loaded with `dtype=torch.bfloat16` (float32 modules kept): the adapter takes the dtype of the
    layers it wraps, changes the output, and saves/loads bit-identically."""
    from peft import get_peft_model_state_dict

    tiny_pipeline().transformer.save_pretrained(tmp_path / "transformer")

    def bf16_pipeline():
        pipe = tiny_pipeline()
        pipe.transformer = MagiTransformer3DModel.from_pretrained(tmp_path / "transformer", dtype=torch.bfloat16)
        return pipe

    pipe = bf16_pipeline()
    base = _run(pipe)
    pipe.load_lora_weights(lora_file, adapter_name="style")
    assert pipe.transformer.blocks[0].attn.to_q.lora_A["style"].weight.dtype == torch.bfloat16
    assert pipe.transformer.proj_out.weight.dtype == torch.float32
    adapted = _run(pipe)
    assert torch.isfinite(adapted).all() and (adapted - base).abs().max() > 1e-2
    pipe.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="style"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["style"].to_dict(),
    )
    fresh = bf16_pipeline()
    fresh.load_lora_weights(tmp_path / "lora")
    assert torch.equal(_run(fresh), adapted)


def test_load_lora_weights_from_a_hub_id(lora_file, adapted_reference):
    """A Hub id is resolved like Diffusers resolves any LoRA repository (the Hub calls answered from a local folder,
    no network)."""
    import types
    from unittest import mock

    from diffusers.loaders import lora_base
    from diffusers.utils import hub_utils

    def model_info(repo_id, *args, **kwargs):
        assert repo_id == "magi-test/lora"
        return types.SimpleNamespace(
            siblings=[types.SimpleNamespace(rfilename=path.name) for path in lora_file.iterdir()]
        )

    def hf_hub_download(repo_id, filename, *args, subfolder=None, **kwargs):
        assert repo_id == "magi-test/lora" and subfolder is None
        return str(lora_file / filename)

    pipe = tiny_pipeline()
    with (
        mock.patch.object(lora_base, "model_info", model_info),
        mock.patch.object(hub_utils, "hf_hub_download", hf_hub_download),
    ):
        pipe.load_lora_weights("magi-test/lora", adapter_name="from_hub")
    assert torch.equal(_run(pipe), adapted_reference)
