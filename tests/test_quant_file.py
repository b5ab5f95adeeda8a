"""The quantization file: round trip, byte determinism, validation of damaged or mismatched contents."""

import json

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.formats import TaqFormatError
from taq.formats.container import content_digest
from taq.formats.quantization import (LayerQuantization, Quantization, load_quantization, read_quantization_meta,
                                      save_quantization)
from taq.quant.grid import QParams, QuantSpec
from taq.quant.grid import grid_from_range
from taq.quant.schedules import fit_schedule

SIGMAS = np.array([1.0, 0.6, 0.2])


def sample_quantization(mode: str = "per-timestep") -> Quantization:
    scale, zero_point = (np.array(v) for v in grid_from_range(np.full(3, -0.17), np.array([3.0, 4.0, 6.0]),
                                                               QuantSpec(bits=8)))
    schedule = fit_schedule(mode, 8, SIGMAS, scale, zero_point, float(scale.max()), 7.0, degree=2)
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    weight = QParams(np.full((8, 2), 0.01, np.float32), np.full((8, 2), 7.0, np.float32))
    layers = {"mm_00_img.qkv": LayerQuantization("mm_00_img.qkv", "joint_blocks.0.x_block.attn.qkv", None, None,
                                                 schedule),
              "mm_00_img.fc2": LayerQuantization("mm_00_img.fc2", "joint_blocks.0.x_block.mlp.fc2", spec, weight,
                                                 schedule)}  # in model order, as the file keeps them
    return Quantization(layers, {"label": f"W4A8 {mode}", "model": "tiny", "weights_id": "random-seed-0"})


@pytest.mark.parametrize("mode", ["static", "per-timestep", "sigma-poly"])
def test_round_trip_keeps_every_grid_and_option(tmp_path, mode):
    original = sample_quantization(mode)
    save_quantization(tmp_path / "q.safetensors", original)
    loaded = load_quantization(tmp_path / "q.safetensors")
    assert list(loaded.layers) == list(original.layers) and loaded.meta == original.meta
    for site, layer in original.layers.items():
        got = loaded.layers[site]
        assert (got.path, got.weight_spec) == (layer.path, layer.weight_spec)
        for name in ("sigmas", "scale", "zero_point", "lo", "hi", "poly_lo", "poly_hi"):
            np.testing.assert_array_equal(getattr(got.act, name), getattr(layer.act, name))
    np.testing.assert_array_equal(loaded.layers["mm_00_img.fc2"].weight.scale, original.layers["mm_00_img.fc2"]
                                  .weight.scale)
    assert read_quantization_meta(tmp_path / "q.safetensors")["label"] == f"W4A8 {mode}"


def test_the_same_contents_give_the_same_bytes(tmp_path):
    save_quantization(tmp_path / "a.safetensors", sample_quantization())
    save_quantization(tmp_path / "b.safetensors", sample_quantization())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def rewrite(path, edit_arrays=None, edit_meta=None):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["taq_metadata"])
    arrays = load_file(str(path))
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    meta.pop("taq_sha256")
    meta["taq_sha256"] = content_digest(json.dumps(meta, sort_keys=True), (  # a consistent file of wrong contents
        (k, str(v.dtype), v.shape, np.ascontiguousarray(v).tobytes()) for k, v in arrays.items()))
    save_file(arrays, str(path), metadata={"taq_metadata": json.dumps(meta)})


@pytest.mark.parametrize("damage, message", [
    (dict(edit_arrays=lambda a: a.__setitem__("act/mm_00_img.fc2/scale", np.array([np.nan, 1.0, 1.0]))),
     "NaN or inf"),
    (dict(edit_arrays=lambda a: a.__setitem__("weight/mm_00_img.fc2/scale", -a["weight/mm_00_img.fc2/scale"])),
     "weight scales must be finite and > 0"),
    (dict(edit_arrays=lambda a: a.pop("act/mm_00_img.qkv/zero_point")), "layer mm_00_img.qkv"),
    (dict(edit_meta=lambda m: m["layers"]["mm_00_img.fc2"]["weight"].__setitem__("bits", 12)), "bits must be"),
    (dict(edit_meta=lambda m: m["layers"]["mm_00_img.fc2"]["act"].__setitem__("bits", 1)), "activation bits"),
    (dict(edit_meta=lambda m: m.__setitem__("kind", "taq-stats")), "expected 'taq-quantization'"),
    (dict(edit_meta=lambda m: m.__setitem__("format_version", 9)), "format version 9"),
    (dict(edit_meta=lambda m: m.__setitem__("layers", {})), "lists no quantized layers"),
])
def test_damaged_contents_are_refused_naming_the_problem(tmp_path, damage, message):
    path = tmp_path / "q.safetensors"
    save_quantization(path, sample_quantization())
    rewrite(path, **damage)
    with pytest.raises(TaqFormatError, match=message):
        load_quantization(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantization(path, sample_quantization())
    data = path.read_bytes()
    for name, content in (("cut.safetensors", data[: len(data) // 2]), ("text.safetensors", b"hello"),
                          ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TaqFormatError, match="not a readable safetensors file"):
            load_quantization(tmp_path / name)
    with pytest.raises(TaqFormatError, match="no such file"):
        load_quantization(tmp_path / "absent.safetensors")


def test_a_changed_byte_is_refused_by_the_digest(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantization(path, sample_quantization())
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # inside the last array: a valid safetensors file with another grid
    path.write_bytes(bytes(data))
    with pytest.raises(TaqFormatError, match="do not match its taq_sha256 digest"):
        load_quantization(path)
