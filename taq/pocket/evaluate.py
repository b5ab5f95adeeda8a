"""Does the pocket model draw the digit it is asked for?

    python -m taq.pocket.evaluate [--weights PATH] [--samples-per-class 8 --steps 100 --cfg-scale 1.5]

A logistic-regression classifier, fit on the real training split's 8x8 images (its held-out accuracy is
reported and must be >= 95%), labels samples generated with the Euler CFG sampler from each class's
canonical prompt. Writes a JSON report and a sample grid (one row per digit, one column per seed).
The target: >= 90% of generated samples classified as the prompted digit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from taq.formats import atomic_path
from taq.pocket import DEFAULT_WEIGHTS, load_pocket
from taq.pocket.data import LATENT_SIZE, MAX_INTENSITY, NUM_CLASSES, DigitSplit, latents_to_images, split_digits
from taq.pocket.prompts import UNCONDITIONAL_PROMPT, canonical_prompt
from taq.pocket.text_encoder import TextEncoder
from taq.sampling.euler import CFGDenoiser, sample
from taq.sampling.schedule import SD3_SHIFT, flow_sigmas

MIN_CLASSIFIER_ACCURACY = 0.95
TARGET_ACCURACY = 0.90
DEFAULT_OUT_DIR = Path("reports") / "pocket-eval"


def fit_digit_classifier(split: DigitSplit):
    """Logistic regression on the training split's images; returns (classifier, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=10.0, max_iter=5000)
    classifier.fit(pixel_features(split.train_images), split.train_labels)
    return classifier, float(classifier.score(pixel_features(split.test_images), split.test_labels))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """The classifier's input: (N, 8, 8) images in 0..16 as (N, 64) in 0..1."""
    return images.reshape(len(images), -1) / MAX_INTENSITY


def digit_logits(classifier, images: np.ndarray) -> np.ndarray:
    """(N, 10) the classifier's decision values: the feature space of taq's Frechet distances on pocket."""
    return classifier.decision_function(pixel_features(images))


def generate_digits(mmdit: Callable, text_encoder: TextEncoder, samples_per_class: int, steps: int = 100,
                    cfg_scale: float = 1.5, shift: float = SD3_SHIFT, seed: int = 0) -> np.ndarray:
    """Latents (10 * samples_per_class, 16, 16, 1), digit-major; sample j of every digit starts from noise j."""
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    noise = np.random.default_rng(seed).standard_normal((samples_per_class, LATENT_SIZE, LATENT_SIZE, 1))
    x = mx.array(np.tile(noise, (NUM_CLASSES, 1, 1, 1)).astype(np.float32))
    prompts = [canonical_prompt(d) for d in range(NUM_CLASSES) for _ in range(samples_per_class)]
    denoiser = CFGDenoiser(mmdit, text_encoder.encode(prompts), text_encoder.encode([UNCONDITIONAL_PROMPT]),
                           scale=cfg_scale)
    latents = sample(denoiser, x, flow_sigmas(steps, shift=shift))
    return np.array(latents.astype(mx.float32))


def score_samples(classifier, images: np.ndarray, samples_per_class: int) -> dict:
    """Overall and per-class accuracy of digit-major samples, with the full confusion matrix."""
    prompted = np.repeat(np.arange(NUM_CLASSES), samples_per_class)
    predicted = classifier.predict(pixel_features(images))
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)  # [prompted, predicted]
    np.add.at(confusion, (prompted, predicted), 1)
    return {"accuracy": float(np.mean(predicted == prompted)),
            "per_class_accuracy": {str(d): float(confusion[d, d] / samples_per_class) for d in range(NUM_CLASSES)},
            "confusion": confusion.tolist(), "predicted": predicted.tolist()}


def save_grid(path: Path, images: np.ndarray, predicted: list[int], samples_per_class: int) -> None:
    """One row per prompted digit, one column per seed; a red title marks a misclassified sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(NUM_CLASSES, samples_per_class, figsize=(0.9 * samples_per_class + 0.6, 9.6),
                             squeeze=False)
    for index, (ax, image) in enumerate(zip(axes.flat, images)):
        digit, column = divmod(index, samples_per_class)
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=MAX_INTENSITY)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(predicted[index]), fontsize=7, color="black" if predicted[index] == digit else "red", pad=2)
        if column == 0:
            ax.set_ylabel(f'"{digit}"', rotation=0, labelpad=14, fontsize=10)
    fig.suptitle("pocket model samples (rows: prompted digit; titles: classifier's label)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate(weights: str | Path = DEFAULT_WEIGHTS, samples_per_class: int = 8, steps: int = 100,
             cfg_scale: float = 1.5, shift: float = SD3_SHIFT, seed: int = 0) -> tuple[dict, np.ndarray]:
    """The report (JSON-ready) and the generated 8x8 images (digit-major)."""
    model, metadata = load_pocket(weights)
    split_seed = metadata.get("train_config", {}).get("split_seed", 0)
    classifier, classifier_accuracy = fit_digit_classifier(split_digits(seed=split_seed))
    started = time.perf_counter()
    latents = generate_digits(model.mmdit, model.text_encoder, samples_per_class, steps, cfg_scale, shift, seed)
    seconds = time.perf_counter() - started
    images = latents_to_images(latents)
    report = {"weights": str(weights), "trained_steps": metadata.get("trained_steps"),
              "samples_per_class": samples_per_class, "steps": steps, "cfg_scale": cfg_scale, "shift": shift,
              "seed": seed, "classifier_heldout_accuracy": classifier_accuracy,
              "classifier_ok": classifier_accuracy >= MIN_CLASSIFIER_ACCURACY,
              **score_samples(classifier, images, samples_per_class),
              "target_accuracy": TARGET_ACCURACY, "sampling_seconds": round(seconds, 2),
              "device": str(mx.default_device())}
    report["meets_target"] = report["accuracy"] >= TARGET_ACCURACY
    return report, images


def format_table(report: dict) -> str:
    lines = [f"classifier held-out accuracy: {report['classifier_heldout_accuracy']:.1%} "
             f"(needs >= {MIN_CLASSIFIER_ACCURACY:.0%})",
             f"{'digit':>5}  {'accuracy':>8}  most common labels"]
    for digit in range(NUM_CLASSES):
        row = np.array(report["confusion"][digit])
        labels = ", ".join(f"{label}x{row[label]}" for label in np.argsort(-row, kind="stable") if row[label])
        lines.append(f"{digit:>5}  {report['per_class_accuracy'][str(digit)]:>8.1%}  {labels}")
    verdict = "meets" if report["meets_target"] else "MISSES"
    lines.append(f"overall: {report['accuracy']:.1%} of {NUM_CLASSES * report['samples_per_class']} samples "
                 f"({verdict} the {TARGET_ACCURACY:.0%} target); {report['steps']} Euler steps, "
                 f"CFG {report['cfg_scale']}, shift {report['shift']}, {report['sampling_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--samples-per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--shift", type=float, default=SD3_SHIFT, help="schedule shift (SD3: 3.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="for the JSON report and grid PNG")
    args = parser.parse_args(argv)
    report, images = evaluate(args.weights, args.samples_per_class, args.steps, args.cfg_scale, args.shift, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = args.out_dir / "pocket_samples.png"
    save_grid(grid_path, images, report["predicted"], args.samples_per_class)
    report["grid"] = str(grid_path)
    with atomic_path(args.out_dir / "pocket_eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {args.out_dir / 'pocket_eval.json'} and {grid_path}")
    return report


if __name__ == "__main__":
    main()
