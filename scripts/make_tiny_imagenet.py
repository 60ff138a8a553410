"""Write a small ImageNet-layout folder of JPEG files made from Fashion-MNIST.

    PYTHONPATH=src python scripts/make_tiny_imagenet.py OUT [--classes N] [--train-per-class N]
        [--val-per-class N] [--size N] [--seed N] [--fashion-dir DIR] [--odd-files]

See megabatch.data.tiny_imagenet for what the images are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megabatch.data import fashion_mnist, tiny_imagenet
from megabatch.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (new, empty, or a previous output)")
    parser.add_argument("--classes", type=int, default=10, help="1..10 (default 10)")
    parser.add_argument("--train-per-class", type=int, default=32, help="default 32")
    parser.add_argument("--val-per-class", type=int, default=8, help="default 8")
    parser.add_argument("--size", type=int, default=64, help="about this many pixels a side (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--fashion-dir", type=Path, default=None,
                        help=f"Fashion-MNIST idx files (default {fashion_mnist.DEFAULT_DIR})")
    parser.add_argument("--odd-files", action="store_true",
                        help="also a CMYK, a greyscale, a PNG-named-.JPEG, a tiny and a large image, a "
                             "truncated and an empty file in the first training class")
    args = parser.parse_args(argv)
    try:
        out = tiny_imagenet.write(args.out, args.classes, args.train_per_class, args.val_per_class,
                                  args.size, args.seed, args.fashion_dir)
        odd = tiny_imagenet.add_odd_files(out, args.seed) if args.odd_files else {}
    except (ValueError, UserError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    jpegs = [p for p in out.rglob("*.JPEG") if p not in odd.values()]
    n_train = sum(1 for p in jpegs if p.parts[-3] == "train")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {args.classes} classes, {n_train} train + {len(jpegs) - n_train} val "
          f"JPEGs, {total} bytes" + (f", and {len(odd)} odd files ({', '.join(odd)})" if odd else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
