"""Fixtures and hooks of the characterization suite; see characterization/__init__.py for what it does."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.analysis.claims import CLAIMS, DOES_NOT_HOLD, Measurement, measure
from taq.config import get_preset
from taq.formats import atomic_path
from taq.formats import calibration as calibration_format
from taq.formats.stats import StatsFile
from taq.loading import check_model_options, load_model
from taq.options import histogram_option_names, histogram_spec
from taq.models.mmdit import MMDiT
from taq.pipeline import ensure_calibration, ensure_stats
from taq.recipes import Recipe, get_recipe
from taq.tracing import mmdit_layer_paths
from taq.tracing.tracer import traced_layer_names

from characterization.claims_table import tally, write_claims
from characterization.registry import ALL_CLAIMS, QUANT_CLAIM_LAYERS
from characterization.expectations import Expectations, contradicts, expectations_path, load_expectations
from characterization.expectations import updated
from characterization.expectations import write_expectations

SUITE = pytest.StashKey["Suite"]()
BENCHMARKS_FILE = "benchmarks.json"


@dataclass
class Suite:
    """The session's settings (from the --taq-* options) and what the tests leave for the report."""

    config: pytest.Config
    model_name: str
    checkpoint: str | None
    random_weights: bool
    recipe: Recipe
    calibration_file: Path | None
    report_dir: Path
    cache_dir: Path
    update_expectations: bool
    update_baselines: bool
    expectations: Expectations
    records: dict[str, dict] = field(default_factory=dict)  # test node id -> claims-table row
    stats: StatsFile | None = None
    calibration_meta: dict | None = None
    summary_lines: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "Suite":
        root = config.rootpath
        model_name = config.getoption("--taq-model")
        checkpoint, random_weights = config.getoption("--taq-checkpoint"), config.getoption("--taq-random-weights")
        try:
            check_model_options(model_name, checkpoint, random_weights)
        except ValueError as exc:  # its message names the command line's options; say the suite's
            message = str(exc).replace("--checkpoint", "--taq-checkpoint").replace("--random-weights",
                                                                                  "--taq-random-weights")
            raise pytest.UsageError(f"--taq-model {model_name}: {message}") from None
        names = histogram_option_names("--taq-")
        try:
            histogram = histogram_spec(*(config.getoption(names[field]) for field in ("bins", "scale", "limit")),
                                       names=names)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        calibration_file = config.getoption("--taq-calibration")
        if calibration_file is not None and not Path(calibration_file).is_file():
            raise pytest.UsageError(f"--taq-calibration {calibration_file}: no such file")
        return cls(config=config, model_name=model_name, checkpoint=checkpoint, random_weights=random_weights,
                   recipe=replace(get_recipe(config.getoption("--taq-recipe")), histogram=histogram,
                                  profile_branches=config.getoption("--taq-branches")),
                   calibration_file=Path(calibration_file).resolve() if calibration_file else None,
                   report_dir=root / config.getoption("--taq-report-dir"), cache_dir=root / ".cache" / "taq",
                   update_expectations=config.getoption("--taq-update-expectations"),
                   update_baselines=config.getoption("--taq-update-baselines"),
                   expectations=load_expectations(expectations_path(model_name)))

    @cached_property
    def layers(self) -> list[str]:
        """The model's FFN layer names, from its (lazily built, never evaluated) architecture; with
        --taq-branches each followed by its two CFG branches."""
        return traced_layer_names(mmdit_layer_paths(MMDiT(get_preset(self.model_name).mmdit)),
                                  self.recipe.profile_branches)

    def log(self, message: str) -> None:
        """A line on the terminal now, also from inside a fixture (output capture is suspended for it)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[taq] {message}")

    @property
    def context(self) -> dict:
        # A session that measured only model claims profiled no statistics: keep the file's weights id then.
        weights_id = self.stats.meta.get("weights_id") if self.stats else self.expectations.meta.get("weights_id")
        return {"model": self.model_name, "recipe": self.recipe.name, "weights_id": weights_id}


def pytest_configure(config):
    config.addinivalue_line("markers", "claim(name): a TaQ-DiT claim test, parametrized over the model's layers")
    config.stash[SUITE] = Suite.from_config(config)


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("claim")
    if marker is None or "layer" not in metafunc.fixturenames:
        return
    (claim,) = marker.args
    if claim not in ALL_CLAIMS:
        raise ValueError(f"{metafunc.function.__name__}: unknown claim {claim!r}")
    suite = metafunc.config.stash[SUITE]
    params = []
    for layer in (suite.layers if claim in CLAIMS else QUANT_CLAIM_LAYERS[claim]):
        marks = []
        if suite.expectations.expected(claim, layer) == DOES_NOT_HOLD and not suite.update_expectations:
            then = suite.expectations.measured.get((claim, layer), "?")
            interval = suite.expectations.intervals.get((claim, layer))
            then = f"{then}, 95% interval {interval}" if interval else f"{then} < {ALL_CLAIMS[claim].threshold:g}"
            marks.append(pytest.mark.xfail(strict=True, reason=(
                f"{expectations_path(suite.model_name).name} says it does not hold for this layer (measured {then} "
                "when written); if it now holds and that is intended, run with --taq-update-expectations")))
        params.append(pytest.param(layer, id=layer, marks=marks))
    metafunc.parametrize("layer", params)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def suite(pytestconfig) -> Suite:
    return pytestconfig.stash[SUITE]


@pytest.fixture(scope="session")
def model(suite):
    return load_model(suite.model_name, checkpoint=suite.checkpoint, random_weights=suite.random_weights)


@pytest.fixture(scope="session")
def calibration_path(suite, model) -> Path:
    if suite.calibration_file is not None:
        path, meta = suite.calibration_file, calibration_format.read_meta(suite.calibration_file)
    else:
        path, meta = ensure_calibration(model, suite.recipe, suite.cache_dir, suite.log)
    suite.calibration_meta = meta
    return path


@pytest.fixture(scope="session")
def stats_file(suite, model, calibration_path) -> StatsFile:
    suite.stats = ensure_stats(model, calibration_path, suite.recipe, suite.cache_dir, suite.log)
    return suite.stats


@pytest.fixture(scope="session")
def stats_arrays(stats_file) -> dict:
    return stats_file.arrays


@pytest.fixture(scope="session")
def claim_intervals(suite, stats_file) -> dict:
    """(claim, layer) -> bootstrap 95% interval over the profile's trajectory groups (taq.analysis.uncertainty)."""
    from taq.analysis.uncertainty import RESAMPLES, claim_intervals as intervals

    suite.log(f"bootstrapping the statistics claims over {len(stats_file.groups or ())} trajectory groups "
              f"({RESAMPLES} resamples)")
    return intervals(stats_file)


