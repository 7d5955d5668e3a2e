"""Shared test helpers.

Parity tests read the reference data recorded from the original MAGI-1 code. It lives in ``../shared/reference``
relative to the repository root; tests that need it skip with a clear message when the folder is absent.
"""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = (REPO_ROOT / ".." / "shared" / "reference").resolve()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data folder {REFERENCE_DIR} is absent; parity tests need ../shared/reference")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def relative_max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|ours - reference| / max(1, max|reference|)``, the parity metric of the reference READMEs."""
    ours = ours.detach().double().cpu()
    reference = reference.detach().double().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    return ((ours - reference).abs().max() / max(1.0, reference.abs().max().item())).item()
