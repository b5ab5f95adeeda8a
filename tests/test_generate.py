import numpy as np
import pytest

import taq  # noqa: F401
from taq.cli import main
from taq.generate import generate
from taq.loading import load_model


def test_generate_writes_a_png_for_the_pocket_model(tmp_path, capsys):
    out = tmp_path / "seven.png"
    assert main(["generate", "a handwritten digit seven", "--steps", "5", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_generate_is_seeded_per_prompt():
    model = load_model()
    a = generate(model, ["a handwritten digit one", "a handwritten digit two"], steps=4, seed=3)
    b = generate(model, ["a handwritten digit one"], steps=4, seed=3)
    assert a.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["x", "--output", "a.jpg"], "must end in .png or .npy"),
    (["x", "--model", "tiny", "--output", "a.png"], "need a VAE"),
    (["x", "--steps", "0", "--output", "a.png"], "--steps must be >= 1"),
    (["x", "--model", "sd3-medium", "--output", "a.npy"], "sd3-medium needs its weights"),
])
def test_bad_generate_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_generate_refuses_a_negative_guidance_scale(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--cfg-scale", "-0.5", "--output", "a.png"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--cfg-scale: must be a number >= 0, got '-0.5'" in err and "\n" not in err


def test_generate_refuses_to_write_over_its_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "w.npy"
    checkpoint.write_bytes(b"weights")
    assert main(["generate", "x", "--model", "tiny", "--checkpoint", str(checkpoint), "--output", str(checkpoint)]) == 2
    assert "would destroy that input" in capsys.readouterr().err and checkpoint.read_bytes() == b"weights"


def test_the_guidance_scale_must_not_be_negative():
    with pytest.raises(ValueError, match="guidance scale .* >= 0, got -1"):
        generate(load_model(), ["a handwritten digit one"], steps=1, cfg_scale=-1)
