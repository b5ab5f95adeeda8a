from dataclasses import replace

import taq  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from taq.conditioning import PrecomputedEncoder, RandomEncoder, save_embeddings
from taq.config import get_preset
from taq.formats import TaqFormatError
from taq.loading import check_model_options, load_model
from taq.models.checkpoint import CheckpointError, save_sd3_checkpoint
from taq.models.mmdit import MMDiT


def test_random_presets_are_seeded():
    a, b, c = (load_model("tiny", seed=seed, random_weights=True) for seed in (1, 1, 2))
    wa, wb, wc = (np.array(m.mmdit.pos_embed) for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)
    assert a.weights_id == "random-seed-1" and a.random_weights


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
    src = load_model("tiny", seed=3, random_weights=True).mmdit
    save_sd3_checkpoint(src, tmp_path / "sd3.safetensors")
    model = load_model("tiny", checkpoint=tmp_path / "sd3.safetensors", embeddings=None)
    assert model.mmdit.config == src.config
    assert len(model.weights_id) == 64 and not model.random_weights  # sha256 of the file


def test_an_sd3_checkpoint_of_another_width_gets_heads_of_sd3s_head_dim(tmp_path):
    narrow = MMDiT(replace(get_preset("sd3-medium").mmdit, depth=1, hidden_size=192, num_heads=3))
    save_sd3_checkpoint(narrow, tmp_path / "narrow.safetensors")
    model = load_model("sd3-medium", checkpoint=tmp_path / "narrow.safetensors")
    assert (model.mmdit.config.num_heads, model.mmdit.config.head_dim) == (3, 64)  # not sd3-medium's 24 heads


def test_an_sd3_checkpoint_whose_width_is_no_multiple_of_the_head_dim_is_refused(tmp_path):
    odd = MMDiT(replace(get_preset("sd3-medium").mmdit, depth=1, hidden_size=96, num_heads=3))
    save_sd3_checkpoint(odd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd.safetensors: hidden size 96 is not a multiple of the head dim 64"):
        load_model("sd3-medium", checkpoint=tmp_path / "odd.safetensors")


@pytest.mark.parametrize("name", ["sd3-medium", "tiny"])
def test_a_preset_without_shipped_weights_needs_a_checkpoint_or_an_explicit_random_weights(name):
    with pytest.raises(ValueError, match=f"{name} needs its weights: give --checkpoint PATH .* or --random-weights"):
        load_model(name)
    with pytest.raises(ValueError, match="either --checkpoint or --random-weights"):
        check_model_options(name, "w.safetensors", random_weights=True)


def test_random_weights_are_refused_for_a_model_that_ships_its_own():
    with pytest.raises(ValueError, match="ships its own weights; --random-weights"):
        load_model("pocket", random_weights=True)


@pytest.mark.parametrize("resolution, message", [(15, "multiple of 2"), (0, "positive multiple"),
                                                 (64, "larger than")])
def test_latent_shape_rejects_bad_resolutions(resolution, message):
    with pytest.raises(ValueError, match=message):
        load_model("tiny", random_weights=True).latent_shape(resolution)


def test_latent_shape_applies_the_vae_scale():
    assert load_model("tiny", random_weights=True).latent_shape(16) == (16, 16, 4)


def test_pocket_refuses_a_checkpoint():
    with pytest.raises(ValueError, match="ships its own weights"):
        load_model("pocket", checkpoint="x.safetensors")


def test_dtype_is_applied():
    assert load_model("tiny", dtype=mx.float16, random_weights=True).mmdit.pos_embed.dtype == mx.float16
