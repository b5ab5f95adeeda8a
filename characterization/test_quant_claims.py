"""The quantizer's claim on the model under test: time-aware activation grids reduce its output error at the same
bits, per activation bit width and layer group (rows `A{bits}:{group}`). Measured by `taq.quant.claims`; which rows
hold is in the expectations file like the statistics claims (strict xfail where it does not hold)."""

import pytest

from taq.formats.calibration import load_calibration
from taq.quant.claims import BITS, measure_time_aware_gain

CALIBRATION_POINTS = 256  # TaQ-DiT initialises its activation quantizers on 256 calibration points
HELD_OUT_POINTS = 48


@pytest.fixture(scope="module")
def time_aware_gains(model, calibration_path) -> dict:
    cal = load_calibration(calibration_path)
    return {m.layer: m for bits in BITS for m in measure_time_aware_gain(
        model, cal, bits, num_samples=CALIBRATION_POINTS, eval_points=HELD_OUT_POINTS)}


@pytest.mark.claim("time_aware_activation_error")
def test_time_aware_activation_error(layer, check_claim, time_aware_gains):
    check_claim(layer, time_aware_gains[layer])
