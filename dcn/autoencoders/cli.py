"""bin/ae: an autoencoder (AE, semi-supervised AE, VAE, CVAE), two-stage clustering of its codes
(k-means, DBSCAN, SOM) and images generated from the clusters.

    bin/ae --model vae --dataset fmnist                  # train, cluster, draw
    bin/ae --model ae --hidden 500 500 2000 --latent_dim 10 --cluster kmeans som
    bin/ae predict --model results/fmnist_vae/model.keras --dataset fmnist   # codes and clusters, CSV
    bin/ae generate --model results/fmnist_vae/model.keras --cluster 3 --out cluster3.png
    bin/ae generate --model results/fmnist_cvae/model.keras --label 7 --out sevens.png
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.cli import SEED_BOUNDS, ArgumentParser, add_data_arguments, dispatch, run
from common.command import RunData, TrainingCommand
from common.data import Scaler, load_data, value_range
from common.errors import UsageError
from common.predict import add_predict_arguments, model_and_samples, write_predictions
from common.results import write_csv
from common.runtime import quiet_tensorflow
from dcn.autoencoders.models import MODELS
from dcn.autoencoders.twostage import METHODS

#: (latent_dim, hidden) of each model when not given
DEFAULTS = {"ae": (32, (128,)), "semisupervised": (32, (128,)), "vae": (8, (400, 128)),
            "cvae": (8, (400, 128))}


class AeCommand(TrainingCommand):
    prog = "ae"
    resume_may_change = ("epochs",)  # more epochs at the same learning rate
    description = ("Train an autoencoder (ae, semi-supervised, vae or cvae), cluster its codes with k-means, "
                   "DBSCAN and a SOM (scores in clustering.csv), and draw reconstructions, images generated "
                   "from each cluster and t-SNE/PCA maps of the codes. `ae generate --help` draws new "
                   "images from a saved model.")
    seed_help = "seed of weights, data order, labelled subset, clustering and pictures"
    outputs = ("model.keras", "log.csv", "clustering.csv", "results.json", "predictions.csv",
               "reconstructions.png", "generated_from_clusters.png", "tsne.png", "pca.png", "kdistance.png",
               "manifold.png", "training.png", "architecture.png", "architecture.txt")

    def add_arguments(self, p):
        add_data_arguments(p, required=False, what="a data set, values in [0, 1]", scaling=True)
        p.add_argument("--model", choices=MODELS, default="ae",
                       help="ae: dense autoencoder; semisupervised: + a classifier trained on "
                       "--labeled_fraction of the labels; vae: variational; cvae: conditional VAE (uses "
                       "every label)")
        p.add_argument("--latent_dim", type=int, bounds="[1, inf)",
                       help="size of the code (32 ae/semisupervised, 8 vae/cvae)")
        p.add_argument("--hidden", type=int, nargs="+", bounds="[1, inf)", metavar="UNITS",
                       help="encoder layer sizes, mirrored by the decoder (128 ae/semisupervised; 400 128 "
                       "vae/cvae; DESOM/DEC: 500 500 2000 with --latent_dim 10)")
        p.add_argument("--epochs", type=float, default=20, bounds="(0, inf)", help="training epochs")
        p.add_argument("--batch_size", type=int, default=128, bounds="[1, inf)", help="global batch size")
        p.add_argument("--lr", type=float, default=0.001, bounds="(0, inf)", help="Adam learning rate")
        p.add_argument("--kl_weight", type=float, default=1.0, bounds="[0, inf)",
                       help="vae/cvae: weight of the KL term (beta of a beta-VAE)")
        p.add_argument("--recon_weight", type=float, default=1.0, bounds="[0, inf)",
                       help="semisupervised: weight of the reconstruction error")
        p.add_argument("--class_weight", type=float, default=1.0, bounds="[0, inf)",
                       help="semisupervised: weight of the classifier's cross-entropy")
        p.rename("--alpha", "--recon_weight")
        p.rename("--beta", "--kl_weight", "--class_weight", note="vae/cvae: --kl_weight; semisupervised: "
                 "--class_weight")
        p.add_argument("--dropout", type=float, default=0.2, bounds="[0, 1)",
                       help="vae/cvae: dropout after each encoder layer")
        p.add_argument("--labeled_fraction", type=float, default=0.01, bounds="(0, 1]",
                       help="semisupervised: share of the labels used in training (stratified, fixed by "
                       "--seed)")
        p.add_argument("--cluster", nargs="+", choices=(*METHODS, "all"), default=["all"],
                       help="clusterings of the codes to run and score: UMAP to --n_clusters dimensions + a "
                       "Gaussian mixture (umap_gmm, N2D), k-means, DBSCAN, a SOM; all: every one, in that "
                       "order; the first is the program's answer (predictions.csv's cluster column)")
        p.add_argument("--n_clusters", type=int, bounds="[2, inf)",
                       help="k-means clusters (default: the number of classes)")
        p.add_argument("--eps", type=float, bounds="(0, inf)",
                       help="DBSCAN radius (default: the knee of the k-distance curve, reported)")
        p.add_argument("--min_samples", type=int, default=10, bounds="[1, inf)",
                       help="DBSCAN: neighbours of a core point")
        p.add_argument("--dbscan_samples", type=int, default=10000, bounds="[1, inf)",
                       help="DBSCAN runs on at most this many codes (fixed-seed sample)")
        p.add_argument("--som_map_size", type=int, nargs=2, default=[8, 8], bounds="[1, inf)",
                       metavar=("ROWS", "COLS"), help="the SOM (Kerasom) trained on the codes")
        p.add_argument("--som_epochs", type=float, default=20, bounds="(0, inf)",
                       help="epochs of that SOM on the codes")
        p.add_argument("--tsne_samples", type=int, default=2000, bounds="[2, inf)",
                       help="codes drawn in tsne.png and pca.png")
        p.add_argument("--save_dir", help="output folder (default: results/<data>_<model>)")

    def check(self, args):
        from desom.layers import check_map

        check_map(args.som_map_size, flag="--som_map_size")
        args.cluster = list(METHODS) if "all" in args.cluster else list(dict.fromkeys(args.cluster))
        latent, hidden = DEFAULTS[args.model]
        args.latent_dim = args.latent_dim or latent
        args.hidden = list(args.hidden or hidden)

    def load(self, args) -> RunData:
        source = args.data or args.dataset or "digits"
        (x, y), _ = load_data(source, flatten=False, data_dir=args.data_dir, label_col=args.label_col)
        scaler = Scaler(args.scaling).fit(x.reshape(len(x), -1))
        x = scaler.apply(x)
        low, high = value_range(x)
        if low < 0 or high > 1:
            raise UsageError(f"bin/ae models values in [0, 1] (sigmoid and Bernoulli outputs); {source} "
                             f"holds {low:.3g}..{high:.3g}: give --scaling minmax, or rescale it to [0, 1] "
                             "first")
        classes = None
        if y is not None:
            classes, y = np.unique(y, return_inverse=True)
        if args.model in ("semisupervised", "cvae") and y is None:
            raise UsageError(f"--model {args.model} trains with labels; {source} has none (give --label_col, "
                             f"or use --model ae or vae)")
        if args.n_clusters is None:
            if classes is None:
                raise UsageError("give --n_clusters (the data have no labels to count classes from)")
            args.n_clusters = len(classes)
        if args.n_clusters > len(x):
            raise UsageError(f"--n_clusters {args.n_clusters} is more than the {len(x)} samples")
        name = Path(source).stem if args.data else source
        return RunData(x, y, name=name, description=f"{source}: {len(x)} samples of shape {x.shape[1:]}"
                       + (f", {len(classes)} classes" if classes is not None else ""),
                       extra={"classes": None if classes is None else [str(c) for c in classes],
                              "scaler": scaler})

    def default_save_dir(self, args, data):
        return f"results/{data.name}_{args.model}"

    def describe(self, run):
        a, m = run.args, run.model
        return (f"{type(m).__name__} ({'-'.join(map(str, [math.prod(m.sample_shape), *a.hidden]))}"
                f"-{a.latent_dim} code)")

    def build(self, run):
        import keras

        from dcn.autoencoders.models import build

        a = run.args
        run.optimizers = {"train": keras.optimizers.Adam(a.lr)}
        n_classes = len(run.data.extra["classes"] or [])
        return build(a.model, run.data.x.shape[1:], n_classes, latent_dim=a.latent_dim, hidden=a.hidden,
                     beta=a.class_weight if a.model == "semisupervised" else a.kl_weight,
                     alpha=a.recon_weight, n_clusters=a.n_clusters, dropout=a.dropout)

    def planned_steps(self, run):
        return [("train", run.epoch_steps(run.args.epochs))]

    def train(self, run):
        from sklearn.cluster import KMeans

        from dcn.autoencoders.models import labeled_subset
        from dcn.autoencoders.twostage import cluster_codes

        a, x, y, model = run.args, run.data.x, run.data.y, run.model
        labels = None
        if a.model == "semisupervised":
            labels = labeled_subset(y, a.labeled_fraction, a.seed)
        elif a.model == "cvae":
            labels = y
        run.data.extra["labels"] = labels
        run.record("train", model.fit(x, labels, epochs=a.epochs, y_eval=y, optimizer=run.optimizers["train"],
                                      **run.loop_options()))
        codes = model.embed(x, y if model.needs_labels else None)
        stages = cluster_codes(codes, y, methods=a.cluster, n_clusters=a.n_clusters, eps=a.eps,
                               min_samples=a.min_samples, dbscan_samples=a.dbscan_samples,
                               som_map_size=a.som_map_size, som_epochs=a.som_epochs, seed=a.seed,
                               verbose=0)
        kmeans = stages.assignments.get("k-means")
        if kmeans is None:  # generation needs the k-means clusters even when not scored
            kmeans = KMeans(a.n_clusters, n_init=10, random_state=a.seed).fit_predict(codes)
        model.fit_clusters(codes, kmeans)
        run.data.extra.update(codes=codes, stages=stages, kmeans=kmeans)

    def results(self, run):
        from dcn.autoencoders.twostage import text

        a, d, model = run.args, run.data, run.model
        stages = d.extra["stages"]
        write_csv(stages.table, run.save_dir / "clustering.csv")
        if a.verbose:
            print(f"\ntwo-stage clustering of the {model.latent_dim}-d codes of all {len(d.x)} samples:")
            print(text(stages.table))
            if stages.dbscan:
                db = stages.dbscan
                print(f"DBSCAN: eps {db['eps']:.4g} ({db['eps_from']}), min_samples {db['min_samples']}: "
                      f"{db['clusters']} clusters, {db['noise']} of {db['samples']} samples noise")
        out = {"n_samples": len(d.x), "model": a.model, "latent_dim": model.latent_dim,
               "classes": d.extra["classes"],  # the label of class index i (predict maps labels by it)
               "iterations": run.phases["train"].iterations,
               "clustering": stages.table.to_dict(orient="records")}
        if stages.dbscan:
            out["dbscan"] = {k: v for k, v in stages.dbscan.items() if k != "curve"}
        labels = d.extra["labels"]
        if a.model == "semisupervised" and d.y is not None:
            unlabeled = labels < 0
            predicted = model.predict_classes(d.x[unlabeled])
            out["classifier"] = {"labelled_samples": int(np.sum(~unlabeled)),
                                 "accuracy_on_unlabelled": float(np.mean(predicted == d.y[unlabeled]))}
        return out

    def predictions(self, run):
        """``cluster``: the first clustering of ``--cluster``; a column per clustering (``dbscan``: -1 for
        noise, empty for the samples it did not see; ``som_group``: the k-means group of the unit)."""
        import pandas as pd

        from common.command import prediction_frame
        from dcn.autoencoders.twostage import method_name

        a, d, stages = run.args, run.data, run.data.extra["stages"]
        columns = {}
        for method in a.cluster:
            name = method_name(method, a.som_map_size)
            column = pd.Series(pd.NA, index=range(len(d.x)), dtype="Int64")
            column.iloc[stages.samples[name]] = stages.assignments[name]
            columns[method] = column.to_numpy()
            if name in stages.groups:  # a map: the k-means group of each sample's unit too
                columns[f"{method}_group"] = stages.groups[name][stages.assignments[name]]
        first = columns[a.cluster[0]]
        classes = d.extra["classes"]
        return prediction_frame("train", first, labels=d.y, names=classes, **columns)

    def pictures(self, run, results):
        import pandas as pd

        from common import plots

        a, d, model = run.args, run.data, run.model
        save, rng = run.save_dir, np.random.default_rng(a.seed)
        y, stages, codes = d.y, d.extra["stages"], d.extra["codes"]
        condition = y if model.needs_labels else None
        if d.x.ndim == 4:
            pick = np.sort(rng.choice(len(d.x), size=min(10, len(d.x)), replace=False))
            rec = model.reconstruct(d.x[pick], None if condition is None else condition[pick])
            plots.image_rows([("original", d.x[pick]), ("reconstruction", rec)], save / "reconstructions.png",
                             title=f"{type(model).__name__}: {len(pick)} samples and their reconstructions")
            plots.image_rows(_generated_rows(model, d.extra["classes"], a.seed),
                             save / "generated_from_clusters.png", title=_generated_title(model))
            if model.latent_dim == 2:
                plots.prototype_grid(_manifold(model, codes), (12, 12), save / "manifold.png",
                                     title="decoded codes on a grid over the latent plane")
        # t-SNE / PCA of the codes, on samples DBSCAN also saw
        pool = stages.samples.get("DBSCAN", np.arange(len(codes)))
        at = np.sort(rng.choice(len(pool), size=min(a.tsne_samples, len(pool)), replace=False))
        idx = pool[at]
        panels = []
        if y is not None:
            panels.append(("true classes", y[idx]))
        panels.append(("k-means", d.extra["kmeans"][idx]))
        if "DBSCAN" in stages.assignments:
            panels.append(("DBSCAN (-1: noise)", stages.assignments["DBSCAN"][at]))
        for kind, label in (("tsne", "t-SNE"), ("pca", "PCA")):
            xy = plots.project_2d(codes[idx], kind, a.seed)
            plots.scatter_panels([(f"codes, coloured by {name}", xy, lab) for name, lab in panels],
                                 save / f"{kind}.png",
                                 title=f"{label} of {len(idx)} codes ({model.latent_dim}-d)")
        if stages.dbscan.get("curve") is not None:
            _kdistance_plot(stages.dbscan, save / "kdistance.png")
        log = save / "log.csv"
        if log.is_file():
            plots.training_curves(pd.read_csv(log), save / "training.png",
                                  columns=("loss", "reconstruction", "bce", "kl", "cross_entropy",
                                           "kmeans_acc", "classifier_acc"))

    def summary(self, run, results):
        line = f"{results['iterations']} iterations"
        first = results["clustering"][0]  # the program's answer: the first of --cluster
        acc = first.get("acc") if first.get("acc") is not None else first.get("acc_kmeans")
        if acc is not None and not (isinstance(acc, float) and math.isnan(acc)):
            line += f"; {first['method']} of the codes: accuracy {acc:.4f}, NMI {first['nmi']:.4f}"
        if "classifier" in results:
            accuracy = results["classifier"]["accuracy_on_unlabelled"]
            line += f"; classifier on the unlabelled samples: accuracy {accuracy:.4f}"
        return line


def _generated_title(model) -> str:
    if model.needs_labels:
        return "generated per class: codes from the prior, decoded with the label"
    return ("generated per k-means cluster: the decoded centre, then samples of a Gaussian fitted to the "
            "cluster's codes")


def _generated_rows(model, classes, seed: int, per_row: int = 8):
    """One row per class (CVAE) or per cluster: the decoded centre and samples around it."""
    import keras

    rows = []
    if model.needs_labels:
        for c in range(model.n_classes):
            name = classes[c] if classes else str(c)
            rows.append((f"class {name}", model.generate(per_row, label=c, seed=seed + c)))
        return rows
    centres = keras.ops.convert_to_numpy(model.cluster_means)
    for k in range(model.n_clusters):
        images = np.concatenate([model.decode(centres[k:k + 1]), model.generate(per_row - 1, cluster=k,
                                                                               seed=seed + k)])
        rows.append((f"cluster {k}", images))
    return rows


def _manifold(model, codes, n: int = 12):
    """Decoded codes on an n x n grid over a 2-d latent plane: Gaussian
    quantiles for variational models, the codes' 2-98 % range otherwise."""
    from scipy.stats import norm

    if hasattr(model, "noise"):  # VAE: the prior's quantiles
        axis = [norm.ppf(np.linspace(0.05, 0.95, n))] * 2
    else:
        lo, hi = np.percentile(codes, [2, 98], axis=0)
        axis = [np.linspace(lo[i], hi[i], n) for i in range(2)]
    grid = np.array([[a, b] for b in axis[1][::-1] for a in axis[0]], np.float32)
    labels = np.zeros(len(grid), int) if model.needs_labels else None
    return model.decode(grid, labels)


