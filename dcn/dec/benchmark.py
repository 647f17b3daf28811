"""bin/dcn-benchmark: DEC and IDEC on a vector data set, and a folder benchmark.

Vectors (default Fashion-MNIST, all 70,000 samples): per seed, the
d-500-500-2000-10 autoencoder is pretrained once and its weights shared by
every method, so they differ only in the clustering phase. Pretraining
follows ``--protocol``: ``ours`` (Glorot initialisation, Adam, 50 epochs) or
``dec-keras`` (DEC-keras' settings for MNIST and Fashion-MNIST: uniform
+-sqrt(1/fan_in) initialisation, SGD lr 1 momentum 0.9, 300 epochs; and
its clustering phase's batches of consecutive samples in data order, not
shuffled). ``--pretrained DIR`` takes each seed's autoencoder from an
earlier run, or DEC-keras' own (``bin/dcn-deckeras``), instead.

* ``ae+kmeans``: k-means (20 restarts) on the pretrained embedding;
* ``dec``: KL(P || Q) alone, SGD lr 0.01 momentum 0.9 (DEC-keras);
* ``idec``: KL + 10 x reconstruction, Adam lr 0.001 (IDEC's gamma 0.1).

Targets are refreshed every 140 iterations; training stops when fewer than
0.1 % of the labels change, or after 20,000 iterations. On Fashion-MNIST
with ``--protocol dec-keras``, ``published.csv`` sets the runs beside
DEC-keras' own 10 trials (means, spreads, Welch's test; :mod:`dcn.dec.published`).

Folders (``--folder``): Fashion-MNIST images written as PNG files into
``train/`` (unlabelled), ``test/<class>/`` and ``reference/<class>_N.png``
for four classes, then ``bin/dcn --data DIR --image_size 64 --pretrain_epochs 5``
end to end with every other flag at its default (DCEC, references name the
clusters); reports test accuracy and the run's time.

Speed (``--speed``): milliseconds per training step of DEC and DCEC in the
shared loop against a bare Keras step (:mod:`common.speed`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, command_line, parsed_settings, run
from common.data import KNOWN_DATASETS, load_data
from common.errors import UsageError
from common.metrics import evaluate_clustering
from common.processes import JOBS_HELP, peak_rss_gb, run_measured, run_seeds
from common.results import write_csv, write_summary
from common.runtime import quiet_tensorflow
from dcn.dec.cli import DcnCommand
from dcn.dec.models import UPDATE_INTERVAL

METHODS = ("ae+kmeans", "dec", "idec")
COLUMNS = ("acc", "nmi", "nmi_geometric", "ari", "iterations", "pretrain_seconds", "cluster_seconds",
           "peak_rss_gb")
#: DEC's clustering phase as published, the vector runs' defaults: batches of 256, a target refresh every
#: 140 iterations, stop below 0.1 % label change or after 20,000 iterations (bin/dcn proportions the batch,
#: the refresh and the budget to the data instead)
DEC_PROTOCOL = {"--max_iterations": 20000, "--update_interval": UPDATE_INTERVAL, "--batch_size": 256}
FMNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "boot")


def parser():
    p = ArgumentParser(prog="dcn-benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=KNOWN_DATASETS, default="fmnist", help="vector data set")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                   help="clustering methods on the vectors (none: skip the vector benchmark)")
    p.add_argument("--runs", type=int, default=3, bounds="[1, inf)",
                   help="seeds seed..seed+runs-1 (vector and folder runs)")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    p.add_argument("--jobs", type=int, default=1, bounds="[1, inf)",
                   help="vector runs: " + JOBS_HELP)
    p.add_argument("--protocol", choices=("ours", "dec-keras"), default="ours",
                   help="pretraining: ours = Glorot init, Adam, 50 epochs; dec-keras = DEC-keras' "
                   "VarianceScaling init, SGD lr 1 momentum 0.9, 300 epochs, and clustering batches in "
                   "data order (not shuffled)")
    program = DcnCommand().parser()  # bin/dcn's flags, declared there
    p.add_argument_from(program, "--pretrain_epochs", default_text="the protocol's: 50 ours, 300 dec-keras")
    p.add_argument("--pretrained", metavar="DIR",
                   help="take each seed's autoencoder from DIR/ae_<dataset>_seed<N>.weights.h5 (an earlier "
                   "run's, or DEC-keras' own written by bin/dcn-deckeras) instead of pretraining it")
    for flag, value in DEC_PROTOCOL.items():  # the vector runs' (the folder run takes bin/dcn's defaults)
        p.add_argument_from(program, flag, default=value)
    p.add_argument_from(program, "--tol")
    p.add_argument("--folder", action="store_true", help="also run the image-folder benchmark")
    p.add_argument("--folder_classes", nargs="+", type=int, default=[0, 1, 8, 9], bounds="[0, 9]",
                   help="Fashion-MNIST classes of the folder benchmark")
    p.add_argument("--folder_train", type=int, default=1000, bounds="[1, inf)",
                   help="training images per class")
    p.add_argument("--folder_test", type=int, bounds="[1, 1000]",
                   help="test images per class (default: all 1,000 of the Fashion-MNIST test split)")
    p.add_argument("--folder_references", type=int, default=3, bounds="[1, inf)",
                   help="reference images per class")
    p.add_argument("--folder_epochs", type=int, default=5, bounds="[0, inf)",
                   help="pretraining epochs of the folder run")
    p.add_argument("--folder_image_size", type=int, default=64, bounds="[8, inf)",
                   help="image size of the folder run")
    p.add_argument("--folder_max_iterations", type=int, bounds="[1, inf)",
                   help="clustering iterations at most of the folder run (default: bin/dcn's, 73 epochs)")
    p.add_argument("--data_dir", help="folder searched first for the data files")
    p.add_argument("--save_dir", default="bench/dcn",
                   help="output folder for runs.csv, summary.csv, folder data")
    p.rename("--out", "--save_dir")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0)
    p.add_argument("--speed", action="store_true",
                   help="instead: ms per training step of DEC and DCEC (28 and 64 px) in our loop and in a "
                   "bare Keras step (random data; writes <save_dir>/speed_dcn.csv)")
    p.add_argument("--speed_runs", type=int, default=5, bounds="[1, inf)",
                   help="--speed: alternating repeats per case")
    return p


def speed_cases():
    """The clustering networks of the speed table (batch 256): DEC's clustering
    phase on 784-d vectors, DCEC's at 28 and 64 px, and DCEC pretraining at 64 px."""
    import keras

    from common.networks import ReconstructionTask
    from common.speed import SpeedCase, random_data
    from dcn.dec.models import DCN, ClusteringTask

    def case(name, shape, recon_weight, pretrain=False):
        def make():
            keras.utils.set_random_seed(0)
            x = random_data(shape)
            model = DCN(shape, 10)
            if pretrain:
                return ReconstructionTask(model.encoder, model.decoder), x
            task = ClusteringTask(model, x, recon_weight=recon_weight, tol=0.0)
            task.refresh(0)  # real targets
            return task, x
        return SpeedCase(name, make)

    return [case("DEC (dense, 784)", (784,), 0.0),
            case("DCEC (28x28)", (28, 28, 1), 10.0),
            case("DCEC (64x64)", (64, 64, 1), 10.0),
            case("DCEC pretraining (64x64)", (64, 64, 1), 0.0, pretrain=True)]


