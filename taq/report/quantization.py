"""The evaluation report of `taq evaluate`: figures and one offline HTML page (`index.html`) beside
evaluation.json. Draws and writes only; every number comes from the evaluation document."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

from taq.formats import atomic_path
from taq.report.plots import prepare_output_dir, save_figure

FIGURES_DIR = "figures"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h2 { margin-top: 2.2rem; border-bottom: 2px solid #dde1e7; padding-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d7dbe2; padding: 0.3rem 0.6rem; } th { background: #eef1f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #e3e6eb; }
figcaption, .note { color: #4a5367; font-size: 0.9rem; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _labels(doc: Mapping) -> list[str]:
    return [c["label"] for c in doc["configs"]]


# --------------------------------------------------------------------------- figures


def error_trajectory_figure(doc: Mapping) -> Figure:
    """Mean latent MSE against the full-precision twin after every sampler step, per configuration, with its
    bootstrap 95% band (log scale)."""
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.subplots()
    for config in doc["configs"]:
        step = config["step_mse"]
        x = np.arange(1, len(step["mean"]) + 1)
        (line,) = ax.plot(x, step["mean"], lw=1.4, label=config["label"])
        ax.fill_between(x, step["ci_low"], step["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("sampler step (denoising order)")
    ax.set_ylabel("latent MSE vs full precision (log)")
    ax.set_title("Does the error accumulate over the steps? (same noise and prompts as full precision)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return fig


def psnr_figure(doc: Mapping) -> Figure:
    """Per-sample PSNR against full precision, one box per configuration, the mean and its interval marked."""
    labels = _labels(doc)
    fig = Figure(figsize=(max(7.0, 1.0 * len(labels) + 3), 5), layout="constrained")
    ax = fig.subplots()
    values = [[float(v) if v not in ("inf", "-inf") else math.inf for v in c["psnr_per_sample"]]
              for c in doc["configs"]]
    finite = [[v for v in row if math.isfinite(v)] or [0.0] for row in values]
    ax.boxplot(finite, tick_labels=labels, showfliers=True, flierprops={"markersize": 2})
    for k, config in enumerate(doc["configs"], start=1):
        p = config["psnr_db"]
        ax.errorbar([k + 0.25], [p["mean"]], yerr=[[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]], fmt="o",
                    color="firebrick", ms=4, capsize=3)
    ax.set_ylabel("PSNR vs full precision (dB), per sample")
    ax.set_title("Per-sample PSNR (box: quartiles; red: mean and its bootstrap 95% interval)")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return fig


def layer_error_figure(config: Mapping) -> Figure | None:
    """Each quantized layer's own output SQNR (dB) at each sampler step: which layers and timesteps hurt."""
    sqnr = config.get("layer_sqnr_db", {})
    if not sqnr.get("sites"):
        return None
    grid = np.array(sqnr["db"], dtype=np.float64)
    fig = Figure(figsize=(11, max(4.0, 0.16 * len(sqnr["sites"]) + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(sqnr["sites"])), sqnr["sites"], fontsize=6)
    ax.set_xlabel("sampler step (denoising order)")
    ax.set_title(f"{config['label']}: each layer's output SQNR on its own input (dB; low = hurts)")
    fig.colorbar(image, ax=ax, pad=0.01).set_label("SQNR (dB)")
    return fig


def samples_figure(runs: Mapping, labels: list[str], count: int = 10) -> Figure | None:
    """Pocket: the first `count` samples of full precision and of each configuration, same noise per column."""
    fp = runs["FP"].final
    if fp.shape[-1] != 1:
        return None
    rows = ["FP"] + labels
    count = min(count, len(fp))
    fig = Figure(figsize=(0.9 * count + 1.8, 0.95 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), count, squeeze=False)
    for r, name in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(runs[name].final[c, ..., 0], cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Samples from the same noise and prompt (columns) in each configuration (rows)", fontsize=9)
    return fig


# --------------------------------------------------------------------------- page


def _table(doc: Mapping) -> str:
    pocket = "digits" in doc["fp"]
    head = ["configuration", "PSNR dB mean [95% CI]", "p10", "worst", "final-latent MSE"]
    head += ["digit accuracy", "FD to FP", "FD to real"] if pocket else []
    head += ["seconds", "arithmetic"]
    rows = []
    if pocket:
        fp = doc["fp"]["digits"]
        rows.append(["full precision", "", "", "", "", f"{fp['accuracy']['mean']:.1%}", "",
                     f"{fp['frechet_to_real']:.3g}", f"{doc['fp']['seconds']:.1f}", "reference"])
    for c in doc["configs"]:
        p, m = c["psnr_db"], c["final_latent_mse"]
        row = [c["label"], f"{p['mean']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]", f"{p['p10']:.2f}",
               f"{p['min']:.2f} (sample {p['min_sample']})", f"{m['mean']:.3g}"]
        if pocket:
            d = c["digits"]
            row += [f"{d['accuracy']['mean']:.1%}", f"{d['frechet_to_fp']:.3g}", f"{d['frechet_to_real']:.3g}"]
        rows.append(row + [f"{c['seconds']:.1f}", c["arithmetic"]])
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(v)}</td>' if i else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"


def _comparisons(doc: Mapping) -> str:
    if not doc["comparisons"]:
        return '<p class="note">No pair of configurations differs only in its activation grids over time.</p>'
    def recovered(c) -> str:
        gap = c.get("gap_recovered")
        return f"{gap['share']:.0%} [{gap['ci'][0]:.0%}, {gap['ci'][1]:.0%}]" if gap else ""

    rows = "".join(f"<tr><td>{_e(c['a'])} minus {_e(c['b'])}</td><td class=\"num\">{c['mean']:+.2f}</td>"
                   f"<td class=\"num\">[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]</td><td class=\"num\">{c['samples']}"
                   f"</td><td class=\"num\">{_e(recovered(c))}</td></tr>" for c in doc["comparisons"])
    return ("<table><thead><tr><th>paired difference of PSNR (dB)</th><th>mean</th><th>95% CI</th><th>samples</th>"
            "<th>share of the static-to-dynamic gap recovered [95% CI]</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def write_evaluation_report(output_dir: str | Path, doc: Mapping, runs: Mapping) -> Path:
    """Figures into output_dir/figures and output_dir/index.html; returns the index path."""
    output_dir = prepare_output_dir(output_dir)
    figures_dir = prepare_output_dir(output_dir / FIGURES_DIR)
    figures = [(save_figure(error_trajectory_figure(doc), figures_dir / "error_trajectory.png"),
                "Latent MSE against the full-precision twin after each step, mean and bootstrap 95% band."),
               (save_figure(psnr_figure(doc), figures_dir / "psnr.png"), "Per-sample PSNR against full precision.")]
    grid = samples_figure(runs, _labels(doc))
    if grid is not None:
        figures.append((save_figure(grid, figures_dir / "samples.png"), "Samples, paired by noise and prompt."))
    for k, config in enumerate(doc["configs"]):
        fig = layer_error_figure(config)
        if fig is not None:
            figures.append((save_figure(fig, figures_dir / f"layer_error_{k:02d}.png"),
                            f"{config['label']}: per-layer output SQNR per step."))
    setup = doc["setup"]
    parts = [f"<h1>Quantized {_e(doc['model'])} against full precision</h1>",
             f'<p class="note">{setup["num_samples"]} samples per configuration, {setup["steps"]} Euler steps, '
             f'CFG {setup["cfg_scale"]}, noise seed {setup["seed"]}; every quantized sample starts from the same noise '
             f'and prompt as a full-precision one. PSNR: {_e(doc["psnr_definition"])}. Intervals: bootstrap 95% over '
             f'samples. taq {_e(doc["taq_version"])}, MLX {_e(doc["mlx_version"])}, {_e(doc["device"])}. '
             'All numbers: <a href="evaluation.json">evaluation.json</a>.</p>',
             "<h2>Configurations</h2>", _table(doc), "<h2>Time-aware against static activation grids</h2>",
             _comparisons(doc), "<h2>Figures</h2>"]
    for path, caption in figures:
        src = path.relative_to(output_dir).as_posix()
        parts.append(f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
                     "</figure>")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>taq evaluation: {_e(doc["model"])}'
            f"</title><style>{STYLE}</style></head><body><main>{''.join(parts)}</main></body></html>\n")
    index = output_dir / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
