"""bin/desom-benchmark: the DESOM paper's protocol, n seeded runs per model.

Defaults follow Forest et al. (ESANN 2019): an 8x8 map, 10,000 iterations,
batch 256, gamma 0.001, T from 10 to 0.1 (exponential), Gaussian kernel,
no pretraining, prototypes initialised from encoded random samples. Each run
is scored on all samples (train + test) by its best-matching units; the
table gives mean ± std over runs, and ``runs.csv`` / ``summary.csv`` hold the
numbers (``runs.csv`` is rewritten after every run, so nothing is lost when a
long benchmark is stopped).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, command_line, parsed_settings, run
from common.data import CLASS_NAMES, IMAGE_SHAPES, KNOWN_DATASETS, load_data
from common.errors import DataError, UsageError
from common.metrics import evaluate_clustering, prototype_kmeans_accuracy
from common.processes import JOBS_HELP, peak_rss_gb, run_measured, run_seeds
from common.results import write_csv, write_summary
from common.runtime import quiet_tensorflow
from desom.cli import add_map_arguments

MODELS = ("desom", "convdesom", "som", "kmeans")
COLUMNS = ("purity", "nmi", "nmi_geometric", "ari", "acc", "acc_kmeans", "quantization_error",
           "topographic_error", "fit_seconds", "iterations_per_second", "peak_rss_gb")


def parser():
    p = ArgumentParser(prog="desom-benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=KNOWN_DATASETS, default=["fmnist"],
                   help="data sets; missing files skip the data set with a note")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["desom"],
                   help="som = Kerasom on the inputs; kmeans = scikit-learn k-means with one "
                   "cluster per unit, on the inputs (its centres scored as prototypes: acc_kmeans, and the "
                   "quantization error in input space)")
    p.add_argument("--runs", type=int, default=5, bounds="[1, inf)",
                   help="runs per data set and model (seeds seed..seed+runs-1)")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    p.add_argument("--jobs", type=int, default=1, bounds="[1, inf)",
                   help=JOBS_HELP)
    add_map_arguments(p)
    p.add_argument("--data_dir", help="folder searched first for the data files")
    p.add_argument("--save_dir", default="bench/desom",
                   help="output folder for runs.csv, summary.csv and run logs")
    p.rename("--out", "--save_dir")
    p.add_argument("--fig_dir", help="also write the first run's decoded map of each image data set here "
                   "as desom_map_<dataset>.png")
    p.add_argument("--strategy", choices=("auto", "default", "mirrored"), default="auto")
    p.add_argument("--mixed_precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0, help="training output per run")
    p.add_argument("--speed", action="store_true",
                   help="instead: ms per training step of DESOM, ConvDESOM and Kerasom in our loop and in a "
                   "bare Keras step (random data; writes <save_dir>/speed_desom.csv)")
    p.add_argument("--speed_runs", type=int, default=5, bounds="[1, inf)",
                   help="--speed: alternating repeats per case")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak resident memory of bin/desom (--iterations, --map_size, --batch_size) "
                   "on Fashion-MNIST held in memory, from .npy shards, and from shards of a --memory_scale "
                   "times larger set (Fashion-MNIST repeated with noise); writes <save_dir>/memory.csv")
    p.add_argument("--memory_scale", type=int, default=10, bounds="[2, inf)",
                   help="--memory: size of the large set, in copies of Fashion-MNIST")
    p.add_argument("--explorer", action="store_true",
                   help="instead: size and speed of the map explorer page (bin/desom explore) for 8x8, 20x20 "
                   "and 40x40 maps of all 70,000 Fashion-MNIST images, in headless Chromium; writes "
                   "<save_dir>/explorer.csv")
    return p


def _write_shards(folder: Path, x, y, copies: int, seed: int, rows_per_shard: int = 10000):
    """``copies`` of (x, y) as float32 .npy shards; every copy after the first
    with Gaussian noise (std 0.05, clipped to [0, 1]). Written once, reused."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1)
    k = 0
    for c in range(copies):
        for start in range(0, len(flat), rows_per_shard):
            part = flat[start:start + rows_per_shard]
            if c:
                part = np.clip(part + rng.normal(0.0, 0.05, part.shape), 0.0, 1.0)
            np.save(folder / f"part-{k:05d}.npy", part.astype(np.float32))
            k += 1
    np.save(folder / "labels.npy", np.tile(np.asarray(y), copies))
    done.touch()
    return folder


