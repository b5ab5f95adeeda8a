"""Command-line options of taq's test suites (the characterization suite's are read in characterization/conftest.py),
and the end-of-run list of what was skipped and how to install it."""

import re
from collections import Counter

from taq.config import DEFAULT_MODEL
from taq.options import add_histogram_options, histogram_option_names
from taq.recipes import DEFAULT_RECIPE, RECIPES


def pytest_addoption(parser):
    group = parser.getgroup("taq", "taq characterization suite (characterization/)")
    group.addoption("--taq-model", default=DEFAULT_MODEL, metavar="PRESET",
                    help=f"model under test: a preset name (default: {DEFAULT_MODEL}, the embedded default)")
    group.addoption("--taq-checkpoint", metavar="PATH", help="SD3-layout weights for --taq-model sd3-medium")
    group.addoption("--taq-random-weights", action="store_true",
                    help="seeded random weights for a --taq-model without shipped weights (its claims then describe "
                         "no trained model)")
    group.addoption("--taq-calibration", metavar="FILE",
                    help="use this calibration set instead of sampling (and caching) the recipe's")
    group.addoption("--taq-recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                    help="; ".join(recipe.describe() for recipe in RECIPES.values()) + f" (default: {DEFAULT_RECIPE})")
    group.addoption("--taq-report-dir", default="reports/latest", metavar="DIR",
                    help="where the HTML report, claims table and benchmark JSON go (default: reports/latest)")
    add_histogram_options(group.addoption, histogram_option_names("--taq-"))
    group.addoption("--taq-update-expectations", action="store_true",
                    help="rewrite characterization/expectations/<model>.json from this run's measurements")
    group.addoption("--taq-update-baselines", action="store_true",
                    help="rewrite characterization/baselines/<model>.npz from this run's statistics")
    group.addoption("--taq-branches", action="store_true",
                    help="also profile the conditional and unconditional CFG rows apart and check every statistics "
                         "claim on each branch (layers <layer>:cond, <layer>:uncond)")
    group.addoption("--taq-bench-sd3", action="store_true",
                    help="run the random-weight sd3-medium benchmarks on the CPU device too (they always run on "
                         "GPU/Metal devices)")


# What a skipped test was missing (a pattern of its skip reason) -> the one command that installs it.
INSTALLERS = {
    r"diffusionkit": "bash scripts/install_diffusionkit.sh",
    r"chromium": "apt-get install chromium",
    r"huggingface_hub": 'pip install -e ".[hf]"',
}


def pytest_terminal_summary(terminalreporter):
    """Say, at the end, which tests were skipped and why, and how to install what they need: CI (bash .ci/run)
    installs all of it, so a test skipped here runs there."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.write_sep("-", f"skipped: {sum(reasons.values())} tests")
    installable = False
    for reason, count in reasons.most_common():
        install = [command for pattern, command in INSTALLERS.items() if re.search(pattern, reason, re.IGNORECASE)]
        installable = installable or bool(install)
        terminalreporter.write_line(f"{count:4d}  {reason}" + (f"\n      install: {install[0]}" if install else ""))
    if installable:
        terminalreporter.write_line("bash .ci/run installs all of these and runs the suite as CI does")
