"""bin/desom: train a DESOM / ConvDESOM / Kerasom map, or predict with one.

    bin/desom --dataset fmnist --map_size 20 20          # train
    bin/desom predict --model DIR/model.keras --dataset fmnist
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, add_run_arguments, dispatch, resume_args, run
from common.data import KNOWN_DATASETS, SCALINGS, Scaler, load_data
from common.errors import UsageError
from common.results import write_json
from common.runtime import quiet_tensorflow

MODELS = ("desom", "convdesom", "som")
RESULT_KEYS = ("purity", "nmi", "ari", "acc", "quantization_error", "topographic_error")


def _data_arguments(p, required: bool):
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--dataset", choices=KNOWN_DATASETS,
                     help="a data set of the DESOM papers" + ("" if required else
                     " (default: digits, bundled with scikit-learn)"))
    src.add_argument("--data", metavar="FILE", help="your own data: .npz (arrays x, optional y) "
                     "or .csv (numeric columns; see --label_col)")
    p.add_argument("--data_dir", help="folder searched first for the data set's files")
    p.add_argument("--label_col", help="CSV: the column holding labels (used for evaluation only)")


def train_parser():
    p = ArgumentParser(
        prog="desom",
        description="Train a deep embedded self-organizing map (DESOM), its convolutional "
        "variant or a plain SOM, and write the model, its log, metrics and pictures to "
        "--save_dir. Use `desom predict --help` to apply a trained model.")
    _data_arguments(p, required=False)
    p.add_argument("--scaling", choices=SCALINGS, default="none",
                   help="per-feature scaling of --data files (statistics saved for predict)")
    p.add_argument("--model", choices=MODELS, default="desom",
                   help="desom: dense autoencoder + SOM; convdesom: convolutional autoencoder + SOM "
                   "(images); som: a plain SOM on the inputs (Kerasom)")
    p.add_argument("--validation", action="store_true",
                   help="train on the canonical training split and also evaluate on the test split")
    p.add_argument("--ae_weights", help="pretrained autoencoder weights (ae.weights.h5 from an earlier run)")
    p.add_argument("--map_size", nargs=2, type=int, default=[8, 8], metavar=("ROWS", "COLS"),
                   help="number of rows and columns of the map")
    p.add_argument("--topology", choices=("rectangular", "hexagonal"), default="rectangular",
                   help="grid of the map")
    p.add_argument("--toroidal", action="store_true", help="wrap the map around its edges")
    p.add_argument("--latent_dim", type=int, default=10, help="size of the latent code")
    p.add_argument("--gamma", type=float, default=0.001, help="weight of the SOM loss")
    p.add_argument("--pretrain_epochs", type=int, default=0,
                   help="epochs of autoencoder pretraining before DESOM training (0: none, as in the paper)")
    p.add_argument("--iterations", type=int, default=10000, help="training iterations (batches)")
    p.add_argument("--som_iterations", type=int, default=None,
                   help="iterations over which T decays from Tmax to Tmin (default: --iterations)")
    p.add_argument("--update_interval", type=int, default=1,
                   help="iterations between updates of the temperature T")
    p.add_argument("--eval_interval", type=int, default=500,
                   help="iterations between rows of log.csv (losses and map quality)")
    p.add_argument("--eval_samples", type=int, default=10000,
                   help="fixed random samples on which each log row measures map quality")
    p.add_argument("--save_epochs", type=int, default=5, help="epochs between checkpoints")
    p.add_argument("--batch_size", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=0.001, help="Adam learning rate")
    p.add_argument("--Tmax", type=float, default=10.0, help="initial neighbourhood radius")
    p.add_argument("--Tmin", type=float, default=0.1, help="final neighbourhood radius")
    p.add_argument("--decay", choices=("exponential", "linear", "constant"), default="exponential",
                   help="how T goes from Tmax to Tmin")
    p.add_argument("--neighborhood", choices=("gaussian", "window"), default="gaussian",
                   help="neighbourhood kernel: exp(-d^2/T^2) or d <= T")
    p.add_argument("--som_init", choices=("random", "som"), default="random",
                   help="prototypes from encoded random samples, or a short batch-SOM fit on the codes")
    p.add_argument("--batchnorm", action="store_true", help="batch normalisation in the autoencoder")
    p.add_argument("--save_dir", help="output folder (default: results/<data>_<model>_<rows>x<cols>)")
    add_run_arguments(p, "seed of weights, data order and sampling")
    return p


def predict_parser():
    p = ArgumentParser(prog="desom predict",
                       description="Best-matching units of samples under a trained model; writes one "
                       "CSV row per sample: bmu, row, col, distance (latent) and the label when known.")
    p.add_argument("--model", required=True, metavar="MODEL.keras", help="a model written by desom")
    _data_arguments(p, required=True)
    p.add_argument("--out", metavar="CSV", help="output file (default: predictions.csv beside the model)")
    return p


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _load(args, validation: bool):
    source = args.data or args.dataset or "digits"
    (x, y), (xv, yv) = load_data(source, validation=validation, flatten=False,
                                 data_dir=args.data_dir, label_col=args.label_col)
    return source, (x, y), (xv, yv)


def _shape_for(model_name: str, x: np.ndarray, source: str) -> np.ndarray:
    if model_name == "convdesom":
        if x.ndim != 4:
            raise UsageError(f"convdesom needs images; {source} holds vectors of {x.shape[1]} features "
                             "(use --model desom)")
        return x
    return x.reshape(len(x), -1)


def _scaled(scaler: Scaler, a):
    """Apply a per-feature scaler to flat vectors or images, keeping the shape."""
    return None if a is None else scaler.transform(a.reshape(len(a), -1)).reshape(a.shape)


def _majority(y, bmu, n_units):
    major = np.full(n_units, np.nan)
    for k in np.unique(bmu):
        major[k] = np.bincount(y[bmu == k]).argmax()
    return major


def _pictures(model, x, y, save_dir: Path, image_shape, title: str):
    from common import plots
    from desom.layers import pairwise_sq_distances

    bmu = pairwise_sq_distances(model.transform(x), model.prototypes).argmin(axis=1)
    hits = np.bincount(bmu, minlength=model.n_units)
    um = model.umatrix()
    size, topo = model.map_size, model.topology
    plots.map_heatmaps({"U-matrix": um}, size, save_dir / "umatrix.png", topo, title=f"{title}: U-matrix")
    if image_shape is not None:
        plots.prototype_grid(model.decode_prototypes().reshape(model.n_units, *image_shape), size,
                             save_dir / "map.png", topo, title=f"{title}: decoded prototypes")
    else:
        panels = {"U-matrix": um, "hits": hits}
        if y is not None:
            panels["majority class"] = _majority(y, bmu, model.n_units)
        plots.map_heatmaps(panels, size, save_dir / "map.png", topo, title=title)


def _build_model(args, x):
    from desom.models import DESOM, ConvDESOM, Kerasom

    common = dict(map_size=args.map_size, topology=args.topology, toroidal=args.toroidal)
    if args.model == "convdesom":
        return ConvDESOM(input_shape=x.shape[1:], latent_dim=args.latent_dim, batchnorm=args.batchnorm,
                         **common)
    if args.model == "som":
        return Kerasom(input_dim=x.shape[1], **common)
    return DESOM(input_dim=x.shape[1], latent_dim=args.latent_dim, batchnorm=args.batchnorm, **common)


def _check_args(args):
    for name in ("iterations", "batch_size", "eval_interval", "update_interval", "save_epochs",
                 "latent_dim", "eval_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.pretrain_epochs < 0:
        raise UsageError(f"--pretrain_epochs must be 0 or more, got {args.pretrain_epochs}")
    if args.som_iterations is not None and args.som_iterations < 1:
        raise UsageError(f"--som_iterations must be positive, got {args.som_iterations}")
    from desom.layers import check_map

    check_map(args.map_size, args.topology, args.toroidal)
    if args.model == "som" and (args.pretrain_epochs or args.ae_weights):
        raise UsageError("--model som has no autoencoder: drop --pretrain_epochs/--ae_weights")
    if args.data is None and args.scaling != "none":
        raise UsageError("--scaling applies to --data files; the named data sets come scaled as in DESOM")


# --------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------- #
def train_main(argv):
    args = train_parser().parse_args(argv)
    if args.resume:
        args = resume_args(args)
    _check_args(args)
    if args.verbose == 1 and not sys.stdout.isatty():
        args.verbose = 2  # a progress bar in a log file is noise
    source, (x, y), (xv, yv) = _load(args, args.validation)
    image_shape = x.shape[1:] if x.ndim == 4 else None
    scaler = Scaler(args.scaling).fit(x.reshape(len(x), -1))
    x = _shape_for(args.model, _scaled(scaler, x), source)
    if xv is not None:
        xv = _shape_for(args.model, _scaled(scaler, xv), source)
    if args.batch_size > len(x):
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(x)} training samples")
    args.dataset = None if args.data else source
    name = Path(source).stem if args.data else source
    save_dir = Path(args.save_dir or f"results/{name}_{args.model}_{args.map_size[0]}x{args.map_size[1]}")
    save_dir.mkdir(parents=True, exist_ok=True)
    args.save_dir = str(save_dir)
    if not args.resume:
        write_json(save_dir / "args.json", vars(args))
    if args.scaling != "none":
        write_json(save_dir / "preprocessing.json", scaler.to_dict())

    tf = quiet_tensorflow()
    import keras

    from common import plots
    from common.runtime import make_strategy, set_mixed_precision

    keras.utils.set_random_seed(args.seed)
    set_mixed_precision(args.mixed_precision)
    strategy = make_strategy(args.strategy)
    with strategy.scope():
        model = _build_model(args, x)
        optimizer = keras.optimizers.Adam(args.lr)
    if args.verbose:
        print(f"{source}: {len(x)} samples of shape {x.shape[1:]}"
              + (f", {len(xv)} validation samples" if xv is not None else "")
              + f"; {args.model} with a {args.map_size[0]}x{args.map_size[1]} {args.topology} map"
              + f"{' (toroidal)' if args.toroidal else ''}; {strategy.num_replicas_in_sync} replica(s)")
    plots.architecture(model.functional_view(), save_dir / "architecture.png")

    fit_kw = dict(batch_size=args.batch_size, save_dir=save_dir, resume=args.resume, seed=args.seed,
                  verbose=args.verbose, strategy=strategy, jit_compile=not args.no_jit)
    t0 = time.perf_counter()
    if args.ae_weights:
        model.load_autoencoder_weights(args.ae_weights)
    elif args.pretrain_epochs:
        with strategy.scope():
            pre_opt = keras.optimizers.Adam(args.lr)
        model.pretrain(x, args.pretrain_epochs, optimizer=pre_opt, **fit_kw)
    model.init_prototypes(x, method=args.som_init, seed=args.seed)
    steps_per_epoch = max(len(x) // args.batch_size, 1)
    result = model.fit(
        x, y, iterations=args.iterations, gamma=args.gamma, Tmax=args.Tmax, Tmin=args.Tmin,
        decay=args.decay, neighborhood=args.neighborhood, som_iterations=args.som_iterations,
        update_interval=args.update_interval, eval_interval=args.eval_interval,
        eval_samples=args.eval_samples, checkpoint_interval=args.save_epochs * steps_per_epoch,
        optimizer=optimizer, **fit_kw)
    total_seconds = time.perf_counter() - t0
    from common.networks import save_keras_model

    save_keras_model(model, save_dir / "model.keras")

    results = {"data": source, "model": args.model, "n_samples": len(x),
               "iterations": result.iterations, "fit_seconds": round(result.seconds, 2),
               "iterations_per_second": round(result.trained / result.seconds, 2) if result.seconds else None,
               "total_seconds": round(total_seconds, 2),
               "train": model.evaluate_map(x, y, seed=args.seed)}
    if xv is not None:
        results["validation"] = model.evaluate_map(xv, yv, seed=args.seed)
    results.update({k: results["train"][k] for k in RESULT_KEYS if k in results["train"]})
    results["args"] = vars(args)
    results["environment"] = {"python": platform.python_version(), "tensorflow": tf.__version__,
                              "keras": keras.__version__, "replicas": strategy.num_replicas_in_sync,
                              "devices": [d.name for d in tf.config.list_logical_devices()]}
    write_json(save_dir / "results.json", results)

    title = f"{name} {args.model} {args.map_size[0]}x{args.map_size[1]}"
    _pictures(model, x, y, save_dir, image_shape, title)
    import pandas as pd

    plots.training_curves(pd.read_csv(save_dir / "log.csv"), save_dir / "training.png")
    if args.verbose:
        shown = ", ".join(f"{k} {results[k]:.4f}" for k in RESULT_KEYS if k in results)
        print(f"{result.iterations} iterations in {result.seconds:.1f} s; {shown}")
        print(f"outputs in {save_dir}/: model.keras log.csv results.json map.png umatrix.png "
              "training.png architecture.png")
    return 0


# --------------------------------------------------------------------------- #
# predict
# --------------------------------------------------------------------------- #
def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model_path = Path(args.model)
    quiet_tensorflow()
    import pandas as pd

    from desom.layers import pairwise_sq_distances
    from desom.models import ConvDESOM, load_model

    model = load_model(model_path)
    source, (x, y), _ = _load(args, validation=False)
    x = _shape_for("convdesom" if isinstance(model, ConvDESOM) else "desom", x, source)
    prep = model_path.parent / "preprocessing.json"
    if prep.is_file():
        x = _scaled(Scaler.from_dict(json.loads(prep.read_text())), x)
    expected = tuple(model.sample_shape)
    if tuple(x.shape[1:]) != expected:
        raise UsageError(f"the model expects samples of shape {expected}, {source} has {tuple(x.shape[1:])}")
    d = pairwise_sq_distances(model.transform(x), model.prototypes)
    bmu = d.argmin(axis=1)
    rows, cols = model.unit_coordinates(bmu)
    out = pd.DataFrame({"bmu": bmu, "row": rows, "col": cols,
                        "distance": np.sqrt(d[np.arange(len(d)), bmu])})
    if y is not None:
        out["label"] = y
    path = Path(args.out) if args.out else model_path.parent / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)
    msg = f"{len(out)} predictions written to {path}"
    if y is not None:
        from common.metrics import nmi, purity

        msg += f" (purity {purity(y, bmu):.4f}, NMI {nmi(y, bmu):.4f})"
    print(msg)
    return 0


def main(argv=None):
    run(dispatch({"train": train_main, "predict": predict_main}, "train"), argv, prog="desom")


if __name__ == "__main__":
    main()
