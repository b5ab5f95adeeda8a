import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import math

import matplotlib.image
import mlx.core as mx
import numpy as np
import pytest

from taq.cli import main
from taq.formats.stats import save_stats
from taq.report.plots import (
    GELU_MINIMUM, channel_ranges_figure, default_layers, heatmap_figure, histogram_figure,
    channel_time_map_figure, fraction_figure, range_vs_timestep_figure, time_groups_figure, widest_layers,
    write_figures,
)
from taq.tracing.stats import ActivationStats, CellStats, HistogramSpec

DEFAULT_PER_LAYER = ["mm_00_img", "mm_03_img", "mm_05_img", "mm_02_txt"]
ALL_LAYER_FIGURES = ["range_vs_timestep_all.png", "range_vs_timestep_img.png", "range_vs_timestep_txt.png",
                     "heatmap_mean.png", "heatmap_std.png", "negative_fraction_heatmap.png",
                     "zero_fraction_heatmap.png", "time_groups.png"]


@pytest.fixture(scope="module")
def stats(post_gelu_stats):
    return post_gelu_stats


@pytest.fixture(scope="module")
def holey_stats(synthetic_timesteps):
    """A layer that never saw data, a timestep missing from one layer, a channel that was NaN throughout."""
    spec = HistogramSpec(128, scale=0.25, limit=16.0)
    stats = ActivationStats(spec, ["mm_00_img", "mm_01_img", "mm_00_txt", "mm_01_txt"])
    rng = np.random.default_rng(1)
    for layer, steps in (("mm_00_img", synthetic_timesteps), ("mm_01_img", synthetic_timesteps[:3]),
                         ("mm_00_txt", synthetic_timesteps)):
        for t in steps:
            x = np.maximum(rng.standard_normal((64, 32)), -0.17).astype(np.float32)
            x[:, 5] = np.nan
            stats.update(layer, t, CellStats.from_activations(mx.array(x), spec))
    return stats


def notes(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts if t.get_text().startswith("Note:"))


def axis_texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


# --------------------------------------------------------------------------- writing


def test_every_figure_is_written_as_a_png(stats, tmp_path):
    written = write_figures(stats, tmp_path)
    expected = ALL_LAYER_FIGURES + [f"{kind}_{layer}.png" for layer in DEFAULT_PER_LAYER
                                    for kind in ("histogram", "channel_ranges")] + [
        f"channel_time_map_{layer}.png" for layer in widest_layers(stats.to_arrays())]
    assert sorted(f.path.name for f in written) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)  # no temporary files left
    for figure in written:
        image = matplotlib.image.imread(figure.path)
        assert image.shape[0] > 300 and image.shape[1] > 600, figure.path.name
        assert image[..., :3].std() > 0.05, f"{figure.path.name} is blank"
        assert figure.caption


def test_layer_filter_restricts_every_figure(stats, tmp_path):
    written = write_figures(stats, tmp_path, layers=["mm_04_txt", "mm_01_txt"])
    assert sorted(f.path.name for f in written) == sorted([
        "range_vs_timestep_all.png", "range_vs_timestep_txt.png", "heatmap_mean.png", "heatmap_std.png",
        "negative_fraction_heatmap.png", "zero_fraction_heatmap.png", "time_groups.png", "histogram_mm_04_txt.png",
        "channel_ranges_mm_04_txt.png", "histogram_mm_01_txt.png", "channel_ranges_mm_01_txt.png",
        "channel_time_map_mm_04_txt.png", "channel_time_map_mm_01_txt.png"])
    heatmap = heatmap_figure(stats, "mean", ["mm_04_txt", "mm_01_txt"])
    assert [t.get_text() for t in heatmap.axes[0].get_yticklabels()] == ["mm_01_txt", "mm_04_txt"]  # by depth
    ranges = range_vs_timestep_figure(stats, ["mm_04_txt", "mm_01_txt"])
    assert "2 shown" in ranges.get_suptitle()


