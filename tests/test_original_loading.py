"""Loading the original layout one tensor at a time: the resident memory a load adds stays within 1.25x the
checkpoint on full-width (sparse) imitations of the released variants; tensors the model does not use, and shard
tensors the index does not list, are skipped with one warning; placements (`device`, `device_map`) are honoured."""

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffusers_magi.conversion import load_original_transformer

from .conftest import REPO_ROOT
from .original_snapshot import reference_weights, variant_config, weight_folder, write_sharded_safetensors

VARIANT = "tiny45_distill_quant"
SLOW_VARIANTS = {"4.5B_distill", "24B_base", "24B_distill", "24B_distill_quant"}


def _sparse_module():
    spec = importlib.util.spec_from_file_location(
        "sparse_checkpoints", REPO_ROOT / "benchmarks" / "sparse_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured_load(variant: str, num_layers: int = 3, device: str = "cpu") -> dict:
    script = REPO_ROOT / "benchmarks" / "load_once.py"
    result = subprocess.run(
        [sys.executable, str(script), variant, str(num_layers), device], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v for v in _sparse_module().VARIANTS],
)
def test_load_adds_at_most_one_and_a_quarter_checkpoints(variant):
    """Full-width blocks (three: first, second and last, so fp8 variants keep a quantised block) as sparse files."""
    record = measured_load(variant)
    assert record["checkpoint_bytes"] > 5e8  # full width: a 4.5B block alone is ~0.26 GB
    ratio = record["added_peak_rss_bytes"] / record["checkpoint_bytes"]
    assert ratio <= 1.25, f"{variant}: the load added {ratio:.2f}x the checkpoint size"
    assert record["parameter_devices"] == ["cpu"]


@pytest.mark.slow
def test_conversion_streams_one_tensor_at_a_time():
    """magi-convert writes each tensor to its output shard as it reads it: the conversion of a full-width 4.5B
    checkpoint (three blocks, 0.86 GB) adds far less resident memory than the checkpoint, and writes all of it."""
    record = measured_load("4.5B_base", device="convert")
    assert record["written_bytes"] >= record["checkpoint_bytes"] * 0.99
    largest_tensor = 12288 * 3072 * 2  # a 4.5B FFN projection in bfloat16
    assert record["added_peak_rss_bytes"] < 0.4 * record["checkpoint_bytes"], record
    assert record["added_peak_rss_bytes"] < 4 * largest_tensor, record


def test_sparse_imitations_match_the_configs():
    """Every manifest tensor maps onto the model of its preset config, with nothing missing, extra or mis-shaped."""
    import tempfile
    from pathlib import Path

    from diffusers_magi.conversion.transformer import plan_original_transformer

    sparse = _sparse_module()
    with tempfile.TemporaryDirectory() as root:
        for variant in sparse.VARIANTS:
            config, checkpoint_dir, size = sparse.write_sparse_checkpoint(variant, Path(root), num_layers=3)
            plan = plan_original_transformer(config, checkpoint_dir)[3]
            assert plan.ok and not plan.unexpected, (variant, plan.missing, plan.mis_shaped, plan.unexpected)
            assert plan.stored_bytes <= size < plan.stored_bytes + 1e6


def _checkpoint(tmp_path, tensors, shards=1):
    root = tmp_path / "dit"
    folder = root / weight_folder(VARIANT)
    if shards == 1:
        folder.mkdir(parents=True)
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    else:
        write_sharded_safetensors(tensors, folder, shards)
    return root


@pytest.fixture(scope="module")
def reference_model(reference_dir):
    return load_original_transformer(variant_config(VARIANT), variant_config(VARIANT).parent)


def assert_same(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[name].dtype == t.dtype and torch.equal(ours[name], t) for name, t in theirs.items())


def test_unused_tensors_are_listed_once_and_skipped(reference_model, tmp_path, caplog):
    tensors = reference_weights(VARIANT)
    tensors["videodit_blocks.layers.0.self_attention.extra_proj.weight"] = torch.zeros(2, 2)
    tensors["videodit_blocks.layers.9.mlp.linear_fc1.weight"] = torch.zeros(2, 2)  # a block the config lacks
    with caplog.at_level(logging.WARNING):
        model = load_original_transformer(variant_config(VARIANT), _checkpoint(tmp_path, tensors))
    warnings = [record.getMessage() for record in caplog.records if "does not use" in record.getMessage()]
    assert len(warnings) == 1
    assert "extra_proj.weight" in warnings[0] and "layers.9.mlp.linear_fc1.weight" in warnings[0]
    assert_same(model, reference_model)


def test_shard_tensors_the_index_does_not_list_are_not_read(reference_model, tmp_path, caplog):
    tensors = reference_weights(VARIANT)
    tensors["stray.weight"] = torch.zeros(3)
    checkpoint = _checkpoint(tmp_path, tensors, shards=2)
    index_path = checkpoint / weight_folder(VARIANT) / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["stray.weight"]
    index_path.write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        model = load_original_transformer(variant_config(VARIANT), checkpoint)
    messages = [record.getMessage() for record in caplog.records]
    assert any("does not list" in message and "stray.weight" in message for message in messages), messages
    assert not any("does not use" in message for message in messages)
    assert_same(model, reference_model)


def test_missing_and_mis_shaped_tensors_are_named_before_reading(tmp_path, monkeypatch):
    from diffusers_magi.conversion import original_checkpoint

    tensors = reference_weights(VARIANT)
    del tensors["videodit_blocks.layers.0.mlp.linear_fc2.weight"]
    tensors["final_linear.linear.weight"] = tensors["final_linear.linear.weight"][:-1]
    checkpoint = _checkpoint(tmp_path, tensors)
    monkeypatch.setattr(original_checkpoint, "_read_entries", lambda *args: pytest.fail("read tensor data"))
    with pytest.raises(ValueError) as error:
        load_original_transformer(variant_config(VARIANT), checkpoint)
    assert "blocks.0.ff.linear_out.weight" in str(error.value) and "proj_out.weight has shape" in str(error.value)


def test_device_and_device_map(reference_model, reference_dir):
    config, checkpoint = variant_config(VARIANT), variant_config(VARIANT).parent
    assert_same(load_original_transformer(config, checkpoint, device="cpu"), reference_model)
    assert_same(
        load_original_transformer(config, checkpoint, device_map={"blocks": "cpu", "": "cpu"}), reference_model
    )
    placed = load_original_transformer(config, checkpoint, device_map="auto", max_memory={"cpu": "10GB"})
    assert_same(placed, reference_model)  # accelerate's planner, on the meta model with the planned dtypes
    with pytest.raises(ValueError, match="not both"):
        load_original_transformer(config, checkpoint, device="cpu", device_map={"": "cpu"})
    with pytest.raises(ValueError, match="disk"):
        load_original_transformer(config, checkpoint, device_map={"blocks": "disk", "": "cpu"})
    with pytest.raises(ValueError, match="cuda:7"):
        load_original_transformer(config, checkpoint, device="cuda:7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_straight_onto_the_gpu_keeps_host_memory_within_one_shard():
    record = measured_load("4.5B_base", device="cuda")
    assert record["parameter_devices"] == ["cuda:0"]
    largest_shard = record["checkpoint_bytes"] / 2  # 4.5B ships as 2 shards
    assert record["added_peak_rss_bytes"] <= largest_shard, record
