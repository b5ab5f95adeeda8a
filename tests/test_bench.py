import json

import pytest

import taq  # noqa: F401
from taq.bench import forward_flops
from taq.cli import main
from taq.config import MMDiTConfig, get_preset


def test_forward_flops_counts_each_matmul_once():
    # depth 1: the only block is the last, whose text stream stops after qkv.
    cfg = MMDiTConfig(depth=1, hidden_size=8, num_heads=2, in_channels=1, pos_embed_max_size=4,
                      pooled_dim=4, token_dim=4)
    D, F, n_img, n_txt = 8, 32, 4, 3
    image = 2 * n_img * (3 * D * D + D * D + 2 * D * F)
    text = 2 * n_txt * 3 * D * D
    modulation = 2 * D * 12 * D
    attention = 2 * 2 * (n_img + n_txt) ** 2 * D
    final = 2 * n_img * D * 4 * 1
    assert forward_flops(cfg, 1, n_img, n_txt) == image + text + modulation + attention + final
    assert forward_flops(cfg, 3, n_img, n_txt) == 3 * forward_flops(cfg, 1, n_img, n_txt)


def test_sd3_medium_1024_step_matches_the_design_estimate():
    # DESIGN.md: 1.69e13 FLOP per 1024x1024 CFG step (batch 2, 154 text tokens).
    flops = forward_flops(get_preset("sd3-medium").mmdit, 2, 64 * 64, 154)
    assert flops == pytest.approx(1.69e13, rel=0.02)


def test_bench_prints_json_with_every_mode(capsys):
    assert main(["bench", "--model", "tiny", "--repeats", "1", "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("untraced_ms", "traced_ms"):
        assert result[key]["median"] > 0
    assert result["rows"] == 2 and result["flops"] > 0
