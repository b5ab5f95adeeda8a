import mlx.core as mx
import numpy as np
import pytest

import taq  # noqa: F401
from taq.conditioning import PrecomputedEncoder, RandomEncoder, save_embeddings
from taq.formats import TaqFormatError
from taq.models.checkpoint import save_sd3_checkpoint
from taq.loading import load_model


def test_random_presets_are_seeded():
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    wa, wb, wc = (np.array(m.mmdit.pos_embed) for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)
    assert a.weights_id == "random-seed-1"


def test_random_encoder_gives_each_prompt_its_own_fixed_embedding():
    enc = RandomEncoder(token_dim=8, pooled_dim=4, length=5)
    tokens, pooled = enc(["a cat", "a dog", "a cat"])
    assert tokens.shape == (3, 5, 8) and pooled.shape == (3, 4)
    t = np.array(tokens)
    np.testing.assert_array_equal(t[0], t[2])
    assert not np.array_equal(t[0], t[1])


def test_precomputed_embeddings_round_trip_and_name_missing_prompts(tmp_path):
    enc = RandomEncoder(token_dim=8, pooled_dim=4)
    save_embeddings(tmp_path / "emb.npz", ["", "a cat"], enc)
    loaded = PrecomputedEncoder(tmp_path / "emb.npz")
    for got, want in zip(loaded(["a cat", ""]), enc(["a cat", ""])):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    with pytest.raises(ValueError, match="no embeddings for prompt"):
        loaded(["a bird"])


def test_precomputed_embeddings_refuse_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(TaqFormatError, match="not a taq"):
        PrecomputedEncoder(tmp_path / "x.npz")


def test_sd3_checkpoint_loads_with_the_preset_gelu_and_heads(tmp_path):
    src = load_model("tiny", seed=3).mmdit
    save_sd3_checkpoint(src, tmp_path / "sd3.safetensors")
    model = load_model("tiny", checkpoint=tmp_path / "sd3.safetensors", embeddings=None)
    assert model.mmdit.config == src.config
    assert len(model.weights_id) == 64  # sha256 of the file


@pytest.mark.parametrize("resolution, message", [(15, "multiple of 2"), (0, "positive multiple"),
                                                 (64, "larger than")])
def test_latent_shape_rejects_bad_resolutions(resolution, message):
    with pytest.raises(ValueError, match=message):
        load_model("tiny").latent_shape(resolution)


def test_latent_shape_applies_the_vae_scale():
    assert load_model("tiny").latent_shape(16) == (16, 16, 4)


def test_pocket_refuses_a_checkpoint():
    with pytest.raises(ValueError, match="ships its own weights"):
        load_model("pocket", checkpoint="x.safetensors")


def test_dtype_is_applied():
    assert load_model("tiny", dtype=mx.float16).mmdit.pos_embed.dtype == mx.float16
