"""Which claims hold for which layers of a model: `characterization/expectations/<model>.json`.

    {"model": "pocket", "recipe": "ci", "weights_id": "...", "thresholds": {claim: value},
     "holds": {claim: {layer: true | false}}, "measured": {claim: {layer: value}}}

A pair expected not to hold runs as `xfail(strict=True)`: a change of outcome either way fails the suite.
`measured` is for reading only (how far each value sits from its threshold); `holds` decides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from taq.formats import atomic_path

from characterization.registry import ALL_CLAIMS

EXPECTATIONS_DIR = Path(__file__).resolve().parent / "expectations"


@dataclass
class Expectations:
    holds: dict[tuple[str, str], bool] = field(default_factory=dict)  # (claim, layer) -> holds
    measured: dict[tuple[str, str], float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def expected(self, claim: str, layer: str) -> bool | None:
        """True / False from the file; None when the file says nothing about the pair."""
        return self.holds.get((claim, layer))


def expectations_path(model: str) -> Path:
    return EXPECTATIONS_DIR / f"{model}.json"


def load_expectations(path: Path) -> Expectations:
    """The file's expectations; an absent file expects nothing (every pair then runs as a plain test)."""
    if not path.exists():
        return Expectations()
    data = json.loads(path.read_text(encoding="utf-8"))
    holds, measured = data.get("holds", {}), data.get("measured", {})
    unknown = sorted(set(holds) - set(ALL_CLAIMS))
    if unknown:
        raise ValueError(f"{path}: unknown claims {unknown} (known: {', '.join(ALL_CLAIMS)}); regenerate it with "
                         "--taq-update-expectations")
    result = Expectations(meta={k: v for k, v in data.items() if k not in ("holds", "measured")})
    for claim, layers in holds.items():
        for layer, value in layers.items():
            if not isinstance(value, bool):
                raise ValueError(f"{path}: holds.{claim}.{layer} must be true or false, got {value!r}")
            result.holds[claim, layer] = value
            if layer in measured.get(claim, {}):
                result.measured[claim, layer] = measured[claim][layer]
    return result


def updated(previous: Expectations, records: Iterable[Mapping], meta: dict) -> Expectations:
    """`previous` with every measured (claim, layer) pair replaced by what the records show."""
    result = Expectations(dict(previous.holds), dict(previous.measured), {**previous.meta, **meta})
    for record in records:
        key = (record["claim"], record["layer"])
        result.holds[key] = bool(record["measured"] >= record["threshold"])
        result.measured[key] = record["measured"]
    return result


def write_expectations(path: Path, expectations: Expectations) -> None:
    def nested(values: Mapping[tuple[str, str], object]) -> dict:
        out: dict[str, dict] = {}
        order = list(ALL_CLAIMS)
        for (claim, layer), value in sorted(values.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
            out.setdefault(claim, {})[layer] = value
        return out

    measured = {k: (round(v, 6) if math.isfinite(v) else str(v)) for k, v in expectations.measured.items()}
    document = {**expectations.meta, "thresholds": {name: c.threshold for name, c in ALL_CLAIMS.items()},
                "holds": nested(expectations.holds), "measured": nested(measured)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
