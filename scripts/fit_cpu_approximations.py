"""Fit the two approximations behind `taq.models.fused`'s CPU paths and print their coefficients (NumPy only).

- GELU_TANH_P / _Q: tanh(u(a)), u(a) = sqrt(2/pi) (a + 0.044715 a^3), as a P(a^2) / Q(a^2) on a in [0, 2 X],
  P(0) = sqrt(2/pi), Q(0) = 1. Past X - 0.5 the target is lifted smoothly to 1 + 1e-6, so that the float32
  result is >= 1 (and is capped to exactly 1) wherever the true value rounds to 1.
- EXP2: 2^f on [-0.5, 0.5] as a polynomial with constant term 1, minimising the relative error.

Both are linearised least squares (a rational one reweighted by 1 / Q of the previous pass), then Lawson-style
reweighting toward the minimax error:

    python scripts/fit_cpu_approximations.py
"""

import numpy as np

SQRT_2_OVER_PI = 0.7978845608028654
X = 5.5  # GELU_CLAMP: |x| beyond which the float32 tanh GELU is relu(x)
LIFT = 1e-6


def lawson(weight: np.ndarray, err: np.ndarray) -> np.ndarray:
    weight = weight * (np.abs(err) / np.abs(err).max() + 1e-3) ** 0.2
    return weight / weight.max()


def tanh_target(a: np.ndarray) -> np.ndarray:
    t = np.tanh(SQRT_2_OVER_PI * (a + 0.044715 * a**3))
    ramp = np.clip((a - X) / 0.5 + 1, 0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep over [X - 0.5, X]
    return t + ramp * (1 + LIFT - t)


def fit_gelu_tanh(n_p: int = 6, n_q: int = 6, iterations: int = 200) -> tuple[np.ndarray, np.ndarray, float]:
    hi = 2 * X
    a = np.unique(np.concatenate([hi * (0.5 - 0.5 * np.cos(np.linspace(0, np.pi, 30000))),
                                  np.linspace(0, hi, 30000)]))
    t, r = tanh_target(a), (a / hi) ** 2  # fit in r = (a / hi)^2 for conditioning
    weight, q_prev = np.ones_like(a), np.ones_like(a)
    for i in range(iterations):
        basis = np.concatenate([np.stack([a * r**k for k in range(1, n_p + 1)], 1),
                                np.stack([-t * r**k for k in range(1, n_q + 1)], 1)], 1)
        w = weight / q_prev
        coef, *_ = np.linalg.lstsq(basis * w[:, None], (t - SQRT_2_OVER_PI * a) * w, rcond=None)
        p = np.concatenate([[SQRT_2_OVER_PI], coef[:n_p]])
        q = np.concatenate([[1.0], coef[n_p:]])
        q_prev = np.polyval(q[::-1], r)
        err = a * np.polyval(p[::-1], r) / q_prev - t
        if i > 20:
            weight = lawson(weight, err)
    scale = lambda n: hi ** (-2.0 * np.arange(n + 1))  # noqa: E731  (back to powers of a^2)
    return p * scale(n_p), q * scale(n_q), float(np.abs(err).max())


def fit_exp2(degree: int = 6, iterations: int = 300) -> tuple[np.ndarray, float]:
    f = np.linspace(-0.5, 0.5, 40001)
    y = np.exp2(f)
    weight = np.ones_like(f)
    for _ in range(iterations):
        basis = np.stack([f**k for k in range(1, degree + 1)], 1) / y[:, None]
        coef, *_ = np.linalg.lstsq(basis * weight[:, None], (1 - 1 / y) * weight, rcond=None)
        c = np.concatenate([[1.0], coef])
        err = np.polyval(c[::-1], f) / y - 1
        weight = lawson(weight, err)
    return c, float(np.abs(err).max())


def literal(name: str, values: np.ndarray) -> str:
    return f"{name} = (" + ", ".join(f"{v:.17g}" for v in values) + ")"


if __name__ == "__main__":
    p, q, err = fit_gelu_tanh()
    print(f"# tanh(u(a)): max |error| in float64 on [0, {2 * X}]: {err:.1e}")
    print(literal("GELU_TANH_P", p))
    print(literal("GELU_TANH_Q", q))
    c, err = fit_exp2()
    print(f"# 2**f: max relative error in float64 on [-0.5, 0.5]: {err:.1e}")
    print(literal("EXP2", c))
