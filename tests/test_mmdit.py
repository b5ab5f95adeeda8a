from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import taq  # noqa: F401
from taq.config import get_preset
from taq.models.mmdit import MMDiT, zero_init_modulation


def inputs(cfg, batch, size=8, tokens=7, seed=0):
    keys = mx.random.split(mx.random.key(seed), 4)
    return (
        mx.random.normal((batch, size, size, cfg.in_channels), key=keys[0]),
        mx.random.uniform(0, 1000, (batch,), key=keys[1]),
        mx.random.normal((batch, tokens, cfg.token_dim), key=keys[2]),
        mx.random.normal((batch, cfg.pooled_dim), key=keys[3]),
    )


@pytest.fixture(scope="module")
def tiny():
    mx.random.seed(0)
    return MMDiT(get_preset("tiny").mmdit)


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_output_has_the_latent_shape_and_model_dtype(preset, dtype, batch):
    cfg = get_preset(preset).mmdit
    mx.random.seed(1)
    model = MMDiT(cfg)
    model.set_dtype(dtype)
    out = model(*inputs(cfg, batch, size=16))
    assert out.shape == (batch, 16, 16, cfg.in_channels) and out.dtype == dtype
    assert np.isfinite(np.array(out.astype(mx.float32))).all()


def test_rows_are_independent_so_batching_changes_nothing(tiny):
    x, t, tok, pooled = inputs(tiny.config, 4)
    batched = np.array(tiny(x, t, tok, pooled))
    for i in range(4):
        alone = np.array(tiny(x[i : i + 1], t[i : i + 1], tok[i : i + 1], pooled[i : i + 1]))
        np.testing.assert_allclose(alone[0], batched[i], rtol=1e-5, atol=1e-5)


def test_compiled_forward_equals_eager(tiny):
    args = inputs(tiny.config, 2)
    np.testing.assert_allclose(np.array(mx.compile(tiny)(*args)), np.array(tiny(*args)), rtol=1e-5, atol=1e-6)


def test_output_depends_on_timestep_text_and_pooled(tiny):
    x, t, tok, pooled = inputs(tiny.config, 2)
    base = np.array(tiny(x, t, tok, pooled))
    for changed in [(x, t + 100, tok, pooled), (x, t, tok + 1, pooled), (x, t, tok, pooled + 1)]:
        assert np.abs(np.array(tiny(*changed)) - base).max() > 1e-4


def test_positional_embedding_is_the_centre_crop(tiny):
    M = tiny.config.pos_embed_max_size
    grid = np.array(tiny.pos_embed).reshape(M, M, -1)
    crop = np.array(tiny.cropped_pos_embed(4, 6)).reshape(4, 6, -1)
    top, left = (M - 4) // 2, (M - 6) // 2
    np.testing.assert_array_equal(crop, grid[top : top + 4, left : left + 6])


def test_every_ffn_activation_is_an_addressable_module(tiny):
    paths = sorted(name for name, _ in tiny.named_modules() if name.endswith("mlp.act"))
    depth = tiny.config.depth
    assert len(paths) == 2 * depth - 1  # the last block's text stream has no FFN
    assert f"joint_blocks.{depth - 1}.context_block.mlp.act" not in paths
    assert f"joint_blocks.{depth - 1}.x_block.mlp.act" in paths


@pytest.mark.parametrize("gelu, reference", [("tanh", nn.gelu_approx), ("exact", nn.gelu)])
def test_gelu_flavour_is_a_config_field(gelu, reference):
    act = MMDiT(replace(get_preset("tiny").mmdit, gelu=gelu)).joint_blocks[0].x_block.mlp.act
    x = mx.linspace(-4, 4, 801)
    assert act.form == gelu
    # The CPU's tanh form is a rational approximation (tests/test_fused_cpu.py), within 1.5e-6 of MLX's.
    np.testing.assert_allclose(np.array(act(x)), np.array(reference(x)), rtol=0, atol=1.5e-6)
    assert float(mx.abs(nn.gelu_approx(x) - nn.gelu(x)).max()) > 1e-4  # the two forms are distinguishable


def test_zero_init_modulation_makes_the_output_zero(tiny):
    model = MMDiT(tiny.config)
    zero_init_modulation(model)
    assert np.abs(np.array(model(*inputs(model.config, 2)))).max() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t, tok, p: (x[..., :2], t, tok, p), "x must be"),
        (lambda x, t, tok, p: (x[:, :7, :7], t, tok, p), "not divisible by the patch size"),
        (lambda x, t, tok, p: (mx.zeros((2, 40, 40, 4)), t, tok, p), "exceeds the positional grid"),
        (lambda x, t, tok, p: (x, t[:1], tok, p), "t must have shape"),
        (lambda x, t, tok, p: (x, t, tok[..., :5], p), "tokens must be"),
        (lambda x, t, tok, p: (x, t, tok, p[:1]), "pooled must be"),
    ],
)
def test_bad_inputs_give_clear_errors(tiny, change, message):
    with pytest.raises(ValueError, match=message):
        tiny(*change(*inputs(tiny.config, 2)))


@pytest.mark.slow
def test_sd3_medium_width_at_512px_gives_a_finite_output():
    # SD3 Medium's width and a 512x512 latent (64x64x16, 154 tokens, CFG batch 2), 2 of the 24 blocks to keep
    # the test small; benchmarks/ runs all 24.
    cfg = replace(get_preset("sd3-medium").mmdit, depth=2)
    mx.random.seed(0)
    model = MMDiT(cfg)  # float32: the CPU's BLAS has no fast bfloat16 path
    out = model(*inputs(cfg, 2, size=64, tokens=154))
    assert out.shape == (2, 64, 64, 16)
    assert np.isfinite(np.array(out)).all()
