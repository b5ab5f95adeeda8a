"""The suite ends by saying what it skipped and the command that installs what those tests need."""

from pathlib import Path

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_skipped_tests_are_listed_with_the_command_that_installs_what_they_need(pytester):
    pytester.makeconftest(ROOT_CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_optional="""
        import pytest

        @pytest.mark.skip(reason="headless Chromium not installed (Debian package: chromium)")
        def test_browser():
            pass

        def test_reference():
            pytest.importorskip("diffusionkit_is_not_here")

        def test_runs():
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*skipped: 2 tests*",
                                 "*1  headless Chromium not installed*", "*install: apt-get install chromium",
                                 "*1  could not import 'diffusionkit_is_not_here'*",
                                 "*install: bash scripts/install_diffusionkit.sh",
                                 "bash .ci/run installs all of these and runs the suite as CI does"])
