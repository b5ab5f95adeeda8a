import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import html
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from taq.analysis.claims import Claim
from taq.analysis.summary import summarize
from taq.formats.stats import StatsFile, save_stats
from matplotlib.figure import Figure

from taq.report.html import write_report
from taq.report.plots import save_figure
from taq.report.tables import format_value

CLAIMS = [
    {"claim": "post-GELU min stays above GELU's floor", "layer": "all", "measured": -0.16997, "threshold": -0.1701,
     "outcome": "holds", "expected": "holds", "as_expected": True, "note": ""},
    {"claim": "temporal range ratio > 2", "layer": "mm_03_img", "measured": 1.5, "threshold": 2.0,
     "outcome": "does not hold", "expected": "does not hold", "as_expected": True, "note": "tiny model"},
    {"claim": "outlier ratio > 10", "layer": "mm_00_txt", "measured": 6.5, "threshold": 10,
     "outcome": "does not hold", "expected": "holds", "as_expected": False, "note": "<b>raw & unescaped?</b>"},
    {"claim": "shifting lowers the error", "layer": "A6:fc2", "measured": 0.02, "interval": [-0.01, 0.05],
     "threshold": 0.0, "outcome": "undecided", "expected": "holds", "as_expected": True, "note": ""},
]
BENCHMARKS = {
    "datetime": "2026-11-25T10:00:00", "machine_info": {"node": "ci", "cpu": {"brand_raw": "Xeon"}},
    "benchmarks": [{"name": "test_cfg_step", "fullname": "characterization/test_bench.py::test_cfg_step",
                    "stats": {"median": 0.0123, "min": 0.0119, "rounds": 20}}],
}
CALIBRATION = {"model": "pocket", "num_fid_samples": 64, "cfg_scale": 1.5, "sigmas": [i / 100 for i in range(100)],
               "num_trajectories": 64, "num_steps": 100, "num_selected": 25, "step_selection": "stride", "seed": 0,
               "num_points": 1600}
CLAIM_INFO = {c["claim"]: Claim(c["claim"], c["threshold"], f"what {c['claim']} measures",
                                f"the observation behind {c['claim']}", compute=None) for c in CLAIMS}


class PageParts(HTMLParser):
    """Image sources, link targets, element ids and tags of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids, self.tags = [], [], set(), set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.ids.add(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def parse(page: str) -> PageParts:
    parts = PageParts()
    parts.feed(page)
    return parts


@pytest.fixture(scope="module")
def stats(post_gelu_stats):
    return post_gelu_stats


@pytest.fixture(scope="module")
def report(stats, tmp_path_factory):
    stats_file = StatsFile(stats=stats, arrays=stats.to_arrays(), meta={"model": "synthetic-mmdit", "seed": 0,
                                                                             "num_samples": 512, "groups": 8})
    report_dir = tmp_path_factory.mktemp("report")
    (report_dir / "claims").mkdir()  # a claim figure on disk, as the characterization suite leaves them
    save_figure(Figure(figsize=(2, 1)), report_dir / "claims" / "temporal range ratio > 2.png")
    index = write_report(report_dir, stats_file, calibration_meta=CALIBRATION, claims=CLAIMS, claim_info=CLAIM_INFO,
                         benchmarks=BENCHMARKS)
    return index, index.read_text()


def test_report_shows_every_figure_by_a_relative_link(report):
    index, page = report
    images = parse(page).images
    on_disk = sorted(p.relative_to(index.parent).as_posix() for p in (index.parent / "figures").glob("*.png"))
    assert sorted(i for i in images if i.startswith("figures/")) == on_disk and len(on_disk) == 18
    assert all(not Path(src).is_absolute() for src in images)


def test_report_has_every_section_and_no_external_resources(report):
    _, page = report
    parts = parse(page)
    assert {"claims", "summary", "figures", "benchmarks", "metadata"} <= parts.ids
    assert "script" not in parts.tags and "link" not in parts.tags
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert all(link.startswith("#") or link in ("summary.md", "summary.csv") for link in parts.links)


def test_report_summary_table_holds_every_layer(report, stats):
    index, page = report
    for row in summarize(stats):
        assert f"<td>{row.layer}</td>" in page
        assert f'<td class="num">{format_value(row.max)}</td>' in page
    assert (index.parent / "summary.md").is_file() and (index.parent / "summary.csv").is_file()


def test_report_claims_benchmarks_and_metadata(report):
    _, page = report
    assert "1 holds, 2 does not hold, 1 undecided; 1 contradicts the expectations file." in page
    assert f"<td>[{format_value(-0.01)}, {format_value(0.05)}]</td>" in page
    for kind, outcome in (("holds", "holds"), ("not", "does not hold"), ("undecided", "undecided"),
                          ("unexpected", "unexpected")):
        assert f'<span class="outcome outcome-{kind}">{outcome}</span>' in page
    assert "&lt;b&gt;raw &amp; unescaped?&lt;/b&gt;" in page and "<b>raw" not in page
    assert "characterization/test_bench.py::test_cfg_step" in page and "12.3 ms" in page and "11.9 ms" in page
    assert "synthetic-mmdit" in page and "cfg_scale" in page and "(100 items)" in page  # long list shortened
    assert "Not run" not in page


def test_report_from_a_stats_file_path_says_not_run_for_missing_parts(tmp_path, make_post_gelu_stats):
    small = make_post_gelu_stats(blocks=2, channels=16, tokens=8, timesteps=(1000.0, 500.0))[0]
    save_stats(tmp_path / "stats.npz", small, {"model": "tiny"})
    index = write_report(tmp_path / "report", tmp_path / "stats.npz", layers=["mm_00_img"])
    page = index.read_text()
    assert "Not run: no claims" in page and "Not run: no benchmark results" in page
    assert "Not run: no calibration metadata" in page
    assert sorted(parse(page).images) == sorted(f"figures/{name}.png" for name in (
        "range_vs_timestep_all", "range_vs_timestep_img", "histogram_mm_00_img", "channel_ranges_mm_00_img",
        "heatmap_mean", "heatmap_std", "negative_fraction_heatmap", "zero_fraction_heatmap", "time_groups",
        "channel_time_map_mm_00_img"))
    assert "Random weights" not in page


def test_report_says_how_exact_zeros_are_counted_and_flags_random_weights(tmp_path, make_post_gelu_stats):
    small = make_post_gelu_stats(blocks=1, channels=8, tokens=4, timesteps=(500.0,))[0]
    save_stats(tmp_path / "stats.npz", small, {"model": "tiny", "weights_id": "random-seed-0", "random_weights": True})
    page = write_report(tmp_path / "report", tmp_path / "stats.npz").read_text()
    assert "Exact zeros are counted apart from negative values" in page and "zero frac." in page
    assert "<b>Random weights</b> (random-seed-0)" in page


def test_report_rejects_unknown_layers_before_writing(tmp_path, stats):
    with pytest.raises(ValueError, match="unknown layers"):
        write_report(tmp_path / "report", stats, layers=["mm_00_imgg"])
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
IMAGE_CHECK = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', loaded + '/' + images.length);
});</script>"""


