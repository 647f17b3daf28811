"""Data-set utilities from the command line (``python -m common.datatool``):
``info NAME`` loads a data set and prints its shape, classes and value
range; ``make-reuters10k DIR`` builds ``reutersidf10k.npz`` from RCV1 (needs
the network once)."""

from __future__ import annotations

import numpy as np

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.data import KNOWN_DATASETS, load_data, make_reuters10k, value_range


def main(argv=None):
    parser = ArgumentParser(prog="python -m common.datatool", description="Data-set utilities.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-reuters10k", help="build reutersidf10k.npz from RCV1 (needs network)")
    p.add_argument("out_dir", help="folder to write reutersidf10k.npz to")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="seed of the 10,000-document draw")
    p = sub.add_parser("info", help="load a data set and print its shape and classes")
    p.add_argument("name",
                   help=f"{', '.join(KNOWN_DATASETS)}, a .npz/.csv/.npy path or a folder of .npy shards")
    p.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "make-reuters10k":
        print(make_reuters10k(args.out_dir, seed=args.seed))
    else:
        (x, y), _ = load_data(args.name, data_dir=args.data_dir)
        classes = "unlabelled" if y is None else f"{len(np.unique(y))} classes"
        low, high = value_range(x)
        print(f"{args.name}: {x.shape[0]} samples, {x.shape[1]} features, {classes}, "
              f"values in [{low:.3g}, {high:.3g}]")


if __name__ == "__main__":
    run(main)
