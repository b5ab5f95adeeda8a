"""The HTML report: one offline page (`index.html`, no scripts or external resources) a researcher reads top to
bottom: what TaQ-DiT claims and what was measured on what, the claims as a claims x layers matrix (colour: outcome;
value, interval and note on hover) with each claim's observation and figure, the Phase 2 figures (PNG files beside
it, linked relatively), the summary table, benchmark timings and the run metadata."""

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
from urllib.parse import quote

import taq
from taq.analysis.cells import select_layers, stats_arrays
from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, OUTCOMES, REFERENCE, UNDECIDED, Claim
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
    ("Channel x timestep range maps of the widest layers", "channel_time_map_"),
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
table.matrix td.cell { text-align: center; font-size: 0.8rem; font-variant-numeric: tabular-nums; min-width: 3.2rem; }
td.cell-holds { background: #bfe8ca !important; } td.cell-not { background: #d5def0 !important; }
td.cell-undecided { background: #fbdca0 !important; } td.cell-contradicts { outline: 3px solid #c62828; }
.matrix-wrap { overflow-x: auto; } .claim-list figure img { max-width: 760px; }
.claim-list dt { font-weight: 700; margin-top: 0.6rem; } .claim-list dd { margin-left: 1.2rem; }
details summary { cursor: pointer; font-weight: 600; margin: 1rem 0; }
"""
CLAIMS_FIGURES_DIR = "claims"  # claim figures written beside the page by the characterization suite
INTRO = (
    REFERENCE + " argues that diffusion transformers break at low bit widths mainly because of "
    "their post-GELU activations (the inputs of each FFN's second Linear, fc2): they are asymmetric (GELU's floor "
    "is about -0.17 while the positive tail is long), their ranges drift across the denoising timesteps, and a "
    "few channels carry outliers. Its remedies are time-aware (per-timestep) activation ranges, momentum-based "
    "shifting, reconstruction-driven outlier migration and joint reconstruction. This report measures those "
    "observations, and what the remedies buy, on the model below; each claim is a number per layer against a "
    "threshold, and where the number has a 95% interval the outcome is holds, does not hold or undecided.")



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


def figures_section(figures: Sequence[WrittenFigure], report_dir: Path, layers: int) -> str:
    if not figures:
        return '<p class="notrun">No figures were written.</p>'
    per_layer = [f.path.stem.removeprefix("histogram_") for f in figures if f.path.name.startswith("histogram_")]
    selection = ("every layer" if len(per_layer) == layers else
                 f"{len(per_layer)} of the {layers} layers ({', '.join(per_layer)}; `--layers` chooses others)")
    parts = ['<p>Timestep axes run in denoising order, t = 1000·σ from 1000 (noise) to 0 (image). Per-layer '
             f"figures (histograms, channel ranges) are shown for {_e(selection)}.</p>"]
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


def _kind(outcome: str) -> str:
    return {HOLDS: "holds", DOES_NOT_HOLD: "not", UNDECIDED: "undecided"}.get(outcome, "other")


def intro_section(stats_meta: Mapping | None, calibration_meta: Mapping | None, rows: Sequence[LayerSummary],
                  claims: Sequence[Mapping] | None, timesteps: int | None = None) -> str:
    """What TaQ-DiT claims, and what was measured on what: model, weights, recipe, counts."""
    stats_meta, cal = stats_meta or {}, calibration_meta or {}
    facts = {"model": stats_meta.get("model") or cal.get("model"),
             "weights id": stats_meta.get("weights_id") or cal.get("weights_id")}
    if cal.get("num_trajectories"):
        facts["calibration"] = (f"{cal['num_trajectories']} trajectories x {cal.get('num_steps', '?')} Euler steps, "
                                f"{cal.get('num_selected', '?')} kept ({cal.get('step_selection', '?')}), CFG "
                                f"{cal.get('cfg_scale', '?')}, seed {cal.get('seed', '?')}: "
                                f"{cal.get('num_points', '?')} points")
    if stats_meta.get("num_samples"):
        groups = f", in {stats_meta['groups']} trajectory groups" if stats_meta.get("groups") else ""
        facts["profiled"] = (f"{stats_meta['num_samples']} points (each as a conditional and an unconditional row), "
                             f"{len(rows)} FFN layers x {timesteps if timesteps is not None else '?'} timesteps"
                             f"{groups}")
    if claims:
        outcomes = [str(c.get("outcome")) for c in claims]
        facts["claims"] = (f"{len({c['claim'] for c in claims})} claims, {len(claims)} measurements: "
                           + ", ".join(f"{outcomes.count(o)} {o}" for o in OUTCOMES if o in outcomes))
    return f"<p>{_e(INTRO)}</p>" + _key_value_table({k: v for k, v in facts.items() if v})


def _matrix_cell(record: Mapping) -> str:
    value = record.get("measured")
    shown = format_value(float(value)) if isinstance(value, (int, float)) else _e(value)
    interval = record.get("interval")
    hover = f"{record['claim']} / {record['layer']}: {record.get('outcome')}, measured {shown}"
    if interval:
        hover += f", 95% interval [{format_value(float(interval[0]))}, {format_value(float(interval[1]))}]"
    hover += f", threshold {record.get('threshold')}" + (f"; {record['note']}" if record.get("note") else "")
    contradicts = " cell-contradicts" if record.get("as_expected") is False else ""
    return (f'<td class="cell cell-{_kind(str(record.get("outcome")))}{contradicts}" title="{_e(hover)}">'
            f"{shown}</td>")


def claims_matrix(claims: Sequence[Mapping], info: Mapping[str, Claim]) -> str:
    """One claims x columns table per set of columns (the FFN layers; a quantizer claim's own rows)."""
    by_claim: dict[str, dict[str, Mapping]] = {}
    for record in claims:
        by_claim.setdefault(record["claim"], {})[record["layer"]] = record
    tables: dict[tuple, list[str]] = {}
    for claim, cells in by_claim.items():
        tables.setdefault(tuple(cells), []).append(claim)
    parts = []
    for columns, names in tables.items():
        head = "<th>claim</th>" + "".join(f"<th>{_e(c)}</th>" for c in columns)
        body = "".join(
            f'<tr><td title="{_e(info[n].observation if n in info else "")}"><a href="#claim-{_e(n)}">{_e(n)}</a>'
            "</td>" + "".join(_matrix_cell(by_claim[n][c]) if c in by_claim[n] else "<td></td>" for c in columns)
            + "</tr>" for n in names)
        parts.append(f'<div class="matrix-wrap"><table class="matrix"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    legend = ('<p class="footnotes">Cell colour: <span class="outcome outcome-holds">holds</span> '
              '<span class="outcome outcome-not">does not hold</span> '
              '<span class="outcome outcome-undecided">undecided</span>; a red frame: the outcome contradicts the '
              "expectations file. Hover a cell for its interval and note, a claim for its observation.</p>")
    return legend + "".join(parts)


def claim_definitions(claims: Sequence[Mapping], info: Mapping[str, Claim], report_dir: Path) -> str:
    """Each measured claim: its observation, what is measured, the threshold, and its figure where one exists."""
    parts = ['<dl class="claim-list">']
    for name in dict.fromkeys(record["claim"] for record in claims):
        claim = info.get(name)
        parts.append(f'<dt id="claim-{_e(name)}">{_e(name)}</dt>')
        if claim is not None:
            parts.append(f"<dd>{_e(claim.observation)}<br><i>Measured:</i> {_e(claim.measure)}; threshold "
                         f"{claim.threshold:g}.</dd>")
        figure = report_dir / CLAIMS_FIGURES_DIR / f"{name}.png"
        if figure.is_file():
            parts.append(f'<dd><figure><img src="{CLAIMS_FIGURES_DIR}/{quote(figure.name)}" alt="{_e(name)}" '
                         f'loading="eager"><figcaption>{_e(name)}: each value with its interval where it has '
                         "one, against the threshold (dashed).</figcaption></figure></dd>")
    return "".join(parts) + "</dl>"


def claims_section(claims: Sequence[Mapping] | None, info: Mapping[str, Claim] | None = None,
                   report_dir: Path | None = None) -> str:
    if claims is None:
        return _not_run("claims")
    if not claims:
        return "<p>The claims suite ran but reported no claims.</p>"
    info = info or {}
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
                unexpected = ' <span class="outcome outcome-unexpected">unexpected</span>' \
                    if claim.get("as_expected") is False else ""
                cells.append(f'<td><span class="outcome outcome-{_kind(outcome)}">{_e(outcome)}</span>{unexpected}</td>')
            elif column == "interval":
                interval = claim.get("interval")
                cells.append(_cell(None if not interval else
                                   f"[{format_value(float(interval[0]))}, {format_value(float(interval[1]))}]"))
            else:
                cells.append(_cell(claim.get(column)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return (f"<p>{_e(tally)}.</p>" + claims_matrix(claims, info)
            + "<h3>The claims</h3>" + claim_definitions(claims, info, report_dir or Path("."))
            + f"<details><summary>Every measurement ({len(claims)} rows)</summary>{table}</details>")


def benchmarks_section(benchmarks: Mapping | None) -> str:
    if benchmarks is None:
        return _not_run("benchmark results") + ('<p class="footnotes">`pytest characterization/` and `taq bench` '
                                                 "measure them; `taq report` does not.</p>")
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
                  claims: Sequence[Mapping] | None = None, claim_info: Mapping[str, Claim] | None = None,
                  benchmarks: Mapping | None = None, outlier_fraction: float = OUTLIER_FRACTION,
                  timesteps: int | None = None) -> str:
    """The page as a string; figure paths are made relative to report_dir."""
    model = (stats_meta or {}).get("model") or (calibration_meta or {}).get("model") or "unknown model"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections = [
        ("measured", "What was measured", intro_section(stats_meta, calibration_meta, rows, claims, timesteps)),
        ("claims", "Claims", claims_section(claims, claim_info, report_dir)),
        ("figures", "Figures", figures_section(figures, report_dir, len(rows))),
        ("summary", "Summary table", summary_section(rows, outlier_fraction)),
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
<h1>TaQ-DiT characterization: post-GELU activations and time-aware quantization</h1>
<p class="subtitle">{_e(model)} · {len(rows)} FFN layers · generated {_e(created)} by taq {_e(taq.__version__)}</p>
{warning}<nav>{nav}</nav>
{body}
</main></body></html>
"""


def write_report(report_dir: str | Path, stats_file, *, calibration_meta: Mapping | None = None,
                 claims: Sequence[Mapping] | None = None, claim_info: Mapping[str, Claim] | None = None,
                 benchmarks: Mapping | None = None,
                 layers: Sequence[str] | None = None,
                 outlier_fraction: float = OUTLIER_FRACTION) -> Path:
    """Write report_dir/index.html with figures/ and summary.md/csv beside it; returns the index path.

    `stats_file`: a stats file path, or a loaded stats file / ActivationStats / arrays dict. `claims`: dicts with
    the keys of CLAIM_COLUMNS; `claim_info`: name -> Claim (observation, measure, threshold) of those claims;
    `benchmarks`: pytest-benchmark's JSON as a dict. None renders as "not run".
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
                         claims=claims, claim_info=claim_info, benchmarks=benchmarks,
                         outlier_fraction=outlier_fraction, timesteps=len(stats_arrays(stats_file)["timesteps"]))
    index = report_dir / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
