import pytest

import taq  # noqa: F401  (loads the fast BLAS before MLX)
from taq.config import PRESETS, MMDiTConfig, get_preset


def test_sd3_medium_preset_matches_the_published_architecture():
    cfg = get_preset("sd3-medium").mmdit
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (24, 1536, 24, 64)
    assert (cfg.patch_size, cfg.in_channels, cfg.pos_embed_max_size) == (2, 16, 192)
    assert (cfg.pooled_dim, cfg.token_dim, cfg.frequency_embedding_dim) == (2048, 4096, 256)
    assert cfg.mlp_hidden == 6144 and cfg.gelu == "tanh"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_dict(name):
    cfg = PRESETS[name].mmdit
    assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(gelu="relu"), "gelu must be one of"),
        (dict(frequency_embedding_dim=255), "must be even"),
        (dict(mlp_ratio=0), "mlp_ratio must be positive"),
    ],
)
def test_invalid_configs_name_the_bad_field(fields, message):
    base = dict(depth=2, hidden_size=64, num_heads=2)
    with pytest.raises(ValueError, match=message):
        MMDiTConfig(**{**base, **fields})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known presets: .*pocket"):
        get_preset("sd4")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown MMDiTConfig fields"):
        MMDiTConfig.from_dict({"depth": 2, "hidden_size": 64, "num_heads": 2, "qk_norm": "rms"})
