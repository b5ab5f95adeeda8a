import errno
import os
import shutil
from pathlib import Path

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)

import numpy as np
import pytest

import taq.profiling
from taq.cli import main
from taq.formats.stats import load_stats
from taq.tracing import HistogramSpec


def test_profile_writes_the_stats_file_and_prints_one_line(pocket_calibration, tmp_path, capsys):
    output = tmp_path / "stats.npz"
    assert main(["profile", "--calibration-file", str(pocket_calibration), "--num-samples", "16",
                 "--output", str(output)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and stdout[0].startswith("wrote statistics of 11 layers x 4 timesteps from 16 points")
    loaded = load_stats(output)
    assert (loaded.meta["model"], loaded.meta["seed"], loaded.meta["batch_size"]) == ("pocket", 0, 32)
    assert loaded.meta["hist_spec"] == {"bins": 4096, "scale": 1 / 64, "limit": 65536.0}


def test_every_flag_reaches_the_run(tiny_calibration, tmp_path, capsys):
    output = tmp_path / "stats.npz"
    assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--random-weights",
                 "--num-samples", "10", "--seed", "2", "--batch-size", "4", "--layers", "mm_01_img", "mm_00_img",
                 "--bins", "32", "--hist-scale", "0.5", "--hist-limit", "2", "--output", str(output)]) == 0
    assert "from 10 points" in capsys.readouterr().out
    loaded = load_stats(output)
    assert loaded.stats.layers == ("mm_00_img", "mm_01_img")
    assert loaded.stats.spec == HistogramSpec(32, 0.5, 2.0)
    assert (loaded.meta["seed"], loaded.meta["num_samples"], loaded.meta["batch_size"]) == (2, 10, 4)
    assert loaded.meta["random_weights"] is True and loaded.meta["weights_id"] == "random-seed-0"


REFUSED = {
    "absent calibration": (["--calibration-file", "{dir}/absent.npz"], "absent.npz: no such file"),
    "stats as calibration": (["--calibration-file", "{stats}"], "is a taq 'taq-stats' file, expected 'taq-calib"),
    "too many samples": (["--num-samples", "17"], "num_samples 17 exceeds the 16 points"),
    "no samples": (["--num-samples", "0"], "--num-samples and --batch-size must be >= 1"),
    "no batch": (["--batch-size", "0"], "--num-samples and --batch-size must be >= 1"),
    "unknown layer": (["--layers", "mm_07_txt"], "unknown layers ['mm_07_txt']"),
    "no bins": (["--bins", "0"], "--bins must be an even integer from 4 to 65536, got 0"),
    "odd bins": (["--bins", "33"], "--bins must be an even integer"),
    "zero scale": (["--hist-scale", "0"], "--hist-scale must be a number from 1e-30 to 1e+30, got 0.0"),
    "infinite limit": (["--hist-limit", "inf"], "--hist-limit must be a number from"),
    "unknown model": (["--model", "huge"], "unknown model preset 'huge'"),
    "sd3 without weights": (["--model", "sd3-medium"], "sd3-medium needs its weights: give --checkpoint PATH"),
    "directory as calibration": (["--calibration-file", "{dir}"], "is a directory, not a taq .npz file"),
    "text as calibration": (["--calibration-file", "{text}"], "not a taq .npz file (it is not a zip archive)"),
    "another model's set": (["--model", "pocket"], "made with 'tiny' and does not fit model 'pocket'"),
    "pocket checkpoint": (["--model", "pocket", "--checkpoint", "w.safetensors"], "ships its own weights"),
    "no output dir": (["--output", "{dir}/nowhere/stats.npz"], "nowhere does not exist"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_input_exits_2_with_one_line_and_no_output(tiny_calibration, tmp_path, capsys, case):
    stats = tmp_path / "made.npz"  # a valid stats file, for the wrong-kind case
    assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--random-weights",
                 "--num-samples", "2", "--output", str(stats)]) == 0
    capsys.readouterr()
    flags, message = REFUSED[case]
    (tmp_path / "notes.npz").write_text("plain text, not an archive\n")
    flags = [flag.format(dir=tmp_path, stats=stats, text=tmp_path / "notes.npz") for flag in flags]
    output = tmp_path / "stats.npz"
    model = [] if "--model" in flags else ["--model", "tiny", "--random-weights"]
    argv = ["profile", "--calibration-file", str(tiny_calibration), *model, "--num-samples", "8",
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
        assert main(["profile", "--calibration-file", str(tiny_calibration), "--model", "tiny", "--random-weights",
                     "--output", str(tmp_path / "s.npz"), *flags]) == 2
    assert capsys.readouterr().err.count("taq profile: error: ") == 4


def test_the_calibration_file_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--num-samples", "4"])
    assert exit_info.value.code == 2 and "--calibration-file" in capsys.readouterr().err


@pytest.mark.parametrize("alias", ["same path", "relative path", "symlink", "hard link"])
def test_an_output_that_is_the_calibration_file_is_refused_and_the_file_kept(tiny_calibration, tmp_path, capsys,
                                                                             monkeypatch, alias):
    calibration = tmp_path / "cal.npz"
    shutil.copy(tiny_calibration, calibration)
    before = calibration.read_bytes()
    output = {"same path": calibration, "relative path": Path("sub/../cal.npz")}.get(alias, tmp_path / "alias.npz")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if alias == "symlink":
        output.symlink_to(calibration)
    elif alias == "hard link":
        os.link(calibration, output)
    assert main(["profile", "--calibration-file", str(calibration), "--model", "tiny", "--random-weights",
                 "--num-samples", "4", "--output", str(output)]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and "is --calibration-file" in stderr[0] and "would destroy that input" in stderr[0]
    assert calibration.read_bytes() == before


def profile_argv(calibration, output) -> list[str]:
    return ["profile", "--calibration-file", str(calibration), "--model", "tiny", "--random-weights",
            "--num-samples", "4", "--output", str(output)]


def test_a_full_disk_is_one_line_and_leaves_no_file(tiny_calibration, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full)
    output = tmp_path / "stats.npz"
    assert main(profile_argv(tiny_calibration, output)) == 2
    stderr = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("taq ")]
    assert stderr == [f"taq profile: error: cannot write {output}: No space left on device; nothing was written "
                      "(profiling keeps no partial results)"]
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_ctrl_c_is_one_line_and_exits_130(tiny_calibration, tmp_path, capsys, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(taq.profiling, "batch_inputs", interrupt)
    output = tmp_path / "stats.npz"
    assert main(profile_argv(tiny_calibration, output)) == 130
    stderr = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("taq ")]
    assert stderr == [f"taq profile: interrupted; nothing was written to {output} (profiling keeps no partial "
                      "results); run the same command again to start over"]
    assert not output.exists()
