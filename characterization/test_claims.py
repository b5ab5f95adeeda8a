"""TaQ-DiT's observations on post-GELU activations, one test per claim, parametrized over the model's FFN layers.

What each claim measures and the observation its threshold encodes: `taq.analysis.claims.CLAIMS`. Which layers are
expected to show it: characterization/expectations/<model>.json (the others run as strict xfails).
"""

import pytest


@pytest.mark.claim("asymmetry_ratio")
def test_asymmetry_ratio(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("asymmetry_wasted_levels")
def test_asymmetry_wasted_levels(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("temporal_range_drift")
def test_temporal_range_drift(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("temporal_mean_shift")
def test_temporal_mean_shift(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("channel_outliers")
def test_channel_outliers(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("time_aware_mse_8bit")
def test_time_aware_mse_8bit(layer, check_claim):
    check_claim(layer)


@pytest.mark.claim("time_aware_mse_4bit")
def test_time_aware_mse_4bit(layer, check_claim):
    check_claim(layer)
