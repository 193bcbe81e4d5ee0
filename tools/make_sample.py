"""Build lowbit/_sample/: the built-in MNIST sample (6,000 train + 1,000 test digits).

Usage: python tools/make_sample.py SOURCE_DIR [--out lowbit/_sample] [--seed 0]

SOURCE_DIR holds the standard MNIST IDX files (train-images-idx3-ubyte.gz, ...). From each
split, ``per_class`` digits of every class (600 train, 100 test) are drawn without replacement
by ``np.random.default_rng(seed)``, then the chosen samples are shuffled with the same
generator. The output is gzip IDX files written reproducibly (mtime 0, no file name), so the
same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.data import load_idx_folder, write_idx  # noqa: E402

SPLITS = {"train": ("train", 600), "test": ("t10k", 100)}


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of each class, in a random order."""
    chosen = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} samples, need {per_class}")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="folder with the MNIST IDX files")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "lowbit/_sample"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, (prefix, per_class) in SPLITS.items():
        images, labels = load_idx_folder(args.source, split)
        idx = select(labels, per_class, rng)
        write_idx(args.out / f"{prefix}-images-idx3-ubyte.gz", images[idx, 0])
        write_idx(args.out / f"{prefix}-labels-idx1-ubyte.gz", labels[idx].astype(np.uint8))
        print(f"{split}: {len(idx)} samples, classes {np.bincount(labels[idx]).tolist()}")
    total = sum(p.stat().st_size for p in args.out.glob("*.gz"))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
