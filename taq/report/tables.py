"""The summary table rendered: console, Markdown and CSV (`write_summary` writes summary.md / summary.csv)."""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from taq.analysis.measures import OUTLIER_FRACTION
from taq.analysis.summary import COLUMN_NOTES, LayerSummary
from taq.formats import atomic_path


# --------------------------------------------------------------------------- rendering


COLUMNS = [f.name for f in fields(LayerSummary)]
HEADERS = ["layer", "min", "max", "mean", "std", "neg. frac.", "zero frac.", "asymmetry", "outlier ratio",
           "temporal ratio"]


def format_value(value) -> str:
    if isinstance(value, str):
        return value
    if np.isnan(value):
        return "n/a"
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def _text_rows(rows: Sequence[LayerSummary]) -> list[list[str]]:
    return [[format_value(v) for v in astuple(row)] for row in rows]


def format_console(rows: Sequence[LayerSummary]) -> str:
    """Aligned plain-text table: layer names left-aligned, numbers right-aligned."""
    table = [HEADERS] + _text_rows(rows)
    widths = [max(len(r[k]) for r in table) for k in range(len(HEADERS))]
    lines = []
    for n, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def footnotes(outlier_fraction: float = OUTLIER_FRACTION) -> list[tuple[str, str]]:
    """(header, definition) for each numeric column; 'n/a' marks layers without data."""
    pct = f"{outlier_fraction:.3g}".rstrip("0") if outlier_fraction >= 1 else f"{100 * outlier_fraction:.3g}%"
    return [(h, COLUMN_NOTES[c].format(pct=pct)) for h, c in zip(HEADERS[1:], COLUMNS[1:])]


def format_markdown(rows: Sequence[LayerSummary], outlier_fraction: float = OUTLIER_FRACTION) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "| --- |" + " ---: |" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in _text_rows(rows)]
    lines += ["", "Per layer, over all timesteps and channels of the calibration set (finite values only; "
                  "n/a: no data):", ""]
    lines += [f"- **{header}**: {note}" for header, note in footnotes(outlier_fraction)]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[LayerSummary]) -> str:
    """Full-precision CSV with the field names as header (nan/inf as Python writes them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([row.layer] + [repr(float(v)) for v in astuple(row)[1:]] for row in rows)
    return out.getvalue()


def write_summary(rows: Sequence[LayerSummary], output_dir: str | Path,
                  outlier_fraction: float = OUTLIER_FRACTION) -> tuple[Path, Path]:
    """Write summary.md and summary.csv into output_dir (atomically); returns their paths."""
    output_dir = Path(output_dir)
    paths = output_dir / "summary.md", output_dir / "summary.csv"
    for path, text in zip(paths, (format_markdown(rows, outlier_fraction), format_csv(rows))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths
