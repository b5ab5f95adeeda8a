"""Names of an MMDiT's Linear layers inside its joint blocks, extending the FFN names `mm_{block:02d}_{img|txt}`.

`mm_03_img.qkv`, `.proj`, `.fc1`, `.fc2` are the image stream's attention and FFN projections of block 3 (the
input of `.fc2` is the post-GELU activation `mm_03_img`), `.adaln` its adaLN modulation Linear. The text stream
of the last block stops after q, k, v, so it has a `.qkv` and an `.adaln` only.
"""

from __future__ import annotations

import re

import mlx.nn as nn

ROLES = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "adaLN_modulation.1": "adaln"}
STREAMS = {"x_block": "img", "context_block": "txt"}
ROLE_ORDER = ("qkv", "proj", "fc1", "fc2", "adaln")  # the order a block runs them in (adaLN first, listed last)
LINEAR_PATH = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|"
                         r"adaLN_modulation\.1)")
LINEAR_NAME = re.compile(r"mm_(\d+)_(img|txt)\.(qkv|proj|fc1|fc2|adaln)")
STREAM_NAME = re.compile(r"mm_\d+_(img|txt)(\..*)?")


def linear_sites(model: nn.Module) -> dict[str, str]:
    """{site name: module path} of every joint-block Linear of `model`, ordered by block, stream (img, txt) and
    role (qkv, proj, fc1, fc2, adaln)."""
    found = {}
    for path, module in model.named_modules():
        match = LINEAR_PATH.fullmatch(path)
        if match and isinstance(module, nn.Linear):
            block, stream, role = match.groups()
            found[f"mm_{int(block):02d}_{STREAMS[stream]}.{ROLES[role]}"] = path
    if not found:
        raise ValueError(f"no joint-block Linear layers found in {type(model).__name__}")
    return dict(sorted(found.items(), key=lambda item: site_order(item[0])))


def site_order(name: str) -> tuple[int, int, int]:
    """Sort key of a Linear site name: (block, stream, role)."""
    match = LINEAR_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a Linear site name (mm_NN_img|txt.qkv|proj|fc1|fc2|adaln)")
    block, stream, role = match.groups()
    return int(block), ("img", "txt").index(stream), ROLE_ORDER.index(role)


def site_role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def stream_of(name: str) -> str:
    """The stream ("img" or "txt") of any site name extending mm_{block}_{stream}."""
    match = STREAM_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} does not name a site of a joint block's stream (mm_NN_img|txt[.site])")
    return match.group(1)
