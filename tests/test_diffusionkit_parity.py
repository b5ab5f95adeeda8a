"""taq's MMDiT against DiffusionKit 0.5.2's MLX MMDiT: two independent loaders and models, one SD3-layout file.

DiffusionKit departs from SD3 in one place that changes outputs: it drops the attention key bias ("redundant due
to softmax invariance"). That holds only when every key shares one bias; in MMDiT's joint attention the text and
image keys come from different projections with different biases, so q . (b_img - b_txt) shifts attention between
the two streams. The parity test puts the key biases back into DiffusionKit's model (SD3's behaviour); a second test
shows that this is DiffusionKit's only departure.
"""

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import pytest

from taq.config import MMDiTConfig
from taq.models.checkpoint import SD3_PREFIX, load_sd3_checkpoint, save_sd3_checkpoint
from taq.models.mmdit import MMDiT

pytestmark = pytest.mark.diffusionkit
NOT_IMPORTABLE = "DiffusionKit (diffusionkit.mlx) is not importable"
dk_config = pytest.importorskip("diffusionkit.mlx.config", reason=NOT_IMPORTABLE, exc_type=ImportError)
dk_mmdit = pytest.importorskip("diffusionkit.mlx.mmdit", reason=NOT_IMPORTABLE, exc_type=ImportError)
dk_model_io = pytest.importorskip("diffusionkit.mlx.model_io", reason=NOT_IMPORTABLE, exc_type=ImportError)

# DiffusionKit's FFN uses exact GELU. 12x16 latents are 6x8 patches: an off-centre crop of the 16x16 grid.
CFG = MMDiTConfig(depth=3, hidden_size=128, num_heads=2, patch_size=2, in_channels=16, pos_embed_max_size=16,
                  pooled_dim=64, token_dim=96, gelu="exact")
LATENT_HW = (12, 16)
TOKENS = 7
TIMESTEPS = (1000.0, 500.0, 3.0)
RTOL = 1e-4  # max abs diff <= RTOL * max(1, max |output|)


def diffusionkit_config(cfg: MMDiTConfig):
    return dk_config.MMDiTConfig(
        num_heads=cfg.num_heads, depth_multimodal=cfg.depth, hidden_size_override=cfg.hidden_size,
        mlp_ratio=int(cfg.mlp_ratio), vae_latent_dim=cfg.in_channels, layer_norm_eps=cfg.layer_norm_eps,
        max_latent_resolution=cfg.pos_embed_max_size, patch_size=cfg.patch_size,
        pooled_text_embed_dim=cfg.pooled_dim, token_level_text_embed_dim=cfg.token_dim,
        frequency_embed_dim=cfg.frequency_embedding_dim, dtype=mx.float32, float16_dtype=mx.float32,
        low_memory_mode=False,  # True passes an argument current MLX's attention no longer takes
    )


def restore_key_biases(model, sd3_weights: dict[str, mx.array]) -> None:
    """Give DiffusionKit's bias-free key projections SD3's key biases (the middle third of each qkv bias)."""
    for i, block in enumerate(model.multimodal_transformer_blocks):
        for sd3_stream, stream in (("x_block", block.image_transformer_block),
                                   ("context_block", block.text_transformer_block)):
            weight = stream.attn.k_proj.weight  # (D_out, D_in)
            k_proj = nn.Linear(weight.shape[1], weight.shape[0])
            qkv_bias = sd3_weights[f"{SD3_PREFIX}joint_blocks.{i}.{sd3_stream}.attn.qkv.bias"]
            k_proj.update({"weight": weight, "bias": mx.split(qkv_bias, 3)[1]})
            stream.attn.k_proj = k_proj


def diffusionkit_velocities(path, x, tokens, pooled, sd3_key_bias: bool) -> list[mx.array]:
    """DiffusionKit's own sequence: load (model_io.load_mmdit minus the download), cache modulation, then call."""
    model = dk_mmdit.MMDiT(diffusionkit_config(CFG))
    raw = mx.load(str(path))
    model.load_weights(list(dk_model_io.mmdit_state_dict_adjustments(raw, prefix=SD3_PREFIX).items()))
    if sd3_key_bias:
        restore_key_biases(model, raw)
    # Replaces the adaLN weights by per-timestep modulation for this exact pooled batch: one model per batch.
    model.cache_modulation_params(pooled, mx.array(TIMESTEPS))
    rows = x.shape[0]
    return [model(x, tokens[:, :, None, :], mx.full((rows,), t)) for t in TIMESTEPS]


