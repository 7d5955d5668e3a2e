"""Parity of AutoencoderMagi and the MAGI-1 pre/post-processing with the original code, case by case.

Every case folder under ``<reference>/vae/cases`` (the full set or the in-repository subset) is a test: the original checkpoint folder it names is
converted with ``load_original_vae`` (after checking the weights' sha256), the recorded operation is re-run with the
recorded parameters, and every recorded output is compared:

* float tensors: ``atol = rtol = 1e-4`` in float32 (the case's own suggested tolerance where it is stricter, and for
  other dtypes the case's suggestion);
* decoded uint8 frames: equal except a difference of 1 on at most 0.01% of the values;
* preprocessed uint8 frames (ffmpeg): exactly equal.
"""

import pytest
import torch

from ._vae_reference import Case, case_names, run_case
from .conftest import relative_max_error

FLOAT32_TOLERANCE = 1e-4
# bfloat16 keeps 8 significant bits: 1e-2 is about two units in the last place; used only if a case suggests nothing.
BFLOAT16_TOLERANCE = 1e-2
UINT8_MAX_OFF_BY_ONE_FRACTION = 1e-4


def _float_tolerance(case: Case) -> tuple[float, float]:
    suggested = case.spec.get("suggested_tolerance", {})
    if case.dtype == torch.float32:
        return (
            min(suggested.get("atol", FLOAT32_TOLERANCE), FLOAT32_TOLERANCE),
            min(suggested.get("rtol", FLOAT32_TOLERANCE), FLOAT32_TOLERANCE),
        )
    return suggested.get("atol", BFLOAT16_TOLERANCE), suggested.get("rtol", BFLOAT16_TOLERANCE)


@pytest.mark.parametrize("name", case_names())
def test_vae_reference_case(reference_dir, name):
    case = Case(name)
    if "checkpoint" in case.spec:
        assert case.weights_sha256_ok(), "checkpoint weights differ from the ones the case was recorded with"

    ours = run_case(case)
    assert set(case.outputs) <= set(ours), f"case records outputs we do not produce: {set(case.outputs) - set(ours)}"

    preprocessing = case.kind() in ("preprocess_i2v", "preprocess_v2v") or case.kind().startswith("process_")
    atol, rtol = _float_tolerance(case)
    for key, reference in case.outputs.items():
        mine = ours[key].detach().cpu()
        assert mine.shape == reference.shape, f"{key}: shape {tuple(mine.shape)} != {tuple(reference.shape)}"
        if reference.dtype == torch.uint8:
            assert mine.dtype == torch.uint8, f"{key}: dtype {mine.dtype}"
            difference = (mine.int() - reference.int()).abs()
            if preprocessing:
                assert difference.max() == 0, f"{key}: preprocessed frames differ by up to {difference.max()}"
            else:
                off_by_one = (difference == 1).sum().item()
                assert difference.max() <= 1, f"{key}: frames differ by up to {difference.max()} levels"
                assert off_by_one <= UINT8_MAX_OFF_BY_ONE_FRACTION * reference.numel(), (
                    f"{key}: {off_by_one} of {reference.numel()} values are off by one"
                )
        else:
            torch.testing.assert_close(mine.float(), reference, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
            print(f"{name} {key}: relative max error {relative_max_error(mine, reference):.3g}")
