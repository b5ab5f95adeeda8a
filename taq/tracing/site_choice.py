"""Which activations a profile traces (`taq profile --sites`), each under a name that extends `mm_{block}_{stream}`.

- `post-gelu` (default): every FFN's GELU output, `mm_03_img` (fc2's input);
- `linear-inputs`: the inputs of the joint blocks' other Linears, `mm_03_img.qkv`, `.proj`, `.fc1` (all of the
  model's hidden width; fc2's input is `post-gelu`);
- `adaln`: the adaLN modulation outputs, `mm_03_img.adaln` (shift, scale and gate of attention and FFN, 6 x hidden
  per row, one row per sample and timestep). The last block's text stream modulates only its qkv (2 x hidden) and
  is left out: a statistics file holds one channel width;
- `attention`: the attention probabilities softmax(q k^T / sqrt(d)) of each joint block, the rows of the image
  queries as `mm_03_img.attn` and of the text queries as `mm_03_txt.attn`, one channel per head (the last block's
  text queries feed nothing and are left out). They are formed again beside the fused attention, whose output
  stays the model's: (rows x heads x queries x keys) float32 values per block, 4 bytes each, in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from taq.tracing.sites import linear_sites, site_role
from taq.tracing.tracer import mmdit_layer_paths

SITES = ("post-gelu", "linear-inputs", "adaln", "attention")
INPUT_ROLES = ("qkv", "proj", "fc1")


@dataclass(frozen=True)
class TracedSites:
    paths: dict[str, str]  # name -> module path
    record: str  # what each module's wrapper records: "output", "input" or "probabilities" (tracer.RECORDS)
    left_out: tuple[str, ...] = ()  # sites of another width


def traced_sites(model: nn.Module, sites: str = "post-gelu", layers=None) -> TracedSites:
    """The modules to trace for `sites`; `layers` (FFN layer names such as mm_03_img) keeps only those layers'
    (the last block's text stream has no FFN, so naming layers leaves its qkv and adaLN out)."""
    if sites not in SITES:
        raise ValueError(f"sites must be one of {', '.join(SITES)}, got {sites!r}")
    if sites == "post-gelu":
        return TracedSites(mmdit_layer_paths(model, layers), record="output")
    if sites == "attention":
        return TracedSites(attention_sites(model, layers), record="probabilities")
    keep = set(mmdit_layer_paths(model, layers)) if layers is not None else None  # validates `layers`
    roles = INPUT_ROLES if sites == "linear-inputs" else ("adaln",)
    chosen = {name: path for name, path in linear_sites(model).items()
              if site_role(name) in roles and (keep is None or name.split(".")[0] in keep)}
    if sites == "linear-inputs":
        return TracedSites(chosen, record="input")
    modules = dict(model.named_modules())
    width = {name: modules[path].weight.shape[0] for name, path in chosen.items()}
    common = max(set(width.values()), key=list(width.values()).count)
    return TracedSites({n: p for n, p in chosen.items() if width[n] == common}, record="output",
                       left_out=tuple(n for n in chosen if width[n] != common))


def attention_sites(model: nn.Module, layers=None) -> dict[str, str]:
    """{`mm_03_img.attn`: `joint_blocks.3.attention`, ...}: one name per query stream of a block whose stream has an
    FFN (`layers` as in `traced_sites`); taq's MMDiT only, whose attention is a module (`JointAttention`)."""
    modules = dict(model.named_modules())
    found = {}
    for layer in mmdit_layer_paths(model, layers):
        path = f"joint_blocks.{int(layer[3:5])}.attention"
        if path not in modules:
            raise ValueError(f"--sites attention needs taq's MMDiT (its attention a module at {path}); "
                             f"{type(model).__name__} has none")
        found[f"{layer}.attn"] = path
    return found
