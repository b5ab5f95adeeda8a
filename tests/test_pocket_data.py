import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import taq  # noqa: F401
from taq.pocket.data import (
    images_to_latents,
    latents_to_images,
    load_digits,
    split_digits,
    stratified_split_indices,
)
from taq.pocket.prompts import (
    CALIBRATION_DIGITS,
    CALIBRATION_PROMPTS,
    DIGIT_WORDS,
    TEMPLATES,
    UNCONDITIONAL_PROMPT,
    canonical_prompt,
    paraphrases,
    random_prompts,
)
from taq.pocket.text_encoder import Tokenizer, pocket_text_encoder_config
from taq.pocket.train import make_batch

digit_images = arrays(np.float32, st.tuples(st.integers(1, 3), st.just(8), st.just(8)),
                      elements=st.integers(0, 16).map(float))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def split():
    return split_digits()


# --------------------------------------------------------------------------- latents


def test_digits_are_1797_images_of_8x8_in_0_to_16(digits):
    images, labels = digits
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16 and set(np.unique(labels)) == set(range(10))


def test_latents_are_16x16x1_nhwc_in_minus_one_to_one(digits):
    latents = images_to_latents(digits[0][:50])
    assert latents.shape == (50, 16, 16, 1) and latents.dtype == np.float32
    assert latents.min() == -1.0 and latents.max() == 1.0


def test_latent_is_the_nearest_neighbour_upsampling(digits):
    image = digits[0][3]
    latent = images_to_latents(image[None])[0, :, :, 0]
    for dy in range(2):
        for dx in range(2):
            np.testing.assert_array_equal(latent[dy::2, dx::2], image / 8 - 1)


@given(digit_images)
@settings(max_examples=30, deadline=None)
def test_image_to_latent_to_image_is_exact(images):
    np.testing.assert_array_equal(latents_to_images(images_to_latents(images)), images)


def test_latents_to_images_averages_2x2_and_clips():
    latents = np.zeros((1, 16, 16, 1), np.float32)
    latents[0, 0:2, 0:2, 0] = [[-1.0, 1.0], [0.0, 0.0]]  # mean 0 -> intensity 8
    latents[0, 2:4, 0:2, 0] = 5.0  # out of range -> 16
    latents[0, 4:6, 0:2, 0] = -3.0  # out of range -> 0
    images = latents_to_images(latents)
    assert images.shape == (1, 8, 8)
    assert (images[0, 0, 0], images[0, 1, 0], images[0, 2, 0], images[0, 3, 0]) == (8.0, 16.0, 0.0, 8.0)


@pytest.mark.parametrize("bad", [np.zeros((8, 8)), np.zeros((2, 8, 9)), np.zeros((2, 16, 16))])
def test_wrong_image_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="images must have shape"):
        images_to_latents(bad)


def test_wrong_latent_shapes_are_refused():
    with pytest.raises(ValueError, match="latents must have shape"):
        latents_to_images(np.zeros((2, 16, 16, 4)))


# --------------------------------------------------------------------------- split


def test_split_is_disjoint_covers_everything_and_holds_out_20_percent(split):
    assert np.intersect1d(split.train_indices, split.test_indices).size == 0
    assert np.union1d(split.train_indices, split.test_indices).size == 1797
    assert split.test_labels.size == pytest.approx(0.2 * 1797, abs=10)


def test_split_is_stratified(split):
    train_share = np.bincount(split.train_labels) / split.train_labels.size
    test_share = np.bincount(split.test_labels) / split.test_labels.size
    np.testing.assert_allclose(train_share, test_share, atol=0.005)


def test_split_is_deterministic_and_depends_on_the_seed(split):
    again = split_digits()
    np.testing.assert_array_equal(again.test_indices, split.test_indices)
    np.testing.assert_array_equal(again.train_images, split.train_images)
    assert not np.array_equal(split_digits(seed=1).test_indices, split.test_indices)


def test_split_rows_match_the_full_dataset(digits, split):
    images, labels = digits
    np.testing.assert_array_equal(images[split.test_indices], split.test_images)
    np.testing.assert_array_equal(labels[split.train_indices], split.train_labels)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split_indices(np.arange(10), fraction, seed=0)


# --------------------------------------------------------------------------- prompts


def test_every_class_has_distinct_paraphrases_naming_it():
    for digit in range(10):
        phrasings = paraphrases(digit)
        assert len(set(phrasings)) == len(TEMPLATES) >= 6
        assert all(DIGIT_WORDS[digit] in p or str(digit) in p for p in phrasings)
    uses = [("{word}" in t, "{numeral}" in t) for t in TEMPLATES]
    assert any(w for w, _ in uses) and any(n for _, n in uses)  # words and numerals both appear


def test_canonical_prompt_is_one_of_the_paraphrases():
    assert canonical_prompt(7) == "a handwritten digit seven"
    assert all(canonical_prompt(d) in paraphrases(d) for d in range(10))


@pytest.mark.parametrize("bad", [-1, 10, 2.5])
def test_prompt_for_a_non_digit_is_refused(bad):
    with pytest.raises(ValueError, match="digit must be an integer 0..9"):
        canonical_prompt(bad)


