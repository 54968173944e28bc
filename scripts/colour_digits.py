"""Write scikit-learn's 1797 handwritten digits as small RGB PNGs, each stroke in one of six colours.

An offline colour dataset for trying `ddim restore --gray` (colourisation needs an RGB model):

python scripts/colour_digits.py --out data/colour-digits
ddim train configs/colour-digits.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

# Saturated stroke colours on black; their lumas (0.299 R + 0.587 G + 0.114 B) differ, so a gray
# digit narrows down, but does not fix, its colour.
PALETTE = np.array(
    [[1.0, 0.15, 0.15], [0.15, 1.0, 0.15], [0.3, 0.45, 1.0], [1.0, 0.9, 0.1], [0.1, 0.95, 1.0], [1.0, 0.3, 1.0]]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/colour-digits"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seeds the colour of each digit")
    args = parser.parse_args()
    digits = load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]
    colours = PALETTE[np.random.default_rng(args.seed).integers(len(PALETTE), size=len(digits))]
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (digit, colour) in enumerate(zip(digits, colours, strict=True)):
        pixels = np.round(digit[..., None] * colour * 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(args.out / f"{index:04d}.png")
    print(f"wrote {len(digits)} images to {args.out}/")


if __name__ == "__main__":
    main()
