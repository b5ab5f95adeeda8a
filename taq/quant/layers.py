"""Which Linear layers are quantized, and at how many weight bits.

By default every Linear inside the joint blocks (qkv, proj, fc1, fc2 of both streams); the embedders, the adaLN
modulation and the final layer stay in full precision, as in TaQ-DiT's code. Layers are chosen by shell-style
patterns over the site names of `taq.tracing.sites` (`mm_*_txt.fc2`, `mm_0[0-3]_*`), and per-layer weight bit
widths are overridden by pattern (`mm_00_*.qkv=8`); `first_last_bits` gives the first quantized layers (block 0's
qkv, both streams) and the last one (the last block's image fc2) their own width, as TaQ-DiT does with 8 bits.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

from taq.tracing.sites import site_order, site_role

DEFAULT_ROLES = ("qkv", "proj", "fc1", "fc2")


def parse_override(text: str) -> tuple[str, int]:
    """'PATTERN=BITS' -> (pattern, bits)."""
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit():
        raise ValueError(f"override {text!r} must look like PATTERN=BITS, e.g. 'mm_00_*.qkv=8'")
    return pattern.strip(), int(bits)


def select_layers(sites: Sequence[str], patterns: Sequence[str] | None = None,
                  include_adaln: bool = False) -> list[str]:
    """The quantized layers among `sites` (Linear site names), in model order.

    None: the default roles, plus the adaLN modulation when `include_adaln`. Otherwise the union of the names
    matching any pattern; a pattern matching nothing is an error that lists the names."""
    if patterns is None:
        roles = DEFAULT_ROLES + (("adaln",) if include_adaln else ())
        chosen = [name for name in sites if site_role(name) in roles]
    else:
        if not patterns:
            raise ValueError("no layer patterns given; leave them out to quantize the default layers")
        unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in sites)]
        if unmatched:
            raise ValueError(f"layer patterns {unmatched} match no layer; the layers are: {', '.join(sites)}")
        chosen = [name for name in sites if any(fnmatchcase(name, p) for p in patterns)]
    return sorted(chosen, key=site_order)


def first_and_last(layers: Sequence[str]) -> list[str]:
    """The first quantized layers (the earliest block's qkv, both streams) and the last (the latest image fc2,
    or whichever layer runs last)."""
    ordered = sorted(layers, key=site_order)
    if not ordered:
        return []
    first_block = site_order(ordered[0])[0]
    first = [name for name in ordered if site_order(name)[0] == first_block and site_role(name) == "qkv"]
    last = ([name for name in ordered if name.endswith("_img.fc2")] or ordered)[-1]
    return list(dict.fromkeys(first + [last]))


def weight_bits(layers: Sequence[str], bits: int, overrides: Sequence[tuple[str, int]] = (),
                first_last_bits: int | None = None) -> dict[str, int]:
    """{layer: weight bits}: `bits`, then `first_last_bits` for `first_and_last`, then each override in order
    (a later override wins). An override pattern that matches none of `layers` is an error."""
    result = {name: bits for name in layers}
    if first_last_bits is not None:
        result.update({name: first_last_bits for name in first_and_last(layers)})
    for pattern, value in overrides:
        matched = [name for name in layers if fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"override pattern {pattern!r} matches none of the quantized layers "
                             f"({', '.join(layers)})")
        result.update({name: value for name in matched})
    return result
