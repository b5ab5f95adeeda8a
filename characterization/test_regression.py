"""Stats regression: this run's per-(layer, timestep) statistics against the committed baseline.

Baselines: characterization/baselines/<model>.npz, made with the ci recipe (`--taq-update-baselines` rewrites it
from the current run). Statistics and tolerances: characterization/regression.py.
"""

from dataclasses import replace
from pathlib import Path

import pytest

from characterization.perturbation import PERTURBATION_SCALE, PERTURBED_LAYER, PERTURBED_PARAMETER, perturbed_model
from taq.pipeline import ensure_stats
from characterization.regression import Baseline, compare, load_baseline, make_baseline, save_baseline

BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
SHOWN_MISMATCHES = 25


def baseline_path(model: str) -> Path:
    return BASELINES_DIR / f"{model}.npz"


def baseline_meta(suite, stats_file) -> dict:
    return {"model": suite.model_name, "recipe": suite.recipe.name, "weights_id": stats_file.meta["weights_id"],
            "num_samples": stats_file.meta["num_samples"], "calibration_sha256": stats_file.meta["calibration_sha256"],
            "generated_by": "pytest characterization/ --taq-update-baselines"}


@pytest.fixture(scope="module")
def baseline(suite, stats_file) -> Baseline:
    path = baseline_path(suite.model_name)
    if suite.update_baselines:
        save_baseline(path, make_baseline(stats_file.arrays, baseline_meta(suite, stats_file)))
        suite.summary_lines.append(f"baseline rewritten: {path}")
    if not path.exists():
        pytest.skip(f"no stats baseline for {suite.model_name} ({path}); create it with --taq-update-baselines")
    stored = load_baseline(path)
    if stored.meta.get("recipe") != suite.recipe.name:
        pytest.skip(f"{path.name} was made with the {stored.meta.get('recipe')} recipe, this run uses "
                    f"{suite.recipe.name}")
    return stored


def test_stats_match_the_baseline(baseline, stats_file, suite):
    mismatches = compare(stats_file.arrays, baseline)
    if mismatches:
        lines = [str(m) for m in mismatches[:SHOWN_MISMATCHES]]
        if len(mismatches) > SHOWN_MISMATCHES:
            lines.append(f"... and {len(mismatches) - SHOWN_MISMATCHES} more")
        hint = ""
        if baseline.meta.get("weights_id") != stats_file.meta["weights_id"]:
            hint = (f"\nThe baseline was made with other weights ({baseline.meta.get('weights_id')}, now "
                    f"{stats_file.meta['weights_id']}).")
        pytest.fail(f"{len(mismatches)} statistics differ from {baseline_path(suite.model_name).name}:\n"
                    + "\n".join(lines) + hint + "\nIf the change is intended, regenerate the baseline with "
                    "pytest characterization/ --taq-update-baselines", pytrace=False)


def test_regression_check_catches_a_perturbed_ffn_weight(suite, calibration_path, stats_file, tmp_path):
    """A test of the test: one FFN weight matrix x 1.05, profiled on the same calibration set, must fail the
    comparison, in the perturbed layer and later ones only, while the model as loaded passes it. The reference is a
    baseline written from this run's statistics, so the check does not depend on the committed file being current."""
    if suite.model_name != "pocket" or suite.checkpoint is not None:
        pytest.skip("the regression check's own test runs on the embedded default (--taq-model pocket)")
    save_baseline(tmp_path / "reference.npz", make_baseline(stats_file.arrays, baseline_meta(suite, stats_file)))
    reference = load_baseline(tmp_path / "reference.npz")
    # One pass, no trajectory groups: only the merged statistics are compared (the batching differs from the
    # grouped profile's by float32 rounding, far inside the tolerances).
    perturbed = ensure_stats(perturbed_model(suite.model_name), calibration_path,
                             replace(suite.recipe, profile_groups=1), suite.cache_dir, suite.log,
                             variant=f"{PERTURBED_PARAMETER} x {PERTURBATION_SCALE}")
    assert compare(stats_file.arrays, reference) == []
    mismatches = compare(perturbed.arrays, reference)
    flagged = {m.layer for m in mismatches}
    assert PERTURBED_LAYER in flagged, f"the perturbed layer passed; flagged only {sorted(flagged)}"
    upstream = {"mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt", "mm_02_txt"}  # not downstream of the change
    assert not flagged & upstream, f"layers before the perturbation were flagged: {sorted(flagged & upstream)}"
    assert {m.timestep for m in mismatches if m.layer == PERTURBED_LAYER} == set(reference.timesteps.tolist())
