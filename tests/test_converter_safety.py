"""`magi-convert` never destroys data, and its dry run reads headers only.

Refusals: an output equal to, inside or containing an input; an output that is a file; `--overwrite` over a folder
that is not an earlier conversion. A leftover `.partial-*` folder of a killed run is removed by the next run into the
same output. File-system errors end as one line `magi-convert: error: ...`, exit 1, no partial output. After each,
the source checkpoint is byte for byte what it was. `--dry-run` / `inspect_original` report every released variant
(sparse, full width) as convertible and name the missing, extra and mis-shaped tensors of a broken one.
"""

import errno
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import save_file

from diffusers_magi.conversion import inspect_original
from diffusers_magi.conversion.cli import main as magi_convert

from .conftest import REPO_ROOT
from .original_snapshot import SPECIAL_TOKENS, reference_weights, variant_config, weight_folder

VARIANT = "tiny45_distill_quant"


def digest(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture()
def checkpoint(reference_dir, tmp_path):
    """A DiT checkpoint folder and its digest (to prove it intact afterwards)."""
    root = tmp_path / "dit"
    folder = root / weight_folder(VARIANT)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference_weights(VARIANT).items()}, str(folder / "model.safetensors"))
    return root


def run(checkpoint, output, *extra):
    args = ["--config", str(variant_config(VARIANT)), "--checkpoint-dir", str(checkpoint)]
    args += ["--special-tokens", str(SPECIAL_TOKENS), "--output", str(output), *extra]
    return magi_convert(args)


@pytest.fixture()
def inputs(reference_dir, tmp_path):
    """Every input magi-convert takes, each alone in a folder of its own (so an output around one holds no other):
    flag -> path. The source is an original layout holding the DiT checkpoint; the VAE and T5 folders are never read
    here (every refusal comes before any reading)."""
    weights = {k: v.contiguous() for k, v in reference_weights(VARIANT).items()}
    source = tmp_path / "snapshot" / "MAGI-1"
    checkpoint = tmp_path / "dit" / "checkpoint"
    for folder in (source / "ckpt" / "magi" / VARIANT / weight_folder(VARIANT), checkpoint / weight_folder(VARIANT)):
        folder.mkdir(parents=True)
        save_file(weights, str(folder / "model.safetensors"))
    paths = {"--source": source, "--checkpoint-dir": checkpoint}
    for flag, name in (("--vae-dir", "vae"), ("--t5-dir", "t5")):
        paths[flag] = tmp_path / name / name
        paths[flag].mkdir(parents=True)
        (paths[flag] / "config.json").write_text(json.dumps({"component": name}))
    for flag, original in (("--config", variant_config(VARIANT)), ("--special-tokens", SPECIAL_TOKENS)):
        paths[flag] = tmp_path / flag.strip("-") / original.name
        paths[flag].parent.mkdir()
        paths[flag].write_bytes(original.read_bytes())
    return paths


def digest_of(path: Path) -> dict:
    return digest(path) if path.is_dir() else {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}