def _measured_run(argv, save_dir: Path) -> dict:
    """``bin/desom`` in a child process: its peak resident set size
    (:func:`common.processes.run_measured`), wall time, results."""
    shutil.rmtree(save_dir, ignore_errors=True)
    save_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "desom.cli", *argv, "--save_dir", str(save_dir), "--verbose", "0"]
    ended = run_measured(command, stderr_path=save_dir / "stderr.txt")
    if ended.code:
        raise RuntimeError(f"bin/desom {' '.join(argv)} failed ({ended.code}): {ended.stderr.strip()[-500:]}")
    results = json.loads((save_dir / "results.json").read_text())
    return {"peak_rss_gb": ended.peak_rss_gb, "seconds": ended.seconds, "purity": results["train"]["purity"],
            "quantization_error": results["train"]["quantization_error"]}


def memory_table(args, out: Path):
    """Peak memory of bin/desom from an array, from shards, and from shards of a larger set."""
    (x, y), _ = load_data("fmnist", data_dir=args.data_dir)
    data = out / "data"
    cases = [("array in memory", len(x), ["--dataset", "fmnist"]),
             ("npy shards", len(x), ["--data", str(_write_shards(data / "fmnist", x, y, 1, args.seed))]),
             (f"npy shards, {args.memory_scale}x", args.memory_scale * len(x),
              ["--data", str(_write_shards(data / f"fmnist_x{args.memory_scale}", x, y, args.memory_scale,
                                           args.seed))])]
    del x, y
    common = ["--map_size", *map(str, args.map_size), "--iterations", str(args.iterations),
              "--batch_size", str(args.batch_size), "--seed", str(args.seed)]
    if args.data_dir:
        common += ["--data_dir", args.data_dir]
    rows = []
    for name, n, argv in cases:
        row = {"data": name, "samples": n, "data_gb": n * 784 * 4 / 1024**3,
               **_measured_run([*argv, *common], out / "runs" / name.replace(" ", "_").replace(",", ""))}
        rows.append(row)
        write_csv(pd.DataFrame(rows), out / "memory.csv")
        print(f"{name:>22}: {n:>9,} samples ({row['data_gb']:.2f} GiB float32), peak RSS "
              f"{row['peak_rss_gb']:.2f} GiB, {row['seconds']:.0f} s, purity {row['purity']:.3f}", flush=True)
    print(f"\nwritten: {out}/memory.csv")


def explorer_table(args, out: Path, sizes=((8, 8), (20, 20), (40, 40)), repeats: int = 20):
    """Write the explorer page of maps of every size on all of Fashion-MNIST and
    time it in headless Chromium: page size, writing, loading until drawn, one
    redraw of each layer, a click listing a unit's members (medians).

    The maps are Kerasoms with prototypes drawn from the images, not trained:
    what a page costs depends on the sizes of the map and the data only.
    """
    from desom.explorer import chromium_driver, open_page, write_explorer
    from desom.models import Kerasom

    (x, y), _ = load_data("fmnist", data_dir=args.data_dir)
    rng = np.random.default_rng(args.seed)
    driver = chromium_driver()
    rows = []
    try:
        for size in sizes:
            som = Kerasom(input_dim=x.shape[1], map_size=size)
            som.init_prototypes(x, method="random", seed=args.seed)
            path = out / f"explorer_{size[0]}x{size[1]}.html"
            t = time.perf_counter()
            write_explorer(path, som, x, y, image_shape=(28, 28), class_names=CLASS_NAMES["fmnist"],
                           title=f"fmnist {size[0]}x{size[1]}")
            written = time.perf_counter() - t
            ready = []
            for _ in range(3):
                open_page(driver, path, timeout=300)
                ready.append(driver.execute_script("return explorer.readyMs"))
            layers = driver.execute_script("return explorer.layers")
            units = rng.integers(0, som.n_units, repeats).tolist()
            draw, select = [], []
            for k in range(repeats):
                draw.append(driver.execute_script(
                    "explorer.state.layer = arguments[0]; explorer.draw(); return explorer.drawMs",
                    layers[k % len(layers)]))
                select.append(driver.execute_script(
                    "const t = performance.now(); explorer.select(arguments[0]); "
                    "return performance.now() - t", units[k]))
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            row = {"map": f"{size[0]}x{size[1]}", "samples": len(x), "page_mb": path.stat().st_size / 2**20,
                   "write_seconds": written, "load_ms": float(np.median(ready)),
                   "redraw_ms": float(np.median(draw)), "click_ms": float(np.median(select)),
                   "browser_errors": len(severe)}
            rows.append(row)
            write_csv(pd.DataFrame(rows), out / "explorer.csv")
            print(f"{row['map']:>6}: page {row['page_mb']:.1f} MB written in {written:.1f} s; in Chromium: "
                  f"loaded and drawn {row['load_ms']:.0f} ms, redraw {row['redraw_ms']:.1f} ms, click "
                  f"{row['click_ms']:.1f} ms (medians); {len(severe)} errors", flush=True)
    finally:
        driver.quit()
    print(f"\nwritten: {out}/explorer.csv")


