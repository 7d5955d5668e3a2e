"""What a new user meets first: imports and commands print nothing but their own output, a saved pipeline folder
loads in a fresh process with nothing imported by hand, and the frame-count rule of `docs/pipelines.md` is the one
the pipelines apply."""

import os
import re
import subprocess
import sys

import pytest
import torch

from diffusers_magi import MagiImageToVideoPipeline, MagiVideoToVideoPipeline
from diffusers_magi.tiny_random import tiny_random_pipeline

from .conftest import REFERENCE_DIR, REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-c", "import diffusers_magi"],
        [sys.executable, "-m", "diffusers_magi.cli", "--help"],
        [sys.executable, "-m", "diffusers_magi.conversion.cli", "--help"],
        [sys.executable, "-m", "diffusers_magi.training.train_lora", "--help"],
    ],
    ids=["import", "magi-generate --help", "magi-convert --help", "magi-train-lora --help"],
)
def test_no_warning_noise(command):
    """No torchao / pytree / Diffusers import-time lines (torchao is installed by the `quantization` extra)."""
    result = _run(*command)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"unexpected output on stderr:\n{result.stderr}"


def test_torchao_messages_are_back_after_import():
    """Only the import is quiet: the loggers keep the levels they had."""
    result = _run(
        sys.executable,
        "-c",
        "import logging; logging.getLogger('torchao').setLevel(logging.INFO); import diffusers_magi; "
        "print(logging.getLogger('torchao').level, logging.getLogger('torch.utils._pytree').level)",
    )
    assert result.stdout.split() == [str(20), "0"], result.stderr


def test_offline_generate_says_what_to_do(tmp_path):
    """The README's `magi-generate` line without network access: one clear error, no traceback."""
    special_tokens = REFERENCE_DIR / "dit" / "e_sampler_t2v_base" / "special_tokens.npz"
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_magi.cli", "--prompt", "a fox", "--special-tokens-file", str(special_tokens),
         "--output", str(tmp_path / "fox.mp4")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "could not download sand-ai/MAGI-1" in result.stderr and "--model tiny-random" in result.stderr


def _frame_table():
    """Rows of the table in docs/pipelines.md "How many frames come out": (num_frames, t2v, i2v, v2v)."""
    text = (REPO_ROOT / "docs" / "pipelines.md").read_text()
    section = text.split("## How many frames come out", 1)[1]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", section, flags=re.M)
    assert rows, "the frame table of docs/pipelines.md is missing"
    return [tuple(int(value) for value in row) for row in rows]


@pytest.mark.slow
def test_frame_count_table_matches_the_pipelines():
    """Every row of the docs' frame table, computed by running the three pipelines (tiny random weights; the prefix
    as latents: one latent frame for the image, 8 for a 32-frame video)."""
    pipe = tiny_random_pipeline()
    pipelines = {
        "t2v": (pipe, {}),
        "i2v": (MagiImageToVideoPipeline.from_pipe(pipe), {"prefix_latents": torch.randn(1, 16, 1, 4, 4)}),
        "v2v": (MagiVideoToVideoPipeline.from_pipe(pipe), {"prefix_latents": torch.randn(1, 16, 32 // 4, 4, 4)}),
    }
    for num_frames, *expected in _frame_table():
        counts = []
        for pipeline, prefix in pipelines.values():
            pipeline.set_progress_bar_config(disable=True)
            frames = pipeline(prompt="a fox", height=32, width=32, num_frames=num_frames, output_type="pt", **prefix)
            counts.append(frames.frames.shape[1])
        assert counts == expected, f"num_frames={num_frames}: pipelines give {counts}, the docs say {expected}"


def test_saved_folder_loads_in_a_fresh_process_that_imports_only_diffusers(tmp_path):
    """A folder saved by `save_pretrained` loads with `DiffusionPipeline.from_pretrained` in a new process that never
    imports `diffusers_magi` by hand: the installed `diffusers_magi.pth` hook resolves the class name (and importing
    Diffusers alone does not import the package)."""
    tiny_random_pipeline().save_pretrained(str(tmp_path / "tiny"))
    result = _run(
        sys.executable,
        "-c",
        "import sys\nfrom diffusers import DiffusionPipeline\nprint('before', 'diffusers_magi' in sys.modules)\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'tiny')!r})\nprint(type(pipe).__name__)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["before", "False", "MagiPipeline"], result.stdout


def test_startup_hook_names_every_public_class():
    import _diffusers_magi_hook
    import diffusers_magi

    assert _diffusers_magi_hook.CLASS_NAMES == set(diffusers_magi.__all__)
