"""Write some of scikit-learn's handwritten digits as PNG files, e.g. to try `ddim invert` on.

python scripts/export_digits.py --out digits/ 3 17
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("indices", nargs="+", type=int, help="which of the 1797 digits (0-based)")
    parser.add_argument("--out", type=Path, default=Path("digits"), help="output folder")
    args = parser.parse_args()
    images = load_digits().images  # 8x8, values 0..16
    args.out.mkdir(parents=True, exist_ok=True)
    for index in args.indices:
        if not 0 <= index < len(images):
            parser.error(f"index {index} is outside 0..{len(images) - 1}")
        path = args.out / f"digit{index}.png"
        Image.fromarray(np.round(images[index] * 255 / 16).astype(np.uint8)).save(path)
        print(path)


if __name__ == "__main__":
    main()
