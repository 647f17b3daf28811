"""bin/dcn: deep clustering of an image folder (DCEC) or a data set (DEC/IDEC).

    bin/dcn --data datasets/                    # train/, test/, reference/
    bin/dcn --dataset fmnist --recon_weight 0   # DEC on Fashion-MNIST vectors
    bin/dcn predict --model results/datasets_dcn/model.keras photo1.jpg photo2.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, add_scaling_argument, dispatch, run
from common.command import RunData, TrainingCommand
from common.data import KNOWN_DATASETS, Scaler, is_array_source, is_file_name, label_names, load_data
from common.errors import UsageError
from common.predict import add_predict_arguments, model_and_samples, write_predictions
from common.results import write_json
from common.training import proportional_batch_size
from dcn.dec.models import (
    CENTERS,
    MAX_EPOCHS,
    PRETRAIN_EPOCHS,
    PRETRAIN_STEPS,
    UPDATE_INTERVAL,
    pretrain_epochs,
)

#: the largest side --image_size takes from the images by default
AUTO_SIDE = 64


class DcnCommand(TrainingCommand):
    prog = "dcn"
    resume_may_change = ("max_iterations", "max_epochs")  # a longer clustering phase; no schedule
    description = ("Deep clustering network: pretrain an autoencoder, initialise cluster centres "
                   "(--centers: UMAP + GMM of the embeddings, or DEC's k-means), then train with DEC's "
                   "self-training target (KL(P||Q)) plus, with --recon_weight > 0, the reconstruction "
                   "error (IDEC/DCEC). On an image folder it names the clusters from reference/ images and "
                   "evaluates on test/. See `dcn predict --help` to apply a trained model.")
    seed_help = "seed of weights, data order and k-means"
    progress = "progress bars"
    outputs = ("model.keras", "pretrain_log.csv", "log.csv", "class_mappings.json", "results.json",
               "predictions.csv", "test_metrics.json", "test_cm.png", "architecture.png", "architecture.txt")

    def upgrade_saved_args(self, saved):
        dataset = saved.get("dataset")
        if dataset and dataset not in KNOWN_DATASETS and is_file_name(dataset) and not saved.get("data"):
            saved["data"], saved["dataset"] = dataset, None  # saved when --dataset also took files

    def resumed_with_changes(self, args, changed):
        if "max_epochs" in changed and "max_iterations" not in changed:
            args.max_iterations = None  # the saved --max_iterations would override the new budget

    def add_arguments(self, p):
        src = p.add_mutually_exclusive_group()
        src.add_argument("--data", metavar="PATH",
                         help="your data: an image folder with train/ and optional test/, reference/; or a "
                         ".npz/.csv/.npy file or a folder of .npy shards (read batch by batch)")
        src.add_argument("--dataset", metavar="NAME",
                         help=f"a named data set (DEC/IDEC protocol): {', '.join(KNOWN_DATASETS)}")
        p.add_argument("--data_dir", help="--dataset: folder searched first for its files")
        p.add_argument("--label_col", help="--data CSV: the column holding labels (used for evaluation only)")
        add_scaling_argument(p)
        p.add_argument("--n_clusters", type=int, bounds="[2, inf)",
                       help="number of clusters (default: reference classes, or the data set's classes)")
        p.add_argument("--image_size", type=int, nargs="+", bounds="[8, inf)", metavar="PX",
                       help="height and width images are resized to (one value: square); default: the median "
                       f"side of the training images, at most {AUTO_SIDE} (the original project: 160, "
                       "about 6 times slower than 64 on a CPU)")
        p.add_argument("--color", choices=("grayscale", "rgb"), default="grayscale",
                       help="colour mode of images")
        p.add_argument("--architecture", choices=("conv", "mlp"),
                       help="autoencoder: conv (DCEC, default for images) or mlp (d-500-500-2000-d', "
                       "default for vectors)")
        p.add_argument("--latent_dim", type=int, default=10, bounds="[1, inf)",
                       help="size of the embedding (DEC's embedded space)")
        p.rename("--embedding_dim", "--latent_dim")
        p.add_argument("--alpha", type=float, default=1.0, bounds="(0, inf)",
                       help="degrees of freedom of the Student's t kernel")
        p.add_argument("--pretrain_epochs", type=float, bounds="[0, inf)",
                       help=f"autoencoder pretraining epochs (default: {PRETRAIN_EPOCHS} for vectors; for "
                       f"images as many as make {PRETRAIN_STEPS} optimizer steps; DEC-keras: 300 on "
                       "MNIST/Fashion-MNIST)")
        p.add_argument("--pretrain_optimizer", choices=("adam", "sgd"), default="adam",
                       help="pretraining optimizer (DEC-keras: sgd with --pretrain_lr 1, momentum 0.9)")
        p.add_argument("--pretrain_lr", type=float, bounds="(0, inf)",
                       help="pretraining learning rate (default: 0.001 adam, 1 sgd)")
        p.add_argument("--weight_init", choices=("glorot_uniform", "dec"), default="glorot_uniform",
                       help="dense autoencoder weight initialisation; dec is DEC-keras' uniform "
                       "+-sqrt(1/fan_in)")
        p.rename("--init", "--weight_init")
        p.add_argument("--ae_weights",
                       help="pretrained autoencoder weights (ae.weights.h5) instead of pretraining")
        p.add_argument("--centers", choices=CENTERS, default="umap_gmm",
                       help="initial cluster centres: the means of a UMAP + Gaussian mixture clustering of "
                       "the embeddings, whose labels are also the first target (umap_gmm, N2D), or "
                       "k-means of the embeddings (kmeans, DEC's)")
        p.add_argument("--n_init", type=int, default=20, bounds="[1, inf)",
                       help="restarts of the clustering that places the initial centres")
        p.add_argument("--max_epochs", type=float, default=MAX_EPOCHS, bounds="(0, inf)",
                       help="clustering epochs at most (DEC/IDEC/DCEC's 20,000 iterations on 70,000 "
                       "samples)")
        p.add_argument("--max_iterations", type=int, bounds="[1, inf)",
                       help="clustering iterations at most (default: as many as --max_epochs make)")
        p.add_argument("--update_interval", type=int, bounds="[1, inf)",
                       help=f"iterations between refreshes of the target distribution P over all samples "
                       f"(default: {UPDATE_INTERVAL}, as DEC, or one epoch when that is shorter)")
        p.add_argument("--tol", type=float, default=0.001, bounds="[0, 1]",
                       help="stop when fewer than this share of labels change between refreshes")
        p.add_argument("--recon_weight", type=float, default=10.0, bounds="[0, inf)",
                       help="weight of the reconstruction error in the clustering phase; 0 gives DEC, 10 "
                       "is IDEC/DCEC's gamma 0.1 under Adam")
        p.add_argument("--batch_size", type=int, bounds="[1, inf)",
                       help="global batch size (default: 256, or on fewer than 12,800 samples the largest "
                       "power of two giving 50 batches per epoch, at least 16)")
        p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                       help="clustering-phase optimizer; DEC used SGD, lr 0.01, momentum 0.9")
        p.add_argument("--lr", type=float, bounds="(0, inf)",
                       help="clustering learning rate (default: 0.001 adam, 0.01 sgd)")
        p.add_argument("--augment", action="store_true",
                       help="images: random flips, small rotations, brightness and noise while training")
        p.add_argument("--eval_interval", type=int, bounds="[1, inf)",
                       help="iterations between log rows (default: --update_interval)")
        p.add_argument("--save_dir", help="output folder (default: results/<data>_dcn)")

    def check(self, args):
        if not (args.data or args.dataset):
            raise UsageError("give --data PATH (an image folder or a file) or --dataset NAME")
        if args.dataset and args.dataset not in KNOWN_DATASETS:
            file = is_file_name(args.dataset) or Path(args.dataset).exists()
            raise UsageError(f"--dataset {args.dataset}: " + (
                "give your own files with --data" if file else
                f"unknown; give one of {', '.join(KNOWN_DATASETS)}, or your own data with --data"))
        if args.data and not is_array_source(args.data) and (args.label_col or args.scaling != "none"):
            raise UsageError(f"--label_col and --scaling apply to tables and arrays; {args.data} is an image "
                             "folder (its classes come from reference/ and test/)")
        _check(args)

    def load(self, args) -> RunData:
        from common import folders as fold

        if args.data and not is_array_source(args.data):  # an image folder
            if args.image_size is None:  # the images' own size, within what a CPU trains in minutes
                args.image_size = [max(8, fold.typical_side(Path(args.data) / "train", AUTO_SIDE))] * 2
            folders = fold.load_folders(args.data, args.image_size, args.color)
            x = folders.train.x
            if args.n_clusters is None:
                if folders.reference is None:
                    raise UsageError("give --n_clusters (there is no reference/ folder to count classes "
                                     "from)")
                args.n_clusters = len(folders.reference.classes)
            data = RunData(x, name=Path(args.data).name, description=f"{args.data}: {fold.describe(folders)}",
                           extra={"folders": folders, "class_names": None})
        else:
            source = args.data or args.dataset  # a file or .npy shards, or a named set
            (x, y), _ = load_data(source, data_dir=args.data_dir, flatten=args.architecture != "conv",
                                  label_col=args.label_col)
            scaler = Scaler(args.scaling).fit(x.reshape(len(x), -1))
            x = scaler.apply(x)
            if args.architecture == "conv" and x.ndim != 4:
                raise UsageError(f"--architecture conv needs images; {source} holds vectors")
            class_names = None if y is None else label_names(y) or [str(c) for c in np.unique(y)]
            if args.n_clusters is None:
                if y is None:
                    raise UsageError(f"give --n_clusters ({source} has no labels to count classes from)")
                args.n_clusters = len(class_names)
            classes = "unlabelled" if y is None else f"{len(class_names)} classes"
            data = RunData(x, y, name=Path(source).stem if args.data else source,
                           description=f"{source}: {len(x)} samples of shape {x.shape[1:]}, {classes}",
                           extra={"folders": None, "class_names": class_names, "scaler": scaler})
        if args.n_clusters > len(x):
            raise UsageError(f"--n_clusters {args.n_clusters} is more than the {len(x)} training samples")
        if args.batch_size is None:
            args.batch_size = proportional_batch_size(len(x))
        if args.pretrain_epochs is None and not args.ae_weights:
            args.pretrain_epochs = round(pretrain_epochs(len(x), args.batch_size, x.ndim == 4), 3)
        return data

    def default_save_dir(self, args, data):
        return f"results/{data.name}_dcn"

    def describe(self, run):
        m = run.model
        kind = ("DEC" if not run.args.recon_weight else "IDEC") if m.architecture == "mlp" else "DCEC"
        return (f"{kind} ({m.architecture} autoencoder, embedding {m.embedding_dim}) with {m.n_clusters} "
                "clusters")

    def build(self, run):
        import keras

        from dcn.dec.models import DCN

        a = run.args
        run.optimizers = {
            "pretrain": (keras.optimizers.SGD(a.pretrain_lr, momentum=0.9) if a.pretrain_optimizer == "sgd"
                         else keras.optimizers.Adam(a.pretrain_lr)),
            "train": (keras.optimizers.SGD(a.lr, momentum=0.9) if a.optimizer == "sgd"
                      else keras.optimizers.Adam(a.lr))}
        return DCN(run.data.x.shape[1:], a.n_clusters, a.latent_dim, a.architecture, alpha=a.alpha,
                   init=a.weight_init)

    def planned_steps(self, run):
        from dcn.dec.models import clustering_schedule

        a = run.args
        _, steps = clustering_schedule(len(run.data.x), a.batch_size, a.update_interval, a.max_iterations,
                                       a.max_epochs)
        return [*run.pretrain_plan(), ("train", steps)]

    def train(self, run):
        from common import folders as fold
        from dcn.dec.naming import name_from_labels, name_from_references

        a, x, y, model = run.args, run.data.x, run.data.y, run.model
        augment = _augmenter(a.seed) if a.augment and x.ndim == 4 else None
        options = run.loop_options(map_fn=augment)
        run.pretrain(model, run.optimizers["pretrain"], map_fn=augment)
        labels = model.init_centers(x, n_init=a.n_init, seed=a.seed, method=a.centers)
        # N2D's clusters are not convex in the embedding: the network first learns them as its target
        first = np.eye(model.n_clusters, dtype=np.float32)[labels] if a.centers == "umap_gmm" else None
        run.record("train", model.fit(x, y, max_iterations=a.max_iterations, max_epochs=a.max_epochs,
                                      update_interval=a.update_interval, tol=a.tol,
                                      recon_weight=a.recon_weight, eval_interval=a.eval_interval,
                                      optimizer=run.optimizers["train"], initial_targets=first, **options))

        # naming
        folders = run.data.extra["folders"]
        if folders is not None and folders.reference is not None:
            ref = folders.reference
            naming = name_from_references(model.soft_assign(ref.x), ref.labels, ref.classes)
        elif folders is not None and folders.test is not None:
            test = folders.test
            naming = name_from_labels(model.cluster(test.x), test.labels, test.classes, model.n_clusters)
        elif y is not None:
            naming = name_from_labels(model.cluster(x), np.searchsorted(np.unique(y), y),
                                      run.data.extra["class_names"], model.n_clusters,
                                      source="the data set's labels")
        else:
            naming = None
        run.data.extra["naming"] = naming
        if naming is not None:
            for w in naming.warnings:
                fold.warn(w)
            model.cluster_names = naming.names
            if run.chief:
                write_json(run.save_dir / "class_mappings.json", naming.to_json())
            if naming.source.startswith("test labels") and folders is not None:
                fold.warn("no reference images: clusters were named by matching them to the test labels, "
                          "so the test accuracy is an upper bound")

    def results(self, run):
        r, folders = run.phases["train"], run.data.extra["folders"]
        naming = run.data.extra["naming"]
        out = {"n_samples": len(run.data.x), "n_clusters": run.model.n_clusters, "iterations": r.iterations,
               "stopped": r.stopped_early or "max_iterations",
               "train": run.model.evaluate_clusters(run.data.x, run.data.y, seed=run.args.seed)}
        if folders is not None and folders.test is not None and naming is not None:
            out["test"] = _test_report(run.model, naming, folders.test, run.save_dir)
        return out

    def predictions(self, run):
        import os

        import pandas as pd

        from common.command import prediction_frame

        model, folders = run.model, run.data.extra["folders"]

        def part(name, x, **kwargs):  # with the cluster's class name, when the clusters were named
            clusters = model.cluster(x)
            named = {} if not model.cluster_names else {
                "name": [model.cluster_names[k] or "" for k in clusters]}
            return prediction_frame(name, clusters, **kwargs, **named)

        if folders is None:
            return part("train", run.data.x, labels=run.data.y, names=label_names(run.data.y))

        def relative(paths):  # to the --data folder, as a user finds them there
            return [os.path.relpath(p, run.args.data) for p in paths]

        frames = [part("train", folders.train.x, images=relative(folders.train.paths))]
        if folders.test is not None:
            test = folders.test
            frames.append(part("test", test.x, images=relative(test.paths), labels=test.labels,
                               names=test.classes))
        return pd.concat(frames, ignore_index=True)

    def summary(self, run, results):
        train = results["train"]
        line = f"{results['iterations']} clustering iterations ({results['stopped']})"
        if "acc" in train:
            line += f"; accuracy {train['acc']:.4f}, NMI {train['nmi']:.4f}, ARI {train['ari']:.4f}"
        if "test" in results:
            line += f"; test accuracy {results['test']['accuracy']:.4f}"
        return line


def predict_parser():
    p = ArgumentParser(prog="dcn predict",
                       description="Clusters of samples under a trained DEC/IDEC/DCEC model: one CSV row per "
                       "sample with its cluster, the probability q of that cluster and the cluster's class "
                       "name when the run named them.")
    add_predict_arguments(p, "dcn")
    return p


# --------------------------------------------------------------------------- #
def _check(args):
    if args.image_size is None:
        pass  # chosen from the images when they are loaded
    elif len(args.image_size) == 1:
        args.image_size = args.image_size * 2
    if args.image_size is not None and len(args.image_size) != 2:
        raise UsageError(f"--image_size takes one or two sizes, got {len(args.image_size)}: "
                         f"{' '.join(map(str, args.image_size))}")
    if args.lr is None:
        args.lr = 0.01 if args.optimizer == "sgd" else 0.001
    if args.pretrain_lr is None:
        args.pretrain_lr = 1.0 if args.pretrain_optimizer == "sgd" else 0.001


def _augmenter(seed):
    """Random flips, small rotations, brightness and noise, clipped to [0, 1]."""
    import keras

    from common.networks import Augmentation

    layers = keras.layers
    return Augmentation([lambda s: layers.RandomFlip("horizontal", seed=s),
                         lambda s: layers.RandomRotation(0.05, fill_mode="constant", seed=s),
                         lambda s: layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=s),
                         lambda s: layers.GaussianNoise(0.02, seed=s)], seed)


def _test_report(model, naming, test, save_dir: Path):
    """test_metrics.json and test_cm.png for a labelled test folder."""
    from sklearn.metrics import classification_report, confusion_matrix

    from common import plots
    from common.metrics import ari, nmi

    clusters = model.cluster(test.x)
    truth = [test.classes[i] for i in test.labels]
    named = [n if n is not None else "(unnamed)" for n in naming.name(clusters)]
    columns = list(test.classes) + sorted({n for n in named if n not in test.classes})
    report = classification_report(truth, named, labels=test.classes, output_dict=True, zero_division=0)
    metrics = {
        "n_images": len(truth),
        "accuracy": float(np.mean(np.array(named) == np.array(truth))),
        "nmi": nmi(test.labels, clusters),
        "ari": ari(test.labels, clusters),
        "naming": naming.source,
        "per_class": {c: {k: round(float(report[c][k]), 4)
                          for k in ("precision", "recall", "f1-score", "support")} for c in test.classes},
    }
    write_json(save_dir / "test_metrics.json", metrics)
    cm = confusion_matrix(truth, named, labels=columns)[: len(test.classes)]
    plots.confusion_matrix(cm, columns, save_dir / "test_cm.png",
                           title=f"test accuracy {metrics['accuracy']:.3f} "
                           f"(clusters named from {naming.source})",
                           row_names=test.classes)
    return metrics


# --------------------------------------------------------------------------- #
def train_main(argv):
    return DcnCommand().main(argv)


def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model, samples = model_and_samples(args, "dcn.dec.models")
    q = model.soft_assign(samples.x)
    clusters = q.argmax(axis=1)
    columns = {"cluster": clusters, "probability": q.max(axis=1).round(6)}
    if model.cluster_names:
        columns["class"] = [model.cluster_names[k] or "(unnamed)" for k in clusters]
    if args.images:  # a few files named on the command line: also on the screen
        for path, row in zip(samples.frame["image"], zip(*columns.values())):
            print(f"{path}\t" + "\t".join(map(str, row)))
    write_predictions(samples, columns, args)
    return 0


def main(argv=None):
    run(dispatch({"train": train_main, "predict": predict_main}, "train"), argv, prog="dcn")


if __name__ == "__main__":
    main()