def speed_cases():
    """The SOM models of the speed table, at the paper's sizes (8x8 map, batch 256)."""
    import keras

    from common.speed import SpeedCase, random_data
    from desom.models import SOMTask

    def case(name, build, shape):
        def make():
            keras.utils.set_random_seed(0)
            x = random_data(shape)
            model = build()
            model.init_prototypes(x)
            return SOMTask(model, gamma=0.001, Tmax=10.0, Tmin=0.1, decay="exponential",
                           neighborhood="gaussian", som_iterations=10000, update_interval=1), x
        return SpeedCase(name, make)

    from desom.models import DESOM, ConvDESOM, Kerasom

    return [case("DESOM (dense, 784)", lambda: DESOM(784, (8, 8)), (784,)),
            case("ConvDESOM (28x28)", lambda: ConvDESOM((28, 28, 1), (8, 8)), (28, 28, 1)),
            case("Kerasom (784)", lambda: Kerasom(784, (8, 8)), (784,))]


def _one_run(args, name, model_name, x, y, seed, strategy, run_dir):
    import keras

    from desom.models import DESOM, ConvDESOM, Kerasom

    keras.utils.set_random_seed(seed)
    if model_name == "kmeans":
        from sklearn.cluster import KMeans

        t0 = time.perf_counter()
        flat = x.reshape(len(x), -1)
        km = KMeans(n_clusters=args.map_size[0] * args.map_size[1], n_init=3, random_state=seed)
        pred = km.fit_predict(flat)
        seconds = time.perf_counter() - t0
        out = evaluate_clustering(pred, y, features=flat, seed=seed)
        if km.n_clusters > len(np.unique(y)):  # as the maps are scored: not the one-to-one accuracy
            del out["acc"]
            out["acc_kmeans"] = prototype_kmeans_accuracy(y, pred, km.cluster_centers_, seed)
        out.update(quantization_error=float(km.transform(flat).min(axis=1).mean()), fit_seconds=seconds)
        return out
    with strategy.scope():
        if model_name == "convdesom":
            model = ConvDESOM(x.shape[1:], args.map_size, latent_dim=args.latent_dim)
        elif model_name == "som":
            model = Kerasom(int(np.prod(x.shape[1:])), args.map_size)
        else:
            model = DESOM(x.shape[1], args.map_size, latent_dim=args.latent_dim)
    t0 = time.perf_counter()
    if args.pretrain_epochs:
        model.pretrain(x, args.pretrain_epochs, batch_size=args.batch_size, seed=seed, verbose=args.verbose,
                       strategy=strategy)
    model.init_prototypes(x, method=args.som_init, seed=seed)
    result = model.fit(x, y, iterations=args.iterations, batch_size=args.batch_size, gamma=args.gamma,
                       Tmax=args.Tmax, Tmin=args.Tmin, eval_interval=args.iterations, save_dir=run_dir,
                       seed=seed, verbose=args.verbose, strategy=strategy)
    seconds = time.perf_counter() - t0
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # keep the log, not the weights
    out = model.evaluate_map(x, y, seed=seed)
    out.update(fit_seconds=seconds, iterations_per_second=result.iterations_per_second)
    if args.fig_dir and name in IMAGE_SHAPES and not (Path(args.fig_dir) / f"desom_map_{name}.png").exists():
        from common.plots import prototype_grid

        rows, cols = args.map_size
        prototype_grid(model.decode_prototypes().reshape(rows * cols, *IMAGE_SHAPES[name]), args.map_size,
                       Path(args.fig_dir) / f"desom_map_{name}.png",
                       title=f"{model_name.upper()} on {name}, {rows}x{cols} map (seed {seed})")
    return out


