"""bin/ae-benchmark: the autoencoders of bin/ae + two-stage clustering, several seeds, one table.

For each data set (Fashion-MNIST, and MNIST where its files are present) and
seed, one ``bin/ae`` process per configuration:

* ``ae``, ``semisupervised``, ``vae``, ``cvae`` with their defaults, codes
  clustered by k-means;
* ``ae-desom``: the DESOM/DEC-size autoencoder (d-500-500-2000-10), its codes
  clustered by k-means and by an 8x8 SOM (Kerasom): the two-stage baselines
  of the DESOM papers (AE + k-means, AE + SOM), to stand beside DESOM.

Every run trains and scores on the whole data set (70,000 images), as the
DESOM and DEC papers do. Any flag this program does not know goes to
``bin/ae`` unchanged (e.g. ``--epochs 5``). Writes ``runs.csv`` (every
method of every run), ``summary.csv`` (mean ± std per data set,
configuration and method) and prints the summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.data import load_data
from common.errors import DataError, UsageError
from common.processes import run_measured
from common.results import write_csv, write_summary

CONFIGS = {
    "ae": ["--model", "ae", "--cluster", "kmeans"],
    "semisupervised": ["--model", "semisupervised", "--cluster", "kmeans"],
    "vae": ["--model", "vae", "--cluster", "kmeans"],
    "cvae": ["--model", "cvae", "--cluster", "kmeans"],
    "ae-desom": ["--model", "ae", "--hidden", "500", "500", "2000", "--latent_dim", "10",
                 "--cluster", "kmeans", "som"],
}
COLUMNS = ("acc", "purity", "nmi", "ari", "silhouette", "clusters", "classifier_acc", "run_seconds")


def parser():
    p = ArgumentParser(prog="ae-benchmark", description=__doc__.split("\n\n")[0] + " Flags not listed here "
                       "are passed on to bin/ae.")
    p.add_argument("--datasets", nargs="+", default=["fmnist", "mnist"],
                   help="data sets; those whose files are missing are skipped with a line")
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                   help="configurations to run")
    p.add_argument("--runs", type=int, default=3, bounds="[1, inf)",
                   help="seeds seed..seed+runs-1 per configuration")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    p.add_argument("--save_dir", default="bench/ae",
                   help="output folder for the runs and the tables")
    p.rename("--out", "--save_dir")
    return p


def _available(name: str) -> bool:
    try:
        load_data(name, download=False)
        return True
    except (DataError, UsageError):
        return False


def _main(argv=None):
    args, passed = parser().parse_known_args(argv)
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    ae = Path(__file__).resolve().parents[2] / "bin" / "ae"
    datasets = []
    for name in args.datasets:
        if _available(name):
            datasets.append(name)
        else:
            print(f"{name}: files not found here, skipped")
    if not datasets:
        raise UsageError("none of the data sets is available here")
    print(f"{os.cpu_count()} CPU cores; bin/ae on {', '.join(datasets)}, {args.runs} seeds "
          f"{' '.join(passed)}".rstrip())
    rows = []
    for dataset in datasets:
        for config in args.configs:
            for r in range(args.runs):
                seed = args.seed + r
                save_dir = out / f"{dataset}_{config}_seed{seed}"
                cmd = [str(ae), "--dataset", dataset, *CONFIGS[config], "--seed", str(seed), "--save_dir",
                       str(save_dir), "--overwrite", "--verbose", "0", *passed]
                ended = run_measured(cmd)
                seconds = ended.seconds
                if ended.code:
                    raise UsageError(f"bin/ae failed ({dataset} {config}, seed {seed}): "
                                     f"{ended.last_error_line()}")
                table = pd.read_csv(save_dir / "clustering.csv")
                classifier = json.loads((save_dir / "results.json").read_text()).get("classifier")
                for _, row in table.iterrows():
                    rows.append({"dataset": dataset, "config": config, "method": row["method"], "seed": seed,
                                 **row.drop("method").to_dict(),
                                 "classifier_acc": (classifier or {}).get("accuracy_on_unlabelled"),
                                 "run_seconds": round(seconds, 1),
                                 "peak_rss_gb": round(ended.peak_rss_gb, 2)})
                write_csv(pd.DataFrame(rows), out / "runs.csv")
                first = table.iloc[0]
                print(f"{dataset} {config} seed {seed}: {first['method']} accuracy {first['acc']:.4f}, NMI "
                      f"{first['nmi']:.4f}; {seconds:.0f} s", flush=True)
    write_summary(rows, out / "summary.csv", ["dataset", "config", "method"], COLUMNS)
    print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
    return 0


def main(argv=None):
    run(_main, argv, prog="ae-benchmark")


if __name__ == "__main__":
    sys.exit(main())