def _kdistance_plot(info, path):
    import matplotlib.pyplot as plt

    from common import plots

    curve = info["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.arange(len(curve)), curve)
    ax.axhline(info["eps"], color="tab:red", linestyle="--", label=f"eps = {info['eps']:.3g} (knee)")
    ax.set_xlabel("codes, sorted")
    ax.set_ylabel(f"distance to neighbour {info['min_samples']} (itself counted)")
    ax.set_title(f"DBSCAN: {info['clusters']} clusters, {info['noise']} of {info['samples']} noise",
                 fontsize=9)
    ax.legend(frameon=False)
    fig.tight_layout()
    plots.save_figure(fig, path, bbox_inches=None)


# --------------------------------------------------------------------------- #
def generate_parser():
    p = ArgumentParser(prog="ae generate",
                       description="Draw new samples from a model written by bin/ae: from a k-means cluster "
                       "(--cluster), a class (--label, CVAE), or with neither from the prior (VAE), the "
                       "mixture of clusters (AE) or every class (CVAE).")
    p.add_argument("--model", required=True, metavar="MODEL.keras", help="a model written by bin/ae")
    p.add_argument("--cluster", type=int, bounds="[0, inf)",
                   help="the k-means cluster to draw from (ae, semisupervised, vae)")
    p.add_argument("--label", type=int, bounds="[0, inf)", help="the class to draw (cvae)")
    p.add_argument("--n", type=int, default=16, bounds="[1, inf)",
                   help="samples to draw (per class for a CVAE without --label)")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="seed of the draws")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="a .png grid (image models) or a .csv of the samples (any model)")
    return p