def taq_velocities(model: MMDiT, x, tokens, pooled) -> list[mx.array]:
    return [model(x, mx.full((x.shape[0],), t), tokens, pooled) for t in TIMESTEPS]


def conditioning_batch(batch: int, cfg_doubling: bool, seed: int = 0):
    """(x, tokens, pooled); with CFG doubling 2B rows, conditional rows [0:B] first, as the samplers lay them out."""
    keys = mx.random.split(mx.random.key(seed), 5)
    x = mx.random.normal((batch, *LATENT_HW, CFG.in_channels), key=keys[0])
    tokens = mx.random.normal((batch, TOKENS, CFG.token_dim), key=keys[1])
    pooled = mx.random.normal((batch, CFG.pooled_dim), key=keys[2])
    if not cfg_doubling:
        return x, tokens, pooled
    return (mx.concatenate([x, x]),
            mx.concatenate([tokens, mx.random.normal(tokens.shape, key=keys[3])]),
            mx.concatenate([pooled, mx.random.normal(pooled.shape, key=keys[4])]))


def max_abs_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max())


def write_checkpoint(path, shared_key_bias: bool = False) -> str:
    """Random weights (adaLN non-zero) in SD3's layout; a full-scale positional table so its crop shows."""
    mx.random.seed(7)
    model = MMDiT(CFG)
    model.pos_embed = mx.random.normal(model.pos_embed.shape)
    if shared_key_bias:
        D = CFG.hidden_size
        for block in model.joint_blocks:
            ctx, img = block.context_block.attn.qkv, block.x_block.attn.qkv
            ctx.bias = mx.concatenate([ctx.bias[:D], img.bias[D : 2 * D], ctx.bias[2 * D :]])
    save_sd3_checkpoint(model, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dk") / "sd3_layout.safetensors")


@pytest.fixture(scope="module")
def taq_model(checkpoint):
    model = load_sd3_checkpoint(checkpoint, gelu="exact")
    assert model.config == CFG
    return model


@pytest.mark.parametrize("batch, cfg_doubling", [(1, False), (3, False), (1, True), (3, True)],
                         ids=["batch1", "batch3", "cfg_batch1", "cfg_batch3"])
def test_taq_matches_diffusionkit_with_sd3_key_biases(checkpoint, taq_model, batch, cfg_doubling):
    x, tokens, pooled = conditioning_batch(batch, cfg_doubling)
    theirs = diffusionkit_velocities(checkpoint, x, tokens, pooled, sd3_key_bias=True)
    ours = taq_velocities(taq_model, x, tokens, pooled)
    report = {t: (max_abs_diff(o, r), float(mx.abs(o).max())) for t, o, r in zip(TIMESTEPS, ours, theirs)}
    assert all(scale > 0.5 for _, scale in report.values()), f"outputs too small to compare: {report}"
    assert all(diff <= RTOL * max(1.0, scale) for diff, scale in report.values()), \
        f"{{timestep: (max abs diff, output scale)}} = {report}"


def test_diffusionkit_departs_from_sd3_only_by_dropping_key_biases(tmp_path, checkpoint, taq_model):
    x, tokens, pooled = conditioning_batch(2, cfg_doubling=False, seed=1)
    scale = max(float(mx.abs(v).max()) for v in taq_velocities(taq_model, x, tokens, pooled))

    shipped = diffusionkit_velocities(checkpoint, x, tokens, pooled, sd3_key_bias=False)
    shipped_gap = max(map(max_abs_diff, shipped, taq_velocities(taq_model, x, tokens, pooled)))
    # Far above float32 rounding (parity above measures ~5e-7): the dropped biases change the output.
    assert shipped_gap > 1e-5 * max(1.0, scale), f"DiffusionKit as shipped: max abs diff only {shipped_gap}"

    shared = write_checkpoint(tmp_path / "shared_key_bias.safetensors", shared_key_bias=True)
    shared_taq = load_sd3_checkpoint(shared, gelu="exact")
    shared_gap = max(map(max_abs_diff, diffusionkit_velocities(shared, x, tokens, pooled, sd3_key_bias=False),
                         taq_velocities(shared_taq, x, tokens, pooled)))
    assert shared_gap <= RTOL * max(1.0, scale), f"with one key bias per block: max abs diff {shared_gap}"
