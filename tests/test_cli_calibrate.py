import os
from pathlib import Path

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)

import taq.calibration
from taq.calibration import partial_path
from taq.formats.calibration import load_calibration
from taq.cli import main

SMALL_RUN = ["--model", "tiny", "--num-fid-samples", "3", "--num-sampling-steps", "4", "--num-selected-steps", "2",
             "--resolution", "8", "--batch-size", "2"]


def test_calibrate_writes_the_set_and_prints_one_summary_line(tmp_path, capsys):
    output = tmp_path / "cal.npz"
    assert main(["calibrate", *SMALL_RUN, "--step-selection", "linspace", "--cfg-scale", "2.5", "--seed", "7",
                 "--output", str(output)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and stdout[0].startswith(f"wrote 6 points (3 trajectories x 2 steps) to {output} (")
    cal = load_calibration(output)
    assert len(cal) == 6 and cal.cfg_scale == 2.5 and cal.meta["seed"] == 7
    assert cal.meta["selected_steps"] == [0, 3] and cal.meta["step_selection"] == "linspace"
    assert len(cal.prompts) == 20  # the random presets use the shipped SD3 prompts
    assert not partial_path(output).exists()


def test_prompts_file_is_used(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    output = tmp_path / "cal.npz"
    assert main(["calibrate", *SMALL_RUN, "--prompts", str(prompts), "--output", str(output)]) == 0
    cal = load_calibration(output)
    assert cal.prompts == ["a cat", "a dog"]
    np.testing.assert_array_equal(cal.prompt_indices, cal.trajectory_indices % 2)


def test_unreadable_partial_is_refused_unless_no_resume(tmp_path, capsys):
    output = tmp_path / "cal.npz"
    partial_path(output).write_bytes(b"not even an npz")
    assert main(["calibrate", *SMALL_RUN, "--output", str(output)]) == 2  # resuming reads it and refuses
    stderr = capsys.readouterr().err
    assert "cannot resume from" in stderr and "pass --no-resume" in stderr and not output.exists()
    assert main(["calibrate", *SMALL_RUN, "--no-resume", "--output", str(output)]) == 0
    assert output.exists() and not partial_path(output).exists()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must be caught before the model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(taq.calibration, "load_model", refuse)


def check_refused(argv, output, capsys, message):
    assert main(["calibrate", *argv, "--output", str(output)]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("taq calibrate: error: ") and message in stderr[0], stderr
    assert not output.exists() and not partial_path(output).exists()


def test_missing_prompts_file(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--prompts", str(tmp_path / "nope.txt")], tmp_path / "cal.npz", capsys,
                  "prompts file")


def test_empty_prompts_file(tmp_path, capsys, no_model_loading):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n")
    check_refused([*SMALL_RUN, "--prompts", str(prompts)], tmp_path / "cal.npz", capsys, "no prompts")


def test_more_selected_steps_than_sampling_steps(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--num-selected-steps", "5"], tmp_path / "cal.npz", capsys,
                  "cannot select 5 steps out of 4")


def test_resolution_not_divisible_by_the_patch(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--resolution", "15"], tmp_path / "cal.npz", capsys,
                  "resolution 15 must be a positive multiple of 2")


def test_output_directory_missing(tmp_path, capsys, no_model_loading):
    check_refused(SMALL_RUN, tmp_path / "missing" / "cal.npz", capsys, "does not exist")


def test_output_directory_is_a_file(tmp_path, capsys, no_model_loading):
    (tmp_path / "file").write_text("")
    check_refused(SMALL_RUN, tmp_path / "file" / "cal.npz", capsys, "is not a directory")


def test_output_directory_not_writable(tmp_path, capsys, no_model_loading):
    locked = Path("/sys")  # read-only even for root on Linux; a mode-0500 directory stops anyone else
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    check_refused(SMALL_RUN, locked / "cal.npz", capsys, "is not writable")


def test_unknown_model(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--model", "sd4"], tmp_path / "cal.npz", capsys, "unknown model preset 'sd4'")


def test_checkpoint_with_the_pocket_model(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--model", "pocket", "--checkpoint", "x.safetensors"], tmp_path / "cal.npz", capsys,
                  "--checkpoint is for SD3-layout models")


def test_missing_embeddings_file(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--embeddings", str(tmp_path / "e.npz")], tmp_path / "cal.npz", capsys,
                  "embeddings file")


def test_nonpositive_trajectories(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--num-fid-samples", "0"], tmp_path / "cal.npz", capsys,
                  "num_trajectories must be >= 1")


def test_num_trajectories_and_the_seeds_num_fid_samples_are_one_option(tmp_path):
    runs = {}
    for flag in ("--num-trajectories", "--num-fid-samples"):
        output = tmp_path / f"{flag.strip('-')}.npz"
        args = [*SMALL_RUN, "--output", str(output)]
        args[args.index("--num-fid-samples")] = flag
        assert main(["calibrate", *args]) == 0
        runs[flag] = load_calibration(output)
    assert len(runs["--num-trajectories"]) == len(runs["--num-fid-samples"]) == 6
    np.testing.assert_array_equal(runs["--num-trajectories"].xs, runs["--num-fid-samples"].xs)
