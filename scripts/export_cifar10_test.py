"""Write CIFAR-10 test images as PNG files, e.g. to reproduce the DDIM paper's Table 2 with `ddim invert`.

python scripts/export_cifar10_test.py --root data/cifar10 --download --n 100 --out cifar10-test/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from torchvision.datasets import CIFAR10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("data/cifar10"), help="torchvision's CIFAR-10 folder")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into --root if it is missing")
    parser.add_argument("--n", type=int, default=100, help="how many test images, from the first")
    parser.add_argument("--out", type=Path, default=Path("cifar10-test"), help="output folder")
    args = parser.parse_args()
    try:
        test_set = CIFAR10(str(args.root), train=False, download=args.download)
    except RuntimeError:
        parser.error(f"CIFAR-10 is not in {args.root}; add --download to fetch it")
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(min(args.n, len(test_set))):
        Image.fromarray(test_set.data[index]).save(args.out / f"{index:05d}.png")
    print(f"wrote {min(args.n, len(test_set))} images to {args.out}/")


if __name__ == "__main__":
    main()