def generate_main(argv):
    args = generate_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".csv"):
        raise UsageError(f"--out must end in .png or .csv, got {out.name}")
    quiet_tensorflow()
    from common import plots
    from dcn.autoencoders.models import load_model

    model = load_model(args.model)
    if args.label is not None and not model.needs_labels:
        raise UsageError(f"{args.model} is a {type(model).__name__}, not conditioned on labels: use "
                         f"--cluster 0..{model.n_clusters - 1}")
    if model.needs_labels and args.cluster is not None:
        raise UsageError(f"{args.model} is a {type(model).__name__}: it draws a class, not a cluster; use "
                         f"--label 0..{model.n_classes - 1}, or neither for every class")
    if model.needs_labels and args.label is None:
        rows = [(f"class {c}", model.generate(args.n, label=c, seed=args.seed + c))
                for c in range(model.n_classes)]
    else:
        images = model.generate(args.n, cluster=args.cluster, label=args.label, seed=args.seed)
        what = (f"cluster {args.cluster}" if args.cluster is not None else
                f"class {args.label}" if args.label is not None else "samples")
        rows = [(what if i == 0 else "", images[i:i + 8]) for i in range(0, len(images), 8)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.concat([pd.DataFrame(imgs.reshape(len(imgs), -1)).assign(row=name) for name, imgs in rows])
        write_csv(frame, out)
    else:
        if len(model.sample_shape) != 3:
            raise UsageError(f"{args.model} models vectors, not images: use --out FILE.csv")
        plots.image_rows(rows, out, title=f"{type(model).__name__} from {args.model}")
    print(f"{sum(len(imgs) for _, imgs in rows)} samples written to {out}")
    return 0


def predict_parser():
    p = ArgumentParser(prog="ae predict",
                       description="Codes of samples under a model written by bin/ae; one CSV row per "
                       "sample: cluster (the k-means cluster of the code that `ae generate --cluster` draws "
                       "from: the nearest cluster mean), distance (to that mean), reconstruction_error (mean "
                       "squared), class (semi-supervised models: the classifier's), code_1..code_d. The "
                       "run's own predictions.csv holds its clusterings of the training samples (UMAP + GMM "
                       "first), which are not kept in the model.")
    add_predict_arguments(p, "bin/ae")
    return p


def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model, samples = model_and_samples(args, "dcn.autoencoders.models")
    classes = _trained_classes(args.model)
    y = None
    if model.needs_labels:
        if samples.labels is None:
            raise UsageError(f"{args.model} is a {type(model).__name__}: it encodes a sample with its label; "
                             "give data with labels")
        y = _class_indices(samples.labels, classes, args.model)
    x = np.asarray(samples.x, np.float32)
    codes = model.embed(x, y)
    columns = {}
    if model.has_clusters:
        means = np.asarray(model.cluster_means.numpy(), np.float64)
        d2 = ((codes[:, None, :] - means[None]) ** 2).sum(axis=2)
        columns["cluster"] = d2.argmin(axis=1)
        columns["distance"] = np.sqrt(d2.min(axis=1)).round(6)
    error = (model.decode(codes, y).reshape(len(x), -1) - x.reshape(len(x), -1)) ** 2
    columns["reconstruction_error"] = error.mean(axis=1).round(6)
    if hasattr(model, "predict_classes") and not model.needs_labels:
        predicted = model.predict_classes(x)
        columns["class"] = predicted if classes is None else np.asarray(classes, dtype=object)[predicted]
    columns.update({f"code_{j + 1}": codes[:, j] for j in range(codes.shape[1])})
    write_predictions(samples, columns, args)
    return 0


def _trained_classes(model_path) -> list | None:
    """The labels of the class indices the model was trained with (its
    run's results.json; None when not recorded)."""
    import json

    found = Path(model_path).parent / "results.json"
    try:
        return json.loads(found.read_text()).get("classes") if found.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _class_indices(labels, classes, model_path) -> np.ndarray:
    """``labels`` as the class indices training used (``np.unique`` of its
    labels, recorded as ``classes``); without the record, numbered as
    training numbered its own."""
    values = np.asarray(labels)
    if classes is None:
        return np.unique(values, return_inverse=True)[1]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise UsageError(f"labels {', '.join(unknown[:5])} were not among the classes {model_path} was "
                         f"trained with ({', '.join(classes[:10])})")
    return np.array([index[str(v)] for v in values])


def train_main(argv):
    return AeCommand().main(argv)


def main(argv=None):
    run(dispatch({"train": train_main, "predict": predict_main, "generate": generate_main}, "train"), argv,
        prog="ae")


if __name__ == "__main__":
    main()
