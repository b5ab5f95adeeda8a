"""Prompts the pocket model is trained on and understands: digits 0-9 in several phrasings.

Each template names the digit either as a word ("seven") or as a numeral ("7"). Training draws a
random template per sample; "" is the unconditional prompt that classifier-free guidance contrasts with.
"""

from __future__ import annotations

import numpy as np

from taq.conditioning import UNCONDITIONAL_PROMPT

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral} written by hand",
    "a scribbled {word}",
    "handwritten {numeral}",
    "the digit {numeral}",
    "a drawing of the number {word}",
    "a {word} written with a pen",
    "an image of a handwritten {numeral}",
    "number {word}, drawn by hand",
)
CANONICAL_TEMPLATE = 0


def _check_digit(digit: int) -> int:
    if not 0 <= int(digit) <= 9 or int(digit) != digit:
        raise ValueError(f"digit must be an integer 0..9, got {digit!r}")
    return int(digit)


def prompt_for(digit: int, template: int = CANONICAL_TEMPLATE) -> str:
    """The prompt for `digit` in phrasing number `template` (0 .. len(TEMPLATES) - 1)."""
    digit = _check_digit(digit)
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    return TEMPLATES[template].format(word=DIGIT_WORDS[digit], numeral=digit)


def canonical_prompt(digit: int) -> str:
    """The one prompt per class used for evaluation."""
    return prompt_for(digit, CANONICAL_TEMPLATE)


def paraphrases(digit: int) -> list[str]:
    """Every phrasing of `digit`."""
    return [prompt_for(digit, i) for i in range(len(TEMPLATES))]


def all_training_prompts() -> list[str]:
    """Every prompt the model is trained on, the unconditional "" included (defines the vocabulary)."""
    return [UNCONDITIONAL_PROMPT] + [p for digit in range(10) for p in paraphrases(digit)]


def random_prompts(labels: np.ndarray, rng: np.random.Generator, dropout: float = 0.0) -> list[str]:
    """A random paraphrase per label; with probability `dropout` the prompt is "" instead (for CFG)."""
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    templates = rng.integers(0, len(TEMPLATES), size=len(labels))
    dropped = rng.random(len(labels)) < dropout
    return [UNCONDITIONAL_PROMPT if drop else prompt_for(int(label), int(template))
            for label, template, drop in zip(labels, templates, dropped)]


# 20 calibration prompts, two phrasings per digit, together using every template.
CALIBRATION_PROMPTS = tuple(prompt_for(digit, (2 * digit + k) % len(TEMPLATES))
                            for digit in range(10) for k in range(2))
CALIBRATION_DIGITS = tuple(digit for digit in range(10) for _ in range(2))
