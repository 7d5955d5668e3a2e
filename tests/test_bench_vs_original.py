"""benchmarks/bench_vs_original.py: its one-line error without a checkout of the original MAGI-1 code, and a tiny run
against a checkout whose clean chunks match the original's and whose table prints.

The tiny run needs a checkout of SandAI-org/MAGI-1 (and einops): the folder given by `--magi1-original PATH`, else
`../MAGI-1` beside the repository. Without one it is skipped (CI cannot reach GitHub); an explicit path that is not a
checkout fails.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_vs_original.py"
ENTRY_FILE = Path("inference") / "pipeline" / "video_generate.py"
ROWS = ["original", "port, branches one by one", "port, branches batched", "original", "port"]


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture
def original_checkout(request) -> Path:
    given = request.config.getoption("--magi1-original")
    path = Path(given) if given else REPO_ROOT.parent / "MAGI-1"
    if not (path / ENTRY_FILE).is_file():
        if given:
            pytest.fail(f"--magi1-original {given}: no {ENTRY_FILE} there")
        pytest.skip(f"no checkout of the original MAGI-1 code at {path} (pass one with --magi1-original PATH)")
    return path


@pytest.mark.parametrize("given", [False, True], ids=["no --original", "not a checkout"])
def test_without_a_checkout_of_the_original_it_says_how_to_get_one(tmp_path, given):
    result = _run(*(["--original", str(tmp_path)] if given else []), "--preset", "tiny")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--original PATH" in lines[0] and "git clone https://github.com/SandAI-org/MAGI-1" in lines[0]
    assert (str(ENTRY_FILE) in lines[0]) == given


@pytest.mark.slow
def test_tiny_run_matches_the_original_and_prints_the_table(original_checkout):
    result = _run("--original", str(original_checkout), "--preset", "tiny", "--repeats", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity: every clean chunk within 1e-04 of the original" in result.stdout
    assert "preset tiny: hidden 256, 2 layers" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| base", "| distilled"))]
    assert [row[1].strip() for row in rows] == ROWS
    for guidance, label, seconds, ratio, round_ratios, error in rows:
        assert float(seconds) > 0 and ratio.strip().endswith("x")
        median, spread = round_ratios.split()
        low, high = (float(value) for value in spread.strip("()x").split("-"))
        assert median.endswith("x") and low <= float(median[:-1]) <= high
        assert float(error) <= 1e-4, (guidance, label, error)
