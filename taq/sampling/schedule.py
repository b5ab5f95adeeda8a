"""SD3's discrete flow-matching schedule: shifted sigmas and timestep <-> sigma.

Rectified flow (SD3, arXiv:2403.03206): x_t = (1 - sigma) x0 + sigma * noise. SD3 shifts the noise
level towards 1 with sigma(t) = shift * t / (1 + (shift - 1) * t) (shift 3.0 at 1024^2).

The sampling grid follows SD3's reference sampler (sd3_impl.py; DiffusionKit and diffusers agree).
The model was trained on 1000 discrete timesteps whose shifted sigmas run from shift(1/1000) to 1.
The reference takes that smallest *shifted* sigma as the end of a linspace in *unshifted* time and
then shifts the whole linspace, so the last non-zero sigma is shift applied twice to 1/1000:
0.008929 for shift 3 (0.001 for shift 1). A terminal sigma of 0 is appended.
"""

import numpy as np

SD3_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SCALE = 1000.0  # the model's timestep input is 1000 * sigma


def shift_sigma(t, shift: float = SD3_SHIFT):
    """Map unshifted time t in [0, 1] to the shifted noise level; works on floats and arrays."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(
    num_steps: int, shift: float = SD3_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """The num_steps + 1 sigmas of SD3's reference sampler, from 1.0 down to a terminal 0.0.

    Returns float64 (host values: the sampler reads them without touching the device).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    # The reference quirk: the end of the unshifted linspace is the smallest trained *shifted* sigma.
    t_end = shift_sigma(1.0 / num_train_timesteps, shift)
    sigmas = shift_sigma(np.linspace(1.0, t_end, num_steps), shift)
    return np.append(sigmas, 0.0)


def sigma_to_timestep(sigma):
    """The model's timestep input for a noise level (floats or arrays)."""
    return TIMESTEP_SCALE * sigma


def timestep_to_sigma(timestep):
    """The noise level for a model timestep (floats or arrays)."""
    return timestep / TIMESTEP_SCALE


def model_timesteps(sigmas) -> np.ndarray:
    """t = 1000 * sigma rounded as the sampler computes it (float32 sigma times 1000, in float32)."""
    return np.asarray(sigmas, dtype=np.float64).astype(np.float32) * np.float32(TIMESTEP_SCALE)
