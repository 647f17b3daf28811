"""bin/selflabel: a CNN classifier that learns image classes without labels, by
iterative pseudo-label refinement (see :mod:`dcn.selflabel`).

    bin/selflabel --dataset fmnist                        # train on 60k, report on the 10k test images
    bin/selflabel evaluate --model results/fmnist_selflabel/model.keras --dataset fmnist
    bin/selflabel predict --model results/fmnist_selflabel/model.keras shoe.jpg shirt.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, add_data_arguments, dispatch, run
from common.clustering import CLUSTERERS, KMEANS, cluster_features, kmeans_backend, umap_embedding
from common.command import RunData, TrainingCommand
from common.data import CLASS_NAMES, label_names, load_data
from common.errors import DataError, UsageError
from common.networks import save_keras_model
from common.predict import add_predict_arguments, model_and_samples, write_predictions
from common.results import atomic_path, write_json
from common.runtime import from_chief, quiet_tensorflow, worker_count
from dcn.selflabel.network import AUGMENT, AUGMENTATIONS
from dcn.selflabel.refine import (
    FIT_ATTEMPTS,
    FIT_THRESHOLD,
    INIT_MODEL,
    INITS,
    MANIFOLDS,
    MIN_STEPS,
    RELABELS,
    SELECTIONS,
    first_labels_file,
)

#: What the issue's authors asked of an unsupervised Fashion-MNIST classifier.
TARGETS = {"accuracy": 0.72, "nmi": 0.65, "purity": 0.75, "min_f1": 0.60, "stability": 0.95}
#: How a finished run chooses and scores its model (results.json's "scoring"; absent: 1). 2: the chosen
#: model's classes are shifted to its balanced labelling. ``--resume`` of a finished run scores it again.
SCORING = 2


def load_images(args):
    """(x, y, class names) of the training part and (x, y) of the test part
    (None for a single file, which has no split). Images keep their shape."""
    source = args.data or args.dataset or "digits"
    try:
        (x, y), (x_test, y_test) = load_data(source, validation=True, flatten=False, data_dir=args.data_dir,
                                             label_col=args.label_col)
    except DataError:
        if not args.data:
            raise
        (x, y), _ = load_data(source, flatten=False, label_col=args.label_col)
        x_test = y_test = None
    if x.ndim != 4:
        raise UsageError(f"bin/selflabel classifies images; {source} holds vectors of shape {x.shape[1:]}: "
                         f"save them as an array of shape (samples, height, width, channels)")
    if x.min() < 0 or x.max() > 1:
        raise UsageError(f"{source} holds values {x.min():.3g}..{x.max():.3g}; rescale the images to [0, 1]")
    names = None
    if y is not None:
        values = np.unique(y if y_test is None else np.concatenate([y, y_test]))
        known = label_names(y) or CLASS_NAMES.get(source)  # a file's own label values, or a data set's names
        y = np.searchsorted(values, y)
        y_test = None if y_test is None else np.searchsorted(values, y_test)
        names = [known[int(v)] if known is not None and 0 <= int(v) < len(known) else str(v) for v in values]
    return x, y, names, x_test, y_test


class SelfLabelCommand(TrainingCommand):
    prog = "selflabel"
    description = ("Learn to classify images without labels: initial pseudo-labels from clustering "
                   "autoencoder codes (UMAP + Gaussian mixture by default), then a CNN trained on the most "
                   "confident of them with augmentation, relabelled from its own balanced predictions until "
                   "the labels are stable. Labels, where the data have them, are only used for the "
                   "reports. `selflabel evaluate --help`, `selflabel predict --help` for saved models.")
    seed_help = "seed of weights, data order, augmentation and clustering"
    outputs = ("model.keras", "history.csv", "test_metrics.json", "results.json", "predictions.csv",
               "confusion_matrix.png", "clustering_quality.png", "training_progress.png", "architecture.png",
               "architecture.txt")

    def add_arguments(self, p):
        add_data_arguments(p, required=False, what="a data set of images")
        p.add_argument("--rounds", type=int, default=10, bounds="[1, inf)",
                       help="most rounds (training on the pseudo-labels, then relabelling) before "
                       "stopping")
        p.rename("--iterations", "--rounds", note="bin/desom's --iterations are optimizer steps")
        p.add_argument("--epochs_per_round", type=float, default=2, bounds="(0, inf)",
                       help="training epochs per round")
        p.rename("--epochs_per_iteration", "--epochs_per_round")
        p.add_argument("--min_steps", type=int, default=MIN_STEPS, bounds="[0, inf)",
                       help="optimizer steps a round's pseudo-label phase takes at least: on small data "
                       "its epochs (and the neighbour phase's) are stretched to reach them")
        p.add_argument("--fit_threshold", type=float, default=FIT_THRESHOLD, bounds="[0, 1]",
                       help="share of its training labels the classifier must predict before it relabels; "
                       f"below it, the round trains again ({FIT_ATTEMPTS} attempts at most), then the "
                       "refinement stops")
        p.add_argument("--recluster_interval", type=int, default=1, bounds="[1, inf)",
                       help="rounds between relabellings (1: after every round)")
        p.add_argument("--convergence_threshold", type=float, default=0.95, bounds="(0, 1]",
                       help="stop when the aligned stability of a relabelling reaches this")
        p.add_argument("--n_clusters", type=int, bounds="[2, inf)",
                       help="pseudo-classes (default: the number of classes)")
        p.add_argument("--first_features", choices=INITS, default="ae",
                       help="features of the first pseudo-labels: ae (autoencoder codes), desom (codes of "
                       "an 8x8 DESOM), random (the untrained CNN's features), contrastive (the CNN's "
                       "convolutional features after SimCLR pretraining; the classifier trains on from it)")
        p.add_argument("--first_labels", metavar="RUN_DIR",
                       help="start from the first pseudo-labels (and neighbours, and the pretrained CNN of "
                       "--first_features contrastive) of an earlier bin/selflabel run on the same data "
                       "instead of computing them (no init phase): to try loop settings from one start")
        p.rename("--init", "--first_features")
        p.add_argument("--init_epochs", type=float, default=50, bounds="(0, inf)",
                       help="ae: autoencoder training epochs; contrastive: pretraining epochs")
        p.add_argument("--init_iterations", type=int, default=10000, bounds="[1, inf)",
                       help="desom: optimizer steps (bin/desom's --iterations)")
        p.add_argument("--manifold", choices=MANIFOLDS, default="umap",
                       help="reduce the initial features with UMAP to --n_clusters dimensions before "
                       "clustering (N2D)")
        p.add_argument("--neighbors", type=int, default=10, bounds="[2, inf)", help="UMAP neighbours")
        p.add_argument("--clusterer", choices=CLUSTERERS, default="gmm",
                       help="clustering of the initial features")
        p.add_argument("--n_init", type=int, default=10, bounds="[1, inf)",
                       help="initialisations of that clustering; the fit with the highest likelihood (the "
                       "lowest inertia for k-means) is kept")
        p.rename("--cluster_starts", "--n_init")
        p.add_argument("--kmeans", choices=KMEANS, default="auto",
                       help="k-means of --clusterer kmeans and --relabel cluster: faiss' (the faiss-cpu "
                       "package) or scikit-learn's; auto: faiss when installed")
        p.add_argument("--knn", type=int, default=20, bounds="[1, inf)",
                       help="neighbours per image, in the initial features, for the neighbour phase and "
                       "--select neighbours (with --first_labels: the nearest --knn of that run's)")
        p.add_argument("--knn_epochs", type=float, default=1, bounds="[0, inf)",
                       help="epochs per round of SCAN's neighbour loss after the pseudo-label epochs: "
                       "each image and one of its --knn nearest neighbours should get the same class "
                       "(0: none)")
        p.add_argument("--entropy_weight", type=float, default=5.0, bounds="[0, inf)",
                       help="neighbour phase: weight of the entropy of the mean prediction (against "
                       "empty classes)")
        p.add_argument("--relabel", choices=RELABELS, default="predict",
                       help="predict: the classifier's own predictions; cluster: k-means on its features")
        p.add_argument("--balance", choices=("sinkhorn", "none"), default="sinkhorn",
                       help="predict: make the relabelled clusters equal in size (Sinkhorn-Knopp, SeLa), "
                       "and shift the final model's class biases so that it predicts that partition of the "
                       "training images; none for data with very unequal classes")
        p.add_argument("--confident_fraction", type=float, nargs="+", default=[0.5, 1.0], bounds="(0, 1]",
                       metavar="F", help="share of each cluster trained on, the most confident first: one "
                       "value, or the first and last round's (linear in between)")
        p.add_argument("--fraction_rounds", type=int, bounds="[2, inf)", metavar="N",
                       help="the share reaches its last value at round N-1 and stays there, so that "
                       "more --rounds train longer on it (default: --rounds)")
        p.rename("--fraction_iterations", "--fraction_rounds")
        p.add_argument("--select", choices=SELECTIONS, default="probability",
                       help="how the confident share is chosen: probability (the label's probability, or "
                       "the first clustering's posterior) or neighbours (the share of the image's --knn "
                       "neighbours with the same label, ties by probability)")
        p.add_argument("--label_smoothing", type=float, default=0.1, bounds="[0, 1)",
                       help="label smoothing of the targets")
        p.add_argument("--augmentations", nargs="*", choices=AUGMENTATIONS, default=list(AUGMENT),
                       help="augmentations of the training batches, applied in the order given: translate "
                       "(shifts of 10 %%), flip (horizontal), rotate (5 %%), zoom (10 %%), noise (Gaussian), "
                       "crop (zooms in by up to 60 %%), contrast (0.5-1.5), brightness (+-0.3); none: give "
                       "the flag alone")
        p.rename("--augment", "--augmentations", note="bin/dcn's --augment is a switch")
        p.add_argument("--batch_size", type=int, default=256, bounds="[1, inf)", help="global batch size")
        p.add_argument("--lr", type=float, default=0.001, bounds="(0, inf)",
                       help="Adam learning rate (fresh each round)")
        p.add_argument("--save_dir", help="output folder (default: results/<data>_selflabel)")

    def check(self, args):
        f = args.confident_fraction
        if len(f) > 2:
            raise UsageError(f"--confident_fraction takes one or two shares, got {len(f)}: "
                             f"{' '.join(map(str, f))}")
        args.confident_fraction = [f[0], f[-1]]
        if args.clusterer == "kmeans" or args.relabel == "cluster":
            kmeans_backend(args.kmeans)  # faiss asked for and not installed: say so before anything runs
        if args.fraction_rounds is not None and args.fraction_rounds > args.rounds:
            raise UsageError(f"--fraction_rounds {args.fraction_rounds} is more than --rounds "
                             f"{args.rounds}: the share would never reach its last value; give at most "
                             f"{args.rounds}")

    def load(self, args) -> RunData:
        x, y, names, x_test, y_test = load_images(args)
        if args.n_clusters is None:
            if names is None:
                raise UsageError("give --n_clusters (the data have no labels to count classes from)")
            args.n_clusters = len(names)
        if args.n_clusters > len(x):
            raise UsageError(f"--n_clusters {args.n_clusters} is more than the {len(x)} images")
        source = args.data or args.dataset or "digits"
        name = Path(source).stem if args.data else source
        test = f", {len(x_test)} test images" if x_test is not None else ", no test split"
        return RunData(x, y, x_test, y_test, name=name,
                       description=f"{source}: {len(x)} training images of shape {x.shape[1:]}{test}",
                       extra={"classes": names})

    def default_save_dir(self, args, data):
        return f"results/{data.name}_selflabel"

    def describe(self, run):
        m = run.model
        def dashed(values):
            return "-".join(map(str, values))

        return (f"SelfLabelNet (conv {dashed(m.filters)}, dense {dashed(m.dense_units)}, "
                f"head {dashed(m.head_units)}-{m.n_clusters})")

    def build(self, run):
        from dcn.selflabel.network import SelfLabelNet

        return SelfLabelNet(run.data.x.shape[1:], run.args.n_clusters)

    def planned_steps(self, run):
        from dcn.selflabel.labels import fraction_at
        from dcn.selflabel.refine import round_stretch

        a, n = run.args, len(run.data.x)
        steps = []
        if not a.first_labels and a.first_features in ("ae", "contrastive"):
            steps.append(("init", run.epoch_steps(a.init_epochs)))
        elif not a.first_labels and a.first_features == "desom":
            steps.append(("init", a.init_iterations))
        for i in range(a.rounds):  # at most: a run stops when its labels are stable
            share = fraction_at(i, a.fraction_rounds or a.rounds, *a.confident_fraction)
            kept = int(round(n * share))
            stretch = round_stretch(kept, a.batch_size, a.epochs_per_round, a.min_steps)
            steps.append((f"round_{i:02d}", run.epoch_steps(a.epochs_per_round * stretch, kept)))
            if a.knn_epochs > 0:
                steps.append((f"round_{i:02d}_knn", run.epoch_steps(a.knn_epochs * stretch)))
        return steps

    def train(self, run):
        import time

        from common.results import write_csv
        from dcn.selflabel.labels import nearest_neighbours
        from dcn.selflabel.network import augmenter, load_model
        from dcn.selflabel.refine import initial_features, refine, upgrade_names

        a, d, model = run.args, run.data, run.model
        save, k = run.save_dir, a.n_clusters
        loop = run.loop_options()
        loop.pop("seed")
        resume = loop.pop("resume")
        loop.pop("save_dir")
        if resume and run.chief:
            upgrade_names(save)  # a run saved before rounds had that name
        first = save / "pseudo_labels" / "round_00.npz"
        knn_file = save / "neighbours.npy"
        pretrained = save / INIT_MODEL  # the CNN after --first_features contrastive, where the loop starts
        neighbours = None
        with_knn = a.knn_epochs > 0 or a.select == "neighbours"
        fresh = not (resume and first.is_file())
        if fresh and run.chief:  # not a CNN an earlier run left in this folder
            pretrained.unlink(missing_ok=True)
        if not fresh:
            labels = confidence = np.zeros(len(d.x))  # replaced by the saved ones
            if with_knn:
                if not knn_file.is_file():
                    raise UsageError(f"cannot resume {save}: its neighbours.npy is missing (its --knn_epochs "
                                     "or --select neighbours need it); start the run again in a new "
                                     "--save_dir")
                neighbours = np.load(knn_file)
            if pretrained.is_file():
                model.set_weights(load_model(pretrained).get_weights())
        elif a.first_labels:
            source = Path(a.first_labels)
            labels, confidence, neighbours = _first_labels(source, len(d.x), k, a.knn if with_knn else 0)
            if neighbours is not None and run.chief:  # this run's own copy, for --resume
                with atomic_path(knn_file) as tmp:
                    np.save(tmp, neighbours)
            if (source / INIT_MODEL).is_file():
                model.set_weights(load_model(source / INIT_MODEL).get_weights())
                if run.chief:
                    save_keras_model(model, pretrained)
        else:
            t = time.perf_counter()
            z = initial_features(a.first_features, d.x, model, epochs=a.init_epochs,
                                 iterations=a.init_iterations, seed=a.seed, save_dir=save, resume=resume,
                                 **loop)
            if a.first_features == "contrastive" and run.chief:
                save_keras_model(model, pretrained)
            run.stages["init_features"] = time.perf_counter() - t
            if with_knn:
                t = time.perf_counter()
                neighbours = from_chief(run.strategy, nearest_neighbours(z, a.knn))
                if run.chief:
                    with atomic_path(knn_file) as tmp:
                        np.save(tmp, neighbours)
                run.stages["nearest_neighbours"] = time.perf_counter() - t
            t = time.perf_counter()
            if a.manifold == "umap":
                if a.verbose:
                    print(f"UMAP of the {z.shape[1]}-d features to {k} dimensions ...", flush=True)
                z = umap_embedding(z, k, a.neighbors, a.seed)
            labels, confidence = cluster_features(z, k, a.clusterer, a.seed, a.n_init, a.kmeans)
            run.stages["init_clustering"] = time.perf_counter() - t
        def on_rows(rows):
            import pandas as pd

            if not run.chief:
                return
            write_csv(pd.DataFrame(rows), save / "history.csv")
            if a.verbose:
                print(_row_line(rows[-1]), flush=True)

        if neighbours is not None and d.y is not None:  # reporting: how often a neighbour shares the class
            d.extra["neighbours_same_class"] = float(np.mean(d.y[neighbours] == d.y[:, None]))
        t = time.perf_counter()
        rows = refine(model, d.x, labels, confidence, rounds=a.rounds,
                      epochs_per_round=a.epochs_per_round, recluster_interval=a.recluster_interval,
                      relabelling=a.relabel, kmeans=a.kmeans, balance=a.balance == "sinkhorn",
                      confident_fraction=a.confident_fraction, fraction_rounds=a.fraction_rounds,
                      smoothing=a.label_smoothing, threshold=a.convergence_threshold, lr=a.lr,
                      augment=augmenter(a.augmentations, a.seed), neighbours=neighbours,
                      knn_epochs=a.knn_epochs,
                      entropy_weight=a.entropy_weight, select=a.select, min_steps=a.min_steps,
                      fit_threshold=a.fit_threshold,
                      save_dir=save, resume=resume, seed=a.seed, y=d.y, x_test=d.x_val, y_test=d.y_val,
                      on_rows=on_rows, **loop)
        run.stages["refine"] = time.perf_counter() - t
        self._choose(run, rows)

    def _choose(self, run, rows):
        """Weights of the round chosen without labels, shifted to predict the
        balanced labelling (``--balance sinkhorn``); cluster names from the
        training labels (reporting), kept in the model for ``predict``."""
        from dcn.selflabel.network import load_model
        from dcn.selflabel.refine import best_round

        if not run.chief:  # the chief writes and chooses the model
            return
        model, d = run.model, run.data
        best = best_round(rows)
        chosen = load_model(run.save_dir / f"round_{best:02d}.keras")
        if worker_count(run.strategy) > 1:  # the chosen model alone: the other workers have stopped,
            model = run.model = chosen      # a model built under their strategy would wait for them
        else:
            model.set_weights(chosen.get_weights())
        run.data.extra.update(rows=rows, best=best, note=_first_labels_note(rows, best))
        if run.data.extra["note"] and run.args.verbose:
            print(run.data.extra["note"], flush=True)
        shift = run.args.relabel == "predict" and run.args.balance == "sinkhorn"
        if not shift and d.y is None:
            return
        probs = model.predict_proba(d.x)  # once: the shifted predictions follow from it
        pred = probs.argmax(axis=1)
        if shift:  # the model predicts the balanced labelling its relabelling makes (a prior correction)
            from dcn.selflabel.labels import class_offsets

            offsets = class_offsets(probs)
            model.shift_classes(offsets)
            shifted = (np.log(np.clip(probs, 1e-30, None)) + offsets).argmax(axis=1)
            d.extra["class_offsets"] = [round(float(o), 4) for o in offsets]
            d.extra["shift_changed"] = float(np.mean(pred != shifted))
            pred = shifted
        if d.y is not None:
            d.extra["train_pred"] = pred
            model.cluster_names = name_clusters(d.extra["train_pred"], d.y, d.extra["classes"],
                                                model.n_clusters)

    def results(self, run):
        d, model = run.data, run.model
        rows, best = d.extra["rows"], d.extra["best"]
        out = {"rounds_run": len(rows), "chosen_round": best,
               "chosen_by": "highest aligned stability of the relabelling (no labels)",
               "stopped": rows[-1].get("stopped"), "final_stability": _last_stability(rows),
               "n_train": len(d.x), "cluster_names": model.cluster_names, "scoring": SCORING,
               "kept_first_labels_model": bool(d.extra["note"])}
        if d.extra["note"]:
            out["note"] = d.extra["note"]
        if "class_offsets" in d.extra:
            out.update(class_offsets=d.extra["class_offsets"],
                       shift_changed=round(d.extra["shift_changed"], 4))
        if run.args.clusterer == "kmeans" or run.args.relabel == "cluster":
            out["kmeans"] = kmeans_backend(run.args.kmeans)
        if "neighbours_same_class" in d.extra:
            out["neighbours_same_class"] = round(d.extra["neighbours_same_class"], 4)
        if d.y is not None:
            from dcn.selflabel.labels import label_scores

            out["train"] = label_scores(d.extra["train_pred"], d.y)  # predicted once, in _choose
        if d.x_val is not None and d.y_val is not None:
            metrics = test_metrics(model, d.x_val, d.y_val, d.extra["classes"])
            metrics["stability"] = out["final_stability"]
            metrics["targets"] = {name: {"target": target, "reached": _reached(metrics, name, target)}
                                  for name, target in TARGETS.items()}
            write_json(run.save_dir / "test_metrics.json", metrics)
            out["test"] = {key: metrics[key] for key in ("accuracy", "nmi", "purity", "ari", "min_f1")}
            d.extra["test_metrics"] = metrics
        return out

    def predictions(self, run):
        """The kept model's class of every training and test image, with its probability (and the
        class's name when labels named it)."""
        import pandas as pd

        from common.command import prediction_frame

        d, model = run.data, run.model

        def part(name, x, y):
            probs = model.predict_proba(x)
            pred = probs.argmax(axis=1)
            named = {} if not model.cluster_names else {"name": np.asarray(model.cluster_names)[pred]}
            return prediction_frame(name, pred, labels=y, names=d.extra["classes"], **named,
                                    probability=probs.max(axis=1).round(4))

        frames = [part("train", d.x, d.y)]
        if d.x_val is not None:
            frames.append(part("test", d.x_val, d.y_val))
        return pd.concat(frames, ignore_index=True)

    def pictures(self, run, results):
        import pandas as pd

        from common import plots

        save, d = run.save_dir, run.data
        metrics = d.extra.get("test_metrics")
        if metrics is not None:
            plots.confusion_matrix(np.array(metrics["confusion_matrix"]), metrics["predicted_names"],
                                   save / "confusion_matrix.png", row_names=d.extra["classes"],
                                   title=f"test set: accuracy {metrics['accuracy']:.3f}, "
                                   f"NMI {metrics['nmi']:.3f} (round {d.extra['best']})")
        history = save / "history.csv"
        if history.is_file():
            frame = pd.read_csv(history)
            history_plots(frame, save / "clustering_quality.png", save / "training_progress.png",
                          run.args.convergence_threshold)

    def summary(self, run, results):
        line = f"{results['rounds_run']} rounds, model of round {results['chosen_round']}"
        if results.get("final_stability") is not None:
            line += f", aligned stability {results['final_stability']:.4f}"
        t = results.get("test")
        if t:
            line += (f"; test accuracy {t['accuracy']:.4f}, NMI {t['nmi']:.4f}, purity {t['purity']:.4f}, "
                     f"lowest class F1 {t['min_f1']:.4f}")
        return line