INPUT_FLAGS = ["--source", "--checkpoint-dir", "--vae-dir", "--t5-dir", "--config", "--special-tokens"]


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
@pytest.mark.parametrize("flag", INPUT_FLAGS)
def test_output_at_inside_or_around_the_source_is_refused(inputs, capsys, flag, where):
    """For every input flag: an output equal to the input, inside it or holding it is refused in one line naming
    that input, even with --overwrite, and every input is byte for byte what it was."""
    before = {name: digest_of(path) for name, path in inputs.items()}
    target = inputs[flag]
    output = {"equal": target, "inside": target / "converted", "containing": target.parent}[where]
    argv = [*(part for name, path in inputs.items() for part in (name, str(path))), "--variant", VARIANT]
    assert magi_convert([*argv, "--output", str(output), "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("magi-convert: error: The output folder") and error.count("\n") == 1, error
    assert f"the input {target};" in error, error
    assert {name: digest_of(path) for name, path in inputs.items()} == before


def test_output_naming_a_file_is_refused(checkpoint, tmp_path, capsys):
    before = digest(checkpoint)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert run(checkpoint, target, "--overwrite") == 1
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "mine"
    assert digest(checkpoint) == before


def test_overwrite_replaces_only_empty_folders_or_earlier_conversions(checkpoint, tmp_path, capsys):
    before = digest(checkpoint)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    assert run(checkpoint, unrelated, "--overwrite") == 1
    assert "not a previous diffusers-magi output" in capsys.readouterr().err
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8 not really"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(checkpoint, empty, "--overwrite") == 0 and (empty / "model_index.json").is_file()
    assert run(checkpoint, empty, "--overwrite") == 0  # an earlier conversion may be replaced
    assert digest(checkpoint) == before


def test_another_pipeline_folder_is_not_overwritten(checkpoint, tmp_path, capsys):
    """--overwrite replaces only a MAGI-1 pipeline folder: another Diffusers pipeline's folder (its model_index.json
    names StableDiffusionXLPipeline) is refused and left as it was."""
    before = digest(checkpoint)
    other = tmp_path / "sdxl"
    (other / "unet").mkdir(parents=True)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (other / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not really weights")
    kept = digest(other)
    assert run(checkpoint, other, "--overwrite") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a previous diffusers-magi output" in error, error
    assert "its model_index.json names StableDiffusionXLPipeline" in error
    assert digest(other) == kept and digest(checkpoint) == before


def test_leftover_partial_folder_is_removed_by_the_next_run(checkpoint, tmp_path):
    before = digest(checkpoint)
    leftover = tmp_path / "out" / ".converted.partial-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model_index.json").write_text("{}")
    unrelated = tmp_path / "out" / ".other.partial-abc123"  # another output's leftover stays
    unrelated.mkdir()
    assert run(checkpoint, tmp_path / "out" / "converted") == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".other.partial-abc123", "converted"]
    assert digest(checkpoint) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_file_system_errors_end_in_one_line_and_leave_nothing(checkpoint, tmp_path, capsys, code):
    before = digest(checkpoint)
    failure = OSError(code, os.strerror(code), str(tmp_path / "out"))
    with mock.patch("diffusers_magi.conversion.shard_writer.StreamingShardWriter._open_shard", side_effect=failure):
        assert run(checkpoint, tmp_path / "out" / "converted") == 1
    error = capsys.readouterr().err
    assert error == f"magi-convert: error: {os.strerror(code)}: {tmp_path / 'out'}\n"
    assert os.listdir(tmp_path / "out") == []
    assert digest(checkpoint) == before


def test_bad_arguments_fail_before_any_work(checkpoint, tmp_path, capsys):
    before = digest(checkpoint)
    cases = [
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--special-tokens", str(tmp_path / "nope.npz")], "is not a readable file"),
        (["--config", str(tmp_path / "nope.json")], "--config"),
        (["--checkpoint-dir", str(tmp_path / "no-dit")], f"--checkpoint-dir '{tmp_path / 'no-dit'}' is not a folder"),
        (["--vae-dir", str(tmp_path / "no-vae")], f"--vae-dir '{tmp_path / 'no-vae'}' is not a folder"),
        (["--t5-dir", str(tmp_path / "no-t5")], f"--t5-dir '{tmp_path / 'no-t5'}' is not a folder"),
        (["--source", str(tmp_path / "no-snapshot")], f"--source '{tmp_path / 'no-snapshot'}' is not a folder"),
    ]
    for extra, message in cases:
        with mock.patch("diffusers_magi.conversion.cli.convert_original_to_diffusers") as convert:
            with pytest.raises(SystemExit) as exit_info:
                run(checkpoint, tmp_path / "out", *extra)
        assert exit_info.value.code == 2 and not convert.called
        assert message in capsys.readouterr().err
    assert digest(checkpoint) == before


@pytest.mark.parametrize("how", ["read_only_parent", "parent_is_a_file"])
def test_an_output_that_cannot_be_created_fails_before_any_work(tmp_path, capsys, how):
    """An output whose parent may not be written (a read-only folder; or a path under a regular file) is one line and
    exit 1 before the conversion starts (so the checkpoint is never read: a stand-in file serves). Root may write
    into a read-only folder, so there the folder's permission check is answered as for another user."""
    checkpoint = tmp_path / "dit"
    (checkpoint / weight_folder(VARIANT)).mkdir(parents=True)
    (checkpoint / weight_folder(VARIANT) / "model.safetensors").write_bytes(b"never read")
    before = digest(checkpoint)
    real_access = access = os.access
    if how == "read_only_parent":
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
        message = f"Cannot write into {parent} (to create {parent / 'out'}): permission denied."
        if os.geteuid() == 0:
            access = lambda path, mode: os.fspath(path) != str(parent) and real_access(path, mode)  # noqa: E731
    else:
        parent = tmp_path / "notes.txt"
        parent.write_text("mine")
        message = f"Cannot create {parent / 'out'}: {parent} is a file, not a folder."
    try:
        with mock.patch("diffusers_magi.conversion.cli.convert_original_to_diffusers") as convert, mock.patch(
            "diffusers_magi.conversion.hub_folder.os.access", access
        ):
            assert run(checkpoint, parent / "out") == 1
    finally:
        parent.chmod(0o755)
    assert not convert.called
    assert capsys.readouterr().err == f"magi-convert: error: {message}\n"
    assert digest(checkpoint) == before
    if how == "parent_is_a_file":
        assert parent.read_text() == "mine"


def _sparse():
    spec = importlib.util.spec_from_file_location(
        "sparse_checkpoints", REPO_ROOT / "benchmarks" / "sparse_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(config, checkpoint_dir, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    return magi_convert(["--config", str(config_path), "--checkpoint-dir", str(checkpoint_dir), "--dry-run"])


def test_dry_run_on_every_released_variant(tmp_path, capsys, monkeypatch):
    from diffusers_magi.conversion import original_checkpoint

    monkeypatch.setattr(original_checkpoint, "_read_entries", lambda *args: pytest.fail("read tensor data"))
    sparse = _sparse()
    for variant in sparse.VARIANTS:
        config, checkpoint_dir, size = sparse.write_sparse_checkpoint(variant, tmp_path / "ckpt", num_layers=3)
        assert dry_run(config, checkpoint_dir, tmp_path) == 0, capsys.readouterr()
        report = capsys.readouterr().out
        assert "transformer: OK" in report and "0 missing, 0 unexpected (skipped), 0 mis-shaped" in report
        assert "conversion would succeed" in report and f"{size / 1e9:.2f} GB stored" in report
        assert "bfloat16" in report and ("float8_e4m3fn" in report) == variant.endswith("quant")


def test_dry_run_names_missing_extra_and_mis_shaped_tensors(tmp_path, capsys):
    def break_it(tensors):
        del tensors["videodit_blocks.layers.1.mlp.linear_fc2.weight"]
        tensors["videodit_blocks.layers.0.self_attention.extra.weight"] = ([4, 4], "bfloat16")
        shape, dtype = tensors["final_linear.linear.weight"]
        tensors["final_linear.linear.weight"] = ([shape[0] - 1, shape[1]], dtype)

    config, checkpoint_dir, _ = _sparse().write_sparse_checkpoint("4.5B_base", tmp_path / "ckpt", edit=break_it)
    assert dry_run(config, checkpoint_dir, tmp_path) == 1
    report = capsys.readouterr().out
    assert "transformer: FAIL" in report and "1 missing, 1 unexpected (skipped), 1 mis-shaped" in report
    assert "missing: blocks.1.ff.linear_out.weight" in report
    assert "unexpected (skipped): videodit_blocks.layers.0.self_attention.extra.weight" in report
    assert "mis-shaped: proj_out.weight is [63, 3072], the config implies [64, 3072]" in report
    assert "conversion would FAIL" in report
    inspection = inspect_original(config=config, checkpoint_dir=checkpoint_dir)
    assert not inspection.ok and inspection.components["transformer"].missing == ["blocks.1.ff.linear_out.weight"]


@pytest.mark.parametrize("variant", ["4.5B_base", "24B_distill"])
def test_dry_run_prints_the_memory_a_conversion_needs(tmp_path, capsys, variant):
    """The memory line equals what the manifest implies: with --dtype float32 every tensor is loaded as float32, so
    `from_original` holds 4 bytes per element of every tensor plus the largest tensor in flight (its stored bytes and,
    when the cast copies it, its float32 copy); `magi-convert` holds only that largest tensor."""
    sparse = _sparse()
    config, checkpoint_dir, _ = sparse.write_sparse_checkpoint(variant, tmp_path / "ckpt", num_layers=3)
    tensors = sparse.kept_tensors(sparse.load_manifest(variant), 3)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    elements = {name: math.prod(shape) for name, (shape, _) in tensors.items()}
    in_flight = max(
        elements[name] * itemsize[dtype] + (4 * elements[name] if dtype != "float32" else 0)
        for name, (_, dtype) in tensors.items()
    )
    load = 4 * sum(elements.values()) + in_flight
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    argv = ["--config", str(config_path), "--checkpoint-dir", str(checkpoint_dir), "--dtype", "float32", "--dry-run"]
    assert magi_convert(argv) == 0
    report = capsys.readouterr().out
    expected = f"from_original needs ~{load / 1e9:.2f} GB of memory, magi-convert ~{in_flight / 1e9:.2f} GB"
    assert expected in report, report
