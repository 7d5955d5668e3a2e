"""Device maps: `MagiTransformer3DModel.from_pretrained(..., device_map="auto")` spreads whole blocks over devices (and
disk) with the output of a model in memory; placements over GPUs this machine does not have are planned with
Diffusers' own planner on a model built on the meta device at the real shapes; the pipeline's `device_map="balanced"`
plans whole components over GPUs; device maps naming missing devices fail with a clear error."""

from collections import Counter

import pytest
import torch
from accelerate.utils import compute_module_sizes
from diffusers.models.model_loading_utils import _determine_device_map
from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

from diffusers_magi import MagiPipeline, MagiTransformer3DModel

from .tiny_models import tiny_pipeline, tiny_transformer, tiny_transformer_inputs

NO_ACCELERATOR = pytest.mark.skipif(torch.accelerator.is_available(), reason="checks a machine without accelerator")

# The 24B transformer (original example config): 48 layers, hidden 6144, SwiGLU.
CONFIG_24B = dict(
    num_layers=48, hidden_size=6144, num_attention_heads=48, num_key_value_heads=8, ffn_dim=16384,
    gated_linear_unit=True, in_channels=32, out_channels=32, half_channel_vae=True, condition_dim=1536,
    cross_attention_dim=6144,
)


def _placements(device_map):
    """{block index: set of devices of its modules}."""
    blocks = {}
    for name, device in device_map.items():
        if name.startswith("blocks."):
            blocks.setdefault(int(name.split(".")[1]), set()).add(device)
    return blocks


def test_device_map_auto_spreads_whole_blocks_to_disk_with_the_same_output(tmp_path):
    model = tiny_transformer()
    reference = model(*tiny_transformer_inputs()).sample
    model.save_pretrained(tmp_path / "transformer")
    mapped = MagiTransformer3DModel.from_pretrained(
        tmp_path / "transformer", device_map="auto", max_memory={"cpu": "250KB"}, offload_folder=tmp_path / "offload"
    )
    placements = set(mapped.hf_device_map.values())
    assert placements == {"cpu", "disk"}
    # Blocks are never split (`_no_split_modules`): a block is one entry of the map.
    assert all(key.count(".") <= 1 for key in mapped.hf_device_map if key.startswith("blocks"))
    assert torch.equal(mapped(*tiny_transformer_inputs()).sample, reference)


@pytest.mark.parametrize(
    "config, gpus, budget",
    [({}, 2, "6GiB"), (CONFIG_24B, 4, "22GiB"), (CONFIG_24B, 8, "12GiB")],
    ids=["4.5B-on-2x6GB", "24B-on-4x22GB", "24B-on-8x12GB"],
)
def test_planned_placement_over_gpus_this_machine_lacks(config, gpus, budget):
    """Diffusers' planner (`from_pretrained` calls it with `device_map="auto"`) on the real shapes in bfloat16: whole
    blocks spread over the GPUs, none over its budget, nothing left on the CPU or disk."""
    with torch.device("meta"):
        model = MagiTransformer3DModel(**config)
    max_memory = {index: budget for index in range(gpus)} | {"cpu": "200GiB"}
    device_map = _determine_device_map(model, "auto", max_memory, torch.bfloat16, model._keep_in_fp32_modules)
    # accelerate's balancing may leave the last GPU as headroom for the activations.
    assert set(range(gpus - 1)) <= set(device_map.values()) <= set(range(gpus))
    assert all(len(devices) == 1 for devices in _placements(device_map).values())
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    used = Counter()
    for name, device in device_map.items():
        used[device] += sizes[name]
    budget_bytes = int(budget.removesuffix("GiB")) * 2**30
    assert max(used.values()) <= budget_bytes


def test_pipeline_balanced_device_map_plans_whole_components_per_gpu():
    """The components of the real pipeline in bfloat16 (sizes from models built on the meta device, as the pipeline's
    planner computes them) over two 16 GiB GPUs: Diffusers' "balanced" strategy gives the transformer and T5 a GPU
    each, and the VAE joins the smaller one."""
    from transformers import T5Config, T5EncoderModel

    from diffusers_magi import AutoencoderMagi

    with torch.device("meta"):
        components = {
            "transformer": MagiTransformer3DModel(),
            "text_encoder": T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)),
            "vae": AutoencoderMagi(),
        }
    sizes = {name: compute_module_sizes(module, dtype=torch.bfloat16)[""] for name, module in components.items()}
    sizes = dict(sorted(sizes.items(), key=lambda item: item[1], reverse=True))  # as `_get_final_device_map` sorts
    plan = _assign_components_to_devices(sizes, {0: 16 * 2**30, 1: 16 * 2**30}, device_mapping_strategy="balanced")
    placement = {component: device for device, names in plan.items() for component in names}
    assert placement["transformer"] != placement["text_encoder"]
    for device, names in plan.items():
        assert sum(sizes[name] for name in names) <= 16 * 2**30


def test_pipeline_loads_with_balanced_device_map(tmp_path):
    """Without GPUs "balanced" keeps every component on the CPU; the pipeline gives what it gives without it."""
    tiny_pipeline().save_pretrained(tmp_path)
    kwargs = dict(prompt="a cat runs", num_frames=24, height=32, width=32, output_type="latent")
    outputs = []
    for extra in ({}, dict(device_map="balanced")):
        loaded = MagiPipeline.from_pretrained(tmp_path, **extra)
        loaded.set_progress_bar_config(disable=True)
        outputs.append(loaded(generator=torch.Generator().manual_seed(0), **kwargs).frames)
    assert torch.equal(*outputs)


@NO_ACCELERATOR
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device_map={"": "cuda:3"}), r"device_map\[''\]='cuda:3' names a device this machine does not have \(available: cpu\)"),
        (dict(device_map={"": "cpu", "blocks.1": 1}), r"device_map\['blocks.1'\]=1 names a device"),
        (dict(device_map="cuda"), "device_map='cuda' names a device"),
        (dict(device_map="auto", max_memory={0: "1GB", "cpu": "1GB"}), r"max_memory \(key 0\) names a device.*infer_auto_device_map"),
    ],
    ids=["dict-cuda3", "block-on-gpu1", "string-cuda", "max-memory-gpu0"],
)
def test_device_maps_naming_missing_devices_fail_clearly(tmp_path, kwargs, match):
    tiny_transformer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        MagiTransformer3DModel.from_pretrained(tmp_path, **kwargs)


@NO_ACCELERATOR
def test_pipeline_device_map_with_missing_gpus_fails_clearly(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"max_memory \(key 1\) names a device"):
        MagiPipeline.from_pretrained(tmp_path, device_map="balanced", max_memory={1: "20GB"})
