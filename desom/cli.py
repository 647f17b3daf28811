"""bin/desom: train a DESOM / ConvDESOM / Kerasom map, predict with one, or explore it.

    bin/desom --dataset fmnist --map_size 20 20          # train
    bin/desom predict --model DIR/model.keras --dataset fmnist
    bin/desom explore --model DIR/model.keras --dataset fmnist
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, add_data_arguments, dispatch, run
from common.command import RunData, TrainingCommand
from common.data import CLASS_NAMES, Scaler, feature_names, label_names, load_data
from common.errors import UsageError
from common.predict import (
    add_predict_arguments,
    model_and_samples,
    saved_scaler,
    trained_on,
    write_predictions,
)
from common.runtime import quiet_tensorflow

MODELS = ("desom", "convdesom", "som")
#: printed and copied to the top of results.json (``acc``: maps with at most one unit per class;
#: ``acc_kmeans``: larger maps, see common.metrics.prototype_kmeans_accuracy)
RESULT_KEYS = ("purity", "nmi", "ari", "acc", "acc_kmeans", "quantization_error", "topographic_error")


def _data_arguments(p, required: bool, scaling: bool = False):
    add_data_arguments(p, required, what="a data set of the DESOM papers", scaling=scaling)


def add_temperature_arguments(p, what: str = ""):
    """``--Tmax``, ``--Tmin`` and ``--schedule``, declared here once for every
    program with a SOM (``bin/desom``, ``bin/desom-benchmark``, ``bin/rswnet
    --head som``); :func:`desom.layers.temperatures` resolves their defaults."""
    p.add_argument("--Tmax", type=float, default=None, bounds="(0, inf)",
                   help=f"{what}initial neighbourhood radius (default: 10, the paper's, for maps up to "
                   "20x20; half the larger side beyond)")
    p.add_argument("--Tmin", type=float, default=None, bounds="(0, inf)",
                   help=f"{what}final neighbourhood radius (default: the --schedule's)")
    # the names of desom.layers.SCHEDULES (not imported here: it loads Keras)
    p.add_argument("--schedule", choices=("paper", "topology"), default="paper",
                   help=f"{what}paper: T decays to --Tmin 0.1 (DESOM's); topology: to 0.7, a better "
                   "organised map (Fashion-MNIST 8x8, 5 seeds: topographic error 0.24 instead of 0.52; "
                   "purity 0.744 instead of 0.758 at 10,000 iterations, 0.759 with --iterations 30000; see "
                   "RESULTS.md). --Tmin overrides it")


def add_map_arguments(p):
    """The flags of a map and its training that ``bin/desom`` and
    ``bin/desom-benchmark`` share, declared here once with their defaults
    (the DESOM paper's): --map_size, --latent_dim, --gamma, --pretrain_epochs,
    --iterations, --batch_size, --som_init and the temperature's
    (:func:`add_temperature_arguments`)."""
    p.add_argument("--map_size", nargs=2, type=int, default=[8, 8], bounds="[1, inf)",
                   metavar=("ROWS", "COLS"), help="number of rows and columns of the map")
    p.add_argument("--latent_dim", type=int, default=10, bounds="[1, inf)",
                   help="size of the autoencoder's code (DESOM and ConvDESOM; paper: 10)")
    p.add_argument("--gamma", type=float, default=0.001, bounds="[0, inf)", help="weight of the SOM loss")
    p.add_argument("--pretrain_epochs", type=int, default=0, bounds="[0, inf)",
                   help="epochs of autoencoder pretraining before DESOM training (0: none, as in the paper)")
    p.add_argument("--iterations", type=int, default=10000, bounds="[1, inf)",
                   help="training iterations (batches)")
    p.add_argument("--batch_size", type=int, default=256, bounds="[1, inf)", help="global batch size")
    add_temperature_arguments(p)
    p.add_argument("--som_init", choices=("random", "som"), default="random",
                   help="prototypes from encoded random samples, or a short batch-SOM fit on the codes")


class DesomCommand(TrainingCommand):
    prog = "desom"
    description = ("Train a deep embedded self-organizing map (DESOM), its convolutional variant or a "
                   "plain SOM, and write the model, its log, metrics and pictures to --save_dir. Use "
                   "`desom predict --help` to apply a trained model, `desom explore --help` to look at one.")
    outputs = ("model.keras", "log.csv", "results.json", "predictions.csv", "map.png", "umatrix.png",
               "training.png", "explorer.html", "architecture.png", "architecture.txt")

    resume_may_change = ("iterations",)

    def resumed_with_changes(self, args, changed):
        # T keeps the schedule it had: extra iterations run at Tmin; a shorter run stops it where it is
        # (min(old, new) would squeeze the rest of the decay: T jumped from 7.7 to 0.25 in 1,000 iterations)
        if args.som_iterations is None:
            args.som_iterations = changed["iterations"][0]

    def add_arguments(self, p):
        _data_arguments(p, required=False, scaling=True)
        p.add_argument("--model", choices=MODELS, default="desom",
                       help="desom: dense autoencoder + SOM; convdesom: convolutional autoencoder + SOM "
                       "(images); som: a plain SOM on the inputs (Kerasom)")
        p.add_argument("--validation", action="store_true",
                       help="train on the canonical training split and also evaluate on the test split")
        p.add_argument("--ae_weights",
                       help="pretrained autoencoder weights (ae.weights.h5 from an earlier run)")
        add_map_arguments(p)
        p.add_argument("--topology", choices=("rectangular", "hexagonal"), default="rectangular",
                       help="grid of the map")
        p.add_argument("--toroidal", action="store_true", help="wrap the map around its edges")
        p.add_argument("--som_loss", choices=("desom", "normalized"), default="desom",
                       help="desom: the papers' SOM loss; normalized: divided by the batch's latent spread, "
                       "so the encoder cannot lower it by shrinking the codes (for wide latents)")
        p.add_argument("--som_iterations", type=int, default=None, bounds="[1, inf)",
                       help="iterations over which T decays from Tmax to Tmin, then holds (default: "
                       "--iterations)")
        p.add_argument("--T_update_interval", type=int, default=1, bounds="[1, inf)",
                       help="iterations between updates of the temperature T (DESOM's code: update_interval)")
        p.rename("--update_interval", "--T_update_interval")
        p.add_argument("--eval_interval", type=int, default=500, bounds="[1, inf)",
                       help="iterations between rows of log.csv (losses and map quality)")
        p.add_argument("--eval_samples", type=int, default=10000, bounds="[1, inf)",
                       help="fixed random samples on which each log row measures map quality")
        p.add_argument("--lr", type=float, default=0.001, bounds="(0, inf)", help="Adam learning rate")
        p.add_argument("--decay", choices=("exponential", "linear", "constant"), default="exponential",
                       help="how T goes from Tmax to Tmin")
        p.add_argument("--neighborhood", choices=("gaussian", "window"), default="gaussian",
                       help="neighbourhood kernel: exp(-d^2/T^2) or d <= T")
        p.add_argument("--batchnorm", action="store_true", help="batch normalisation in the autoencoder")
        p.add_argument("--save_dir", help="output folder (default: results/<data>_<model>_<rows>x<cols>)")
        p.add_argument("--no_explorer", action="store_true",
                       help="do not write explorer.html (the map explorer page; see `desom explore --help`)")

    def check(self, args):
        from desom.layers import check_map, temperatures

        check_map(args.map_size, args.topology, args.toroidal, flag="--map_size")
        args.Tmax, args.Tmin = temperatures(args.map_size, args.Tmax, args.Tmin, args.schedule)
        if args.model == "som":  # flags of the autoencoder: refused, not silently ignored
            p = self.parser()
            unused = [f"--{k}" for k in ("pretrain_epochs", "ae_weights", "latent_dim", "gamma", "batchnorm")
                      if getattr(args, k) != p.get_default(k)]
            if unused:
                raise UsageError(f"--model som has no autoencoder: drop {' '.join(unused)}")
        elif args.ae_weights and args.pretrain_epochs:
            raise UsageError(f"--ae_weights {args.ae_weights} is an autoencoder pretrained already, and "
                             f"--pretrain_epochs {args.pretrain_epochs} would not run: drop one of the two")

    def load(self, args) -> RunData:
        source, (x, y), (xv, yv) = _load(args, args.validation)
        image_shape = x.shape[1:] if x.ndim == 4 else None
        scaler = Scaler(args.scaling).fit(x.reshape(len(x), -1))
        x = _shape_for(args.model, scaler.apply(x), source)
        if xv is not None:
            xv = _shape_for(args.model, scaler.apply(xv), source)
        args.dataset = None if args.data else source
        name = Path(source).stem if args.data else source
        description = f"{source}: {len(x)} samples of shape {x.shape[1:]}" + (
            f", {len(xv)} validation samples" if xv is not None else "")
        return RunData(x, y, xv, yv, name=name, description=description,
                       extra={"scaler": scaler, "image_shape": image_shape})

    def default_save_dir(self, args, data):
        return f"results/{data.name}_{args.model}_{args.map_size[0]}x{args.map_size[1]}"

    def describe(self, run):
        a = run.args
        return (f"{a.model} with a {a.map_size[0]}x{a.map_size[1]} {a.topology} map"
                f"{' (toroidal)' if a.toroidal else ''}")

    def build(self, run):
        import keras

        run.optimizers = {"train": keras.optimizers.Adam(run.args.lr),
                          "pretrain": keras.optimizers.Adam(run.args.lr)}
        return _build_model(run.args, run.data.x)

    def train(self, run):
        a, x = run.args, run.data.x
        run.pretrain(run.model, run.optimizers["pretrain"])
        run.model.init_prototypes(x, method=a.som_init, seed=a.seed)
        run.record("train", run.model.fit(
            x, run.data.y, iterations=a.iterations, gamma=a.gamma, Tmax=a.Tmax, Tmin=a.Tmin,
            decay=a.decay, neighborhood=a.neighborhood, som_iterations=a.som_iterations,
            update_interval=a.T_update_interval, normalize=a.som_loss == "normalized",
            eval_interval=a.eval_interval, eval_samples=a.eval_samples,
            optimizer=run.optimizers["train"], **run.loop_options()))

    def planned_steps(self, run):
        return [*run.pretrain_plan(), ("train", run.args.iterations)]

    def results(self, run):
        d, model = run.data, run.model
        z = model.transform(d.x)
        run.kept["assignment"] = model.assign_codes(z)  # for the pictures and the explorer too
        out = {"data": d.name if run.args.data is None else run.args.data, "model": run.args.model,
               "n_samples": len(d.x), "iterations": run.phases["train"].iterations,
               "train": model.evaluate_map(d.x, d.y, seed=run.args.seed, codes=z,
                                           assignment=run.kept["assignment"])}
        if d.x_val is not None:
            out["validation"] = model.evaluate_map(d.x_val, d.y_val, seed=run.args.seed)
        out.update({k: out["train"][k] for k in RESULT_KEYS if k in out["train"]})
        if label_names(d.y) is not None:  # a file's own labels, numbered 0..k-1 in the metrics and maps
            out["label_names"] = label_names(d.y)
        return out

    def predictions(self, run):
        import pandas as pd

        from common.command import prediction_frame
        from common.metrics import prototype_groups

        d, model = run.data, run.model
        groups = None  # with labels: the k-means groups of the prototypes that acc_kmeans scores
        if d.y is not None:
            groups = prototype_groups(model.prototypes, len(np.unique(d.y)), run.args.seed)
        names = label_names(d.y)  # a file's own label values
        frames = [prediction_frame("train", run.kept["assignment"][0], labels=d.y, names=names,
                                   map_size=model.map_size, groups=groups)]
        if d.x_val is not None:
            bmu = model.assign_codes(model.transform(d.x_val))[0]
            frames.append(prediction_frame("test", bmu, labels=d.y_val, names=names, map_size=model.map_size,
                                           groups=groups))
        return pd.concat(frames, ignore_index=True)

    def pictures(self, run, results):
        import pandas as pd

        from common import plots

        a = run.args
        title = f"{run.data.name} {a.model} {a.map_size[0]}x{a.map_size[1]}"
        assignment = run.kept["assignment"]  # computed by results()
        _pictures(run.model, assignment[0], run.data.y, run.save_dir, run.data.extra["image_shape"], title)
        plots.training_curves(pd.read_csv(run.save_dir / "log.csv"), run.save_dir / "training.png")
        if not a.no_explorer:
            from desom.explorer import write_explorer

            write_explorer(run.save_dir / "explorer.html", run.model, run.data.x, run.data.y, title=title,
                           assignment=assignment,
                           image_shape=run.data.extra["image_shape"], scaler=run.data.extra["scaler"],
                           class_names=CLASS_NAMES.get(a.dataset), results=results,
                           feature_names=feature_names(a.data, a.label_col) if a.data else None)

    def summary(self, run, results):
        r = run.phases["train"]
        shown = ", ".join(f"{k} {results[k]:.4f}" for k in RESULT_KEYS if k in results)
        ips = r.iterations_per_second
        speed = f" ({ips:.1f} training iterations/s)" if ips else ""
        return f"{r.iterations} iterations in {r.seconds:.1f} s{speed}; {shown}"


def predict_parser():
    p = ArgumentParser(prog="desom predict",
                       description="Best-matching units of samples under a trained map; one CSV row per "
                       "sample: bmu, row, col, distance (latent) and the label when known. Samples are "
                       "scaled as in training (preprocessing.json beside the model).")
    add_predict_arguments(p, "desom (or rswnet --head som)")
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


def _majority(y, bmu, n_units):
    major = np.full(n_units, np.nan)
    for k in np.unique(bmu):
        major[k] = np.bincount(y[bmu == k]).argmax()
    return major


def _pictures(model, bmu, y, save_dir: Path, image_shape, title: str):
    """U-matrix and map pictures; ``bmu``: the samples' best-matching units."""
    from common import plots

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


def train_main(argv):
    return DesomCommand().main(argv)


# --------------------------------------------------------------------------- #
# predict
# --------------------------------------------------------------------------- #
def _model_and_data(args):
    """The model of ``--model`` and the data of ``--dataset``/``--data`` as it
    takes them (shaped, scaled as in training): ``(model, x, y, source, image_shape, scaler)``."""
    quiet_tensorflow()
    from common.networks import load_keras_model
    from desom.models import SOMModel

    model_path = Path(args.model)
    model = load_keras_model(model_path, SOMModel, "a map written by desom or rswnet --head som")
    source, (x, y), _ = _load(args, validation=False)
    image_shape = x.shape[1:] if x.ndim == 4 else None
    if len(model.sample_shape) == 1:  # dense models take flat samples, ConvDESOM and RSWNet images
        x = x.reshape(len(x), -1)
    scaler = saved_scaler(model_path)
    if scaler is not None:
        x = scaler.apply(x)
    expected = tuple(model.sample_shape)
    if tuple(x.shape[1:]) != expected:
        raise UsageError(f"{trained_on(model_path)} samples of shape {expected}; {source} has "
                         f"{tuple(x.shape[1:])}")
    return model, x, y, source, image_shape, scaler


def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model, samples = model_and_samples(args, "desom.models")  # scaled as in training
    bmu, sq, _, _ = model.assign_codes(model.transform(samples.x))
    rows, cols = model.unit_coordinates(bmu)
    note = ""
    if samples.labels is not None:
        from common.metrics import nmi, purity

        note = f" (purity {purity(samples.labels, bmu):.4f}, NMI {nmi(samples.labels, bmu):.4f})"
    write_predictions(samples, {"bmu": bmu, "row": rows, "col": cols, "distance": np.sqrt(sq)}, args, note)
    return 0


# --------------------------------------------------------------------------- #
# explore
# --------------------------------------------------------------------------- #
def explore_parser():
    from desom.explorer import THUMBNAIL_BYTES

    p = ArgumentParser(prog="desom explore",
                       description="Write the map explorer of a trained map: one self-contained HTML page "
                       "(opens from disk, offline) with the map coloured by decoded prototypes or component "
                       "planes, U-matrix, hits, majority label and purity per unit; a unit's nearest samples "
                       "on click; a search by sample row or label; the run's numbers and command.")
    p.add_argument("--model", required=True, metavar="MODEL.keras",
                   help="a model written by desom (or rswnet --head som)")
    _data_arguments(p, required=True)
    p.add_argument("--out", metavar="HTML", help="output file (default: explorer.html beside the model)")
    p.add_argument("--members", type=int, default=12, bounds="[1, 1000]",
                   help="samples listed per unit, nearest the prototype first")
    p.add_argument("--image_shape", type=int, nargs="+", metavar="H W [C]", bounds="[1, inf)",
                   help="draw flat samples (e.g. images saved as rows of a .npy) as images of this shape")
    p.add_argument("--thumbnails_mb", type=float, default=THUMBNAIL_BYTES / 2**20, bounds="(0, inf)",
                   help="megabytes of member thumbnails (or feature rows) in the page; every unit gets the "
                   "same number, at least one, the other members are listed by row and distance")
    return p


def explore_main(argv):
    args = explore_parser().parse_args(argv)
    model, x, y, source, image_shape, scaler = _model_and_data(args)
    from desom.explorer import write_explorer

    if args.image_shape:
        features = int(np.prod(x.shape[1:]))
        if len(args.image_shape) not in (2, 3) or np.prod(args.image_shape) != features:
            raise UsageError(f"--image_shape {' '.join(map(str, args.image_shape))} does not hold the "
                             f"{features} values of a sample; give H W or H W C with H*W*C = {features}")
        image_shape = tuple(args.image_shape)

    model_path = Path(args.model)
    found = model_path.parent / "results.json"
    results = json.loads(found.read_text()) if found.is_file() else None
    rows, cols = model.map_size
    title = f"{Path(source).stem if args.data else source} on {model_path.parent.name}/{model_path.name}"
    path = Path(args.out) if args.out else model_path.parent / "explorer.html"
    write_explorer(path, model, x, y, title=title, image_shape=image_shape, scaler=scaler,
                   class_names=CLASS_NAMES.get(args.dataset) if not args.data else None, results=results,
                   feature_names=feature_names(args.data, args.label_col) if args.data else None,
                   members=args.members, thumbnail_bytes=int(args.thumbnails_mb * 2**20))
    print(f"map explorer of the {rows}x{cols} map on {len(x)} samples written to {path} "
          f"({path.stat().st_size / 2**20:.1f} MB); open it in a browser")
    return 0


def main(argv=None):
    run(dispatch({"train": train_main, "predict": predict_main, "explore": explore_main}, "train"), argv,
        prog="desom")


if __name__ == "__main__":
    main()