def images_loaded_in_chromium(page: Path) -> str:
    """Load a copy of `page` (same folder, so relative links hold) with a load-time check; 'loaded/total'."""
    probe = page.with_name("browser-check.html")
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    probe.unlink()
    match = re.search(r'data-images="(\d+)/(\d+)"', result.stdout)
    assert match, f"chromium did not run the check (exit {result.returncode}): {result.stderr[-500:]}"
    return f"{match.group(1)}/{match.group(2)}"


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package: chromium)")
def test_every_image_loads_in_headless_chromium(report, tmp_path):
    index, page = report
    n = len(parse(page).images)
    assert images_loaded_in_chromium(index) == f"{n}/{n}"
    broken = tmp_path / "broken"  # the check itself must notice a missing figure
    shutil.copytree(index.parent, broken)
    (broken / "figures" / "heatmap_std.png").unlink()
    assert images_loaded_in_chromium(broken / "index.html") == f"{n - 1}/{n}"


def test_report_reads_top_to_bottom_what_claims_and_figures(report):
    index, page = report
    order = [page.index(f'<section id="{key}">') for key in ("measured", "claims", "figures", "summary",
                                                               "benchmarks", "metadata")]
    assert order == sorted(order)
    assert "TaQ-DiT" in page and "arXiv:2411.14172" in page
    assert "64 trajectories x 100 Euler steps, 25 kept (stride), CFG 1.5, seed 0: 1600 points" in page
    assert "4 claims, 4 measurements: 1 holds, 2 does not hold, 1 undecided" in page
    assert "512 points (each as a conditional and an unconditional row), 11 FFN layers x 5 timesteps, in 8 " \
           "trajectory groups" in page


def test_claims_matrix_colours_each_cell_by_outcome_and_explains_on_hover(report):
    _, page = report
    cells = re.findall(r'<td class="cell cell-(\w+)( cell-contradicts)?" title="([^"]*)">', page)
    assert [(kind, bool(red)) for kind, red, _ in cells] == [("holds", False), ("not", False), ("not", True),
                                                             ("undecided", False)]
    assert "95% interval [-0.01, 0.05]" in cells[3][2]
    for record in CLAIMS:  # each claim's observation and measure, linked from its matrix row
        assert html.escape(f"the observation behind {record['claim']}") in page
        assert html.escape(f"what {record['claim']} measures") in page
        assert f'id="claim-{html.escape(record["claim"])}"' in page
    assert "<details><summary>Every measurement (4 rows)</summary>" in page
    assert "claims/temporal%20range%20ratio%20%3E%202.png" in parse(page).images  # the claim figure, embedded


def test_per_layer_figure_selection_is_stated(report, stats):
    _, page = report
    assert "Per-layer figures (histograms, channel ranges) are shown for 4 of the 11 layers" in page
