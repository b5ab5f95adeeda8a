"""The one source of the calibration recipe and of the pipeline's named recipes.

`CalibrationRecipe()` is TaQ-DiT's recipe on SD3's flow schedule (256 trajectories x 100 Euler steps, 25 kept with
the official stride, CFG 1.5); its fields' defaults are the CLI's defaults. `RECIPES` names what the pipeline
(`taq report`) and the characterization suite (`--taq-recipe`) run: `paper` is that recipe, `ci` the same with
a quarter of the trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from taq.config import lookup
from taq.sampling import SD3_SHIFT, check_guidance_scale, flow_sigmas, select_steps
from taq.tracing.histogram import HistogramSpec


@dataclass(frozen=True)
class CalibrationRecipe:
    """Everything that decides the sampled points, besides the model, prompts and resolution."""

    num_trajectories: int = 256
    num_steps: int = 100
    num_selected: int = 25
    step_selection: str = "stride"
    cfg_scale: float = 1.5
    shift: float = SD3_SHIFT
    seed: int = 0
    batch_size: int = 16  # trajectories per model call (2x rows with CFG); part of the recipe: it changes rounding

    def __post_init__(self):
        for name in ("num_trajectories", "num_steps", "num_selected", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("num_trajectories", "num_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_selected > self.num_steps:
            raise ValueError(f"cannot select {self.num_selected} steps out of {self.num_steps} sampling steps")
        select_steps(self.num_steps, self.num_selected, self.step_selection)  # checks the rule and counts
        check_guidance_scale(self.cfg_scale)
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a positive number, got {self.shift}")
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        object.__setattr__(self, "shift", float(self.shift))

    @property
    def selected_steps(self) -> list[int]:
        return select_steps(self.num_steps, self.num_selected, self.step_selection)

    @property
    def sigmas(self) -> np.ndarray:
        return flow_sigmas(self.num_steps, self.shift)

    def describe(self) -> str:
        return (f"{self.num_trajectories} trajectories x {self.num_steps} Euler steps, {self.num_selected} kept "
                f"({self.step_selection}), CFG {self.cfg_scale:g}, seed {self.seed}")


@dataclass(frozen=True)
class Recipe:
    """How the pipeline makes its data: a calibration recipe, how many of its points are profiled, and the
    histogram layout of the statistics."""

    name: str
    calibration: CalibrationRecipe
    num_samples: int = 512
    profile_seed: int = 0
    profile_batch_size: int = 32
    profile_groups: int = 8  # trajectory groups kept for the claims' bootstrap intervals (taq.analysis.uncertainty)
    profile_branches: bool = False  # also keep the conditional and unconditional CFG rows apart
    histogram: HistogramSpec = HistogramSpec()

    def describe(self) -> str:
        return f"{self.name}: {self.calibration.describe()}; {self.num_samples} points profiled"


PAPER = CalibrationRecipe()
RECIPES = {
    "paper": Recipe("paper", PAPER),
    # A quarter of the paper's trajectories keeps a cold run of the suite within minutes on 2 CPU cores.
    "ci": Recipe("ci", replace(PAPER, num_trajectories=64)),
}
DEFAULT_RECIPE = "ci"


def get_recipe(name: str) -> Recipe:
    return lookup(RECIPES, name, "recipe")
