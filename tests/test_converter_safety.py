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


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_output_at_inside_or_around_the_source_is_refused(checkpoint, tmp_path, capsys, where):
    before = digest(checkpoint)
    output = {"equal": checkpoint, "inside": checkpoint / "converted", "containing": tmp_path}[where]
    assert run(checkpoint, output, "--overwrite") == 1
    error = capsys.readouterr().err
    assert error.startswith("magi-convert: error: The output folder") and error.count("\n") == 1, error
    assert digest(checkpoint) == before


def test_output_naming_a_file_is_refused(checkpoint, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert run(checkpoint, target, "--overwrite") == 1
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "mine"


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


def test_leftover_partial_folder_is_removed_by_the_next_run(checkpoint, tmp_path):
    leftover = tmp_path / "out" / ".converted.partial-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model_index.json").write_text("{}")
    unrelated = tmp_path / "out" / ".other.partial-abc123"  # another output's leftover stays
    unrelated.mkdir()
    assert run(checkpoint, tmp_path / "out" / "converted") == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".other.partial-abc123", "converted"]


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
    cases = [
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--special-tokens", str(tmp_path / "nope.npz")], "is not a readable file"),
    ]
    for extra, message in cases:
        with mock.patch("diffusers_magi.conversion.cli.convert_original_to_diffusers") as convert:
            with pytest.raises(SystemExit) as exit_info:
                run(checkpoint, tmp_path / "out", *extra)
        assert exit_info.value.code == 2 and not convert.called
        assert message in capsys.readouterr().err


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