def _first_labels(run_dir: Path, n: int, k: int, knn: int):
    """(labels, confidence, neighbours or None) of the first round of the
    bin/selflabel run in ``run_dir``, checked against ``n`` images and ``k``
    clusters; the ``knn`` nearest of its saved neighbours (None when 0)."""
    path = first_labels_file(run_dir)
    if not path.is_file():
        raise UsageError(f"--first_labels: no {path}; give the --save_dir of an earlier bin/selflabel run")
    with np.load(path) as f:
        labels, confidence = f["labels"], f["confidence"]
    if len(labels) != n or labels.max() >= k:
        raise UsageError(f"--first_labels: {path} labels {len(labels)} images in {labels.max() + 1} "
                         f"clusters, this run has {n} images and --n_clusters {k}; use a run on the "
                         f"same data")
    neighbours = None
    if knn:
        knn_file = run_dir / "neighbours.npy"
        if not knn_file.is_file():
            raise UsageError(f"--first_labels: {run_dir} has no neighbours.npy; give --knn_epochs 0 "
                             f"--select probability")
        neighbours = np.load(knn_file)
        if neighbours.shape[1] < min(knn, n - 1):
            raise UsageError(f"--first_labels: {run_dir} saved {neighbours.shape[1]} neighbours per image, "
                             f"fewer than --knn {knn}; give --knn {neighbours.shape[1]} or less")
        neighbours = neighbours[:, :knn]  # nearest first
    return labels, confidence, neighbours