def parallel_vector_runs(args, out: Path, rows: list):
    """Each seed in its own ``dcn.dec.benchmark`` process, ``args.jobs`` at once
    (:func:`common.processes.run_seeds`), writing ``<out>/seed<N>/`` (runs.csv,
    the autoencoder weights, log.txt); the rows come back in seed order."""
    flags = command_line(parser(), args, skip=("runs", "seed", "out", "jobs", "folder"))
    seeds = range(args.seed, args.seed + args.runs)
    inputs = (lambda seed: [pretrained_weights(args, seed)]) if args.pretrained else None
    for seed_rows in run_seeds("dcn.dec.benchmark", flags, seeds, out, args.jobs, inputs=inputs,
                               settings=partial(parsed_settings, parser())):
        for row in seed_rows:
            rows.append(row)
            _report(row)
        write_csv(pd.DataFrame(rows), out / "runs.csv")


def _report(row):
    pretrained = row.get("pretrained")  # NaN in a runs.csv read back from a run without --pretrained
    source = (f"autoencoder from {pretrained}" if isinstance(pretrained, str) and pretrained
              else f"+{row['pretrain_seconds']:.0f} s shared pretraining")
    print(f"{row['dataset']} {row['method']} seed {row['seed']}: acc {row['acc']:.4f}, NMI {row['nmi']:.4f} "
          f"(geometric {row['nmi_geometric']:.4f}), {row['iterations']} iterations, "
          f"{row['cluster_seconds']:.0f} s ({source})", flush=True)


def score_labels(pred, y) -> dict:
    """Accuracy, NMI (arithmetic and geometric) and ARI of ``pred`` against ``y``."""
    m = evaluate_clustering(pred, y)
    return {k: m[k] for k in ("acc", "nmi", "nmi_geometric", "ari")}


