"""bin/rswnet-benchmark: bin/rswnet at a CPU's size, several seeds, one table.

A ResNet50 step at 224x224 is GPU work; here each run is ``bin/rswnet
--dataset fmnist --input_size 32 --weights none --subset 5000`` (a stratified
subset of the 60,000 training images; all 10,000 test images scored), one
process per head and seed. Any flag this program does not know goes to
``bin/rswnet`` unchanged (e.g. ``--epochs 3``, ``--protocol published``).
Writes ``runs.csv`` (every method of every run), ``summary.csv`` (mean ± std
per head and method) and prints the summary with each run's wall time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.errors import UsageError
from common.processes import run_measured
from common.results import write_csv, write_summary
from rswnet.cli import RswnetCommand

#: bin/rswnet at a CPU's size: 32 px inputs, random weights, a stratified subset of the training images
CPU_SIZE = {"--input_size": 32, "--weights": "none", "--subset": 5000}
COLUMNS = ("acc", "acc_kmeans", "purity", "nmi", "ari", "silhouette", "davies_bouldin", "calinski_harabasz",
           "largest_share", "clusters", "run_seconds")


def parser():
    p = ArgumentParser(prog="rswnet-benchmark", description=__doc__.split("\n\n")[0] + " Flags not listed "
                       "here are passed on to bin/rswnet.")
    program = RswnetCommand().parser()  # bin/rswnet's flags, declared there; CPU-sized defaults here
    p.add_argument_from(program, "--dataset", default="fmnist")
    p.add_argument("--heads", nargs="+", choices=("clustering", "som"), default=["clustering"],
                   help="heads to run")
    p.add_argument("--runs", type=int, default=3, bounds="[1, inf)", help="seeds seed..seed+runs-1 per head")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    for flag, value in CPU_SIZE.items():
        p.add_argument_from(program, flag, default=value)
    p.add_argument("--save_dir", default="bench/rswnet",
                   help="output folder for the runs and the tables")
    p.rename("--out", "--save_dir")
    return p


def _main(argv=None):
    args, passed = parser().parse_known_args(argv)
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    rswnet = Path(__file__).resolve().parents[1] / "bin" / "rswnet"
    print(f"{os.cpu_count()} CPU cores; bin/rswnet --dataset {args.dataset} --input_size {args.input_size} "
          f"--weights {args.weights} --subset {args.subset} {' '.join(passed)}".rstrip())
    rows = []
    for head in args.heads:
        for r in range(args.runs):
            seed = args.seed + r
            save_dir = out / f"{head}_seed{seed}"
            cmd = [str(rswnet), "--dataset", args.dataset, "--head", head, "--input_size",
                   str(args.input_size), "--weights", args.weights, "--subset", str(args.subset), "--seed",
                   str(seed), "--save_dir", str(save_dir), "--overwrite", "--verbose", "0", *passed]
            ended = run_measured(cmd)
            seconds = ended.seconds
            if ended.code:
                raise UsageError(f"bin/rswnet failed ({head}, seed {seed}): {ended.last_error_line()}")
            table = pd.read_csv(save_dir / "comparison.csv")
            for _, row in table.iterrows():
                rows.append({"head": head, "method": row["method"], "seed": seed,
                             **row.drop("method").to_dict(), "run_seconds": round(seconds, 1),
                             "peak_rss_gb": round(ended.peak_rss_gb, 2)})
            write_csv(pd.DataFrame(rows), out / "runs.csv")
            model_row = table[table["method"].str.startswith("RSWNet")].iloc[0]
            kind = "acc" if pd.notna(model_row["acc"]) else "acc_kmeans"  # maps of more units than classes
            print(f"{head} seed {seed}: {model_row['method']}: {kind} {model_row[kind]:.4f}, NMI "
                  f"{model_row['nmi']:.4f}; {seconds:.0f} s", flush=True)
    write_summary(rows, out / "summary.csv", ["head", "method"], COLUMNS)
    print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
    return 0


def main(argv=None):
    run(_main, argv, prog="rswnet-benchmark")


if __name__ == "__main__":
    sys.exit(main())
