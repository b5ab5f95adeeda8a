"""How many time groups a time-aware quantizer needs: per layer, the quantization MSE against the number of
contiguous timestep groups sharing one activation range (1, 2, 4, ... up to one per timestep).

Estimated from the histograms like the time-aware claims (`taq.analysis.quant_error.grouped_mse`: each group's
range chosen to minimize its MSE). `groups_for(curve, share)` reads where per-timestep ranges stop paying: the
fewest groups that already recover `share` of the gain from one group to one per timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taq.analysis.cells import layer_names
from taq.analysis.measures import layer_extremes
from taq.analysis.quant_error import contiguous_groups, grouped_mse

GAIN_SHARE = 0.9  # "stops paying": 90% of the per-timestep gain is reached


def group_counts(timesteps: int) -> list[int]:
    """1, 2, 4, ... below `timesteps`, then `timesteps` itself (one group per timestep)."""
    counts = [1 << k for k in range(max(timesteps, 1).bit_length()) if 1 << k < timesteps]
    return counts + [timesteps] if timesteps > 0 else []


@dataclass(frozen=True)
class TimeGroupCurve:
    layer: str
    bits: int
    groups: np.ndarray  # (K,) numbers of groups
    mse: np.ndarray  # (K,) MSE with that many contiguous groups

    @property
    def relative(self) -> np.ndarray:
        """MSE relative to one group for all timesteps."""
        return self.mse / self.mse[0]

    def groups_for(self, share: float = GAIN_SHARE) -> int:
        """The fewest groups whose MSE recovers `share` of the gain of one range per timestep over one range."""
        gain = self.mse[0] - self.mse[-1]
        if not gain > 0:
            return 1
        reached = (self.mse[0] - self.mse) >= share * gain * (1 - 1e-12)
        return int(self.groups[np.argmax(reached)])


def time_group_curves(arrays: dict, bits: int) -> list[TimeGroupCurve]:
    """One curve per layer with data, in the arrays' layer order; timesteps in their sorted order (contiguous
    groups are runs of neighbouring timesteps, the same in denoising order)."""
    curves = []
    for i, name in enumerate(layer_names(arrays)):
        hist = np.asarray(arrays["hist"][i])
        filled = hist.sum(axis=1) > 0
        if not filled.any():
            continue
        hist = hist[filled]  # an empty timestep belongs to no group
        counts = group_counts(hist.shape[0])
        mse = grouped_mse(hist, arrays["bin_edges"], bits,
                          [contiguous_groups(hist.shape[0], k) for k in counts], *layer_extremes(arrays, i))
        curves.append(TimeGroupCurve(name, bits, np.array(counts), mse))
    return curves
