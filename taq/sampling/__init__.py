"""Phase 1 sampling: SD3's flow schedule, the CFG Euler sampler, and calibration step selection."""

from taq.sampling.euler import CFGDenoiser, Step, check_guidance_scale, euler_steps, euler_update, sample
from taq.sampling.schedule import (
    NUM_TRAIN_TIMESTEPS,
    SD3_SHIFT,
    flow_sigmas,
    model_timesteps,
    shift_sigma,
    sigma_to_timestep,
    timestep_to_sigma,
)
from taq.sampling.selection import DEFAULT_RULE, RULES, select_steps

__all__ = [
    "CFGDenoiser",
    "DEFAULT_RULE",
    "NUM_TRAIN_TIMESTEPS",
    "RULES",
    "SD3_SHIFT",
    "Step",
    "check_guidance_scale",
    "euler_steps",
    "euler_update",
    "flow_sigmas",
    "model_timesteps",
    "sample",
    "select_steps",
    "shift_sigma",
    "sigma_to_timestep",
    "timestep_to_sigma",
]
