import errno
import os
from pathlib import Path

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)

import taq.calibration
from taq.calibration import partial_path
from taq.formats.calibration import load_calibration
from taq.cli import main

SMALL_RUN = ["--model", "tiny", "--random-weights", "--num-fid-samples", "3", "--num-sampling-steps", "4",
             "--num-selected-steps", "2", "--resolution", "8", "--batch-size", "2"]


def test_calibrate_writes_the_set_and_prints_one_summary_line(tmp_path, capsys):
    output = tmp_path / "cal.npz"
    assert main(["calibrate", *SMALL_RUN, "--step-selection", "linspace", "--cfg-scale", "2.5", "--seed", "7",
                 "--output", str(output)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and stdout[0].startswith(f"wrote 6 points (3 trajectories x 2 steps) to {output} (")
    cal = load_calibration(output)
    assert len(cal) == 6 and cal.cfg_scale == 2.5 and cal.meta["seed"] == 7
    assert cal.meta["selected_steps"] == [0, 3] and cal.meta["step_selection"] == "linspace"
    assert len(cal.prompts) == 3  # the 3 trajectories use the first 3 of the 20 shipped SD3 prompts
    assert cal.meta["random_weights"] is True and cal.meta["weights_id"] == "random-seed-0"
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


def test_sd3_medium_without_a_checkpoint_is_refused(tmp_path, capsys, no_model_loading):
    check_refused(["--model", "sd3-medium"], tmp_path / "cal.npz", capsys,
                  "sd3-medium needs its weights: give --checkpoint PATH (SD3-layout weights), or --random-weights")


def test_a_negative_guidance_scale_is_refused(tmp_path, capsys, no_model_loading):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", *SMALL_RUN, "--cfg-scale", "-1", "--output", str(tmp_path / "cal.npz")])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and stderr == [
        "taq calibrate: error: argument --cfg-scale: must be a number >= 0, got '-1' (see taq calibrate --help)"]


def test_abbreviated_options_are_refused(tmp_path, capsys, no_model_loading):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", *SMALL_RUN, "--num-fid-sample", "3", "--output", str(tmp_path / "cal.npz")])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(stderr) == 1 and "unrecognized arguments: --num-fid-sample" in stderr[0]


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path, capsys, no_model_loading):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("une caf\xe9 noire\n".encode("latin-1"))
    check_refused([*SMALL_RUN, "--prompts", str(prompts)], tmp_path / "cal.npz", capsys,
                  f"prompts file {prompts} is not UTF-8 text (byte 7 is 0xe9)")


def test_a_directory_given_as_prompts_file_is_called_a_directory(tmp_path, capsys, no_model_loading):
    check_refused([*SMALL_RUN, "--prompts", str(tmp_path)], tmp_path / "cal.npz", capsys,
                  f"prompts file {tmp_path} is a directory, not a file")


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys, no_model_loading):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    (tmp_path / "link.npz").symlink_to(prompts)
    assert main(["calibrate", *SMALL_RUN, "--prompts", str(prompts), "--output", str(tmp_path / "link.npz")]) == 2
    assert "--output " in capsys.readouterr().err and prompts.read_text() == "a cat\n"


def test_only_the_prompts_the_trajectories_use_are_stored(tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(10_000)))
    output = tmp_path / "cal.npz"
    assert main(["calibrate", *SMALL_RUN, "--prompts", str(prompts), "--output", str(output)]) == 0
    cal = load_calibration(output)
    assert cal.prompts == ["prompt number 0", "prompt number 1", "prompt number 2"] and cal.cs.shape[0] == 3
    np.testing.assert_array_equal(cal.prompt_indices, cal.trajectory_indices)  # i % 10000 = i < 3
    assert output.stat().st_size < 64 * 1024  # all 10,000 prompts' embeddings took 41.75 MiB in this test's bug report


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_output_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert main(["calibrate", *SMALL_RUN, "--output", str(tmp_path / "cal.npz")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "cal.npz").stat().st_mode & 0o777 == mode


def messages(stderr: str) -> list[str]:
    """stderr without the progress bar's lines."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("taq ")]


def disk_full_after(monkeypatch, writes: int) -> None:
    """numpy's .npz writer succeeds `writes` times, then fails as a full disk does."""
    real, calls = np.savez, []

    def savez(*args, **kwargs):
        calls.append(1)
        if len(calls) > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    monkeypatch.setattr(np, "savez", savez)


@pytest.mark.parametrize("writes, kept", [(1, 2), (2, 3)])  # the second checkpoint fails, or the output itself
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_the_same_command_resumes(tmp_path, capsys, monkeypatch,
                                                                                         writes, kept):
    output = tmp_path / "cal.npz"
    argv = ["calibrate", *SMALL_RUN, "--output", str(output)]
    with monkeypatch.context() as patch:
        disk_full_after(patch, writes)
        assert main(argv) == 2
    stderr = messages(capsys.readouterr().err)
    assert len(stderr) == 1 and stderr[0].startswith("taq calibrate: error: cannot write ") and (
        "No space left on device" in stderr[0]), stderr
    assert f"{kept} of 3 trajectories are kept in {partial_path(output)}; run the same command again" in stderr[0]
    assert not output.exists() and not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    assert main(argv) == 0
    assert f"resumed after {kept} trajectories" in capsys.readouterr().out
    assert main(["calibrate", *SMALL_RUN, "--no-resume", "--output", str(tmp_path / "fresh.npz")]) == 0
    np.testing.assert_array_equal(load_calibration(output).xs, load_calibration(tmp_path / "fresh.npz").xs)


def test_ctrl_c_is_one_line_saying_what_was_kept_and_exits_130(tmp_path, capsys, monkeypatch):
    real, calls = taq.calibration.sample_selected_steps, []

    def interrupted_on_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(taq.calibration, "sample_selected_steps", interrupted_on_the_second_batch)
    output = tmp_path / "cal.npz"
    assert main(["calibrate", *SMALL_RUN, "--output", str(output)]) == 130
    assert messages(capsys.readouterr().err) == [
        f"taq calibrate: interrupted; 2 of 3 trajectories are kept in {partial_path(output)}; run the same command "
        "again to resume"]
