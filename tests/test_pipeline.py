import pytest

import taq  # noqa: F401
from taq.cli import main
from taq.loading import load_model
from taq.pipeline import run_report
from taq.recipes import CalibrationRecipe, Recipe

SMALL = Recipe("test", CalibrationRecipe(num_trajectories=2, num_steps=4, num_selected=2, batch_size=2),
               num_samples=4, profile_batch_size=4)


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
