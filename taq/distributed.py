"""Scale-out over processes with MLX's distributed layer: `mlx.launch -n 2 -- python -m taq.cli calibrate ...`.

Every rank runs the same command. Work is cut into batches whose composition does not depend on the number of
ranks (calibration: trajectories [k B, (k + 1) B); profiling: `plan_batches`); global batch k goes to rank
k % size, and a batch is never split, so each batch is computed exactly as a single process computes it.
Results travel to rank 0 as raw bytes (`gather_buffers`: any dtype, float64 included, arrives bit for bit,
whatever the backend supports), and rank 0 alone writes the output.

Failure: each phase runs inside `collective_step`, which catches a rank's error, reports it at once on that rank,
and then lets every rank learn every rank's outcome, so all fail together (`RankFailure`) before any output is
written. A rank that dies outright is seen by the others' transport (the ring backend raises "connection to a
peer was lost") and `mlx.launch` terminates the remaining ranks when one exits non-zero.

Not launched (no MLX_RANK, OMPI_COMM_WORLD_SIZE or PMI_SIZE in the environment) the world is one process and no
distributed backend is initialized at all.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TypeVar

import numpy as np

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.tracing.stats import DERIVED_KEYS, ActivationStats

LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # set by mlx.launch, Open MPI, MPICH
CHUNK_BYTES = 1 << 26  # per rank and collective: bounds the transient memory of a large gather
INPUT_ERRORS = (ValueError, OSError)  # what `taq.cli` reports as one line: bad input, failed reads and writes

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A rank of a distributed run failed (or was lost); every rank raises it, and nothing is written."""


# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`; `group` is None for a single process."""

    rank: int = 0
    size: int = 1
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name in ("rank", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"World.{name} must be an integer, got {value!r}")
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"World needs 0 <= rank < size, got rank {self.rank} of size {self.size}")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"


def join_world(environ=os.environ) -> World:
    """The world described by a launcher's environment; a single process (nothing initialized) when there is none."""
    if not any(name in environ for name in LAUNCH_VARIABLES):
        return World()
    hostfile = environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
        return World()  # `mlx.launch -n 1` hands the ring an empty host list
    try:
        group = mx.distributed.init()
    except RuntimeError as exc:
        raise RankFailure(f"cannot join the distributed run this process was launched into: {exc}") from exc
    if group.size() == 1:
        return World()
    return World(group.rank(), group.size(), group)


@lru_cache(maxsize=None)
def current_world() -> World:
    """This process's world, joined once (MLX keeps one global group per process)."""
    return join_world()


# --------------------------------------------------------------------------- sharding


