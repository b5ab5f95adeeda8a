"""`taq quantize` and `taq evaluate` end to end on the pocket model, and their refusals of bad input."""

import json

import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.cli import main
from taq.formats.quantization import load_quantization

SMALL = ["--num-samples", "8", "--batch-size", "8", "--act-observer", "minmax", "--weight-observer", "minmax"]


@pytest.fixture(scope="module")
def quantized(pocket_calibration, tmp_path_factory):
    """W8A8 per-timestep and static, W4A16 per group of 64 of the small pocket calibration set."""
    folder = tmp_path_factory.mktemp("quantized")
    files = {}
    for name, args in (("w8a8-pt", ["--weights", "8", "--activations", "8", "--act-scales", "per-timestep"]),
                       ("w8a8-static", ["--weights", "8", "--activations", "8", "--act-scales", "static"]),
                       ("w4a16", ["--weights", "4", "--activations", "16", "--group-size", "64"])):
        files[name] = folder / f"{name}.safetensors"
        assert main(["quantize", "--calibration-file", str(pocket_calibration), *SMALL, *args,
                     "--output", str(files[name])]) == 0
    return files


def test_quantize_writes_the_configuration_it_was_asked_for(quantized):
    w8a8 = load_quantization(quantized["w8a8-pt"])
    assert w8a8.meta["label"] == "W8A8 per-timestep" and len(w8a8.layers) == 45
    assert all(layer.act.mode == "per-timestep" and layer.weight_spec.bits == 8 for layer in w8a8.layers.values())
    w4 = load_quantization(quantized["w4a16"])
    assert all(layer.act is None and layer.weight_spec.group_size == 64 for layer in w4.layers.values())


def test_quantize_applies_and_reports_the_taqdit_transforms(pocket_calibration, tmp_path, capsys):
    output = tmp_path / "taqdit.safetensors"
    assert main(["quantize", "--calibration-file", str(pocket_calibration), *SMALL, "--weights", "4",
                 "--activations", "8", "--shift", "--migrate", "1.5", "--output", str(output)]) == 0
    assert "outlier channels migrated per post-GELU layer: mm_00_img.fc2 " in capsys.readouterr().out
    q = load_quantization(output)
    assert q.meta["label"] == "W4A8 per-timestep +shift +migrate" and q.meta["config"]["migrate"] == 1.5
    post_gelu = [layer for site, layer in q.layers.items() if site.endswith(".fc2")]
    assert post_gelu and all(layer.transform.shift is not None and layer.transform.divisor is not None
                             for layer in post_gelu)


def test_quantize_reconstructs_and_resumes(pocket_calibration, tmp_path):
    output, resume = tmp_path / "rec.safetensors", tmp_path / "blocks"
    args = ["quantize", "--calibration-file", str(pocket_calibration), *SMALL, "--weights", "4", "--activations", "8",
            "--layers", "mm_00_*", "--reconstruct", "joint", "--iters", "5", "--resume-dir", str(resume)]
    assert main([*args, "--output", str(output)]) == 0
    q = load_quantization(output)
    assert q.meta["reconstruction"]["iters"] == 5 and all(layer.levels is not None for layer in q.layers.values())
    assert [p.name for p in resume.iterdir()] == ["block_00.safetensors"]
    again = tmp_path / "again.safetensors"
    assert main([*args, "--output", str(again)]) == 0
    assert again.read_bytes() == output.read_bytes()


def test_quantize_is_byte_deterministic(pocket_calibration, quantized, tmp_path):
    again = tmp_path / "again.safetensors"
    assert main(["quantize", "--calibration-file", str(pocket_calibration), *SMALL, "--weights", "8",
                 "--activations", "8", "--act-scales", "per-timestep", "--output", str(again)]) == 0
    assert again.read_bytes() == quantized["w8a8-pt"].read_bytes()


