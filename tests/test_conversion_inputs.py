"""What `magi-convert` reads: sharded and zstd-compressed DiT checkpoints give the same model as the single file;
corrupt inputs (missing shard, wrong shape, missing tensor, truncated file, a pickle that would run code) fail with a
clear error and leave no output folder, and so does a failure while writing."""

import os
import pickle
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from diffusers_magi.conversion import load_original_transformer
from diffusers_magi.conversion.cli import main as magi_convert
from diffusers_magi.conversion.text_encoder import load_original_text_encoder, load_pickled_weights

from .original_snapshot import (
    SPECIAL_TOKENS,
    reference_weights,
    variant_config,
    weight_folder,
    write_sharded_safetensors,
    write_t5_folder,
)

VARIANT = "tiny45_distill_quant"  # the fp8 checkpoint: float8, bfloat16 and float32 tensors


def checkpoint_with(tmp_path: Path, tensors, layout: str = "single") -> Path:
    """A DiT checkpoint folder (`<root>/inference_weight.fp8.distill/`) holding `tensors`."""
    root = tmp_path / "dit"
    folder = root / weight_folder(VARIANT)
    if layout == "single":
        folder.mkdir(parents=True)
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    else:
        write_sharded_safetensors(tensors, folder, 3, compress=layout == "sharded_zst")
    return root


def convert(tmp_path, checkpoint_dir, *extra):
    output = tmp_path / "out" / "converted"
    args = [
        "--config", str(variant_config(VARIANT)), "--checkpoint-dir", str(checkpoint_dir),
        "--special-tokens", str(SPECIAL_TOKENS), "--output", str(output), *extra,
    ]  # fmt: skip
    return magi_convert(args), output


def assert_fails_cleanly(tmp_path, capsys, checkpoint_dir, message, *extra):
    code, output = convert(tmp_path, checkpoint_dir, *extra)
    error = capsys.readouterr().err
    assert code == 1 and message in error, error
    assert not output.exists()
    assert not output.parent.exists() or not os.listdir(output.parent), "a partial folder was left behind"


def assert_same_model(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor) for name, tensor in theirs.items())


@pytest.fixture(scope="module")
def reference_model(reference_dir):
    return load_original_transformer(variant_config(VARIANT), variant_config(VARIANT).parent)


@pytest.mark.parametrize("layout", ["sharded", "sharded_zst"])
def test_sharded_and_compressed_checkpoints(reference_dir, reference_model, tmp_path, layout):
    if layout == "sharded_zst":
        pytest.importorskip("zstandard", reason="reading .zst shards needs the optional `zstandard` package")
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT), layout)
    folder = checkpoint / weight_folder(VARIANT)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.zst" if layout == "sharded_zst" else "*.safetensors"))) == 3
    assert_same_model(load_original_transformer(variant_config(VARIANT), checkpoint), reference_model)


def test_single_compressed_file(reference_dir, reference_model, tmp_path):
    zstandard = pytest.importorskip("zstandard", reason="reading .zst files needs the optional `zstandard` package")
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT))
    single = checkpoint / weight_folder(VARIANT) / "model.safetensors"
    Path(str(single) + ".zst").write_bytes(zstandard.ZstdCompressor().compress(single.read_bytes()))
    single.unlink()
    assert_same_model(load_original_transformer(variant_config(VARIANT), checkpoint), reference_model)


def test_missing_shard(reference_dir, tmp_path, capsys):
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT), "sharded")
    (checkpoint / weight_folder(VARIANT) / "model-00002-of-00003.safetensors").unlink()
    assert_fails_cleanly(tmp_path, capsys, checkpoint, "model-00002-of-00003.safetensors (listed in")


def test_wrong_shape(reference_dir, tmp_path, capsys):
    tensors = reference_weights(VARIANT)
    name = "videodit_blocks.layers.0.mlp.linear_fc1.weight"
    tensors[name] = tensors[name][:-1]
    assert_fails_cleanly(
        tmp_path, capsys, checkpoint_with(tmp_path, tensors), "blocks.0.ff.linear_in.weight has shape"
    )


