"""The claims table (claims.json, claims.md) and one figure per claim, written into the report directory."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from taq.analysis.cells import display_order
from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, OUTCOMES, REFERENCE, UNDECIDED

from characterization.registry import ALL_CLAIMS
from taq.formats import atomic_path
from taq.report.plots import save_figure

UNEXPECTED = "unexpected"  # the outcome contradicts the expectations file (the suite fails)
OUTCOME_COLORS = {HOLDS: "tab:green", DOES_NOT_HOLD: "tab:blue", UNDECIDED: "tab:orange"}
CLAIMS_DIR = "claims"


def tally(records: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    """claim -> {holds: n, does not hold: n, undecided: n, unexpected: n} for every claim that has records, in ALL_CLAIMS order."""
    counts = {claim: Counter() for claim in ALL_CLAIMS}
    for record in records:
        counts.setdefault(record["claim"], Counter())[record["outcome"]] += 1
        counts[record["claim"]][UNEXPECTED] += not record.get("as_expected", True)
    return {claim: {o: c[o] for o in OUTCOMES + (UNEXPECTED,)} for claim, c in counts.items() if c}


def _json_value(value):
    """Non-finite floats (also inside an interval) as strings: JSON has no NaN or infinity."""
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|")  # a bare | would end the Markdown table cell


def claims_markdown(records: Sequence[Mapping], context: Mapping) -> str:
    lines = [f"# Claims: {context.get('model', '?')} ({context.get('recipe', '?')} recipe)", "",
             "A claim holds for a layer when its measured value is >= its threshold; where the value has a 95% "
             "interval, when the whole interval lies above it, and it is undecided when the interval touches or "
             "straddles the threshold. "
             f"{UNEXPECTED}: the outcome contradicts the expectations file (the suite fails).", "",
             f"| claim | {HOLDS} | {DOES_NOT_HOLD} | {UNDECIDED} | {UNEXPECTED} | threshold | measure |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for claim, counts in tally(records).items():
        lines.append(f"| [{claim}]({CLAIMS_DIR}/{claim}.png) | {counts[HOLDS]} | {counts[DOES_NOT_HOLD]} | "
                     f"{counts[UNDECIDED]} | {counts[UNEXPECTED]} | {ALL_CLAIMS[claim].threshold:g} | "
                     f"{_cell(ALL_CLAIMS[claim].measure)} |")
    lines += ["", "| claim | layer | measured | 95% interval | threshold | outcome | expected | note |",
              "| --- | --- | ---: | --- | ---: | --- | --- | --- |"]
    for r in records:
        outcome = r["outcome"] + ("" if r.get("as_expected", True) else f" ({UNEXPECTED})")
        interval = r.get("interval")
        shown = f"[{_number(interval[0])}, {_number(interval[1])}]" if interval else ""
        lines.append(f"| {r['claim']} | {r['layer']} | {_number(r['measured'])} | {shown} | {r['threshold']:g} | "
                     f"{outcome} | {r['expected']} | {_cell(r['note'])} |")
    lines += ["", f"## What each threshold encodes ({REFERENCE})", ""]
    lines += [f"- **{name}** (>= {c.threshold:g}): {c.observation}" for name, c in ALL_CLAIMS.items()]
    return "\n".join(lines) + "\n"


def claim_figure(records: Sequence[Mapping], claim: str) -> Figure:
    """Measured value per layer (with its 95% interval where it has one) against the threshold, coloured by
    outcome (red ring: unexpected). Points, not bars from 0, so 1.02 against a threshold of 1.1 stays visible."""
    rows = [r for r in records if r["claim"] == claim]
    rows = [rows[i] for i in display_order([r["layer"] for r in rows])]
    values = np.array([r["measured"] for r in rows], dtype=np.float64)
    threshold = ALL_CLAIMS[claim].threshold
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for x, (row, value) in enumerate(zip(rows, values)):
        if not math.isfinite(value):
            continue
        color = OUTCOME_COLORS.get(row["outcome"], "grey")
        interval = row.get("interval")
        if interval is not None:
            ax.vlines(x, interval[0], interval[1], color=color, lw=2, alpha=0.6)
        ax.plot(x, value, "o", color=color, ms=7, markeredgecolor="red" if not row.get("as_expected", True)
                else color, markeredgewidth=2)
        ax.annotate(f"{value:.3g}", (x, value), xytext=(5, 0), textcoords="offset points", fontsize=7,
                    va="center")
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(claim)
    ax.set_title(f"{claim}: {ALL_CLAIMS[claim].measure}", fontsize=9, wrap=True)
    outcomes = [Patch(color=color, label=o) for o, color in OUTCOME_COLORS.items()]
    ax.legend(handles=[ax.get_lines()[-1], *outcomes], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    missing = [r["layer"] for r, v in zip(rows, values) if not math.isfinite(v)]
    if missing:
        fig.text(0.01, 0.01, f"not finite (not drawn): {', '.join(missing)}", color="firebrick", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_claims(records: Sequence[Mapping], report_dir: Path, context: Mapping) -> list[Path]:
    """claims.json, claims.md and claims/<claim>.png in report_dir; returns the paths written."""
    figures_dir = report_dir / CLAIMS_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = [save_figure(claim_figure(records, claim), figures_dir / f"{claim}.png") for claim in tally(records)]
    document = {**context, "summary": tally(records),
                "thresholds": {name: {"value": c.threshold, "measure": c.measure, "observation": c.observation}
                               for name, c in ALL_CLAIMS.items()},
                "claims": [{k: _json_value(v) for k, v in r.items()} for r in records]}
    for name, text in (("claims.json", json.dumps(document, indent=2) + "\n"),
                       ("claims.md", claims_markdown(records, context))):
        with atomic_path(report_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(report_dir / name)
    return written
