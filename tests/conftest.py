"""Shared test helpers.

Parity tests read the reference data recorded from the original MAGI-1 code: the full set in ``../shared/reference``
when it is beside the repository, otherwise the in-repository subset of ``tests/data/reference`` (see
``tests/reference_data.py``). A parity test (one that uses the ``reference_dir`` fixture) never skips: a skip is
reported as a failure.
"""

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from .reference_data import FULL_REFERENCE_DIR, REPO_ROOT, reference_root

REFERENCE_DIR = reference_root()
# True when the full reference set is used, False with the in-repository subset.
FULL_REFERENCE = REFERENCE_DIR == FULL_REFERENCE_DIR


def pytest_addoption(parser):
    parser.addoption(
        "--magi1-original",
        metavar="PATH",
        help="a checkout of the original MAGI-1 code (SandAI-org/MAGI-1) for tests/test_bench_vs_original.py "
        "(default: ../MAGI-1 beside the repository)",
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped parity test fails: parity with the original must be proven on every run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and "reference_dir" in getattr(item, "fixturenames", ()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"parity test {item.nodeid} was skipped ({reason}); parity tests must run on every machine"


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_active_attention_backend():
    """`ModelMixin.set_attention_backend` also sets Diffusers' process-wide active backend, which every model whose
    processors name no backend then uses: put it back after each test so no test depends on the ones before it."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def relative_max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|ours - reference| / max(1, max|reference|)``, the parity metric of the reference READMEs."""
    ours = ours.detach().double().cpu()
    reference = reference.detach().double().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    return ((ours - reference).abs().max() / max(1.0, reference.abs().max().item())).item()
