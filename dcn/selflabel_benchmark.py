"""bin/selflabel-benchmark: bin/selflabel on Fashion-MNIST over several seeds, one table.

One ``bin/selflabel`` process per configuration and seed, trained on the
60,000 training images and scored on the 10,000 test images:

* ``n2d``: the defaults (autoencoder codes, UMAP, Gaussian mixture, then
  balanced self-labelling with the neighbour phase);
* ``deepcluster``: the original project's loop (k-means of the untrained
  CNN's features, relabelled by k-means on its features, no neighbour
  phase).

Writes ``runs.csv`` and ``summary.csv`` (mean ± std of test accuracy, NMI,
purity, ARI, lowest per-class F1, final aligned stability, iterations, wall
time) and prints the summary beside the targets. Flags this program does not
know go to ``bin/selflabel`` unchanged (e.g. ``--iterations 3``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.errors import UsageError
from common.results import write_csv, write_summary

CONFIGS = {
    "n2d": [],
    "deepcluster": ["--init", "random", "--manifold", "none", "--clusterer", "kmeans",
                    "--relabel", "cluster", "--knn_epochs", "0"],
}
COLUMNS = ("accuracy", "nmi", "purity", "ari", "min_f1", "stability", "iterations", "run_seconds")


def parser():
    p = ArgumentParser(prog="selflabel-benchmark", description=__doc__.split("\n\n")[0] + " Flags not listed "
                       "here are passed on to bin/selflabel.")
    p.add_argument("--dataset", default="fmnist", help="a data set with a train/test split")
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["n2d"],
                   help="configurations to run")
    p.add_argument("--runs", type=int, default=3, bounds="[1, inf)",
                   help="seeds seed..seed+runs-1 per configuration")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    p.add_argument("--out", default="bench/selflabel", help="folder for the runs and the tables")
    p.add_argument("--jobs", type=int, default=1, bounds="[1, inf)",
                   help="runs at once (their wall times then share the CPU)")
    return p


def _main(argv=None):
    from dcn.selflabel_cli import TARGETS

    args, passed = parser().parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    program = Path(__file__).resolve().parents[1] / "bin" / "selflabel"
    print(f"{os.cpu_count()} CPU cores; bin/selflabel on {args.dataset}, {args.runs} seeds {' '.join(passed)}"
          .rstrip())
    runs = [(config, args.seed + r) for config in args.configs for r in range(args.runs)]

    def one(config, seed):
        save_dir = out / f"{args.dataset}_{config}_seed{seed}"
        cmd = [str(program), "--dataset", args.dataset, *CONFIGS[config], "--seed", str(seed),
               "--save_dir", str(save_dir), "--verbose", "0", *passed]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        return save_dir, done, time.perf_counter() - t0

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, config, seed) for config, seed in runs]
        for (config, seed), future in zip(runs, futures):
            save_dir, done, seconds = future.result()
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise UsageError(f"bin/selflabel failed ({config}, seed {seed}): {last}")
            metrics = json.loads((save_dir / "test_metrics.json").read_text())
            results = json.loads((save_dir / "results.json").read_text())
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
            rows.append({"config": config, "seed": seed, **{k: metrics.get(k) for k in COLUMNS[:6]},
                         "iterations": results["iterations_run"], "run_seconds": round(seconds, 1),
                         "peak_rss_gb": round(peak, 2), "jobs": args.jobs})
            write_csv(pd.DataFrame(rows), out / "runs.csv")
            print(f"{config} seed {seed}: test accuracy {metrics['accuracy']:.4f}, NMI {metrics['nmi']:.4f}, "
                  f"purity {metrics['purity']:.4f}, lowest F1 {metrics['min_f1']:.4f}; {seconds:.0f} s",
                  flush=True)
    write_summary(rows, out / "summary.csv", ["config"], COLUMNS)
    print("targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()))
    print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
    return 0


def main(argv=None):
    run(_main, argv, prog="selflabel-benchmark")


if __name__ == "__main__":
    sys.exit(main())
