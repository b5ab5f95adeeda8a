"""The HTML report: one offline page (`index.html`, no scripts or external resources) with the run metadata, the
summary table, every figure (PNG files beside it, linked relatively), the claims table and benchmark timings."""

from __future__ import annotations

import html
import json
import os
import platform
from dataclasses import astuple
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import taq
from taq.analysis.cells import select_layers, stats_arrays
from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, OUTCOMES, UNDECIDED
from taq.analysis.measures import OUTLIER_FRACTION
from taq.analysis.summary import ZEROS_NOTE, LayerSummary, summarize
from taq.formats import atomic_path
from taq.formats.stats import load_stats
from taq.report.plots import WrittenFigure, prepare_output_dir, write_figures
from taq.report.tables import HEADERS, footnotes, format_value, write_summary

FIGURES_DIR = "figures"
CLAIM_COLUMNS = ("claim", "layer", "measured", "interval", "threshold", "outcome", "note")
FIGURE_GROUPS = (  # (heading, file name prefix)
    ("Activation range vs timestep", "range_vs_timestep"),
    ("Drift heatmaps (layer × timestep)", "heatmap_"),
    ("Fraction of negative activations", "negative_fraction"),
    ("Fraction of exact zeros", "zero_fraction"),
    ("How many time groups a time-aware quantizer needs", "time_groups"),
    ("Histograms per timestep", "histogram_"),
    ("Per-channel ranges and outlier channels", "channel_ranges_"),
)
LONG_VALUE = 160  # characters of a metadata value shown before it is shortened

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1320px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 2px solid #dde1e7; padding-bottom: 0.3rem; }
h3 { margin-top: 1.8rem; color: #39425a; }
nav a { margin-right: 1.2rem; } .subtitle { color: #5b6478; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d7dbe2; padding: 0.3rem 0.6rem; vertical-align: top; }
th { background: #eef1f5; text-align: left; } tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key { font-weight: 600; white-space: nowrap; } td.value { font-family: ui-monospace, Menlo, monospace;
       font-size: 0.82rem; word-break: break-word; max-width: 900px; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e6eb; }
figcaption { color: #4a5367; font-size: 0.9rem; margin-top: 0.3rem; }
.notrun { color: #7a8194; font-style: italic; } .footnotes { font-size: 0.85rem; color: #4a5367; }
.outcome { font-weight: 700; padding: 0.05rem 0.45rem; border-radius: 0.3rem; }
.outcome-holds { background: #d8f3df; color: #14612b; } .outcome-not { background: #e3e9f6; color: #2f4370; }
.outcome-unexpected { background: #fbdada; color: #8f1717; }
.outcome-undecided { background: #fdebc8; color: #7a4b00; } .outcome-other { background: #e6e8ee; color: #39425a; }
.warning { background: #fff1cc; border-left: 4px solid #d99a00; padding: 0.6rem 0.9rem; }
"""



# --------------------------------------------------------------------------- small renderers


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{_e('' if value is None else value)}</td>"
    if isinstance(value, (int, float)):
        return f'<td class="num">{_e(format_value(float(value)) if isinstance(value, float) else value)}</td>'
    return f"<td>{_e(value)}</td>"


def _short(value) -> str:
    """Metadata value as text; long lists and dicts shortened, saying how long they are (strings shown whole)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) <= LONG_VALUE or isinstance(value, str):
        return text
    size = f" ({len(value)} items)" if isinstance(value, (list, tuple, dict)) else ""
    return text[:LONG_VALUE] + f" …{size}"


def _key_value_table(record: Mapping) -> str:
    rows = "".join(f'<tr><td class="key">{_e(k)}</td><td class="value">{_e(_short(v))}</td></tr>'
                   for k, v in record.items())
    return f"<table>{rows}</table>"


def _not_run(what: str) -> str:
    return f'<p class="notrun">Not run: no {_e(what)} were given to this report.</p>'


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


# --------------------------------------------------------------------------- sections


def versions() -> dict[str, str]:
    """Versions of taq, Python and the libraries the numbers and figures come from."""
    found = {"taq": taq.__version__, "python": platform.python_version(), "platform":
             f"{platform.system()} {platform.machine()}"}
    for package in ("mlx", "numpy", "matplotlib"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def metadata_section(stats_meta: Mapping | None, calibration_meta: Mapping | None) -> str:
    parts = ["<h3>Versions (this report)</h3>", _key_value_table(versions())]
    parts += ["<h3>Statistics file</h3>", _key_value_table(stats_meta) if stats_meta else _not_run("stats metadata")]
    parts += ["<h3>Calibration recipe</h3>",
              _key_value_table(calibration_meta) if calibration_meta else _not_run("calibration metadata")]
    return "\n".join(parts)


def summary_section(rows: Sequence[LayerSummary], outlier_fraction: float) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + f"<td>{_e(r.layer)}</td>" + "".join(
        f'<td class="num">{_e(format_value(v))}</td>' for v in astuple(r)[1:]) + "</tr>" for r in rows)
    notes = "".join(f"<li><b>{_e(h)}</b>: {_e(n)}</li>" for h, n in footnotes(outlier_fraction))
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            '<p class="footnotes">Per layer, over all timesteps and channels (finite values only; n/a: no data). '
            'Also as <a href="summary.md">summary.md</a> and <a href="summary.csv">summary.csv</a>.</p>'
            f'<p>Exact zeros are counted apart from negative values (zero frac., neg. frac.): {_e(ZEROS_NOTE)}.</p>'
            f'<ul class="footnotes">{notes}</ul>')


def figures_section(figures: Sequence[WrittenFigure], report_dir: Path) -> str:
    if not figures:
        return '<p class="notrun">No figures were written.</p>'
    parts = ['<p>Timestep axes run in denoising order, t = 1000·σ from 1000 (noise) to 0 (image).</p>']
    for heading, prefix in FIGURE_GROUPS:
        group = [f for f in figures if f.path.name.startswith(prefix)]
        if not group:
            continue
        parts.append(f"<h3>{_e(heading)}</h3>")
        for fig in group:
            src = Path(os.path.relpath(fig.path, report_dir)).as_posix()
            parts.append(f'<figure id="{_e(fig.path.stem)}"><img src="{_e(src)}" alt="{_e(fig.caption)}" '
                         f'loading="eager"><figcaption><code>{_e(fig.path.name)}</code>: {_e(fig.caption)}'
                         "</figcaption></figure>")
    return "\n".join(parts)


def claims_section(claims: Sequence[Mapping] | None) -> str:
    if claims is None:
        return _not_run("claims")
    if not claims:
        return "<p>The claims suite ran but reported no claims.</p>"
    outcomes = [str(c.get("outcome", "")) for c in claims]
    tally = ", ".join(f"{outcomes.count(o)} {o}" for o in dict.fromkeys(list(OUTCOMES) + outcomes) if o in outcomes)
    surprises = sum(1 for c in claims if c.get("as_expected") is False)
    if any("as_expected" in c for c in claims):
        verb = "contradicts" if surprises == 1 else "contradict"
        tally += f"; {surprises} {verb} the expectations file" if surprises else "; none contradicts the expectations"
    columns = CLAIM_COLUMNS + (("expected",) if any("expected" in c for c in claims) else ())
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for claim in claims:
        cells = []
        for column in columns:
            if column == "outcome":
                outcome = str(claim.get("outcome", "?"))
                kind = {HOLDS: "holds", DOES_NOT_HOLD: "not", UNDECIDED: "undecided"}.get(outcome, "other")
                unexpected = ' <span class="outcome outcome-unexpected">unexpected</span>' \
                    if claim.get("as_expected") is False else ""
                cells.append(f'<td><span class="outcome outcome-{kind}">{_e(outcome)}</span>{unexpected}</td>')
            elif column == "interval":
                interval = claim.get("interval")
                cells.append(_cell(None if not interval else
                                   f"[{format_value(float(interval[0]))}, {format_value(float(interval[1]))}]"))
            else:
                cells.append(_cell(claim.get(column)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<p>{_e(tally)}.</p><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def benchmarks_section(benchmarks: Mapping | None) -> str:
    if benchmarks is None:
        return _not_run("benchmark results")
    entries = benchmarks.get("benchmarks", [])
    if not entries:
        return "<p>The benchmark run holds no benchmarks.</p>"
    machine = benchmarks.get("machine_info", {})
    context = {k: v for k, v in (("date", benchmarks.get("datetime")), ("node", machine.get("node")),
                                 ("cpu", machine.get("cpu", {}).get("brand_raw")),
                                 ("python", machine.get("python_version"))) if v}
    rows = "".join(f"<tr><td>{_e(b.get('fullname', b.get('name', '?')))}</td>"
                   f'<td class="num">{_e(_duration(b.get("stats", {}).get("median")))}</td>'
                   f'<td class="num">{_e(_duration(b.get("stats", {}).get("min")))}</td>'
                   f'<td class="num">{_e(b.get("stats", {}).get("rounds", ""))}</td></tr>' for b in entries)
    return ((_key_value_table(context) if context else "") +
            "<table><thead><tr><th>benchmark</th><th>median</th><th>min</th><th>rounds</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


# --------------------------------------------------------------------------- page


def render_report(rows: Sequence[LayerSummary], figures: Sequence[WrittenFigure], report_dir: Path, *,
                  stats_meta: Mapping | None = None, calibration_meta: Mapping | None = None,
                  claims: Sequence[Mapping] | None = None, benchmarks: Mapping | None = None,
                  outlier_fraction: float = OUTLIER_FRACTION) -> str:
    """The page as a string; figure paths are made relative to report_dir."""
    model = (stats_meta or {}).get("model") or (calibration_meta or {}).get("model") or "unknown model"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections = [
        ("claims", "Claims", claims_section(claims)),
        ("summary", "Summary table", summary_section(rows, outlier_fraction)),
        ("figures", "Figures", figures_section(figures, report_dir)),
        ("benchmarks", "Benchmarks", benchmarks_section(benchmarks)),
        ("metadata", "Run metadata", metadata_section(stats_meta, calibration_meta)),
    ]
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title, _ in sections)
    weights = (stats_meta or {}).get("weights_id") or (calibration_meta or {}).get("weights_id")
    random = any((meta or {}).get("random_weights") for meta in (stats_meta, calibration_meta))
    warning = (f'<p class="warning"><b>Random weights</b> ({_e(weights)}): these statistics come from seeded random '
               "weights, not a trained model; they test the pipeline and describe no real model.</p>"
               if random else "")
    body = "\n".join(f'<section id="{key}"><h2>{_e(title)}</h2>\n{content}</section>'
                     for key, title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>taq report: {_e(model)}</title><style>{STYLE}</style></head>
<body><main>
<h1>Post-GELU activation characterization</h1>
<p class="subtitle">{_e(model)} · {len(rows)} FFN layers · generated {_e(created)} by taq {_e(taq.__version__)}</p>
{warning}<nav>{nav}</nav>
{body}
</main></body></html>
"""


def write_report(report_dir: str | Path, stats_file, *, calibration_meta: Mapping | None = None,
                 claims: Sequence[Mapping] | None = None, benchmarks: Mapping | None = None,
                 layers: Sequence[str] | None = None,
                 outlier_fraction: float = OUTLIER_FRACTION) -> Path:
    """Write report_dir/index.html with figures/ and summary.md/csv beside it; returns the index path.

    `stats_file`: a stats file path, or a loaded stats file / ActivationStats / arrays dict. `claims`: dicts with
    the keys of CLAIM_COLUMNS; `benchmarks`: pytest-benchmark's JSON as a dict. None renders as "not run".
    """
    if isinstance(stats_file, (str, os.PathLike)):
        stats_file = load_stats(stats_file)
    stats_meta = getattr(stats_file, "meta", None)
    select_layers(stats_arrays(stats_file), layers)  # unknown names fail before anything is created
    report_dir = prepare_output_dir(report_dir)
    figures = write_figures(stats_file, prepare_output_dir(report_dir / FIGURES_DIR), layers, outlier_fraction)
    rows = summarize(stats_file, layers, outlier_fraction)
    write_summary(rows, report_dir, outlier_fraction)
    page = render_report(rows, figures, report_dir, stats_meta=stats_meta, calibration_meta=calibration_meta,
                         claims=claims, benchmarks=benchmarks, outlier_fraction=outlier_fraction)
    index = report_dir / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
