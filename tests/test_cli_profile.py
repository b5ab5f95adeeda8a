import taq  # noqa: F401  (loads OpenBLAS before mlx.core)

import pytest

import taq.profiling
from taq.cli import main
from taq.formats.stats import load_stats


def test_profile_writes_the_stats_file_and_prints_one_line(pocket_calibration, tmp_path, capsys):
    output = tmp_path / "stats.npz"
    assert main(["profile", "--calibration-file", str(pocket_calibration), "--num-samples", "16",
                 "--output", str(output)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and stdout[0].startswith("wrote statistics of 11 layers x 4 timesteps from 16 points")
    loaded = load_stats(output)
    assert (loaded.meta["model"], loaded.meta["seed"], loaded.meta["batch_size"]) == ("pocket", 0, 32)
    assert loaded.meta["hist_spec"] == {"bins": 512, "lo": -8.0, "hi": 8.0}


def test_every_flag_reaches_the_run(tiny_calibration, tmp_path, capsys):
    output = tmp_path / "stats.npz"
    assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--num-samples", "10",
                 "--seed", "2", "--batch-size", "4", "--layers", "mm_01_img", "mm_00_img", "--bins", "32",
                 "--hist-range", "-1", "2", "--output", str(output)]) == 0
    assert "from 10 points" in capsys.readouterr().out
    loaded = load_stats(output)
    assert loaded.stats.layers == ("mm_00_img", "mm_01_img")
    assert (loaded.stats.spec.bins, loaded.stats.spec.lo, loaded.stats.spec.hi) == (32, -1.0, 2.0)
    assert (loaded.meta["seed"], loaded.meta["num_samples"], loaded.meta["batch_size"]) == (2, 10, 4)


REFUSED = {
    "absent calibration": (["--calibration-file", "{dir}/absent.npz"], "absent.npz: no such file"),
    "stats as calibration": (["--calibration-file", "{stats}"], "is a taq 'taq-stats' file, expected 'taq-calib"),
    "too many samples": (["--num-samples", "17"], "num_samples 17 exceeds the 16 points"),
    "no samples": (["--num-samples", "0"], "--num-samples and --batch-size must be >= 1"),
    "no batch": (["--batch-size", "0"], "--num-samples and --batch-size must be >= 1"),
    "unknown layer": (["--layers", "mm_07_txt"], "unknown layers ['mm_07_txt']"),
    "no bins": (["--bins", "0"], "bins must be a positive integer, got 0"),
    "reversed range": (["--hist-range", "2", "1"], "HistogramSpec needs finite lo < hi"),
    "unknown model": (["--model", "huge"], "unknown model preset 'huge'"),
    "another model's set": (["--model", "pocket"], "made with 'tiny' and does not fit model 'pocket'"),
    "pocket checkpoint": (["--model", "pocket", "--checkpoint", "w.safetensors"], "ships its own weights"),
    "no output dir": (["--output", "{dir}/nowhere/stats.npz"], "nowhere does not exist"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_input_exits_2_with_one_line_and_no_output(tiny_calibration, tmp_path, capsys, case):
    stats = tmp_path / "made.npz"  # a valid stats file, for the wrong-kind case
    assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--num-samples", "2",
                 "--output", str(stats)]) == 0
    capsys.readouterr()
    flags, message = REFUSED[case]
    flags = [flag.format(dir=tmp_path, stats=stats) for flag in flags]
    output = tmp_path / "stats.npz"
    argv = ["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--num-samples", "8",
            "--output", str(output), *flags]  # later flags win
    assert main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("taq profile: error: ") and message in stderr[0], stderr
    assert not output.exists()


def test_bad_arguments_are_refused_before_the_model_is_loaded(tiny_calibration, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(taq.profiling, "load_model", refuse)
    for flags in (["--bins", "0"], ["--num-samples", "0"], ["--calibration-file", str(tmp_path / "absent.npz")],
                  ["--output", str(tmp_path / "nowhere" / "s.npz")]):
        assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny",
                     "--output", str(tmp_path / "s.npz"), *flags]) == 2
    assert capsys.readouterr().err.count("taq profile: error: ") == 4


def test_the_calibration_file_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--num-samples", "4"])
    assert exit_info.value.code == 2 and "--calibration-file" in capsys.readouterr().err