def batch_ranges(count: int, batch_size: int) -> list[range]:
    """range(count) cut into consecutive batches of `batch_size` (the last may be shorter)."""
    for name, value in (("count", count), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if count < 0 or batch_size < 1:
        raise ValueError(f"need count >= 0 and batch_size >= 1, got count {count}, batch_size {batch_size}")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's items: item k goes to rank k % size (round robin keeps shards within one item of each other)."""
    return list(items[world.rank :: world.size])


# --------------------------------------------------------------------------- exchanging data


def _lost_contact(world: World, exc: Exception) -> RankFailure:
    return RankFailure(f"{world.label} lost contact with the other ranks ({exc}); a rank failed or was stopped")


def gather_buffers(world: World, data: np.ndarray, *, to_all: bool = False,
                   chunk_bytes: int = CHUNK_BYTES) -> Optional[list[np.ndarray]]:
    """Every rank's `data` as raw bytes (1-D uint8), in rank order: on rank 0, or on every rank with `to_all`;
    None on the others. Lengths may differ between ranks; at most `chunk_bytes` per rank travel per collective."""
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if world.size == 1:
        return [data]
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    keep = to_all or world.is_root
    try:
        sizes = np.array(mx.distributed.all_gather(mx.array([data.size], dtype=mx.int64), group=world.group))
        out = [np.empty(int(n), dtype=np.uint8) for n in sizes] if keep else None
        longest = int(sizes.max())
        for start in range(0, longest, chunk_bytes):
            width = min(chunk_bytes, longest - start)
            piece = np.zeros(width, dtype=np.uint8)  # zero padded: all_gather takes equal shapes
            mine = data[start : start + width]
            piece[: mine.size] = mine
            gathered = np.array(mx.distributed.all_gather(mx.array(piece), group=world.group))
            if keep:
                for rank, buffer in enumerate(out):
                    take = max(0, min(width, buffer.size - start))
                    buffer[start : start + take] = gathered[rank * width : rank * width + take]
    except RuntimeError as exc:
        raise _lost_contact(world, exc) from exc
    return out


def share(world: World, value: Any) -> list:
    """Every rank's JSON-serializable `value`, in rank order, on every rank."""
    encoded = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    return [json.loads(buffer.tobytes()) for buffer in gather_buffers(world, encoded, to_all=True)]


# --------------------------------------------------------------------------- failing together


@dataclass
class StepOutcome:
    value: Any = None  # set by this rank inside the step (JSON-serializable)
    values: list = field(default_factory=list)  # every rank's value, once the step is over


@contextmanager
def collective_step(world: World, task: str, note: str = "") -> Iterator[StepOutcome]:
    """Run a block on every rank, then let every rank learn whether all ranks succeeded.

    A single process runs the block as is (its errors propagate unchanged). With several ranks, an error is
    reported at once on the failing rank, which then waits for the others to finish the block (so they can
    checkpoint their work); then every rank raises the same RankFailure, ending with `note`.
    """
    step = StepOutcome()
    if world.size == 1:
        yield step
        step.values = [step.value]
        return
    error = None
    try:
        yield step
    except Exception as exc:
        error = exc
        # Bad input is one line, as the CLI reports it; anything else gets its traceback (it may be a remote host's).
        detail = f"{type(exc).__name__}: {exc}\n" if isinstance(exc, INPUT_ERRORS) else \
            "".join(traceback.format_exception(exc))
        print(f"taq: {world.label} failed while {task}; waiting for the other ranks to finish\n{detail}",
              file=sys.stderr, end="", flush=True)
    reports = share(world, {"error": None if error is None else f"{type(error).__name__}: {error}",
                            "value": None if error is not None else step.value})
    failed = [(rank, report["error"]) for rank, report in enumerate(reports) if report["error"] is not None]
    if failed:
        raise RankFailure(describe_failures(failed, world.size, task) + (f"; {note}" if note else "")) from error
    step.values = [report["value"] for report in reports]


def describe_failures(failed: Sequence[tuple[int, str]], size: int, task: str) -> str:
    messages = {message for _, message in failed}
    if len(failed) == size and len(messages) == 1:
        return f"all {size} ranks failed while {task}: {messages.pop()}"
    return "; ".join(f"rank {rank} of {size} failed while {task}: {message}" for rank, message in failed)


def check_agreement(records: Sequence[dict], what: str) -> None:
    """Every rank's record (from a collective_step's values) must equal rank 0's; raises RankFailure otherwise."""
    reference = records[0]
    differing = sorted({key for record in records[1:] for key in set(record) | set(reference)
                        if record.get(key) != reference.get(key)})
    if differing:
        raise RankFailure(f"the ranks disagree on {what} (differs in: {', '.join(differing)}); run the same taq, "
                          "weights, input files and arguments on every host")


@contextmanager
def fail_together(command: str) -> Iterator[None]:
    """For `taq <command>`: a RankFailure becomes one error line from rank 0 and exit status 1 on every rank."""
    try:
        yield
    except RankFailure as exc:
        try:
            world = current_world()
        except RankFailure:
            world = World()
        if world.is_root:
            print(f"taq {command}: error: {exc}", file=sys.stderr, flush=True)
        _barrier(world)  # mlx.launch terminates every rank once one exits non-zero: let rank 0 print first
        raise SystemExit(1) from None


def _barrier(world: World) -> None:
    if world.size == 1:
        return
    try:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=world.group))
    except RuntimeError:
        pass  # a rank is gone already; nothing left to wait for


# --------------------------------------------------------------------------- statistics


def stats_to_bytes(stats: ActivationStats) -> np.ndarray:
    """`stats.to_arrays()` without the derived keys, as an in-memory .npz (1-D uint8): float64 kept bit for bit."""
    arrays = {key: value for key, value in stats.to_arrays().items() if key not in DERIVED_KEYS}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def stats_from_bytes(data: np.ndarray) -> ActivationStats:
    with np.load(io.BytesIO(np.ascontiguousarray(data).tobytes()), allow_pickle=False) as arrays:
        return ActivationStats.from_arrays({key: arrays[key] for key in arrays.files})


def merge_in_rank_order(parts: Sequence[ActivationStats]) -> ActivationStats:
    """((part 0 + part 1) + part 2) + ...: a fixed order, so a given world size always merges the same way."""
    if not parts:
        raise ValueError("nothing to merge: no statistics given")
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def gather_stats(world: World, stats: ActivationStats) -> Optional[ActivationStats]:
    """Every rank's statistics merged on rank 0 (None on the others).

    Precision: each rank's float64 count/mean/M2/min/max arrays travel as raw bytes (exact) and rank 0 merges
    them with Chan et al.'s update in float64, in rank order; nothing is summed in float32 across ranks. Counts,
    histograms, min and max are therefore exactly a single process's; mean and M2 differ only by the float64
    rounding of a different merge order.
    """
    if world.size == 1:
        return stats
    buffers = gather_buffers(world, stats_to_bytes(stats))
    return None if buffers is None else merge_in_rank_order([stats_from_bytes(buffer) for buffer in buffers])
