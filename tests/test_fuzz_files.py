"""Fuzzing taq's readers: a valid file with random bytes changed or cut off is refused with a one-line
TaqFormatError, or loads to exactly the content it had -- never another exception, never other numbers.

Each file kind is one `FileKind` in FILE_KINDS (a future kind, e.g. quantization files, is one more line):
how to write a small valid file, taq's reader, and how many leading bytes the format protects. taq's own files
protect every byte (.npz: zip's CRC-32 over each member; taq weights and quantization files: their SHA-256
digest). An SD3 checkpoint
has no checksum, so only its header is protected -- a changed byte inside a tensor is a valid file with another
tensor -- while a cut anywhere must be refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from taq.calibration import calibrate
from taq.config import MMDiTConfig
from taq.formats import TaqFormatError
from taq.formats.calibration import load_calibration
from taq.formats.quantization import load_quantization, save_quantization
from taq.formats.stats import load_stats, save_stats
from taq.loading import load_model
from taq.models.checkpoint import load_mmdit, load_sd3_checkpoint, save_mmdit, save_sd3_checkpoint
from taq.models.mmdit import MMDiT
from taq.tracing import ActivationStats, CellStats, HistogramSpec

WORKDIR: list[Path] = []  # set once by the fixture below; files are built lazily, once per session

SMALL_MMDIT = MMDiTConfig(depth=1, hidden_size=64, num_heads=1, patch_size=1, in_channels=1, pos_embed_max_size=2,
                          pooled_dim=4, token_dim=4, frequency_embedding_dim=8, mlp_ratio=0.5)


# --------------------------------------------------------------------------- small valid files


def write_calibration(path: Path) -> None:
    calibrate(load_model("tiny", random_weights=True), ["a cat"], num_trajectories=2, num_steps=2, num_selected=2,
              batch_size=2, resolution=2, output=path, progress=False)


def write_stats(path: Path) -> None:
    spec = HistogramSpec(8, 0.25, 4.0)
    stats = ActivationStats(spec, ["mm_00_img", "mm_00_txt"])
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    x[0, 0], x[1, 1] = 0.0, 50.0
    for layer, t in (("mm_00_img", 10.0), ("mm_00_img", 900.0), ("mm_00_txt", 10.0)):
        stats.update(layer, t, CellStats.from_activations(mx.array(x * (1 + t / 100)), spec))
    save_stats(path, stats, {"model": "fuzz"})


def write_sd3_checkpoint(path: Path) -> None:
    mx.random.seed(0)
    save_sd3_checkpoint(MMDiT(SMALL_MMDIT), path, dtype=mx.float16)


def write_quantization(path: Path) -> None:
    from test_quant_file import sample_quantization

    save_quantization(path, sample_quantization())


def write_taq_weights(path: Path) -> None:
    mx.random.seed(1)
    save_mmdit(path, MMDiT(SMALL_MMDIT), {"note": "fuzz"}, dtype=mx.float16)


# --------------------------------------------------------------------------- what "the same content" means


def calibration_content(path: Path):
    cal = load_calibration(path)
    return {**{k: v for k, v in vars(cal).items() if isinstance(v, np.ndarray)},
            "rest": (cal.prompts, cal.cfg_scale, cal.meta)}


def stats_content(path: Path):
    loaded = load_stats(path)
    return {**loaded.arrays, "meta": loaded.meta}


def plain(value):
    """Dataclasses and named tuples as dicts, recursively, down to arrays and scalars: comparable by `equal`."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {name: plain(item) for name, item in zip(value._fields, value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return np.asarray(value) if isinstance(value, mx.array) else value


def parameters(model: MMDiT) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def safetensors_protected(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")  # the length field and the JSON header


@dataclass(frozen=True)
class FileKind:
    write: Callable[[Path], None]  # a small valid file
    content: Callable[[Path], object]  # taq's reader, reduced to comparable content
    protected: Callable[[bytes], int] = len  # leading bytes in which any change must be noticed


FILE_KINDS = {
    "calibration": FileKind(write_calibration, calibration_content),
    "stats": FileKind(write_stats, stats_content),
    "sd3 checkpoint": FileKind(write_sd3_checkpoint, lambda p: parameters(load_sd3_checkpoint(p)),
                               safetensors_protected),
    "taq weights": FileKind(write_taq_weights, lambda p: (parameters(load_mmdit(p)[0]), load_mmdit(p)[1])),
    "quantization": FileKind(write_quantization, lambda p: plain(load_quantization(p))),
}


@pytest.fixture(scope="module", autouse=True)
def workdir(tmp_path_factory):
    WORKDIR[:] = [tmp_path_factory.mktemp("fuzz")]


@lru_cache(maxsize=None)
def original(kind: str) -> tuple[bytes, object]:
    path = WORKDIR[0] / f"valid-{kind.replace(' ', '-')}" / ("file.npz" if "npz" in kind or kind in (
        "calibration", "stats") else "file.safetensors")
    path.parent.mkdir()
    FILE_KINDS[kind].write(path)
    return path.read_bytes(), FILE_KINDS[kind].content(path)


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


# --------------------------------------------------------------------------- the damage


def damage(size: int, protected: int):
    """A cut at any point, or up to three bytes changed among the protected ones: (cut, [(position, xor mask)])."""
    cut = st.tuples(st.integers(0, size - 1), st.just([]))
    flips = st.tuples(st.just(size), st.lists(st.tuples(st.integers(0, protected - 1), st.integers(1, 255)),
                                              min_size=1, max_size=3))  # a mask > 0 always changes the byte
    return st.one_of(cut, flips)


def damaged(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[:cut])
    for position, mask in flips:
        out[position] ^= mask
    return bytes(out)


@pytest.mark.parametrize("kind", FILE_KINDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_file_is_refused_in_one_line_or_reads_as_the_original(kind, data):
    valid, content = original(kind)
    spec = FILE_KINDS[kind]
    bad = damaged(valid, *data.draw(damage(len(valid), spec.protected(valid)), label="cut, flips"))
    path = WORKDIR[0] / f"damaged.{'npz' if kind in ('calibration', 'stats') else 'safetensors'}"
    path.write_bytes(bad)
    try:
        got = spec.content(path)
    except TaqFormatError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        return
    assert equal(got, content), "a damaged file loaded to other content"
