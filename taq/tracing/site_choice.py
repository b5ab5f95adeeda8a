"""Which activations a profile traces (`taq profile --sites`), each under a name that extends `mm_{block}_{stream}`.

- `post-gelu` (default): every FFN's GELU output, `mm_03_img` (fc2's input);
- `linear-inputs`: the inputs of the joint blocks' other Linears, `mm_03_img.qkv`, `.proj`, `.fc1` (all of the
  model's hidden width; fc2's input is `post-gelu`);
- `adaln`: the adaLN modulation outputs, `mm_03_img.adaln` (shift, scale and gate of attention and FFN, 6 x hidden
  per row, one row per sample and timestep). The last block's text stream modulates only its qkv (2 x hidden) and
  is left out: a statistics file holds one channel width.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from taq.tracing.sites import linear_sites, site_role
from taq.tracing.tracer import mmdit_layer_paths

SITES = ("post-gelu", "linear-inputs", "adaln")
INPUT_ROLES = ("qkv", "proj", "fc1")


@dataclass(frozen=True)
class TracedSites:
    paths: dict[str, str]  # name -> module path
    inputs: bool  # record each module's input (True) or output
    left_out: tuple[str, ...] = ()  # sites of another width


def traced_sites(model: nn.Module, sites: str = "post-gelu", layers=None) -> TracedSites:
    """The modules to trace for `sites`; `layers` (FFN layer names such as mm_03_img) keeps only those layers'
    (the last block's text stream has no FFN, so naming layers leaves its qkv and adaLN out)."""
    if sites not in SITES:
        raise ValueError(f"sites must be one of {', '.join(SITES)}, got {sites!r}")
    if sites == "post-gelu":
        return TracedSites(mmdit_layer_paths(model, layers), inputs=False)
    keep = set(mmdit_layer_paths(model, layers)) if layers is not None else None  # validates `layers`
    roles = INPUT_ROLES if sites == "linear-inputs" else ("adaln",)
    chosen = {name: path for name, path in linear_sites(model).items()
              if site_role(name) in roles and (keep is None or name.split(".")[0] in keep)}
    if sites == "linear-inputs":
        return TracedSites(chosen, inputs=True)
    modules = dict(model.named_modules())
    width = {name: modules[path].weight.shape[0] for name, path in chosen.items()}
    common = max(set(width.values()), key=list(width.values()).count)
    return TracedSites({n: p for n, p in chosen.items() if width[n] == common}, inputs=False,
                       left_out=tuple(n for n in chosen if width[n] != common))
