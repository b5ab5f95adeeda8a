"""The quantization file (`taq quantize`'s output): every grid of every quantized layer, and how it was made.

A safetensors file. Per quantized layer (site name as in `taq.tracing.sites`, e.g. `mm_03_img.fc2`):

    weight/<site>/scale, weight/<site>/zero_point    the weight grids, QuantSpec.param_shape of the weight
    weight/<site>/levels                              (out, in) uint8 integer levels, where reconstruction chose
                                                      each weight's rounding (else: round to nearest on load)
    act/<site>/scale, act/<site>/zero_point           (T,) the activation grid at each calibrated sigma
    act/<site>/lo, act/<site>/hi                      (T,) the per-timestep observed grid ends
    act/<site>/poly_lo, act/<site>/poly_hi            polynomial coefficients in sigma (sigma-poly only)
    act_sigmas                                        (T,) the calibrated sigmas, decreasing
    input/<site>/shift, input/<site>/divisor          the exact input transform, where one applies:
                                                      (1 or T, C) shift and (C,) divisor (taq.quant.transforms)

and a JSON record (`taq_metadata`) with each layer's module path and QuantSpecs, the activation mode, the model
and weights it was calibrated for, the calibration file's identity, the options and taq's version, and
`taq_sha256`: the `content_digest` of the record without it and of the arrays, checked on load (safetensors has
no checksum). No creation time is stored: the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taq.formats.container import TaqFormatError, atomic_path, content_digest
from taq.quant.grid import QParams, QuantSpec
from taq.quant.schedules import ActivationSchedule
from taq.quant.transforms import InputTransform
from taq.tracing.sites import site_order

KIND, VERSION = "taq-quantization", 3  # 2: with taq_sha256; 3: input transforms
READABLE = (2, 3)  # version 2 files are version 3 files without input transforms


@dataclass(frozen=True)
class LayerQuantization:
    site: str
    path: str  # module path in the MMDiT, e.g. joint_blocks.3.x_block.mlp.fc2
    weight_spec: QuantSpec | None  # None: full-precision weights
    weight: QParams | None  # NumPy float32 arrays of weight_spec.param_shape
    act: ActivationSchedule | None  # None: full-precision inputs
    transform: InputTransform | None = None  # shift / divisor of the input (taq.quant.transforms)
    levels: np.ndarray | None = None  # (out, in) uint8 weight levels chosen by reconstruction (AdaRound)


@dataclass(frozen=True)
class Quantization:
    layers: dict[str, LayerQuantization]  # site -> layer, in model order
    meta: dict

    @property
    def sigmas(self) -> np.ndarray | None:
        schedules = [layer.act for layer in self.layers.values() if layer.act is not None]
        return schedules[0].sigmas if schedules else None

    def describe(self) -> str:
        return self.meta.get("label", "quantization")


def save_quantization(path: str | os.PathLike, quantization: Quantization) -> None:
    """Write the file atomically; byte-identical for identical contents."""
    from safetensors.numpy import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: quantization files must end in .safetensors")
    arrays: dict[str, np.ndarray] = {}
    layers = {}
    for site, layer in quantization.layers.items():
        entry = {"path": layer.path, "weight": layer.weight_spec.to_dict() if layer.weight_spec else None,
                 "act": None}
        if layer.weight is not None:
            arrays[f"weight/{site}/scale"] = np.asarray(layer.weight.scale, np.float32)
            arrays[f"weight/{site}/zero_point"] = np.asarray(layer.weight.zero_point, np.float32)
        if layer.levels is not None:
            arrays[f"weight/{site}/levels"] = np.asarray(layer.levels, np.uint8)
        if layer.act is not None:
            act = layer.act
            entry["act"] = {"mode": act.mode, "bits": act.bits}
            for name in ("scale", "zero_point", "lo", "hi", "poly_lo", "poly_hi"):
                arrays[f"act/{site}/{name}"] = np.asarray(getattr(act, name), np.float64)
            arrays["act_sigmas"] = np.asarray(act.sigmas, np.float64)
        if layer.transform is not None:
            for name in ("shift", "divisor"):
                if getattr(layer.transform, name) is not None:
                    arrays[f"input/{site}/{name}"] = np.asarray(getattr(layer.transform, name), np.float32)
            arrays["act_sigmas"] = np.asarray(layer.transform.sigmas, np.float64)
        layers[site] = entry
    record = {"kind": KIND, "format_version": VERSION, "layers": layers, **quantization.meta}
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}
    record["taq_sha256"] = _digest(record, arrays)
    payload = save(arrays, metadata={"taq_metadata": json.dumps(record, sort_keys=True)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def read_quantization_meta(path: str | os.PathLike) -> dict:
    """The JSON record alone (kind and version checked), without reading the arrays."""
    return _read(Path(path), arrays=False)[1]


def load_quantization(path: str | os.PathLike) -> Quantization:
    """Read and validate a quantization file; any problem is one TaqFormatError naming the file and the key."""
    path = Path(path)
    arrays, meta = _read(path, arrays=True)

    def fail(message: str) -> TaqFormatError:
        return TaqFormatError(f"{path}: {message}")

    records = meta.pop("layers", None)
    for key in ("kind", "format_version"):
        meta.pop(key)
    if not isinstance(records, dict) or not records:
        raise fail("lists no quantized layers")
    try:
        order = sorted(records, key=site_order)
    except ValueError as exc:
        raise fail(str(exc)) from None
    sigmas = arrays.get("act_sigmas")
    layers = {}
    for site in order:
        record = records[site]
        try:
            layers[site] = _layer(site, record, arrays, sigmas)
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"layer {site}: {exc}") from None
    expected = {key for layer in layers.values() for key in _keys(layer)} | ({"act_sigmas"} if sigmas is not None
                                                                            else set())
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise fail(f"arrays of no listed layer: {unexpected[:5]}")
    return Quantization(layers, meta)


def _read(path: Path, arrays: bool) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise TaqFormatError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            loaded = {key: f.get_tensor(key) for key in f.keys()} if arrays else {}
    except Exception as exc:  # the safetensors reader raises several exception types for damaged files
        raise TaqFormatError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    try:
        meta = json.loads(header["taq_metadata"])
    except (KeyError, ValueError):
        raise TaqFormatError(f"{path}: no taq metadata record; not a taq quantization file") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise TaqFormatError(f"{path}: is a {meta.get('kind') if isinstance(meta, dict) else '?'!r} file, "
                             f"expected {KIND!r}")
    if meta.get("format_version") not in READABLE:
        raise TaqFormatError(f"{path}: format version {meta.get('format_version')}, this taq reads versions "
                             f"{', '.join(map(str, READABLE))}")
    digest = meta.pop("taq_sha256", None)
    if arrays and digest != _digest(meta, loaded):
        raise TaqFormatError(f"{path}: its arrays or metadata do not match its taq_sha256 digest (the file is "
                             "damaged)")
    return loaded, meta


def _digest(record: dict, arrays: dict[str, np.ndarray]) -> str:
    """content_digest of the record (as written: sorted JSON, without the digest) and of the arrays."""
    return content_digest(json.dumps(record, sort_keys=True),
                          ((k, str(v.dtype), v.shape, np.ascontiguousarray(v).tobytes()) for k, v in arrays.items()))


def _keys(layer: LayerQuantization) -> list[str]:
    keys = [f"weight/{layer.site}/{name}" for name in ("scale", "zero_point")] if layer.weight else []
    keys += [f"weight/{layer.site}/levels"] if layer.levels is not None else []
    if layer.act is not None:
        keys += [f"act/{layer.site}/{name}" for name in ("scale", "zero_point", "lo", "hi", "poly_lo", "poly_hi")]
    if layer.transform is not None:
        keys += [f"input/{layer.site}/{name}" for name in ("shift", "divisor")
                 if getattr(layer.transform, name) is not None]
    return keys


def _layer(site: str, record: dict, arrays: dict[str, np.ndarray], sigmas: np.ndarray | None) -> LayerQuantization:
    if not isinstance(record.get("path"), str):
        raise ValueError("no module path")
    weight_spec = weight = act = levels = None
    if record.get("weight") is not None:
        weight_spec = QuantSpec.from_dict(record["weight"])
        scale, zero_point = arrays[f"weight/{site}/scale"], arrays[f"weight/{site}/zero_point"]
        if scale.shape != zero_point.shape or scale.ndim != 2:
            raise ValueError(f"weight grids have shapes {scale.shape} and {zero_point.shape}, expected (out, groups)")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("weight scales must be finite and > 0")
        if not (np.all(np.isfinite(zero_point)) and np.all(zero_point == np.round(zero_point))):
            raise ValueError("weight zero points must be integers")
        weight = QParams(scale, zero_point)
        levels = arrays.get(f"weight/{site}/levels")
        if levels is not None:
            if levels.ndim != 2 or levels.shape[0] != scale.shape[0] or levels.shape[1] % scale.shape[1]:
                raise ValueError(f"weight levels of shape {levels.shape} do not fit grids of shape {scale.shape}")
            if levels.dtype != np.uint8 or levels.max(initial=0) > weight_spec.qmax:
                raise ValueError(f"weight levels must be uint8 in 0..{weight_spec.qmax}")
    if record.get("act") is not None:
        if sigmas is None:
            raise ValueError("has an activation schedule but the file has no act_sigmas")
        settings = record["act"]
        bits = settings["bits"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be an integer in 2..8, got {bits!r}")
        values = {name: arrays[f"act/{site}/{name}"] for name in ("scale", "zero_point", "lo", "hi", "poly_lo",
                                                                   "poly_hi")}
        if not all(math.isfinite(v) for array in values.values() for v in array.ravel()):
            raise ValueError("activation grids hold NaN or inf")
        act = ActivationSchedule(settings["mode"], bits, sigmas, **values)
    if weight_spec is None and act is None:
        raise ValueError("neither its weights nor its inputs are quantized")
    transform = None
    shift, divisor = arrays.get(f"input/{site}/shift"), arrays.get(f"input/{site}/divisor")
    if shift is not None or divisor is not None:
        if sigmas is None:
            raise ValueError("has an input transform but the file has no act_sigmas")
        transform = InputTransform(sigmas, shift, divisor)
    return LayerQuantization(site, record["path"], weight_spec, weight, act, transform, levels)