def test_unknown_layers_are_named_and_known_layers_listed(stats, tmp_path):
    for call in (lambda: write_figures(stats, tmp_path, layers=["mm_00_img", "mm_77_txt"]),
                 lambda: histogram_figure(stats, "mm_77_txt"), lambda: channel_ranges_figure(stats, "mm_77_txt"),
                 lambda: heatmap_figure(stats, "std", ["mm_77_txt"]),
                 lambda: range_vs_timestep_figure(stats, ["mm_77_txt"])):
        with pytest.raises(ValueError, match=r"unknown layers \['mm_77_txt'\]; these stats hold: mm_00_img, "):
            call()
    assert not list(tmp_path.iterdir())


def test_default_layers_are_first_middle_last_image_and_middle_text():
    names = [f"mm_{b:02d}_{s}" for b in range(24) for s in ("img", "txt") if (b, s) != (23, "txt")]
    assert default_layers(names) == ["mm_00_img", "mm_12_img", "mm_23_img", "mm_11_txt"]
    assert default_layers(["a", "b", "c", "d"]) == ["a", "c", "d"]
    assert default_layers(["mm_00_img"]) == ["mm_00_img"]


# --------------------------------------------------------------------------- what the figures show


def test_timestep_axes_run_in_denoising_order(stats, synthetic_timesteps):
    for fig in (range_vs_timestep_figure(stats), range_vs_timestep_figure(stats, stream="img")):
        left, right = fig.axes[1].get_xlim()
        assert left > max(synthetic_timesteps) and right < min(synthetic_timesteps)
    heatmap = fraction_figure(stats, "negative")
    labels = [float(t.get_text()) for t in heatmap.axes[0].get_xticklabels()]
    assert labels == sorted(synthetic_timesteps, reverse=True)


def test_range_lines_are_the_cells_max(stats):
    fig = range_vs_timestep_figure(stats, ["mm_02_img"])
    top = fig.axes[0]
    solid = [line for line in top.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata())]
    arrays = stats.to_arrays()
    np.testing.assert_allclose(solid[0].get_ydata(), arrays["max"][4].max(axis=-1))  # mm_02_img is row 4


def test_histogram_marks_the_gelu_minimum_on_a_log_axis(stats, synthetic_timesteps):
    fig = histogram_figure(stats, "mm_03_img")
    full = fig.axes[0]
    assert full.get_yscale() == "log"
    assert any(np.allclose(line.get_xdata(), GELU_MINIMUM) for line in full.get_lines())
    steps = [line for line in full.get_lines() if line.get_drawstyle() == "steps-post"]
    assert len(steps) == len(synthetic_timesteps)  # one step outline per timestep
    assert full.get_xscale() == "asinh"  # the bins' own scale: every bin equally wide


def test_the_zero_fraction_heatmap_shows_the_cells_exact_zeros():
    x = np.array([[-0.0, 0.0, 0.5, -0.1]], np.float32)  # float32 GELU's output for x << -5 is -0.0
    stats = ActivationStats(HistogramSpec(), ["mm_00_img"])
    stats.update("mm_00_img", 10.0, CellStats.from_activations(mx.array(x)))
    fig = fraction_figure(stats, "zero")
    assert "exactly 0" in fig.axes[0].get_title()
    assert fig.axes[0].images[0].get_array()[0, 0] == 0.5


def test_channel_ranges_highlight_the_top_fraction(stats):
    for fraction in (0.02, 0.1):
        fig = channel_ranges_figure(stats, "mm_01_img", outlier_fraction=fraction)
        red = [c for c in fig.axes[0].collections if c.get_label().startswith("top")]
        assert len(red[0].get_segments()) == math.ceil(fraction * 512)


def test_heatmap_rejects_an_unknown_statistic(stats):
    with pytest.raises(ValueError, match="statistic must be one of"):
        heatmap_figure(stats, "median")


# --------------------------------------------------------------------------- missing data