@pytest.fixture
def check_claim(request, suite):
    """check_claim(layer[, result]): the test's claim (its `claim` marker) for the layer, measured from the
    statistics unless a Measurement is given; its row goes into the claims table. Fails when the outcome
    contradicts the expectations file (or does not hold for a pair the file does not list); a pair that does not
    hold, or is undecided, without contradicting it is an xfail."""
    claim = request.node.get_closest_marker("claim").args[0]

    def check(layer: str, result: Measurement | None = None) -> None:
        if result is None:
            result = measure(request.getfixturevalue("stats_arrays"), layer, claim)
            result = replace(result, interval=request.getfixturevalue("claim_intervals").get((claim, layer)))
        expected = suite.expectations.expected(claim, layer)
        failing = contradicts(expected, result.outcome) and not suite.update_expectations
        changed = "" if suite.update_expectations or expected in (None, result.outcome) else (
            f"{result.outcome}, expected {expected}; ")
        suite.records[request.node.nodeid] = {
            "claim": claim, "layer": layer, "measured": result.value, "interval": result.interval,
            "threshold": result.threshold, "outcome": result.outcome, "expected": expected or "not listed",
            "as_expected": not failing, "note": changed + result.note}
        if result.holds:
            return
        shown = f"{result.value:.4g}" + (f", 95% interval [{result.interval[0]:.4g}, {result.interval[1]:.4g}]"
                                         if result.interval else "")
        message = (f"{claim} {result.outcome} for {layer}: measured {shown}, threshold {result.threshold:g} "
                   f"({result.note}).\nTaQ-DiT: {ALL_CLAIMS[claim].observation}")
        if not failing:
            pytest.xfail(message)
        if expected is None:
            message += (f"\n{expectations_path(suite.model_name)} does not list this pair; "
                        "add it with --taq-update-expectations")
        pytest.fail(message, pytrace=False)

    return check


