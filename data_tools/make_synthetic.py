"""Write clipscale's synthetic dataset (train shards + zero-shot set) and print its specs.

    python data_tools/make_synthetic.py data/synthetic --train-samples 64000 --processes 2
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from clipscale.data.synthetic import write_synthetic_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory (train/, zeroshot/, dataset.json)")
    p.add_argument("--train-samples", type=int, default=64_000)
    p.add_argument("--samples-per-shard", type=int, default=4_000)
    p.add_argument("--zeroshot-samples", type=int, default=2_000)
    p.add_argument("--image-size", type=int, default=64, help="side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                   help="writer processes (the output does not depend on it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    specs = write_synthetic_dataset(
        args.out, train_samples=args.train_samples, samples_per_shard=args.samples_per_shard,
        zeroshot_samples=args.zeroshot_samples, image_size=args.image_size, seed=args.seed,
        processes=args.processes)
    for name, spec in specs.items():
        print(f"{name}: {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
