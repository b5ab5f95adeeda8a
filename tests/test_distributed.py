"""Scale-out with MLX's distributed layer: sharding and merging in process, then real 2-rank runs on localhost
(`mlx.launch --backend ring`) compared with single-process runs. mlx.launch (MLX 0.32.4) exits 0 even when a rank
fails, so each rank's exit status is read from the launcher's report."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.calibration import partial_path
from taq.formats.calibration import load_calibration
from taq.cli import main
from taq.distributed import (RankFailure, World, batch_ranges, check_agreement, collective_step, describe_failures,
                             gather_buffers, join_world, merge_in_rank_order, shard, stats_from_bytes, stats_to_bytes)
from taq.formats.stats import load_stats
from taq.tracing import ActivationStats, HistogramSpec
from taq.tracing.stats import CellStats

REPO = Path(__file__).resolve().parents[1]
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
LAUNCH_TIMEOUT = 60  # seconds; a healthy 2-rank run of these recipes takes about 4

# 7 trajectories in batches of 2: rank 0 gets batches 0 and 2 (trajectories 0, 1, 4, 5), rank 1 batches 1 and 3
CALIBRATE = ["--model", "tiny", "--random-weights", "--num-fid-samples", "7", "--num-sampling-steps", "4",
             "--num-selected-steps", "2",
             "--resolution", "8", "--batch-size", "2", "--seed", "3"]
# 14 points at 2 timesteps in batches of 2: 8 forwards, so each rank merges several batches per timestep
PROFILE = ["--model", "tiny", "--random-weights", "--num-samples", "14", "--batch-size", "2", "--bins", "64"]


# --------------------------------------------------------------------------- sharding


@given(count=st.integers(0, 40), size=st.integers(1, 6))
def test_shards_are_disjoint_balanced_and_cover_every_item(count, size):
    shards = [shard(list(range(count)), World(rank, size)) for rank in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(count))  # union is everything, nothing twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(i % size == rank for rank, s in enumerate(shards) for i in s)  # batch k on rank k % size


@given(count=st.integers(0, 40), batch_size=st.integers(1, 9), size=st.integers(1, 6))
def test_trajectory_batches_stay_whole_across_ranks(count, batch_size, size):
    batches = batch_ranges(count, batch_size)
    assert [i for batch in batches for i in batch] == list(range(count))
    assert all(len(batch) == batch_size for batch in batches[:-1])
    for rank in range(size):  # every rank's batch is one of the single process's batches, unchanged
        assert all(batch in batches for batch in shard(batches, World(rank, size)))


@pytest.mark.parametrize("rank, size", [(2, 2), (-1, 2), (0, 0), (True, 2)])
def test_world_rejects_impossible_ranks(rank, size):
    with pytest.raises(ValueError, match="World"):
        World(rank, size)


def test_batch_ranges_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size 0"):
        batch_ranges(4, 0)


def test_not_launched_means_one_process_and_no_backend(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a distributed backend was initialized")

    monkeypatch.setattr(mx.distributed, "init", refuse)
    assert join_world({}) == World()
    empty = tmp_path / "hosts"
    empty.write_text("\n")  # what `mlx.launch -n 1` hands the ring
    assert join_world({"MLX_RANK": "0", "MLX_HOSTFILE": str(empty)}) == World()


# --------------------------------------------------------------------------- failing together, in one process


def test_a_single_process_step_passes_errors_through_unchanged():
    with pytest.raises(KeyError, match="plain"):
        with collective_step(World(), "working"):
            raise KeyError("plain")
    with collective_step(World(), "working") as step:
        step.value = 5
    assert step.values == [5]


def test_failures_are_described_per_rank_or_once_when_all_agree():
    assert describe_failures([(1, "OSError: disk full")], 3, "sampling") == \
        "rank 1 of 3 failed while sampling: OSError: disk full"
    assert describe_failures([(0, "ValueError: x"), (1, "ValueError: x")], 2, "writing") == \
        "all 2 ranks failed while writing: ValueError: x"


def test_ranks_that_disagree_are_named_by_field():
    with pytest.raises(RankFailure, match=r"disagree on the recipe \(differs in: seed, weights_id\)"):
        check_agreement([{"seed": 0, "weights_id": "a", "model": "m"}, {"seed": 1, "weights_id": "b", "model": "m"}],
                        "the recipe")
    check_agreement([{"seed": 0}, {"seed": 0}], "the recipe")


def test_one_process_gathers_its_own_bytes():
    data = np.array([1.5, -0.0, np.nan])
    (gathered,) = gather_buffers(World(), data)
    assert gathered.tobytes() == data.tobytes()


# --------------------------------------------------------------------------- merging statistics

SPEC = HistogramSpec(bins=16, scale=0.5, limit=2.0)


def random_cells(seed: int, num_batches: int) -> list[tuple[float, dict[str, CellStats]]]:
    """Per batch: its timestep and each layer's CellStats of random (rows, 3) activations, outliers and
    non-finite values included; some batches are empty."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        x = rng.normal(size=(int(rng.integers(0, 6)), 3)).astype(np.float32) * rng.choice([1, 5], size=3)
        x[rng.random(x.shape) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
        cells = {layer: CellStats.from_activations(mx.array(x * scale), SPEC) for layer, scale in (("a", 1), ("b", 3))}
        batches.append((float(rng.choice([0.0, 500.0])), cells))
    return batches


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_batches=st.integers(1, 7), size=st.integers(1, 9))
def test_rank_merged_stats_equal_one_process(seed, num_batches, size):
    batches = random_cells(seed, num_batches)
    single = ActivationStats(SPEC, ["a", "b"])
    parts = [ActivationStats(SPEC, ["a", "b"]) for _ in range(size)]
    for k, (timestep, cells) in enumerate(batches):
        for layer, cell in cells.items():
            single.update(layer, timestep, cell)
            parts[k % size].update(layer, timestep, cell)
    # through the wire format, as gather_stats sends them (ranks without batches send empty statistics)
    merged = merge_in_rank_order([stats_from_bytes(stats_to_bytes(part)) for part in parts]).to_arrays()
    expected = single.to_arrays()
    assert merged.keys() == expected.keys()
    for key in expected:
        if key in ("mean", "m2", "std", "negative_fraction"):
            np.testing.assert_allclose(merged[key], expected[key], rtol=1e-12, atol=1e-12, err_msg=key)
        else:  # counts, histograms, counters, min and max: exactly
            np.testing.assert_array_equal(merged[key], expected[key], err_msg=key)