# --------------------------------------------------------------------------- end of session


def benchmark_results(config: pytest.Config) -> dict | None:
    """pytest-benchmark's JSON document of this session's characterization benchmarks, or None."""
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's per-run state
    if session is None or not session.benchmarks:
        return None
    document = config.hook.pytest_benchmark_generate_json(
        config=config, benchmarks=session.benchmarks, include_data=False, machine_info=session.get_machine_info(),
        commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config))
    document["benchmarks"] = [b for b in document["benchmarks"] if b["fullname"].startswith("characterization/")]
    medians = {b["name"]: b["stats"]["median"] for b in document["benchmarks"] if b.get("stats")}
    for bench in document["benchmarks"]:
        untraced = bench["name"].replace("_traced", "_untraced")
        if bench["name"].endswith("_traced") and untraced in medians and bench.get("stats"):
            bench["extra_info"]["traced_over_untraced"] = bench["stats"]["median"] / medians[untraced]
    return document if document["benchmarks"] else None


def write_session_report(suite: Suite) -> None:
    benchmarks = benchmark_results(suite.config)
    records = list(suite.records.values())
    if suite.stats is None and benchmarks is None and not records:
        return
    suite.report_dir.mkdir(parents=True, exist_ok=True)
    if benchmarks is not None:
        with atomic_path(suite.report_dir / BENCHMARKS_FILE) as tmp:
            tmp.write_text(json.dumps(benchmarks, indent=2) + "\n", encoding="utf-8")
        suite.summary_lines.append(f"benchmarks: {suite.report_dir / BENCHMARKS_FILE}")
    if records:
        write_claims(records, suite.report_dir, suite.context)
        for claim, counts in tally(records).items():
            suite.summary_lines.append(f"{claim:24s} " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if suite.update_expectations and records:
        path = expectations_path(suite.model_name)
        write_expectations(path, updated(suite.expectations, records, suite.context))
        suite.summary_lines.append(f"expectations rewritten: {path}")
    if suite.stats is None:
        suite.summary_lines.append("no HTML report: this session profiled no statistics (run the claims too)")
        return
    from taq.report.html import write_report  # matplotlib only when a report is written

    index = write_report(suite.report_dir, suite.stats, calibration_meta=suite.calibration_meta,
                         claims=records or None, claim_info=ALL_CLAIMS, benchmarks=benchmarks,
                         layers=list(suite.stats.stats.layers))
    suite.summary_lines.append(f"report: {index}")


def pytest_sessionfinish(session, exitstatus):
    suite = session.config.stash.get(SUITE, None)
    if suite is None:
        return
    try:
        write_session_report(suite)
    except Exception:  # the tests' outcome stays visible; the report's failure fails the run
        suite.summary_lines.append("writing the report failed:\n" + traceback.format_exc())
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    suite = terminalreporter.config.stash.get(SUITE, None)
    if suite is not None and suite.summary_lines:
        terminalreporter.write_sep("-", "taq characterization")
        for line in suite.summary_lines:
            terminalreporter.write_line(line)