def test_missing_tensor(reference_dir, tmp_path, capsys):
    tensors = reference_weights(VARIANT)
    del tensors["videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale"]
    assert_fails_cleanly(tmp_path, capsys, checkpoint_with(tmp_path, tensors), "blocks.1.ff.linear_out.smooth_scale")


def test_quantised_linear_stored_as_float(reference_dir, tmp_path, capsys):
    tensors = reference_weights(VARIANT)
    name = "videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"
    tensors[name] = tensors[name].float()
    assert_fails_cleanly(tmp_path, capsys, checkpoint_with(tmp_path, tensors), "is engine_config.fp8_quant right")


def test_truncated_file(reference_dir, tmp_path, capsys):
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT))
    path = checkpoint / weight_folder(VARIANT) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_cleanly(tmp_path, capsys, checkpoint, "is not a valid safetensors file")


def test_truncated_compressed_shard(reference_dir, tmp_path, capsys):
    pytest.importorskip("zstandard", reason="reading .zst shards needs the optional `zstandard` package")
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT), "sharded_zst")
    path = checkpoint / weight_folder(VARIANT) / "model-00001-of-00003.safetensors.zst"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_cleanly(tmp_path, capsys, checkpoint, "model-00001-of-00003.safetensors.zst")


class _RunsCode:
    """Unpickling this calls `os.system`: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def t5_folder(tmp_path):
    pytest.importorskip("sentencepiece", reason="the original T5 tokenizer (spiece.model) needs sentencepiece")
    folder = tmp_path / "t5" / "t5-v1_1-xxl"
    write_t5_folder(folder)
    return folder


def test_pickle_that_runs_code_is_refused(reference_dir, tmp_path, capsys, t5_folder):
    marker = tmp_path / "code_ran"
    with open(t5_folder / "pytorch_model-00001-of-00002.bin", "wb") as file:
        pickle.dump({"shared.weight": _RunsCode(marker)}, file, protocol=2)
    with pytest.raises(ValueError, match="Refusing to load"):
        load_pickled_weights(str(t5_folder / "pytorch_model-00001-of-00002.bin"))
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT))
    assert_fails_cleanly(tmp_path, capsys, checkpoint, "Refusing to load", "--t5-dir", str(t5_folder))
    assert not marker.exists(), "the pickle's code ran"


def test_truncated_pickle(tmp_path, t5_folder):
    path = t5_folder / "pytorch_model-00002-of-00002.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable PyTorch weight file"):
        load_original_text_encoder(str(t5_folder))


def test_t5_folder_is_read_as_the_original_ships_it(t5_folder):
    """Sharded pickles (weights_only) + spiece.model: the encoder gets every tensor, the tokenizer is usable."""
    from diffusers_magi.tiny_random import tiny_text_encoder

    encoder, tokenizer = load_original_text_encoder(str(t5_folder))
    reference = tiny_text_encoder(0, d_model=64)
    assert_same_model(encoder, reference)
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight
    ids = tokenizer("a red fox runs", return_tensors="pt").input_ids
    assert ids[0, -1].item() == tokenizer.eos_token_id and ids.max() < encoder.config.vocab_size


def test_failure_while_writing_leaves_nothing(reference_dir, tmp_path, capsys):
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT))
    failing = mock.patch("diffusers_magi.conversion.hub_folder.write_wrapper_files", side_effect=OSError("disk full"))
    with failing:
        code, _ = convert(tmp_path, checkpoint)
    assert code == 1 and capsys.readouterr().err == "magi-convert: error: disk full\n"
    assert not os.listdir(tmp_path / "out")


def test_overwrite_replaces_the_folder(reference_dir, tmp_path):
    checkpoint = checkpoint_with(tmp_path, reference_weights(VARIANT))
    output = tmp_path / "out" / "converted"
    output.mkdir(parents=True)
    (output / "model_index.json").write_text('{"_class_name": "MagiPipeline"}')  # a previous conversion
    (output / "old.txt").write_text("old")
    code, _ = convert(tmp_path, checkpoint, "--overwrite")
    assert code == 0 and not (output / "old.txt").exists() and (output / "model_index.json").is_file()
    assert os.listdir(tmp_path / "out") == ["converted"]
    # without VAE and T5 folders the pipeline holds only the transformer and the scheduler
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["scheduler", "transformer"]
    shutil.rmtree(output)
