from dataclasses import replace

import pytest

import taq  # noqa: F401
import taq.pipeline
from taq.cli import main
from taq.errors import Interrupted
from taq.formats.stats import load_stats
from taq.tracing import HistogramSpec
from taq.loading import load_model
from taq.pipeline import run_report
from taq.recipes import CalibrationRecipe, Recipe

SMALL = Recipe("test", CalibrationRecipe(num_trajectories=2, num_steps=4, num_selected=2, batch_size=2),
               num_samples=4, profile_batch_size=4, profile_groups=2)


def test_report_runs_the_pipeline_then_reuses_the_cache(tmp_path):
    model = load_model("tiny", random_weights=True)
    first, second = [], []
    index = run_report(model, SMALL, tmp_path / "report", tmp_path / "cache", log=first.append)
    html = index.read_text()
    assert "asymmetry_ratio" in html and "mm_00_img" in html and "holds" in html
    assert any(line.startswith("sampling") for line in first) and any(line.startswith("profiling") for line in first)
    run_report(model, SMALL, tmp_path / "report", tmp_path / "cache", log=second.append)
    assert not any(line.startswith(("sampling", "profiling")) for line in second)


def test_report_refuses_a_file_as_output_dir(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["report", "--output-dir", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_unknown_recipe_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["report", "--recipe", "huge"])
    assert exc.value.code == 2


def test_report_passes_the_histogram_options_and_names_a_bad_one(tmp_path, capsys):
    assert main(["report", "--bins", "5", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--bins must be an even integer from 4 to 65536, got 5" in capsys.readouterr().err
    model = load_model("tiny", random_weights=True)
    recipe = replace(SMALL, histogram=HistogramSpec(64, 0.25, 32.0))
    run_report(model, recipe, tmp_path / "report", tmp_path / "cache", log=lambda line: None)
    stats = load_stats(next((tmp_path / "cache").glob("stats-*.npz")))
    assert stats.stats.spec == HistogramSpec(64, 0.25, 32.0) and stats.meta["random_weights"] is True


def test_report_refuses_sd3_medium_without_weights_and_a_checkpoint_among_its_outputs(tmp_path, capsys):
    assert main(["report", "--model", "sd3-medium", "--output-dir", str(tmp_path / "r")]) == 2
    assert "sd3-medium needs its weights" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_bytes(b"weights")
    assert main(["report", "--model", "sd3-medium", "--checkpoint", str(tmp_path / "r" / "index.html"),
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "would destroy that input" in capsys.readouterr().err


def test_ctrl_c_while_profiling_keeps_the_cached_calibration_set(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(taq.pipeline, "profile", interrupt)
    with pytest.raises(Interrupted, match="the calibration set is kept in .*calibration-tiny-test-.*npz; run the "
                                          "same command again"):
        run_report(load_model("tiny", random_weights=True), SMALL, tmp_path / "report", tmp_path / "cache",
                   log=lambda line: None)