def test_calibration_prompts_are_20_distinct_in_vocabulary_two_per_digit():
    tokenizer = Tokenizer(pocket_text_encoder_config().vocab, 16)
    assert len(set(CALIBRATION_PROMPTS)) == 20
    assert sorted(CALIBRATION_DIGITS) == sorted(list(range(10)) * 2)
    for prompt, digit in zip(CALIBRATION_PROMPTS, CALIBRATION_DIGITS):
        assert prompt in paraphrases(digit)
        assert tokenizer.unk_id not in tokenizer.encode_one(prompt)
    used = {i for i, t in enumerate(TEMPLATES) for p, d in zip(CALIBRATION_PROMPTS, CALIBRATION_DIGITS)
            if p == t.format(word=DIGIT_WORDS[d], numeral=d)}
    assert used == set(range(len(TEMPLATES)))


def test_random_prompts_drop_to_empty_at_the_requested_rate_and_are_seeded():
    labels = np.arange(4000) % 10
    prompts = random_prompts(labels, np.random.default_rng(0), dropout=0.1)
    empty = np.array([p == UNCONDITIONAL_PROMPT for p in prompts])
    assert abs(empty.mean() - 0.1) < 0.02
    assert all(p in paraphrases(int(d)) for p, d in zip(prompts, labels) if p)
    assert prompts == random_prompts(labels, np.random.default_rng(0), dropout=0.1)
    assert len({p for p in prompts if p}) == 10 * len(TEMPLATES)


# --------------------------------------------------------------------------- training batches


def test_training_batch_shapes_and_sigma_range(split):
    latents = images_to_latents(split.train_images)
    tokenizer = Tokenizer(pocket_text_encoder_config().vocab, 16)
    batch = make_batch(np.random.default_rng(0), latents, split.train_labels, tokenizer, 2048, 0.1)
    assert batch["x0"].shape == batch["noise"].shape == (2048, 16, 16, 1)
    assert batch["ids"].shape == (2048, 16) and batch["sigma"].shape == (2048,)
    assert 0 < batch["sigma"].min() and batch["sigma"].max() < 1
    assert abs(np.median(batch["sigma"]) - 0.5) < 0.03  # logit-normal(0, 1) is symmetric about 1/2
    unconditional = (batch["ids"][:, 2] == tokenizer.pad_id)  # bos, eos, pad...
    assert abs(unconditional.mean() - 0.1) < 0.03
    again = make_batch(np.random.default_rng(0), latents, split.train_labels, tokenizer, 2048, 0.1)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)


# --------------------------------------------------------------------------- training runs (tiny model)


@pytest.fixture(scope="module")
def tiny_configs():
    from taq.config import MMDiTConfig

    return (MMDiTConfig(depth=2, hidden_size=32, num_heads=2, in_channels=1, pos_embed_max_size=8, pooled_dim=16,
                        token_dim=16),
            pocket_text_encoder_config(dim=16, pooled_dim=16))


def tiny_run_config(**overrides):
    from taq.pocket.train import TrainConfig

    fields = dict(steps=24, batch_size=16, warmup_steps=4, checkpoint_every=8, log_every=4, compile=False)
    return TrainConfig(**{**fields, **overrides})


def test_training_lowers_the_loss_and_writes_weights_and_log(tmp_path, tiny_configs):
    import csv

    from taq.pocket import load_pocket
    from taq.pocket.train import train

    out = tmp_path / "pocket.safetensors"
    train(tiny_run_config(), out, *tiny_configs, progress=False)
    with open(tmp_path / "pocket.loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(4, 25, 4))
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"])
    model, meta = load_pocket(out)
    assert meta["trained_steps"] == 24 and model.mmdit.config == tiny_configs[0]


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, tiny_configs, monkeypatch):
    from mlx.utils import tree_flatten

    import taq.pocket.train as train_module
    from taq.pocket import load_pocket

    cfg = tiny_run_config()
    train_module.train(cfg, tmp_path / "whole.safetensors", *tiny_configs, progress=False)

    calls = []
    real_make_batch = train_module.make_batch

    def crash_at_step_13(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt  # after the step-8 checkpoint
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_batch", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, tmp_path / "resumed.safetensors", *tiny_configs, progress=False)
    monkeypatch.setattr(train_module, "make_batch", real_make_batch)
    summary = train_module.train(cfg, tmp_path / "resumed.safetensors", *tiny_configs, resume=True, progress=False)
    assert summary["steps_run"] == 16

    whole, resumed = (dict(tree_flatten(load_pocket(tmp_path / f"{name}.safetensors")[0].parameters()))
                      for name in ("whole", "resumed"))
    assert all(np.array_equal(np.array(whole[k]), np.array(resumed[k])) for k in whole)


def test_resuming_with_a_different_recipe_is_refused(tmp_path, tiny_configs):
    from taq.pocket.train import train

    out = tmp_path / "pocket.safetensors"
    train(tiny_run_config(steps=8), out, *tiny_configs, progress=False)
    with pytest.raises(ValueError, match="cannot resume with a different batch_size"):
        train(tiny_run_config(steps=8, batch_size=8), out, *tiny_configs, resume=True, progress=False)
