"""Weights on disk: SD3's original checkpoint layout and taq's own safetensors files.

SD3's single-file checkpoints keep the MMDiT under `model.diffusion_model.` with PyTorch layouts; taq's MMDiT uses
the same module names, so the only conversion is the patch-embedding convolution (OIHW -> OHWI).
taq's own files hold one or more named modules (`mmdit.`, `text_encoder.`) and a JSON metadata record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from taq.config import MMDiTConfig
from taq.formats import TaqFormatError, atomic_path
from taq.models.mmdit import MMDiT

SD3_PREFIX = "model.diffusion_model."
CONV_KEY = "x_embedder.proj.weight"
SD3_HEAD_DIM = 64
TAQ_FORMAT_VERSION = "1"
HF_SD3_MEDIUM = ("stabilityai/stable-diffusion-3-medium", "sd3_medium.safetensors")


class CheckpointError(TaqFormatError):
    """A checkpoint's keys or shapes do not fit the model."""


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


def infer_sd3_config(weights: dict[str, mx.array], **overrides) -> MMDiTConfig:
    """Read an MMDiTConfig off the shapes of SD3-layout weights (prefix already stripped)."""
    try:
        hidden, patch, _, in_channels = weights[CONV_KEY].shape  # MLX layout (O, H, W, I)
        fields = dict(
            depth=1 + max(int(k.split(".")[1]) for k in weights if k.startswith("joint_blocks.")),
            hidden_size=hidden,
            num_heads=hidden // SD3_HEAD_DIM,
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
    except ValueError as exc:
        raise CheckpointError(f"not an SD3 MMDiT checkpoint: cannot read the config from {CONV_KEY} "
                              f"{tuple(weights[CONV_KEY].shape)} ({exc})") from None
    return MMDiTConfig(**{**fields, **overrides})


def load_sd3_weights(path: str | os.PathLike) -> dict[str, mx.array]:
    """SD3-layout tensors with the prefix stripped and the conv in MLX layout; other components dropped."""
    raw = mx.load(str(path))
    weights = {k[len(SD3_PREFIX):]: v for k, v in raw.items() if k.startswith(SD3_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path}: no keys under {SD3_PREFIX!r}; not an SD3 checkpoint")
    if CONV_KEY in weights and weights[CONV_KEY].ndim == 4:  # otherwise load_into names the bad shape
        weights[CONV_KEY] = weights[CONV_KEY].transpose(0, 2, 3, 1)
    return weights


def load_sd3_checkpoint(spec: str | os.PathLike, config: MMDiTConfig | None = None,
                        dtype: mx.Dtype | None = None, **config_overrides) -> MMDiT:
    """Build an MMDiT from an SD3-layout checkpoint; the config is read from the shapes unless given."""
    if config is not None and config_overrides:
        raise ValueError("pass either a config or overrides of the inferred one, not both")
    weights = load_sd3_weights(resolve_checkpoint(spec))
    model = MMDiT(config or infer_sd3_config(weights, **config_overrides))
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


def save_taq_weights(path: str | os.PathLike, modules: dict[str, nn.Module], metadata: dict,
                     dtype: mx.Dtype | None = None) -> None:
    """Save named modules (e.g. {"mmdit": model, "text_encoder": enc}) and a JSON metadata record."""
    arrays = {}
    for name, module in modules.items():
        for key, value in tree_flatten(module.parameters()):
            arrays[f"{name}.{key}"] = value.astype(dtype) if dtype and mx.issubdtype(value.dtype, mx.floating) else value
    _save_safetensors(path, arrays, {"taq_format": TAQ_FORMAT_VERSION, "taq_metadata": json.dumps(metadata)})


def read_taq_weights(path: str | os.PathLike) -> tuple[dict[str, dict[str, mx.array]], dict]:
    """Returns ({module name: flat weights}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    arrays, header = mx.load(str(path), return_metadata=True)
    if header.get("taq_format") != TAQ_FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a taq weights file of format {TAQ_FORMAT_VERSION} "
                              f"(header {sorted(header)})")
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in arrays.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = value
    return modules, json.loads(header["taq_metadata"])


def save_mmdit(path: str | os.PathLike, model: MMDiT, metadata: dict | None = None,
               dtype: mx.Dtype | None = None) -> None:
    save_taq_weights(path, {"mmdit": model}, {"mmdit_config": model.config.to_dict(), **(metadata or {})}, dtype)


def load_mmdit(path: str | os.PathLike, dtype: mx.Dtype | None = None) -> tuple[MMDiT, dict]:
    """An MMDiT from a taq weights file (its config comes from the metadata)."""
    modules, metadata = read_taq_weights(path)
    if "mmdit" not in modules or "mmdit_config" not in metadata:
        raise CheckpointError(f"{path}: holds no MMDiT (modules: {sorted(modules)})")
    model = MMDiT(MMDiTConfig.from_dict(metadata["mmdit_config"]))
    load_into(model, modules["mmdit"], source=str(path))
    if dtype is not None:
        model.set_dtype(dtype)
    return model, metadata
