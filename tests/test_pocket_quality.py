"""The shipped pocket model must draw the digit it is asked for (a reduced version of README's evaluation)."""

import numpy as np

import taq  # noqa: F401
from taq.pocket import DEFAULT_WEIGHTS, load_pocket
from taq.pocket.data import latents_to_images, split_digits
from taq.pocket.evaluate import fit_digit_classifier, generate_digits, score_samples


def test_generated_digits_are_classified_as_the_prompted_digit():
    model, metadata = load_pocket(DEFAULT_WEIGHTS)
    classifier, heldout = fit_digit_classifier(split_digits(seed=metadata["train_config"]["split_seed"]))
    assert heldout >= 0.95
    latents = generate_digits(model.mmdit, model.text_encoder, samples_per_class=5, steps=25, cfg_scale=1.5, seed=7)
    report = score_samples(classifier, latents_to_images(latents), samples_per_class=5)
    assert report["accuracy"] >= 0.80, report["per_class_accuracy"]


def test_the_shipped_weights_fit_the_size_budget():
    assert DEFAULT_WEIGHTS.stat().st_size <= 12 * 2**20
    model, _ = load_pocket(DEFAULT_WEIGHTS)
    assert len(model.mmdit.joint_blocks) >= 6 and model.mmdit.config.mlp_ratio == 4


def test_guidance_changes_the_sample():
    model, _ = load_pocket(DEFAULT_WEIGHTS)
    a = generate_digits(model.mmdit, model.text_encoder, 1, steps=10, cfg_scale=1.0, seed=0)
    b = generate_digits(model.mmdit, model.text_encoder, 1, steps=10, cfg_scale=3.0, seed=0)
    assert np.abs(a - b).max() > 1e-2
