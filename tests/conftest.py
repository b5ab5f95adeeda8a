"""Fixtures shared by the unit tests: models, small calibration sets, synthetic post-GELU statistics."""

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from taq.calibration import calibrate
from taq.loading import load_model
from taq.pocket.prompts import CALIBRATION_PROMPTS
from taq.tracing.stats import ActivationStats, CellStats, HistogramSpec

SYNTHETIC_TIMESTEPS = (1000.0, 875.0, 700.0, 450.0, 30.0)  # 1000 * sigma, denoising order
SYNTHETIC_CHANNELS = 512


# --------------------------------------------------------------------------- models and calibration sets


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny", random_weights=True)


@pytest.fixture(scope="session")
def pocket_model():
    return load_model()


def small_calibration(model, prompts, path):
    """16 points: 4 trajectories x 4 timesteps of 8 Euler steps."""
    calibrate(model, prompts, num_trajectories=4, num_steps=8, num_selected=4, batch_size=4, output=path,
              progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_calibration(tiny_model, tmp_path_factory):
    """16 points of the random-weight tiny preset, 3 prompts."""
    return small_calibration(tiny_model, ["a cat", "a dog", "a red bird"], tmp_path_factory.mktemp("tiny") / "cal.npz")


@pytest.fixture(scope="session")
def pocket_calibration(pocket_model, tmp_path_factory):
    """16 points of the pocket model, 4 of its calibration prompts."""
    return small_calibration(pocket_model, list(CALIBRATION_PROMPTS[:4]), tmp_path_factory.mktemp("pocket") / "cal.npz")


# --------------------------------------------------------------------------- synthetic statistics


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def synthetic_post_gelu(blocks: int = 6, channels: int = SYNTHETIC_CHANNELS, tokens: int = 128, seed: int = 0,
                        timesteps=SYNTHETIC_TIMESTEPS, spec: HistogramSpec = HistogramSpec()):
    """ActivationStats of GELU(pre-activations) for layers mm_{b:02d}_img|txt (the last block has no text FFN),
    plus the raw (tokens, C) activations per (layer, t). Pre-activations drift with t and depth; 2% of channels
    are outliers (pre-activation scaled 10-50x, centred lower so only their tail is large)."""
    rng = np.random.default_rng(seed)
    names = [f"mm_{b:02d}_{s}" for b in range(blocks) for s in ("img", "txt") if (b, s) != (blocks - 1, "txt")]
    stats, raw = ActivationStats(spec, names), {}
    for name in names:
        block = int(name[3:5])
        centre = rng.uniform(-1.2, 0.2, channels)
        outliers = rng.choice(channels, max(1, channels // 50), replace=False)
        scale = np.ones(channels)
        scale[outliers] = rng.uniform(10, 50, outliers.size)
        centre[outliers] -= 2.0
        for t in timesteps:
            late = 1 - t / 1000
            spread = (0.4 + 0.5 * late) * (1 + 0.15 * block)
            x = gelu_tanh((centre + 0.4 * late + spread * rng.standard_normal((tokens, channels))) * scale)
            raw[name, t] = x.astype(np.float32)
            stats.update(name, t, CellStats.from_activations(mx.array(raw[name, t]), spec))
    return stats, raw


@pytest.fixture(scope="session")
def make_post_gelu_stats():
    """`synthetic_post_gelu` itself, for tests that need other sizes."""
    return synthetic_post_gelu


@pytest.fixture(scope="session")
def post_gelu_stats_and_values():
    """(stats, raw activations) of the default synthetic model: 11 layers x 5 timesteps x 512 channels."""
    return synthetic_post_gelu()


@pytest.fixture(scope="session")
def post_gelu_stats():
    """The synthetic statistics with 64 tokens per cell (figures and report tests)."""
    return synthetic_post_gelu(tokens=64)[0]


@pytest.fixture(scope="session")
def synthetic_timesteps():
    return SYNTHETIC_TIMESTEPS
