"""The pocket model's data: scikit-learn's 8x8 handwritten digits as 16x16x1 latents in [-1, 1].

A latent is the digit image upsampled 2x by nearest neighbour and rescaled from 0..16 to [-1, 1]
(x / 8 - 1); going back averages each 2x2 patch, so image -> latent -> image is exact.
scikit-learn is a training dependency only, so it is imported inside `load_digits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 8
UPSAMPLE = 2
LATENT_SIZE = IMAGE_SIZE * UPSAMPLE  # 16
MAX_INTENSITY = 16.0  # sklearn's digits take the values 0..16
NUM_CLASSES = 10


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images (N, 8, 8) float32 in 0..16 and labels (N,) int64."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def images_to_latents(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) in 0..16 -> (N, 16, 16, 1) NHWC in [-1, 1]."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.shape}")
    upsampled = images.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)
    return (upsampled / (MAX_INTENSITY / 2) - 1.0)[..., None]


def latents_to_images(latents: np.ndarray) -> np.ndarray:
    """(N, 16, 16, 1) latents -> (N, 8, 8) images in 0..16 (2x2 average pooling, clipped)."""
    latents = np.asarray(latents, dtype=np.float32)
    if latents.ndim != 4 or latents.shape[1:] != (LATENT_SIZE, LATENT_SIZE, 1):
        raise ValueError(f"latents must have shape (N, {LATENT_SIZE}, {LATENT_SIZE}, 1), got {latents.shape}")
    n = latents.shape[0]
    pooled = latents[..., 0].reshape(n, IMAGE_SIZE, UPSAMPLE, IMAGE_SIZE, UPSAMPLE).mean(axis=(2, 4))
    return np.clip((pooled + 1.0) * (MAX_INTENSITY / 2), 0.0, MAX_INTENSITY)


@dataclass(frozen=True)
class DigitSplit:
    """A held-out split of the digits: images (N, 8, 8) in 0..16, labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_indices: np.ndarray  # rows of `load_digits()` in each part
    test_indices: np.ndarray


def stratified_split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; each class gives round(test_fraction * its count) rows to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        test.append(rng.permutation(rows)[: int(round(test_fraction * rows.size))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(labels.size), test)
    return train, test


def split_digits(test_fraction: float = 0.2, seed: int = 0) -> DigitSplit:
    """The deterministic stratified train/test split used for training and evaluation."""
    images, labels = load_digits()
    train, test = stratified_split_indices(labels, test_fraction, seed)
    return DigitSplit(images[train], labels[train], images[test], labels[test], train, test)