def _row_line(row) -> str:
    parts = [f"round {row['round']}: trained on {row['trained_on']}"]
    if "label_acc" in row:
        parts.append(f"pseudo-label accuracy {row['label_acc']:.4f}")
    if row.get("agreement") is not None:
        parts.append(f"neighbour agreement loss {row['agreement']:.4f}")
    if "test_acc" in row:
        parts.append(f"test accuracy {row['test_acc']:.4f} NMI {row['test_nmi']:.4f}")
    if row.get("stability") is not None:
        parts.append(f"aligned stability {row['stability']:.4f}")
    if row.get("stopped"):
        parts.append(f"stop: {row['stopped']}")
    return "; ".join(parts)


def _first_labels_note(rows, best: int) -> str | None:
    """One line when the model kept is the one trained on the first labels
    (round 0) because refinement could not, or did not, improve on them."""
    if best != 0:
        return None
    first = rows[0]
    if first.get("stability") is None:  # it never relabelled: it could not fit the first labels
        if "fit" not in first:
            return None
        return (f"refinement stopped: {first['stopped']}; the model kept is the one trained on the first "
                f"pseudo-labels (round 0), which are in pseudo_labels/round_00.npz")
    later = [r["stability"] for r in rows[1:] if r.get("stability") is not None]
    if not later:
        return None
    return (f"refinement did not improve on the first pseudo-labels: aligned stability "
            f"{first['stability']:.4f} at round 0, at most {max(later):.4f} after it; the model kept is "
            f"the one trained on the first labels (round 0)")


