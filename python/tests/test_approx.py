"""compile(approx=..., max_error=..., calibration=...): the error budget from Python, as
`kiln run --approx` enforces it (passes/src/approx): a generous budget is accepted and
reported, a tiny one is refused, and calibration comes from a folder or from feed dicts."""

import numpy as np
import pytest

import kiln
from conftest import REPO, read_pb

SWIGLU = REPO / "tests" / "models" / "sparse" / "swiglu_ffn"

# A relative-L2 error no rewrite of this model gets under.
TINY_BUDGET = 1e-9
# A budget far above what a 50% threshold costs this model.
GENEROUS_BUDGET = 0.5


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def feed_sets():
    sets = []
    for d in sorted(SWIGLU.glob("test_data_set_*")):
        sets.append(dict(read_pb(p) for p in sorted(d.glob("input_*.pb"))))
    return sets


def test_a_generous_budget_is_accepted_reported_and_holds():
    exact = kiln.compile(SWIGLU / "model.onnx")
    assert exact.approx_report is None
    exe = kiln.compile(
        SWIGLU / "model.onnx",
        approx="ffn-threshold=0.5",
        max_error=GENEROUS_BUDGET,
        calibration=SWIGLU,
    )
    r = exe.approx_report
    assert r is not None and r["accepted"], r
    assert r["metric"] == "rel-l2" and r["budget"] == GENEROUS_BUDGET
    assert not r["random"] and r["held_out_sets"] >= 1
    assert 0 < r["calibration_error"] <= GENEROUS_BUDGET
    assert r["held_out_error"] is not None and r["held_out_error"] <= GENEROUS_BUDGET
    assert "ffn-threshold" in r["text"]
    # The approximate model really differs from the exact one, within the budget.
    feeds = feed_sets()[-1]
    (y_exact,) = exact.run(feeds).values()
    (y_approx,) = exe.run(feeds).values()
    err = rel_l2(y_approx, y_exact)
    assert 0 < err <= GENEROUS_BUDGET
    assert np.isfinite(y_approx).all()


def test_feed_dicts_calibrate_like_the_folder():
    exe = kiln.compile(
        SWIGLU / "model.onnx",
        approx="ffn-threshold=0.5",
        max_error=GENEROUS_BUDGET,
        calibration=feed_sets(),
    )
    r = exe.approx_report
    assert r["accepted"] and r["source"].endswith("feed dicts")


def test_a_tiny_budget_is_refused():
    with pytest.raises(kiln.KilnError, match="approximation refused"):
        kiln.compile(
            SWIGLU / "model.onnx",
            approx="ffn-threshold=0.5",
            max_error=TINY_BUDGET,
            calibration=SWIGLU,
        )


def test_bad_calibration_and_families_are_clear_errors():
    with pytest.raises(kiln.InputError, match="not a folder"):
        kiln.compile(SWIGLU / "model.onnx", approx="ffn-threshold", max_error=0.1,
                     calibration=SWIGLU / "model.onnx")
    with pytest.raises(kiln.InputError, match="missing input"):
        kiln.compile(SWIGLU / "model.onnx", approx="ffn-threshold", max_error=0.1,
                     calibration=[{}])
    with pytest.raises(kiln.KilnError, match="unknown approximation family"):
        kiln.compile(SWIGLU / "model.onnx", approx="fast", max_error=0.1,
                     calibration=SWIGLU)
