"""A claim's outcome (holds / does not hold / undecided), when it contradicts the expectations file, and the
file's round trip."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, OUTCOMES, UNDECIDED, Measurement

from characterization.expectations import (Expectations, contradicts, load_expectations, updated,
                                           write_expectations)

finite = st.floats(-1e3, 1e3, allow_nan=False)


def _measured(value, threshold=0.0, interval=None):
    return Measurement("shifting_post_gelu_error", "A4:fc2", value, threshold, "", interval)


@given(finite, finite)
def test_a_point_value_is_decided_by_the_threshold(value, threshold):
    assert _measured(value, threshold).outcome == (HOLDS if value >= threshold else DOES_NOT_HOLD)


@given(finite, finite, finite, finite)
def test_an_interval_holds_above_fails_below_and_is_undecided_across(a, b, value, threshold):
    low, high = sorted((a, b))
    outcome = _measured(value, threshold, (low, high)).outcome
    assert outcome == (HOLDS if low > threshold else DOES_NOT_HOLD if high < threshold else UNDECIDED)
    assert (outcome == UNDECIDED) == (low <= threshold <= high)


def test_no_difference_at_all_is_undecided():
    assert _measured(0.0, interval=(0.0, 0.0)).outcome == UNDECIDED


def test_nan_never_holds():
    assert _measured(math.nan).outcome == DOES_NOT_HOLD
    assert _measured(0.1, interval=(math.nan, math.nan)).outcome == UNDECIDED


@pytest.mark.parametrize("expected", [*OUTCOMES, None])
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_only_a_reversal_or_an_unlisted_failure_contradicts(expected, outcome):
    reversal = {expected, outcome} == {HOLDS, DOES_NOT_HOLD}
    assert contradicts(expected, outcome) == (reversal or (expected is None and outcome != HOLDS))


def test_the_file_round_trips_outcomes_values_and_intervals(tmp_path):
    records = [{"claim": "migration_fc2_error", "layer": "A6:fc2", "measured": 0.028, "interval": (0.001, 0.052),
                "threshold": 0.0, "outcome": HOLDS},
               {"claim": "asymmetry_ratio", "layer": "mm_00_img", "measured": math.inf, "interval": None,
                "threshold": 10.0, "outcome": HOLDS},
               {"claim": "migration_fc2_error", "layer": "A4:fc2", "measured": -0.004, "interval": (-0.025, 0.015),
                "threshold": 0.0, "outcome": UNDECIDED}]
    path = tmp_path / "pocket.json"
    write_expectations(path, updated(Expectations(meta={"model": "pocket"}), records, {"recipe": "ci"}))
    loaded = load_expectations(path)
    assert loaded.expected("migration_fc2_error", "A6:fc2") == HOLDS
    assert loaded.expected("migration_fc2_error", "A4:fc2") == UNDECIDED
    assert loaded.expected("migration_fc2_error", "A8:fc2") is None
    assert loaded.intervals[("migration_fc2_error", "A6:fc2")] == [0.001, 0.052]
    assert ("asymmetry_ratio", "mm_00_img") not in loaded.intervals
    assert loaded.measured[("asymmetry_ratio", "mm_00_img")] == "inf"  # JSON has no infinity
    assert (loaded.meta["model"], loaded.meta["recipe"]) == ("pocket", "ci")


def test_an_updated_pair_loses_an_interval_it_no_longer_has():
    previous = Expectations({("c", "l"): UNDECIDED}, {("c", "l"): 0.1}, {("c", "l"): [-0.1, 0.3]})
    result = updated(previous, [{"claim": "c", "layer": "l", "measured": 0.5, "outcome": HOLDS}], {})
    assert result.outcomes[("c", "l")] == HOLDS and ("c", "l") not in result.intervals


@pytest.mark.parametrize("document, message", [
    ({"holds": {"asymmetry_ratio": {"mm_00_img": True}}}, "no 'outcomes'"),
    ({"outcomes": {"no_such_claim": {}}}, "unknown claims"),
    ({"outcomes": {"asymmetry_ratio": {"mm_00_img": True}}}, "must be one of"),
])
def test_a_bad_file_says_what_is_wrong(tmp_path, document, message):
    path = tmp_path / "pocket.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message):
        load_expectations(path)