def test_evaluate_compares_every_configuration_with_full_precision(quantized, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--quantization", *(str(p) for p in quantized.values()), "--samples", "6",
                 "--steps", "6", "--batch-size", "6", "--real-weights", "--output-dir", str(out)]) == 0
    doc = json.loads((out / "evaluation.json").read_text())
    labels = [c["label"] for c in doc["configs"]]
    assert labels == ["W8A8 per-timestep", "W8A8 static", "W4A16"]
    for config in doc["configs"]:
        assert config["psnr_db"]["ci"][0] <= config["psnr_db"]["mean"] <= config["psnr_db"]["ci"][1]
        assert len(config["step_mse"]["mean"]) == 6 and len(config["psnr_per_sample"]) == 6
        assert 0 <= config["digits"]["accuracy"]["mean"] <= 1 and config["digits"]["frechet_to_fp"] >= 0
    assert doc["configs"][2]["arithmetic"].startswith("real") and doc["configs"][0]["arithmetic"].startswith("simul")
    assert doc["comparisons"][0]["a"] == "W8A8 per-timestep" and doc["comparisons"][0]["b"] == "W8A8 static"
    assert (out / "index.html").is_file() and (out / "figures" / "error_trajectory.png").is_file()
    assert "W4A16" in capsys.readouterr().out


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"taq {command}: error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--weights", "9"], "--weights must be 2..8, or 16"),
    (["--weights", "16", "--activations", "16"], "nothing to quantize"),
    (["--num-samples", "8", "--layers", "mm_*_vid.fc2"], "match no layer"),
    (["--override", "mm_00_*.qkv"], "PATTERN=BITS"),
    (["--num-samples", "100000"], "exceeds the 16 points"),
    (["--migrate", "--balance"], "choose one"),
    (["--migrate", "0.5"], "threshold must be > 1"),
    (["--resume-dir", "r"], "needs --reconstruct"),
    (["--reconstruct", "joint", "--iters", "0"], "iters must be >= 1"),
])
def test_quantize_refuses_bad_options_in_one_line_and_writes_nothing(pocket_calibration, tmp_path, capsys, args,
                                                                     message):
    output = tmp_path / "q.safetensors"
    assert main(["quantize", "--calibration-file", str(pocket_calibration), *args, "--output", str(output)]) == 2
    assert message in one_line_error(capsys, "quantize") and not output.exists()


def test_quantize_refuses_to_overwrite_its_input_or_a_bad_suffix(pocket_calibration, tmp_path, capsys):
    assert main(["quantize", "--calibration-file", str(pocket_calibration), "--output",
                 str(tmp_path / "q.npz")]) == 2
    assert "must end in .safetensors" in one_line_error(capsys, "quantize")
    assert main(["quantize", "--calibration-file", str(tmp_path / "absent.npz"), "--output",
                 str(tmp_path / "q.safetensors")]) == 2
    assert "no such file" in one_line_error(capsys, "quantize")
    (tmp_path / "link.safetensors").symlink_to(pocket_calibration)
    before = pocket_calibration.read_bytes()
    assert main(["quantize", "--calibration-file", str(pocket_calibration), "--output",
                 str(tmp_path / "link.safetensors")]) == 2
    assert "is --calibration-file" in one_line_error(capsys, "quantize") and pocket_calibration.read_bytes() == before


def test_quantize_and_evaluate_refuse_sd3_medium_without_weights(tmp_path, capsys):
    assert main(["quantize", "--model", "sd3-medium", "--calibration-file", "c.npz", "--output",
                 str(tmp_path / "q.safetensors")]) == 2
    assert "sd3-medium needs its weights" in one_line_error(capsys, "quantize")
    assert main(["evaluate", "--model", "sd3-medium", "--quantization", "q.safetensors", "--output-dir",
                 str(tmp_path / "e")]) == 2
    assert "sd3-medium needs its weights" in one_line_error(capsys, "evaluate")


def test_evaluate_refuses_a_quantization_of_another_model_or_a_damaged_file(tiny_calibration, quantized, tmp_path,
                                                                            capsys):
    tiny = tmp_path / "tiny.safetensors"
    assert main(["quantize", "--model", "tiny", "--random-weights", "--calibration-file", str(tiny_calibration),
                 *SMALL, "--output", str(tiny)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--quantization", str(tiny), "--samples", "2", "--output-dir",
                 str(tmp_path / "e")]) == 2
    assert "calibrated for model 'tiny', not 'pocket'" in one_line_error(capsys, "evaluate")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(quantized["w8a8-pt"].read_bytes()[:1000])
    assert main(["evaluate", "--quantization", str(damaged), "--output-dir", str(tmp_path / "e")]) == 2
    assert "not a readable safetensors file" in one_line_error(capsys, "evaluate")
    assert not (tmp_path / "e").exists()
