"""The regression test's deliberate perturbation: one FFN's first projection, scaled."""

from __future__ import annotations

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from taq.loading import Model, load_model

PERTURBED_PARAMETER = "joint_blocks.2.x_block.mlp.fc1.weight"
PERTURBED_LAYER = "mm_02_img"
PERTURBATION_SCALE = 1.05


def perturbed_model(name: str, checkpoint=None, parameter: str = PERTURBED_PARAMETER,
                    scale: float = PERTURBATION_SCALE) -> Model:
    """A fresh copy of the model with one parameter multiplied by `scale`."""
    model = load_model(name, checkpoint=checkpoint)
    parameters = dict(tree_flatten(model.mmdit.parameters()))
    if parameter not in parameters:
        raise ValueError(f"{name} has no parameter {parameter!r}")
    model.mmdit.update(tree_unflatten([(parameter, parameters[parameter] * scale)]))
    mx.eval(model.mmdit.parameters())
    return model