def pretrained_weights(args, seed: int) -> Path:
    """``--pretrained``'s autoencoder weights for ``seed``: ``DIR/<name>`` or,
    from an earlier ``--jobs`` run, ``DIR/seed<N>/<name>``; a missing file
    is a UsageError."""
    name = f"ae_{args.dataset}_seed{seed}.weights.h5"
    for path in (Path(args.pretrained) / name, Path(args.pretrained) / f"seed{seed}" / name):
        if path.is_file():
            return path
    seeds = f"seed {seed}" if args.runs == 1 else f"seeds {args.seed}-{args.seed + args.runs - 1}"
    raise UsageError(f"--pretrained: no {name} in {args.pretrained} (nor in its seed{seed}/); give the "
                     f"folder where an earlier run or bin/dcn-deckeras wrote the autoencoders of {seeds}")


def vector_runs(args, out: Path, rows: list):
    import keras

    from dcn.dec.models import DCN

    (x, y), _ = load_data(args.dataset, data_dir=args.data_dir)
    k = len(np.unique(y))
    dec_keras = args.protocol == "dec-keras"
    init = "dec" if dec_keras else "glorot_uniform"
    epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (300 if dec_keras else 50)
    epochs = int(epochs) if float(epochs).is_integer() else epochs  # runs.csv: 5, not 5.0
    for r in range(args.runs):
        seed = args.seed + r
        keras.utils.set_random_seed(seed)
        if args.pretrained:
            weights, pretrain_seconds = pretrained_weights(args, seed), float("nan")
        else:
            weights = out / f"ae_{args.dataset}_seed{seed}.weights.h5"
            model = DCN(x.shape[1:], k, init=init)
            t0 = time.perf_counter()
            pre_opt = keras.optimizers.SGD(1.0, momentum=0.9) if dec_keras else keras.optimizers.Adam()
            if epochs:  # 0: k-means on the codes of the untrained autoencoder, as bin/dcn
                model.pretrain(x, epochs, batch_size=args.batch_size, seed=seed, verbose=args.verbose,
                               optimizer=pre_opt)
            pretrain_seconds = time.perf_counter() - t0
            model.save_autoencoder_weights(weights)
        for method in args.methods:
            keras.utils.set_random_seed(seed)
            m = DCN(x.shape[1:], k, init=init)
            m.load_autoencoder_weights(weights)
            t0 = time.perf_counter()
            labels = m.init_centers(x, n_init=20, seed=seed)
            row = {"dataset": args.dataset, "method": method, "protocol": args.protocol, "seed": seed,
                   "pretrain_epochs": None if args.pretrained else epochs,
                   "pretrain_seconds": pretrain_seconds,
                   "pretrained": str(weights) if args.pretrained else ""}
            if method == "ae+kmeans":
                row.update(score_labels(labels, y), iterations=0, cluster_seconds=time.perf_counter() - t0)
            else:
                dec = method == "dec"
                opt = keras.optimizers.SGD(0.01, momentum=0.9) if dec else keras.optimizers.Adam(0.001)
                res = m.fit(x, y, max_iterations=args.max_iterations, update_interval=args.update_interval,
                            tol=args.tol, recon_weight=0.0 if dec else 10.0, batch_size=args.batch_size,
                            seed=seed, verbose=args.verbose, optimizer=opt, shuffle=not dec_keras)
                row.update(score_labels(m.cluster(x), y), iterations=res.iterations,
                           cluster_seconds=time.perf_counter() - t0)
            row["peak_rss_gb"] = round(peak_rss_gb(), 2)  # this process's so far (its seeds, in turn)
            rows.append(row)
            write_csv(pd.DataFrame(rows), out / "runs.csv")
            _report(row)


def write_fmnist_folder(root: Path, classes, n_train: int, n_refs: int, seed: int = 0, data_dir=None,
                       n_test: int | None = None):
    """Fashion-MNIST as PNG files: train/ (unlabelled), test/<class>/ (the
    first ``n_test`` test images of each class; None: all 1,000),
    reference/<class>_N.png."""
    from PIL import Image

    (xt, yt), (xv, yv) = load_data("fmnist", validation=True, flatten=False, data_dir=data_dir)
    rng = np.random.default_rng(seed)

    def save(img, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[..., 0] * 255).round().astype(np.uint8)).save(path)

    for c in classes:
        name = FMNIST_CLASSES[c]
        pick = rng.permutation(np.flatnonzero(yt == c))[: n_train + n_refs]
        for i, j in enumerate(pick[:n_train]):
            save(xt[j], root / "train" / f"{name}_{i:05d}.png")
        for i, j in enumerate(pick[n_train:]):
            save(xt[j], root / "reference" / f"{name}_{i + 1}.png")
        for i, j in enumerate(np.flatnonzero(yv == c)[:n_test]):
            save(xv[j], root / "test" / name / f"{i:05d}.png")