def test_wire_format_keeps_float64_bit_for_bit():
    stats = ActivationStats(SPEC, ["a"])
    stats.update("a", 10.0, CellStats.from_activations(mx.array([[0.1, np.nan], [1 / 3, np.nan]]), SPEC))
    arrays, back = stats.to_arrays(), stats_from_bytes(stats_to_bytes(stats)).to_arrays()
    for key in ("mean", "m2", "min", "max", "count", "hist"):
        assert back[key].tobytes() == arrays[key].tobytes(), key  # the empty channel's NaN included


# --------------------------------------------------------------------------- 2 ranks on localhost


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring listens on one port per rank): other test runs may launch too."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def launch(*command: str) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring -- python COMMAND` from the repository root, with this checkout's taq first
    on the path (the launcher starts its ranks elsewhere, where an installed taq would win)."""
    if not MLX_LAUNCH.exists():
        pytest.skip(f"{MLX_LAUNCH} is not installed")
    stdin_read, stdin_write = os.pipe()  # a stdin that never turns readable: mlx.launch polls it in a loop
    try:
        return subprocess.run([str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--starting-port",
                               str(free_port_pair()), "--", sys.executable, *command],
                              cwd=REPO, stdin=stdin_read, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    finally:
        os.close(stdin_read)
        os.close(stdin_write)


def rank_exit_codes(result: subprocess.CompletedProcess) -> dict[int, int]:
    """{rank: exit code} of the ranks that the launcher reported as failed."""
    return {int(rank): int(code) for rank, code in re.findall(r"rank (\d+) exited with code (-?\d+)", result.stderr)}


def summary_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("wrote ")]


@pytest.fixture(scope="module")
def single_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "cal.npz"
    assert main(["calibrate", *CALIBRATE, "--output", str(path)]) == 0
    return path


def assert_same_calibration(path, reference):
    got, expected = load_calibration(path), load_calibration(reference)
    for key in ("xs", "ts", "prompt_indices", "trajectory_indices", "step_indices", "cs", "cs_pooled", "cs_uncond",
                "cs_pooled_uncond"):
        assert getattr(got, key).tobytes() == getattr(expected, key).tobytes(), key
    assert (got.prompts, got.cfg_scale) == (expected.prompts, expected.cfg_scale)
    ignored = {"created", "ranks"}
    assert {k: v for k, v in got.meta.items() if k not in ignored} == \
        {k: v for k, v in expected.meta.items() if k not in ignored}


def test_two_ranks_write_the_single_process_calibration_file(single_calibration, tmp_path):
    output = tmp_path / "cal.npz"
    result = launch("-m", "taq.cli", "calibrate", *CALIBRATE, "--output", str(output))
    assert rank_exit_codes(result) == {}, result.stderr
    assert summary_lines(result) == [line for line in summary_lines(result) if "on 2 ranks" in line]
    assert len(summary_lines(result)) == 1  # rank 0 alone reports
    assert_same_calibration(output, single_calibration)
    assert load_calibration(output).meta["ranks"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz"]  # no partial or temporary file left


@pytest.mark.parametrize("groups", [1, 2])
def test_two_ranks_profile_as_one_process(single_calibration, tmp_path, groups):
    single, merged = tmp_path / "single.npz", tmp_path / "merged.npz"
    args = ["profile", "--calibration-file", str(single_calibration), *PROFILE, "--groups", str(groups)]
    assert main([*args, "--output", str(single)]) == 0
    result = launch("-m", "taq.cli", *args, "--output", str(merged))
    assert rank_exit_codes(result) == {}, result.stderr
    assert len(summary_lines(result)) == 1
    assert groups > 1 or "(8 forwards)" in summary_lines(result)[0]
    got, expected = load_stats(merged), load_stats(single)
    assert got.meta["ranks"] == 2 and got.meta["sampled_points"] == expected.meta["sampled_points"]
    pairs = [(got.arrays, expected.arrays)] + list(zip(got.groups or [], expected.groups or []))
    assert len(pairs) == (1 if groups == 1 else 1 + groups)
    for got_arrays, expected_arrays in pairs:
        for key, value in expected_arrays.items():
            if key in ("mean", "m2", "std", "negative_fraction"):
                np.testing.assert_allclose(got_arrays[key], value, rtol=1e-12, atol=1e-12, err_msg=key)
            else:
                np.testing.assert_array_equal(got_arrays[key], value, err_msg=key)


GATHER_SCRIPT = """
import sys
import numpy as np
import taq
from taq.distributed import current_world, gather_buffers, share

