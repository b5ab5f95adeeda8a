"""Weights on disk: SD3's original checkpoint layout and taq's own safetensors files.

SD3's single-file checkpoints keep the MMDiT under `model.diffusion_model.` with PyTorch layouts; taq's MMDiT uses
the same module names, so the only conversion is the patch-embedding convolution (OIHW -> OHWI).
taq's own files hold one or more named modules (`mmdit.`, `text_encoder.`), a JSON metadata record and a
SHA-256 of both, checked on load.

Every .safetensors file is checked against its header before MLX reads it (a truncated, cut or foreign file is a
CheckpointError naming the file, never an MLX error or a read past the end). The format itself has no checksum:
in an SD3 checkpoint a changed byte inside a tensor's data is a different, valid tensor; taq's own files carry
their digest.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from taq.config import MMDiTConfig
from taq.formats import TaqFormatError, atomic_path
from taq.formats.container import content_digest
from taq.models.mmdit import MMDiT

SD3_PREFIX = "model.diffusion_model."
CONV_KEY = "x_embedder.proj.weight"
SD3_HEAD_DIM = 64
TAQ_FORMAT_VERSION = "2"  # 2: with taq_sha256
HF_SD3_MEDIUM = ("stabilityai/stable-diffusion-3-medium", "sd3_medium.safetensors")


class CheckpointError(TaqFormatError):
    """A weights file is unreadable, or its keys or shapes do not fit the model."""


# --------------------------------------------------------------------------- the safetensors container

# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                      "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


def check_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, after checking that it describes the file's bytes exactly: every
    tensor's dtype, shape and byte range fit, and the ranges tile the data without gaps or overlaps."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a safetensors file, or cut short (a header of {length} bytes in a "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: its __metadata__ is not a table of strings")
    data_bytes, ranges = size - 8 - length, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (dtype in SAFETENSORS_DTYPES and all(type(n) is int and n >= 0 for n in (*shape, begin, end))
                     and end - begin == math.prod(shape) * SAFETENSORS_DTYPES[dtype] and end <= data_bytes)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path}: tensor {key!r} has an invalid or cut-short entry {entry!r:.120} "
                                  f"({data_bytes} bytes of data)")
        ranges.append((begin, end))
    covered = 0
    for begin, end in sorted(ranges):
        if begin != covered:
            raise CheckpointError(f"{path}: its tensors overlap or leave gaps in the data (at byte {covered})")
        covered = end
    if covered != data_bytes:
        raise CheckpointError(f"{path}: {data_bytes - covered} bytes after the last tensor belong to none")
    return header


def read_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, read completely (MLX reads lazily: a read error would
    otherwise surface at first use)."""
    check_safetensors_header(path)
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        mx.eval(list(arrays.values()))
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable tensors ({exc})") from None
    return arrays, metadata


