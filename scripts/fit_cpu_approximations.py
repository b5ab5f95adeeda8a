"""Fit the approximation behind `taq.models.fused`'s CPU paths and print its coefficients (NumPy only).

- EXP2: 2^f on [-0.5, 0.5] as a polynomial with constant term 1, minimising the relative error.

A linearised least-squares fit, then Lawson-style reweighting toward the minimax error:

    python scripts/fit_cpu_approximations.py
"""

import numpy as np


def lawson(weight: np.ndarray, err: np.ndarray) -> np.ndarray:
    weight = weight * (np.abs(err) / np.abs(err).max() + 1e-3) ** 0.2
    return weight / weight.max()


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
    c, err = fit_exp2()
    print(f"# 2**f: max relative error in float64 on [-0.5, 0.5]: {err:.1e}")
    print(literal("EXP2", c))
