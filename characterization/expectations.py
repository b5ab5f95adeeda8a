"""Which claims hold for which layers of a model: `characterization/expectations/<model>.json`.

    {"model": "pocket", "recipe": "ci", "weights_id": "...", "thresholds": {claim: value},
     "outcomes": {claim: {layer: "holds" | "does not hold" | "undecided"}},
     "measured": {claim: {layer: value}}, "intervals": {claim: {layer: [low, high]}}}

A pair expected not to hold runs as `xfail(strict=True)`. The suite fails when a pair's outcome contradicts the
file (holds where it said does not hold, or the reverse); an outcome that moves to or from "undecided" (a 95%
interval straddling the threshold) is reported, not failed, since the data could not decide it either way.
`measured` and `intervals` are for reading only (how far each value sits from its threshold); `outcomes` decides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from taq.formats import atomic_path

from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, OUTCOMES

from characterization.registry import ALL_CLAIMS

EXPECTATIONS_DIR = Path(__file__).resolve().parent / "expectations"


@dataclass
class Expectations:
    outcomes: dict[tuple[str, str], str] = field(default_factory=dict)  # (claim, layer) -> one of OUTCOMES
    measured: dict[tuple[str, str], float] = field(default_factory=dict)
    intervals: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def expected(self, claim: str, layer: str) -> str | None:
        """The pair's outcome in the file; None when the file says nothing about it."""
        return self.outcomes.get((claim, layer))


def contradicts(expected: str | None, outcome: str) -> bool:
    """Whether a measured outcome fails the suite: opposite to a decided expectation, or not holding where the
    file says nothing."""
    if expected is None:
        return outcome != HOLDS
    return {expected, outcome} == {HOLDS, DOES_NOT_HOLD}


def expectations_path(model: str) -> Path:
    return EXPECTATIONS_DIR / f"{model}.json"


def load_expectations(path: Path) -> Expectations:
    """The file's expectations; an absent file expects nothing (every pair then runs as a plain test)."""
    if not path.exists():
        return Expectations()
    data = json.loads(path.read_text(encoding="utf-8"))
    if "outcomes" not in data:
        raise ValueError(f"{path}: no 'outcomes' (a file from before claims could be undecided); regenerate it with "
                         "--taq-update-expectations")
    outcomes = data["outcomes"]
    unknown = sorted(set(outcomes) - set(ALL_CLAIMS))
    if unknown:
        raise ValueError(f"{path}: unknown claims {unknown} (known: {', '.join(ALL_CLAIMS)}); regenerate it with "
                         "--taq-update-expectations")
    result = Expectations(meta={k: v for k, v in data.items() if k not in ("outcomes", "measured", "intervals")})
    for claim, layers in outcomes.items():
        for layer, outcome in layers.items():
            if outcome not in OUTCOMES:
                raise ValueError(f"{path}: outcomes.{claim}.{layer} must be one of {', '.join(OUTCOMES)}, "
                                 f"got {outcome!r}")
            result.outcomes[claim, layer] = outcome
            for name, target in (("measured", result.measured), ("intervals", result.intervals)):
                if layer in data.get(name, {}).get(claim, {}):
                    target[claim, layer] = data[name][claim][layer]
    return result


def updated(previous: Expectations, records: Iterable[Mapping], meta: dict) -> Expectations:
    """`previous` with every measured (claim, layer) pair replaced by what the records show."""
    result = Expectations(dict(previous.outcomes), dict(previous.measured), dict(previous.intervals),
                          {**previous.meta, **meta})
    for record in records:
        key = (record["claim"], record["layer"])
        result.outcomes[key] = record["outcome"]
        result.measured[key] = record["measured"]
        result.intervals.pop(key, None)
        if record.get("interval") is not None:
            result.intervals[key] = list(record["interval"])
    return result


def write_expectations(path: Path, expectations: Expectations) -> None:
    def nested(values: Mapping[tuple[str, str], object]) -> dict:
        out: dict[str, dict] = {}
        order = list(ALL_CLAIMS)
        for (claim, layer), value in sorted(values.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
            out.setdefault(claim, {})[layer] = value
        return out

    def rounded(value: float) -> float | str:
        return round(value, 6) if math.isfinite(value) else str(value)

    document = {**expectations.meta, "thresholds": {name: c.threshold for name, c in ALL_CLAIMS.items()},
                "outcomes": nested(expectations.outcomes),
                "measured": nested({k: rounded(v) for k, v in expectations.measured.items()}),
                "intervals": nested({k: [rounded(v) for v in pair] for k, pair in expectations.intervals.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