def _report(row):
    print(f"{row['dataset']} {row['model']} seed {row['seed']}: purity {row['purity']:.4f}, "
          f"NMI {row['nmi']:.4f} (geometric {row['nmi_geometric']:.4f}), {row['fit_seconds']:.1f} s",
          flush=True)


def parallel_runs(args, out: Path) -> list:
    """Each seed in its own ``desom.benchmark`` process, ``args.jobs`` at once
    (:func:`common.processes.run_seeds`), writing ``<out>/seed<N>/`` (runs.csv,
    the runs' logs, log.txt); the rows come back in the order of a run in
    one process (data set, model, seed). Only the first seed draws the
    ``--fig_dir`` maps."""
    flags = command_line(parser(), args, skip=("runs", "seed", "out", "jobs", "fig_dir"))
    figs = ["--fig_dir", args.fig_dir] if args.fig_dir else []
    rows = []
    for seed_rows in run_seeds("desom.benchmark", flags, range(args.seed, args.seed + args.runs), out,
                               args.jobs, first_only=figs, settings=partial(parsed_settings, parser())):
        for row in seed_rows:
            _report(row)
        rows += seed_rows
        rows.sort(key=lambda r: (args.datasets.index(r["dataset"]), args.models.index(r["model"]), r["seed"]))
        write_csv(pd.DataFrame(rows), out / "runs.csv")
    return rows


def _main(argv=None):
    args = parser().parse_args(argv)
    from desom.layers import check_map, temperatures

    check_map(args.map_size, flag="--map_size")
    args.Tmax, args.Tmin = temperatures(args.map_size, args.Tmax, args.Tmin, args.schedule)
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf = quiet_tensorflow()
    if args.memory:
        memory_table(args, out)
        return 0
    if args.explorer:
        explorer_table(args, out)
        return 0
    if args.speed:
        from common.speed import measure

        measure(speed_cases(), runs=args.speed_runs, out=out / "speed_desom.csv")
        print(f"\nwritten: {out}/speed_desom.csv")
        return 0
    if args.jobs > 1 and args.runs > 1:
        rows = parallel_runs(args, out)
        write_summary(rows, out / "summary.csv", ["dataset", "model"], COLUMNS)
        print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
        return 0
    from common.runtime import make_strategy, set_mixed_precision

    set_mixed_precision(args.mixed_precision)
    strategy = make_strategy(args.strategy)
    print(f"TensorFlow {tf.__version__}, {strategy.num_replicas_in_sync} replica(s), "
          f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPU cores; "
          f"map {args.map_size[0]}x{args.map_size[1]}, latent {args.latent_dim}, "
          f"{args.iterations} iterations, batch {args.batch_size}, gamma {args.gamma}, T {args.Tmax:g} -> "
          f"{args.Tmin:g} ({args.schedule} schedule)")
    rows = []
    for name in args.datasets:
        try:
            (x, y), _ = load_data(name, flatten=False, data_dir=args.data_dir)
        except DataError as e:
            print(f"skipping {name}: {e}")
            continue
        for model_name in args.models:
            if model_name == "convdesom" and x.ndim != 4:
                print(f"skipping convdesom on {name}: not image data")
                continue
            data = x if model_name == "convdesom" else x.reshape(len(x), -1)
            for r in range(args.runs):
                seed = args.seed + r
                run_dir = out / f"{name}_{model_name}_seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                metrics = _one_run(args, name, model_name, data, y, seed, strategy, run_dir)
                row = {"dataset": name, "model": model_name, "seed": seed, **metrics,
                       "peak_rss_gb": round(peak_rss_gb(), 2)}
                rows.append(row)
                write_csv(pd.DataFrame(rows), out / "runs.csv")
                _report(row)
    if not rows:
        raise UsageError("no data set could be loaded; see the notes above")
    write_summary(rows, out / "summary.csv", ["dataset", "model"], COLUMNS)
    print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
    return 0


def main(argv=None):
    run(_main, argv, prog="desom-benchmark")


if __name__ == "__main__":
    sys.exit(main())
