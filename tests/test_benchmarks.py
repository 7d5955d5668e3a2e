"""The benchmark scripts run and print their tables (at the smallest sizes; the figures themselves are not checked)."""

import subprocess
import sys

import pytest

from .conftest import REPO_ROOT


def _run(script, *args):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_bench_transformer_prints_a_row_per_chunk_count():
    output = _run("bench_transformer.py", "--latent-size", "4", "--repeats", "1")
    assert "preset=small" in output and "threads=" in output
    rows = [line.split() for line in output.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
