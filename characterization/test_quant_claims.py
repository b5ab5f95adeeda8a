"""The quantizer's claims on the model under test, per activation bit width (and layer group, rows
`A{bits}:{group}`): time-aware activation grids, TaQ-DiT's shifting and its outlier migration each reduce the
quantized model's output error at the same bits, and joint reconstruction beats separate reconstruction at W4A8
(`taq.quant.claims`); and the Phase 2 diagnostics rank the layers by the damage their quantized post-GELU input
does (`taq.quant.damage`, rows `{diagnostic}:A{bits}`). Which rows hold is in the expectations file like the
statistics claims (strict xfail where it does not hold)."""

import pytest

from taq.formats.calibration import load_calibration
from taq.quant.claims import (BITS, MIGRATION, RECONSTRUCTION, SHIFTING, TIME_AWARE, measure_claim,
                              measure_reconstruction_claim)
from taq.quant.damage import DAMAGE, measure_damage_claim

CALIBRATION_POINTS = 256  # TaQ-DiT initialises its activation quantizers on 256 calibration points
HELD_OUT_POINTS = 48


@pytest.fixture(scope="module")
def quant_claims(request, model, calibration_path) -> dict:
    """claim -> row -> Measurement, measured on first use of each claim."""
    cal = load_calibration(calibration_path)
    cache: dict = {}
    sizes = {"num_samples": CALIBRATION_POINTS, "eval_points": HELD_OUT_POINTS}

    def measured(claim: str) -> dict:
        if claim not in cache:
            if claim == RECONSTRUCTION.name:
                found = [measure_reconstruction_claim(model, cal, **sizes)]
            elif claim == DAMAGE.name:
                found = measure_damage_claim(model, cal, request.getfixturevalue("stats_arrays"), **sizes)
            else:
                found = [m for bits in BITS for m in measure_claim(model, cal, claim, bits, **sizes)]
            cache[claim] = {m.layer: m for m in found}
        return cache[claim]
    return measured


@pytest.mark.claim(TIME_AWARE.name)
def test_time_aware_activation_error(layer, check_claim, quant_claims):
    check_claim(layer, quant_claims(TIME_AWARE.name)[layer])


@pytest.mark.claim(SHIFTING.name)
def test_shifting_post_gelu_error(layer, check_claim, quant_claims):
    check_claim(layer, quant_claims(SHIFTING.name)[layer])


@pytest.mark.claim(MIGRATION.name)
def test_migration_fc2_error(layer, check_claim, quant_claims):
    check_claim(layer, quant_claims(MIGRATION.name)[layer])


@pytest.mark.claim(RECONSTRUCTION.name)
def test_joint_reconstruction_w4a8(layer, check_claim, quant_claims):
    check_claim(layer, quant_claims(RECONSTRUCTION.name)[layer])


@pytest.mark.claim(DAMAGE.name)
def test_diagnostics_predict_damage(layer, check_claim, quant_claims):
    check_claim(layer, quant_claims(DAMAGE.name)[layer])