# --------------------------------------------------------------------------- SD3 layout


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local file, or `hf:REPO/FILE` / `hf:` (SD3 Medium) looked up in the local Hugging Face cache."""
    spec = str(spec)
    if not spec.startswith("hf:"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    if spec == "hf:":
        repo, filename = HF_SD3_MEDIUM
    else:
        parts = spec[3:].split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise CheckpointError(f"{spec!r}: expected hf:OWNER/REPO/FILE, or hf: alone for SD3 Medium")
        repo, filename = "/".join(parts[:2]), parts[2]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError("hf: checkpoints need huggingface_hub (pip install 'taq[hf]')") from None
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception as exc:
        raise CheckpointError(f"{repo}/{filename} is not in the Hugging Face cache ({exc}); "
                              f"run `huggingface-cli download {repo} {filename}` first") from None


def infer_sd3_config(weights: dict[str, mx.array], head_dim: int = SD3_HEAD_DIM, **overrides) -> MMDiTConfig:
    """Read an MMDiTConfig off the shapes of SD3-layout weights (prefix already stripped); the attention heads
    are hidden / head_dim (SD3's head dim is 64), which must divide."""
    try:
        hidden, patch, _, in_channels = weights[CONV_KEY].shape  # MLX layout (O, H, W, I)
        fields = dict(
            depth=1 + max(int(k.split(".")[1]) for k in weights if k.startswith("joint_blocks.")),
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            patch_size=patch,
            in_channels=in_channels,
            pos_embed_max_size=round(weights["pos_embed"].shape[1] ** 0.5),
            pooled_dim=weights["y_embedder.mlp.0.weight"].shape[1],
            token_dim=weights["context_embedder.weight"].shape[1],
            frequency_embedding_dim=weights["t_embedder.mlp.0.weight"].shape[1],
            mlp_ratio=weights["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        )
    except KeyError as exc:
        raise CheckpointError(f"not an SD3 MMDiT checkpoint: cannot read the config, key {exc} is missing") from None
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(f"not an SD3 MMDiT checkpoint: cannot read the config from its shapes "
                              f"({CONV_KEY} {tuple(weights[CONV_KEY].shape)}: {exc})") from None
    if "num_heads" not in overrides and hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}; cannot tell the "
                              "number of attention heads")
    try:
        return MMDiTConfig(**{**fields, **overrides})
    except ValueError as exc:
        raise CheckpointError(f"not an SD3 MMDiT checkpoint: its shapes make no valid config ({exc})") from None


def load_sd3_weights(path: str | os.PathLike) -> dict[str, mx.array]:
    """SD3-layout tensors with the prefix stripped and the conv in MLX layout; other components dropped."""
    raw, _ = read_safetensors(Path(path))
    weights = {k[len(SD3_PREFIX):]: v for k, v in raw.items() if k.startswith(SD3_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path}: no keys under {SD3_PREFIX!r}; not an SD3 checkpoint")
    if CONV_KEY in weights and weights[CONV_KEY].ndim == 4:  # otherwise load_into names the bad shape
        weights[CONV_KEY] = weights[CONV_KEY].transpose(0, 2, 3, 1)
    return weights


def load_sd3_checkpoint(spec: str | os.PathLike, config: MMDiTConfig | None = None,
                        dtype: mx.Dtype | None = None, head_dim: int = SD3_HEAD_DIM, **config_overrides) -> MMDiT:
    """Build an MMDiT from an SD3-layout checkpoint; the config is read from the shapes (heads of `head_dim`)
    unless given."""
    if config is not None and config_overrides:
        raise ValueError("pass either a config or overrides of the inferred one, not both")
    path = resolve_checkpoint(spec)
    weights = load_sd3_weights(path)
    if config is None:
        try:
            config = infer_sd3_config(weights, head_dim, **config_overrides)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    model = MMDiT(config)
    load_into(model, weights, source=str(spec))
    if dtype is not None:
        model.set_dtype(dtype)
    return model


def save_sd3_checkpoint(model: MMDiT, path: str | os.PathLike, dtype: mx.Dtype | None = None) -> None:
    """Write the MMDiT in SD3's original layout (for tests and for interchange with SD3 tooling)."""
    weights = dict(tree_flatten(model.parameters()))
    weights[CONV_KEY] = weights[CONV_KEY].transpose(0, 3, 1, 2)
    weights = {SD3_PREFIX + k: (v.astype(dtype) if dtype else v) for k, v in weights.items()}
    _save_safetensors(path, weights, {"format": "pt"})


# --------------------------------------------------------------------------- shared


def load_into(module: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load flat weights into a module; any unknown, missing or mis-shaped key is one clear error."""
    expected = dict(tree_flatten(module.parameters()))
    problems = [f"unexpected key {k} {tuple(weights[k].shape)}" for k in sorted(set(weights) - set(expected))]
    problems += [f"missing key {k} (expected {tuple(expected[k].shape)})" for k in sorted(set(expected) - set(weights))]
    problems += [f"key {k} has shape {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}"
                 for k in sorted(set(weights) & set(expected)) if weights[k].shape != expected[k].shape]
    problems += [f"key {k} holds {str(weights[k].dtype).removeprefix('mlx.core.')}, expected floating-point weights"
                 for k in sorted(set(weights) & set(expected))
                 if mx.issubdtype(expected[k].dtype, mx.floating) and not mx.issubdtype(weights[k].dtype, mx.floating)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: {len(problems)} key problem(s): {shown}")
    module.update(tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in weights.items()]))
    mx.eval(module.parameters())


def _save_safetensors(path: str | os.PathLike, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights files must end in .safetensors")
    with atomic_path(path) as tmp:
        staged = tmp.with_name(tmp.name + ".safetensors")  # MLX appends the suffix when missing
        mx.save_safetensors(str(staged), arrays, metadata=metadata)
        os.replace(staged, tmp)


# --------------------------------------------------------------------------- taq's own format


UNSIGNED = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}  # same-size views for hashing any dtype


def weights_digest(arrays: dict[str, mx.array], record: str) -> str:
    """`content_digest` of MLX tensors (bfloat16 included, hashed through a same-size integer view)."""
    return content_digest(record, ((key, str(value.dtype), value.shape,
                                    np.array(value.view(UNSIGNED[value.dtype.size])).tobytes())
                                   for key, value in arrays.items()))


def save_taq_weights(path: str | os.PathLike, modules: dict[str, nn.Module], metadata: dict,
                     dtype: mx.Dtype | None = None) -> None:
    """Save named modules (e.g. {"mmdit": model, "text_encoder": enc}), a JSON metadata record and their digest."""
    arrays = {}
    for name, module in modules.items():
        for key, value in tree_flatten(module.parameters()):
            arrays[f"{name}.{key}"] = value.astype(dtype) if dtype and mx.issubdtype(value.dtype, mx.floating) else value
    record = json.dumps(metadata)
    _save_safetensors(path, arrays, {"taq_format": TAQ_FORMAT_VERSION, "taq_metadata": record,
                                     "taq_sha256": weights_digest(arrays, record)})


def read_taq_weights(path: str | os.PathLike) -> tuple[dict[str, dict[str, mx.array]], dict]:
    """Returns ({module name: flat weights}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    arrays, header = read_safetensors(path)
    if header.get("taq_format") != TAQ_FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a taq weights file of format {TAQ_FORMAT_VERSION} "
                              f"(header {sorted(header)})")
    if header.get("taq_sha256") != weights_digest(arrays, header.get("taq_metadata", "")):
        raise CheckpointError(f"{path}: its tensors or metadata do not match its taq_sha256 digest (the file is "
                              "damaged)")
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in arrays.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = value
    try:
        metadata = json.loads(header["taq_metadata"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable taq_metadata record ({exc!r})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: its taq_metadata record is not a JSON object")
    return modules, metadata


def config_from_metadata(config_class, record, path):
    """`config_class.from_dict(record)` of a weights file's metadata; a bad record is a CheckpointError."""
    try:
        return config_class.from_dict(record)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its {config_class.__name__} record is invalid ({exc})") from None


def save_mmdit(path: str | os.PathLike, model: MMDiT, metadata: dict | None = None,
               dtype: mx.Dtype | None = None) -> None:
    save_taq_weights(path, {"mmdit": model}, {"mmdit_config": model.config.to_dict(), **(metadata or {})}, dtype)


def load_mmdit(path: str | os.PathLike, dtype: mx.Dtype | None = None) -> tuple[MMDiT, dict]:
    """An MMDiT from a taq weights file (its config comes from the metadata)."""
    modules, metadata = read_taq_weights(path)
    if "mmdit" not in modules or "mmdit_config" not in metadata:
        raise CheckpointError(f"{path}: holds no MMDiT (modules: {sorted(modules)})")
    model = MMDiT(config_from_metadata(MMDiTConfig, metadata["mmdit_config"], path))
    load_into(model, modules["mmdit"], source=str(path))
    if dtype is not None:
        model.set_dtype(dtype)
    return model, metadata
