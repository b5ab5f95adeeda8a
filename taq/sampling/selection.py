"""Which of a trajectory's N sampler steps go into the calibration set (TaQ-DiT: 25 of 100).

Two rules, both giving exactly K distinct sorted step indices in [0, N) for 1 <= K <= N:

- "stride" (default; TaQ-DiT's and PTQ4DiT's official code, `range(0, N, N // K)`): every
  (N // K)-th step from step 0, the first K of them: [0, 4, ..., 96] for N=100, K=25. When K does
  not divide N the stride is still floor(N / K) and the picks stop at (K - 1) * (N // K), leaving
  more of the least noisy steps unchosen: N=10, K=4 gives [0, 2, 4, 6].
- "linspace" (the seed's code, sample_cali_data.py: `np.linspace(0, N - 1, K, dtype=int)`): K
  points spread evenly over [0, N - 1], rounded *down* (NumPy floors for an integer dtype); for
  K >= 2 the first and the last step are always included (K = 1 gives [0]). For N=100, K=25 it
  differs from "stride" at 17 of the 25 positions ([0, ..., 28, 33, 37, ..., 94, 99]); rounding
  to nearest instead would differ at 20.
"""

import numpy as np

DEFAULT_RULE = "stride"
RULES = ("stride", "linspace")


def select_steps(num_steps: int, num_selected: int, rule: str = DEFAULT_RULE) -> list[int]:
    """Sorted indices of the num_selected steps, out of num_steps, chosen by rule."""
    if rule not in RULES:
        raise ValueError(f"unknown step selection rule {rule!r}; expected one of {RULES}")
    for name, value in (("num_steps", num_steps), ("num_selected", num_selected)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= num_selected <= num_steps:
        raise ValueError(f"num_selected must be in [1, num_steps={num_steps}], got {num_selected}")
    if rule == "stride":
        return list(range(0, num_steps, num_steps // num_selected))[:num_selected]
    return [int(i) for i in np.linspace(0, num_steps - 1, num_selected, dtype=np.int64)]
