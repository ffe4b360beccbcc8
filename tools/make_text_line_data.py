#!/usr/bin/env python3
"""Unlabelled text-line inputs for PaddleOCR's direction classifier (ppocr_cls), from real handwriting.

    python tools/make_text_line_data.py OUT.npz [--count 200] [--seed 0]

Each input is a 48x192 line of scikit-learn digits (8x8 handwritten digits scaled to 48x48,
dark ink on white), upright or turned by 180 degrees, normalised as PaddleOCR does
((x / 255 - 0.5) / 0.5, CHW, 3 channels). Campaigns on it use `--metric golden`.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits

HEIGHT, WIDTH, SCALE = 48, 192, 6


def text_lines(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` normalised [3, 48, 192] images of four digits in a row, half of them upside down."""
    digits = load_digits().images  # [1797, 8, 8], ink 0..16
    picks = digits[rng.integers(0, len(digits), (count, WIDTH // HEIGHT))]
    glyphs = np.kron(picks, np.ones((SCALE, SCALE)))  # [count, 4, 48, 48]
    lines = np.concatenate(list(np.moveaxis(glyphs, 1, 0)), axis=2)  # [count, 48, 192]
    pixels = 255.0 - lines * (255.0 / 16.0)
    turned = rng.random(count) < 0.5
    pixels[turned] = pixels[turned, ::-1, ::-1]
    normalised = (pixels / 255.0 - 0.5) / 0.5
    return np.repeat(normalised[:, None], 3, axis=1).astype(np.float32)


def main() -> None:
    """Writes the images and their labels to the .npz named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    np.savez(arguments.out, inputs=text_lines(arguments.count, np.random.default_rng(arguments.seed)))


if __name__ == "__main__":
    main()