def test_missing_layers_cells_and_nan_channels_render_with_notes(holey_stats, tmp_path):
    written = write_figures(holey_stats, tmp_path, layers=["mm_00_img", "mm_01_img", "mm_01_txt"])
    assert len(written) == 3 + 5 + 3 * 2 + 2  # the two layers with data get a channel x timestep map
    for name in ("heatmap_mean", "negative_fraction", "range_vs_timestep_all", "time_groups"):
        fig = {"heatmap_mean": lambda: heatmap_figure(holey_stats, "mean"),
               "negative_fraction": lambda: fraction_figure(holey_stats, "negative"),
               "range_vs_timestep_all": lambda: range_vs_timestep_figure(holey_stats),
               "time_groups": lambda: time_groups_figure(holey_stats)}[name]()
        text = notes(fig)
        assert "no finite data for mm_01_txt" in text and "2 (layer, timestep) cells without" in text, name
    empty = histogram_figure(holey_stats, "mm_01_txt")
    assert "no histogram data for mm_01_txt" in axis_texts(empty)
    assert "no channel has data" in axis_texts(channel_ranges_figure(holey_stats, "mm_01_txt"))
    assert "1 of 32 channels never saw a finite value" in notes(channel_ranges_figure(holey_stats, "mm_00_img"))
    assert "non-finite activation values" in notes(histogram_figure(holey_stats, "mm_00_img"))


def test_stats_without_any_cells_render_with_a_note(tmp_path):
    stats = ActivationStats(HistogramSpec(), ["mm_00_img", "mm_00_txt"])
    written = write_figures(stats, tmp_path)
    assert len(written) == 3 + 5 + 2 * 2
    assert "no layers or timesteps" in axis_texts(heatmap_figure(stats, "std"))
    assert "no layer has data" in axis_texts(time_groups_figure(stats))
    ranges = range_vs_timestep_figure(stats)
    assert "no layers or timesteps" in axis_texts(ranges)
    assert "no finite data for mm_00_img, mm_00_txt" in notes(ranges)


# --------------------------------------------------------------------------- taq plot


def test_taq_plot_writes_figures_and_tables_and_prints_the_table(stats, tmp_path, capsys):
    stats_file = tmp_path / "stats.npz"
    save_stats(stats_file, stats, {"model": "synthetic"})
    out = tmp_path / "plots" / "nested"
    assert main(["plot", "--stats-file", str(stats_file), "--output-dir", str(out), "--layers", "mm_02_img"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["layer", "min", "max"] and "mm_02_img" in printed
    written = {p.name for p in out.iterdir()}
    assert {"summary.md", "summary.csv", "histogram_mm_02_img.png", "heatmap_std.png"} <= written


def test_taq_plot_bad_input_exits_2_with_one_line(stats, tmp_path, capsys):
    stats_file = tmp_path / "stats.npz"
    save_stats(stats_file, stats, {"model": "synthetic"})
    out = tmp_path / "plots"
    assert main(["plot", "--stats-file", str(stats_file), "--output-dir", str(out), "--layers", "mm_42_img"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown layers ['mm_42_img']" in err
    assert not out.exists()  # nothing created for a bad request
    assert main(["plot", "--stats-file", str(tmp_path / "missing.npz"), "--output-dir", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_taq_plot_refuses_an_output_directory_where_it_would_overwrite_the_stats_file(stats, tmp_path, capsys):
    stats_file = tmp_path / "summary.csv"  # a stats file under a name taq plot writes
    save_stats(stats_file, stats, {"model": "synthetic"})
    before = stats_file.read_bytes()
    assert main(["plot", "--stats-file", str(stats_file), "--output-dir", str(tmp_path)]) == 2
    assert "--stats-file" in capsys.readouterr().err and stats_file.read_bytes() == before


def test_the_channel_time_map_shows_the_widest_channels_per_timestep(stats):
    arrays = stats.to_arrays()
    layer = widest_layers(arrays, count=1)[0]
    i = list(arrays["layers"]).index(layer)
    fig = channel_time_map_figure(stats, layer, channels=5)
    absolute, relative = fig.axes[0].images[0].get_array(), fig.axes[1].images[0].get_array()
    ranges = arrays["max"][i].max(axis=0) - arrays["min"][i].min(axis=0)
    widest = np.argsort(-ranges, kind="stable")[:5]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [str(c) for c in widest]
    columns = np.argsort(-arrays["timesteps"], kind="stable")
    np.testing.assert_allclose(absolute, (arrays["max"][i] - arrays["min"][i])[np.ix_(columns, widest)].T)
    np.testing.assert_allclose(relative.max(axis=1), 1.0)
    assert widest_layers(arrays) == sorted(map(str, arrays["layers"]), key=lambda n: -np.nanmax(
        arrays["max"][list(arrays["layers"]).index(n)].max(axis=0)
        - arrays["min"][list(arrays["layers"]).index(n)].min(axis=0)))[:2]