world = current_world()
specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3, 2.0 ** -1074])
mine = specials[: 10 - 6 * world.rank]  # 80 and 32 bytes
gathered = gather_buffers(world, mine, chunk_bytes=7)  # 7 does not divide 8: values straddle chunks
everyone = gather_buffers(world, np.arange(3 * world.rank, dtype=np.int64), to_all=True, chunk_bytes=5)
shared = share(world, {"rank": world.rank})
result = {f"everyone_{r}": b for r, b in enumerate(everyone)}
result.update({f"gathered_{r}": b for r, b in enumerate(gathered or [])})
np.savez(f"{sys.argv[1]}.rank{world.rank}.npz", shared=np.array([s["rank"] for s in shared]), **result)
"""


def test_gathered_bytes_arrive_exactly_in_rank_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    result = launch(str(script), str(tmp_path / "out"))
    assert rank_exit_codes(result) == {}, result.stderr
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3, 2.0**-1074])
    for rank in (0, 1):
        with np.load(tmp_path / f"out.rank{rank}.npz") as got:
            np.testing.assert_array_equal(got["shared"], [0, 1])
            assert got["everyone_0"].size == 0 and got["everyone_1"].tobytes() == np.arange(3).tobytes()
            if rank == 0:  # the root alone receives a gather
                assert got["gathered_0"].tobytes() == specials.tobytes()
                assert got["gathered_1"].tobytes() == specials[:4].tobytes()
            else:
                assert "gathered_0" not in got.files


def test_a_failing_rank_fails_the_run_and_a_rerun_resumes_the_finished_shard(single_calibration, tmp_path):
    output = tmp_path / "cal.npz"
    blocker = partial_path(output, World(1, 2))
    blocker.mkdir()  # rank 1 cannot checkpoint its first batch
    result = launch("-m", "taq.cli", "calibrate", *CALIBRATE, "--no-resume", "--output", str(output))
    assert sorted(rank_exit_codes(result)) == [0, 1] and 0 not in rank_exit_codes(result).values(), result.stderr
    assert "taq calibrate: error: rank 1 of 2 failed while sampling: WriteError: cannot write " in result.stderr
    assert "rank1of2.partial.npz: Is a directory" in result.stderr and "Traceback" not in result.stderr
    assert "rerun the same command to resume" in result.stderr and summary_lines(result) == []
    assert not output.exists()
    with np.load(partial_path(output, World(0, 2))) as partial:  # rank 0 finished its shard and kept it
        assert partial["xs"].shape[0] == 4

    blocker.rmdir()
    result = launch("-m", "taq.cli", "calibrate", *CALIBRATE, "--output", str(output))
    assert rank_exit_codes(result) == {}, result.stderr
    assert summary_lines(result)[0].endswith("on 2 ranks, resumed after 4 trajectories")
    assert_same_calibration(output, single_calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz"]


SABOTAGE_SCRIPT = """
import os, signal, sys
import taq.profiling
from taq.cli import main

def sabotaged_batch(*args, **kwargs):
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("injected failure")

if os.environ.get("MLX_RANK") == "1":
    taq.profiling.batch_inputs = sabotaged_batch
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_that_fails_while_profiling_leaves_no_output(single_calibration, tmp_path, how):
    script, output = tmp_path / "sabotage.py", tmp_path / "stats.npz"
    script.write_text(SABOTAGE_SCRIPT)
    result = launch(str(script), how, "profile", "--calibration-file", str(single_calibration), *PROFILE,
                    "--output", str(output))  # ends well within the timeout: nobody waits forever
    codes = rank_exit_codes(result)
    assert summary_lines(result) == [] and not output.exists()
    assert list(tmp_path.iterdir()) == [script]
    if how == "raise":
        assert sorted(codes) == [0, 1] and 0 not in codes.values(), result.stderr
        assert "taq profile: error: rank 1 of 2 failed while tracing: RuntimeError: injected failure; " \
               f"nothing was written to {output}" in result.stderr
    else:
        assert codes[1] == -9, result.stderr
