"""The calibration set (phase 1's output, phase 2's and the quantizer's input) and calibrate's resume file.

A calibration file holds P points (x_t, t) of T trajectories, K selected steps each, and the embeddings of the M
prompts they were sampled with (each used by some point); `meta` records the recipe, the sigmas and the selected
steps, so every t can be checked against the step it claims to come from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from taq.formats.container import TaqFormatError, load_npz, read_meta as _read_meta, save_npz
from taq.sampling.schedule import model_timesteps

KIND, VERSION = "taq-calibration", 1
PARTIAL_KIND, PARTIAL_VERSION = "taq-calibration-partial", 1

# key -> ndim of every array in a calibration file (P points, M prompts)
REQUIRED_KEYS = {
    "xs": 4,  # (P, H, W, C) float32
    "ts": 1,  # (P,) float32, 1000 * sigma as the model received it
    "prompt_indices": 1,  # (P,) into prompts / cs
    "trajectory_indices": 1,  # (P,)
    "step_indices": 1,  # (P,) sampler step, 0 .. num_steps - 1
    "cs": 3,  # (M, L, token_dim)
    "cs_pooled": 2,  # (M, pooled_dim)
    "cs_uncond": 2,  # (L, token_dim) embedding of "" for the CFG branch
    "cs_pooled_uncond": 1,  # (pooled_dim,)
    "prompts": 1,  # (M,) str
    "cfg_scale": 0,
}


@dataclass(frozen=True)
class CalibrationSet:
    """A validated calibration file; per-point arrays have length P, per-prompt arrays length M."""

    xs: np.ndarray  # (P, H, W, C) float32
    ts: np.ndarray  # (P,) float32
    prompt_indices: np.ndarray  # (P,)
    trajectory_indices: np.ndarray  # (P,)
    step_indices: np.ndarray  # (P,)
    cs: np.ndarray  # (M, L, token_dim)
    cs_pooled: np.ndarray  # (M, pooled_dim)
    cs_uncond: np.ndarray  # (L, token_dim)
    cs_pooled_uncond: np.ndarray  # (pooled_dim,)
    prompts: list[str]
    cfg_scale: float
    meta: dict

    def __len__(self) -> int:
        return self.xs.shape[0]


def save_calibration(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a calibration file (the REQUIRED_KEYS arrays and the metadata record) atomically."""
    missing = sorted(set(REQUIRED_KEYS) - set(arrays))
    if missing:
        raise ValueError(f"a calibration file needs the arrays {missing}")
    save_npz(path, arrays, meta, kind=KIND, version=VERSION)


def read_meta(path: str | os.PathLike) -> dict:
    """A calibration file's metadata record, without reading its arrays."""
    return _read_meta(path, kind=KIND, version=VERSION)


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """Read and validate a calibration file; any inconsistency is a TaqFormatError naming the key."""
    arrays, meta = load_npz(path, kind=KIND, version=VERSION, required=REQUIRED_KEYS)

    def fail(message: str) -> TaqFormatError:
        return TaqFormatError(f"{path}: {message}")

    for key in ("xs", "ts", "cs", "cs_pooled", "cs_uncond", "cs_pooled_uncond"):
        if arrays[key].dtype != np.float32:
            raise fail(f"{key!r} has dtype {arrays[key].dtype}, expected float32")
    for key in ("prompt_indices", "trajectory_indices", "step_indices"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise fail(f"{key!r} has dtype {arrays[key].dtype}, expected integers")
    if arrays["prompts"].dtype.kind != "U":
        raise fail(f"'prompts' has dtype {arrays['prompts'].dtype}, expected str")
    num_points = arrays["xs"].shape[0]
    for key in ("ts", "prompt_indices", "trajectory_indices", "step_indices"):
        if arrays[key].shape[0] != num_points:
            raise fail(f"{key!r} has {arrays[key].shape[0]} entries, 'xs' has {num_points} points")
    num_prompts = arrays["prompts"].shape[0]
    for key in ("cs", "cs_pooled"):
        if arrays[key].shape[0] != num_prompts:
            raise fail(f"{key!r} has {arrays[key].shape[0]} rows for {num_prompts} prompts")
    if arrays["cs_uncond"].shape != arrays["cs"].shape[1:]:
        raise fail(f"'cs_uncond' has shape {arrays['cs_uncond'].shape}, expected {arrays['cs'].shape[1:]}")
    if arrays["cs_pooled_uncond"].shape != arrays["cs_pooled"].shape[1:]:
        raise fail(f"'cs_pooled_uncond' has shape {arrays['cs_pooled_uncond'].shape}, "
                   f"expected {arrays['cs_pooled'].shape[1:]}")
    indices = arrays["prompt_indices"]
    if num_points and (indices.min() < 0 or indices.max() >= num_prompts):
        raise fail(f"'prompt_indices' range [{indices.min()}, {indices.max()}] is outside the {num_prompts} prompts")
    unused = num_prompts - np.unique(indices).size
    if unused:
        raise fail(f"{unused} of its {num_prompts} prompts are used by no point (a calibration file stores the "
                   "prompts its points use)")
    if not np.isfinite(arrays["xs"]).all():
        raise fail(f"'xs' holds {np.size(arrays['xs']) - np.isfinite(arrays['xs']).sum()} NaN or inf values")
    _check_timesteps(arrays, meta, fail)
    return CalibrationSet(**{k: arrays[k] for k in REQUIRED_KEYS if k not in ("prompts", "cfg_scale")},
                          prompts=[str(p) for p in arrays["prompts"]], cfg_scale=float(arrays["cfg_scale"]),
                          meta=meta)


def _check_timesteps(arrays: dict, meta: dict, fail: Callable[[str], TaqFormatError]) -> None:
    """Step indices must be selected steps and each t must be the model timestep of its step's sigma."""
    for key in ("sigmas", "selected_steps"):
        if key not in meta:
            raise fail(f"metadata has no {key!r}")
    steps = arrays["step_indices"]
    unknown = np.setdiff1d(steps, meta["selected_steps"])
    if unknown.size:
        raise fail(f"'step_indices' holds steps {unknown[:5].tolist()} that are not among the selected steps")
    if not np.array_equal(arrays["ts"], model_timesteps(np.asarray(meta["sigmas"]))[steps]):
        raise fail("'ts' does not match 1000 * sigmas[step_indices] from the metadata")


# --------------------------------------------------------------------------- the resume file


def save_partial(path: str | os.PathLike, xs: np.ndarray, recipe: dict) -> None:
    """Checkpoint finished trajectories' selected x_t, (T_done, K, H, W, C), with the recipe they belong to."""
    save_npz(path, {"xs": xs}, {"recipe": recipe, "finished": int(xs.shape[0])}, kind=PARTIAL_KIND,
             version=PARTIAL_VERSION)


def partial_progress(path: str | os.PathLike) -> int:
    """How many finished trajectories a resume file holds (from its metadata alone); 0 if there is none."""
    try:
        return int(_read_meta(path, kind=PARTIAL_KIND, version=PARTIAL_VERSION).get("finished", 0))
    except (TaqFormatError, TypeError, ValueError):
        return 0


def load_partial(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(xs (T_done, K, H, W, C), the recipe record) of a resume file."""
    arrays, meta = load_npz(path, kind=PARTIAL_KIND, version=PARTIAL_VERSION, required={"xs": 5})
    return arrays["xs"], meta.get("recipe", {})