FOLDER_COLUMNS = ("test_accuracy", "nmi", "ari", "iterations", "seconds", "peak_rss_gb")


def folder_run(args, out: Path):
    """``bin/dcn`` on the Fashion-MNIST folder, one run per seed, in a process of its own."""
    root = out / "fmnist_folders"
    if not (root / "train").is_dir():
        write_fmnist_folder(root, args.folder_classes, args.folder_train, args.folder_references,
                            data_dir=args.data_dir, n_test=args.folder_test)
    dcn = Path(__file__).resolve().parents[2] / "bin" / "dcn"
    print(f"\nfolder benchmark ({len(args.folder_classes)} Fashion-MNIST classes: "
          f"{', '.join(FMNIST_CLASSES[c] for c in args.folder_classes)}; {args.folder_train} training "
          f"images and {args.folder_references} references per class, {args.folder_image_size}x"
          f"{args.folder_image_size}, DCEC):")
    rows = []
    for r in range(args.runs):
        seed = args.seed + r
        report = out / f"folder_report_seed{seed}"
        cmd = [str(dcn), "--data", str(root), "--image_size", str(args.folder_image_size),
               "--pretrain_epochs", str(args.folder_epochs), "--save_dir", str(report), "--seed", str(seed),
               "--overwrite", "--verbose", "0"]
        if args.folder_max_iterations:
            cmd += ["--max_iterations", str(args.folder_max_iterations)]
        ended = run_measured(cmd)
        seconds = ended.seconds
        if ended.code:
            raise UsageError(f"bin/dcn failed on the folder benchmark: {ended.last_error_line()}")
        metrics = json.loads((report / "test_metrics.json").read_text())
        results = json.loads((report / "results.json").read_text())
        rows.append({"seed": seed, "test_accuracy": metrics["accuracy"], "nmi": metrics["nmi"],
                     "ari": metrics["ari"], "n_test": metrics["n_images"],
                     "iterations": results["iterations"], "stopped": results["stopped"],
                     "seconds": round(seconds, 1), "peak_rss_gb": round(ended.peak_rss_gb, 2),
                     "command": " ".join(cmd[1:])})
        write_csv(pd.DataFrame(rows), out / "folder_runs.csv")
        print(f"  seed {seed}: test accuracy {metrics['accuracy']:.4f}, NMI {metrics['nmi']:.4f}, ARI "
              f"{metrics['ari']:.4f} on {metrics['n_images']} test images; {results['iterations']} "
              f"clustering iterations ({results['stopped']}); {seconds:.0f} s in all", flush=True)
    print(f"  command: {rows[0]['command']}")
    for row in rows:
        row["benchmark"] = "folder"
    write_summary(rows, out / "folder_summary.csv", ["benchmark"], FOLDER_COLUMNS)


def compare_published(rows: list, out: Path, pretrained=None):
    """Our runs beside DEC-keras' 10 Fashion-MNIST trials (:mod:`dcn.dec.published`):
    writes ``<out>/published.csv`` and prints it."""
    from dcn.dec.published import compare_dec_keras, text

    table = compare_dec_keras(pd.DataFrame(rows))
    if len(table):
        write_csv(table, out / "published.csv")
        print("\nagainst DEC-keras' trials (results/exp1/results.csv)"
              + (f"; our runs start from the autoencoders in {pretrained}:" if pretrained else ":"))
        print(text(table))


def _main(argv=None):
    args = parser().parse_args(argv)
    if args.pretrained and args.methods and not args.speed:  # every seed's file, before the first run starts
        if args.pretrain_epochs:
            raise UsageError("--pretrain_epochs has no effect with --pretrained (nothing is pretrained); "
                             "give one of the two")
        for seed in range(args.seed, args.seed + args.runs):
            pretrained_weights(args, seed)
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf = quiet_tensorflow()
    if args.speed:
        from common.speed import measure

        measure(speed_cases(), runs=args.speed_runs, out=out / "speed_dcn.csv")
        print(f"\nwritten: {out}/speed_dcn.csv")
        return 0
    print(f"TensorFlow {tf.__version__}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPU cores")
    rows: list = []
    if args.methods:
        if args.jobs > 1 and args.runs > 1:
            parallel_vector_runs(args, out, rows)
        else:
            vector_runs(args, out, rows)
        write_summary(rows, out / "summary.csv", ["dataset", "method", "protocol"], COLUMNS)
        if args.dataset == "fmnist" and args.protocol == "dec-keras":
            compare_published(rows, out, args.pretrained)
    if args.folder:
        folder_run(args, out)
    print(f"\nwritten: {out}/")
    return 0


def main(argv=None):
    run(_main, argv, prog="dcn-benchmark")


if __name__ == "__main__":
    sys.exit(main())
