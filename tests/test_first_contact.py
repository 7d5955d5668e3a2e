"""What a new user meets first: imports and commands print nothing but their own output, a saved pipeline folder
loads in a fresh process with nothing imported by hand, and the frame-count rule of `docs/pipelines.md` is the one
the pipelines apply."""

import subprocess
import sys

import pytest

from .conftest import REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-c", "import diffusers_magi"],
        [sys.executable, "-m", "diffusers_magi.cli", "--help"],
        [sys.executable, "-m", "diffusers_magi.conversion.cli", "--help"],
    ],
    ids=["import", "magi-generate --help", "magi-convert --help"],
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