def _last_stability(rows):
    values = [r["stability"] for r in rows if r.get("stability") is not None]
    return float(values[-1]) if values else None


def _reached(metrics, name, target):
    value = metrics.get(name)
    return None if value is None else bool(value >= target)


def name_clusters(pred, y, classes, n_clusters: int) -> list[str]:
    """A class name per cluster: the Hungarian one-to-one match on the given
    samples, then the majority class for clusters left without a partner."""
    from common.metrics import hungarian_mapping

    pred, y = np.asarray(pred), np.asarray(y)
    classes = classes or [str(c) for c in range(int(y.max()) + 1)]
    mapping = hungarian_mapping(y, pred)
    names = []
    for k in range(n_clusters):
        if k in mapping:
            names.append(classes[mapping[k]])
        else:
            members = y[pred == k]
            names.append(classes[int(np.bincount(members).argmax())] if len(members) else f"cluster {k}")
    return names


def test_metrics(model, x, y, classes) -> dict:
    """Accuracy (Hungarian), NMI, purity, ARI of the predictions on ``x``, and
    per-class precision / recall / F1 under the model's cluster names."""
    from sklearn.metrics import classification_report, confusion_matrix

    from dcn.selflabel.labels import label_scores

    pred = model.predict_proba(x).argmax(axis=1)
    scores = label_scores(pred, y)
    classes = classes or [str(c) for c in range(int(np.max(y)) + 1)]
    names = model.cluster_names or name_clusters(pred, y, classes, model.n_clusters)
    truth = [classes[int(c)] for c in y]
    named = [names[int(k)] for k in pred]
    report = classification_report(truth, named, labels=classes, output_dict=True, zero_division=0)
    keys = ("precision", "recall", "f1-score", "support")
    per_class = {c: {key: round(float(report[c][key]), 4) for key in keys} for c in classes}
    predicted_names = list(classes) + sorted({n for n in named if n not in classes})
    return {
        "n_images": len(y), "accuracy": scores["acc"], "nmi": scores["nmi"], "purity": scores["purity"],
        "ari": scores["ari"], "named_accuracy": float(np.mean(np.array(named) == np.array(truth))),
        "min_f1": min(v["f1-score"] for v in per_class.values()), "per_class": per_class,
        "cluster_names": names, "predicted_names": predicted_names,
        "confusion_matrix": confusion_matrix(truth, named, labels=predicted_names)[: len(classes)].tolist(),
    }


def history_plots(frame, quality_path, progress_path, threshold: float):
    """clustering_quality.png (label scores per round, with the targets)
    and training_progress.png (loss, aligned stability, share trained on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from common import plots

    it = frame["round"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, prefix, title in ((axes[0], "label_", "pseudo-labels of the training images"),
                              (axes[1], "test_", "classifier on the test images")):
        for metric, target in (("acc", TARGETS["accuracy"]), ("nmi", TARGETS["nmi"]),
                               ("purity", TARGETS["purity"])):
            column = prefix + metric
            if column in frame:
                line, = ax.plot(it, frame[column], marker="o", label=metric)
                ax.axhline(target, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (dotted: targets)")
    if axes[1].lines:
        axes[1].legend(frameon=False)
    else:  # no labelled test images: say so rather than leave a blank panel
        axes[1].text(0.5, 0.5, "no labelled test images", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
        if axes[0].lines:
            axes[0].legend(frameon=False)
    fig.tight_layout()
    plots.save_figure(fig, quality_path, bbox_inches=None)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(it, frame["loss"], marker="o")
    axes[0].set_title("cross-entropy at the end of the round", fontsize=9)
    if "stability" in frame:
        axes[1].plot(it, frame["stability"], marker="o")
    axes[1].axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
    axes[1].set_title("aligned stability of the relabelling", fontsize=9)
    axes[1].legend(frameon=False)
    axes[2].plot(it, frame["confident_fraction"], marker="o")
    axes[2].set_title("share of each cluster trained on", fontsize=9)
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plots.save_figure(fig, progress_path, bbox_inches=None)


# --------------------------------------------------------------------------- #
def evaluate_parser():
    p = ArgumentParser(prog="selflabel evaluate",
                       description="Score a saved model on the test split of a data set (or on all of a "
                       "labelled file): accuracy, NMI, purity, ARI, per-class F1.")
    p.add_argument("--model", required=True, metavar="MODEL.keras", help="a model written by bin/selflabel")
    add_data_arguments(p, required=False, what="a labelled data set of images")
    p.add_argument("--out", metavar="JSON", help="also write the metrics to this file")
    return p


def evaluate_main(argv):
    args = evaluate_parser().parse_args(argv)
    x, y, names, x_test, y_test = load_images(args)
    if x_test is None:
        x_test, y_test = x, y
    if y_test is None:
        raise UsageError("evaluation needs labels; the data have none (give --label_col for a CSV)")
    quiet_tensorflow()
    from dcn.selflabel.network import load_model

    model = load_model(args.model)
    if tuple(x_test.shape[1:]) != model.sample_shape:
        raise UsageError(f"{args.model} takes images of shape {model.sample_shape}, the data have "
                         f"{x_test.shape[1:]}")
    m = test_metrics(model, x_test, y_test, names)
    print(f"{m['n_images']} images: accuracy {m['accuracy']:.4f}, NMI {m['nmi']:.4f}, "
          f"purity {m['purity']:.4f}, ARI {m['ari']:.4f}, lowest class F1 {m['min_f1']:.4f}")
    for c, v in m["per_class"].items():
        print(f"  {c:<14} precision {v['precision']:.3f}  recall {v['recall']:.3f}  F1 {v['f1-score']:.3f}")
    if args.out:
        write_json(Path(args.out), m)
    return 0


def predict_parser():
    p = ArgumentParser(prog="selflabel predict",
                       description="Classes of images under a saved model (any size or colour: converted to "
                       "the model's size and channels): one CSV row per image with its top-k classes and "
                       "their probabilities (clusters sharing a class name add up).")
    add_predict_arguments(p, "bin/selflabel")
    p.add_argument("--top_k", type=int, default=3, bounds="[1, inf)", help="classes listed per image")
    return p


def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model, samples = model_and_samples(args, "dcn.selflabel.network")
    probs = model.predict_proba(np.asarray(samples.x, np.float32))
    names = model.cluster_names or [f"cluster {k}" for k in range(model.n_clusters)]
    labels = list(dict.fromkeys(names))  # clusters sharing a name add up
    per_name = np.stack([probs[:, [k for k, n in enumerate(names) if n == name]].sum(axis=1)
                         for name in labels], axis=1)
    top = np.argsort(-per_name, axis=1, kind="stable")[:, :args.top_k]
    columns = {}
    for r in range(top.shape[1]):
        columns[f"class_{r + 1}"] = np.asarray(labels, dtype=object)[top[:, r]]
        columns[f"probability_{r + 1}"] = np.take_along_axis(per_name, top[:, [r]], axis=1)[:, 0].round(4)
    if args.images:  # a few files named on the command line: also on the screen
        for path, order, p in zip(samples.frame["image"], top, per_name):
            print(f"{path}\t" + "\t".join(f"{labels[j]} {p[j]:.3f}" for j in order))
    write_predictions(samples, columns, args)
    return 0


def train_main(argv):
    return SelfLabelCommand().main(argv)


def main(argv=None):
    run(dispatch({"train": train_main, "evaluate": evaluate_main, "predict": predict_main}, "train"), argv,
        prog="selflabel")


if __name__ == "__main__":
    main()
