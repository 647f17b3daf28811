"""bin/rswnet: train RSWNet (a ResNet50 encoder and a decoder with a clustering or
a SOM head) and compare it honestly with k-means, SOMs and DESOM.

    bin/rswnet --dataset fmnist --input_size 32 --weights none --subset 5000   # CPU-sized
    bin/rswnet --dataset fmnist --protocol published                          # the notebook (GPU)
    bin/rswnet predict --model DIR/model.keras --dataset fmnist
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, dispatch, run
from common.command import RunData, TrainingCommand
from common.data import CLASS_NAMES, IMAGE_SHAPES, is_array_source, load_data
from common.errors import UsageError
from common.predict import add_predict_arguments, model_and_samples, write_predictions
from common.results import write_csv
from desom.cli import add_temperature_arguments

IMAGE_DATASETS = tuple(IMAGE_SHAPES)
#: What each protocol sets when the flag is not given on the command line.
PROTOCOLS = {
    # ours: the published network, DEC's training (full-data target refreshes
    # + reconstruction, as IDEC), shorter phases
    "ours": dict(input_size=224, weights="imagenet", pretrain_epochs=10, epochs=10, recon_weight=10.0,
                 target="refresh", batch_size=128, lr=0.001, bn_momentum=0.9),
    # published: the notebook's settings (22 + 22 epochs, target P from each
    # mini-batch, KL alone with the decoder frozen)
    "published": dict(input_size=224, weights="imagenet", pretrain_epochs=22, epochs=22, recon_weight=0.0,
                      target="batch", batch_size=128, lr=0.001, bn_momentum=0.99),
}


def _stratified(x, y, n: int, seed: int, what: str):
    """``n`` samples of ``x`` (and ``y``), stratified by ``y`` when known, and
    their indices in ``x``."""
    if n >= len(x):
        return x, y, np.arange(len(x))
    if y is None:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
        return x[pick], None, pick
    from sklearn.model_selection import train_test_split

    names, counts = np.unique(y, return_counts=True)
    classes = len(names)
    if n < classes:
        raise UsageError(f"{what} {n} is smaller than the {classes} classes; give at least {classes}")
    if len(x) - n < classes:  # what is left out must hold each class too
        raise UsageError(f"{what} {n} leaves out {len(x) - n} of the {len(x)} images, fewer than the "
                         f"{classes} classes; give at most {len(x) - classes}, or all {len(x)} (no {what})")
    if counts.min() < 2:  # a class of one image cannot be split: draw at random
        print(f"warning: class {names[counts.argmin()]} has a single image; {what} is drawn at random, "
              "not class by class", file=sys.stderr)
        pick = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
        return x[pick], y[pick], pick
    pick, _ = train_test_split(np.arange(len(x)), train_size=n, stratify=y, random_state=seed)
    pick = np.sort(pick)
    return x[pick], y[pick], pick


class RswnetCommand(TrainingCommand):
    prog = "rswnet"
    description = ("RSWNet: a ResNet50 application encoder (2048-d latent) and a transposed-convolution "
                   "decoder with a clustering head (DEC's Student-t layer, the published model) or a SOM "
                   "head (DESOM's), trained on the shared loop; then every method (k-means on pixels and "
                   "on latents, RSWNet, a SOM trained on the latents, an untrained SOM, DESOM) scored on the "
                   "same held-out images. Use `rswnet predict --help` to apply a trained model.")
    seed_help = "seed of weights, data order, subsets, k-means and the compared methods"
    help_groups = dict.fromkeys(("som_map_size", "som_epochs", "desom_iterations", "desom_model"),
                                "output")  # the comparison
    outputs = ("model.keras", "pretrain_log.csv", "log.csv", "comparison.csv", "results.json",
               "predictions.csv", "pca.png", "tsne.png", "explorer.html", "architecture.png",
               "architecture.txt")
    expand_architecture = False

    def add_arguments(self, p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--dataset", choices=IMAGE_DATASETS,
                         help="an image data set (its canonical train/test split)")
        src.add_argument("--data", metavar="DIR",
                         help="an image folder as for bin/dcn: train/ and, for the comparison, test/<class>/")
        p.add_argument("--data_dir", help="--dataset: folder searched first for its files")
        p.add_argument("--image_size", type=int, default=64, bounds="[1, inf)",
                       help="--data: side the images are resized to (what the decoder reconstructs)")
        p.add_argument("--color", choices=("grayscale", "rgb"), default="grayscale",
                       help="--data: colour mode")
        p.add_argument("--subset", type=int, bounds="[1, inf)",
                       help="train on a stratified subset of this many training images")
        p.add_argument("--test_subset", type=int, bounds="[1, inf)",
                       help="score on a stratified subset of the test images")
        p.add_argument("--head", choices=("clustering", "som"), default="clustering",
                       help="clustering: DEC's Student-t layer (published); som: DESOM's SOM layer")
        p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                       help="defaults of the flags below: ours (refreshed targets + reconstruction, 10 + 10 "
                       "epochs) or published (the notebook: per-batch target, KL only, frozen decoder, "
                       "22 + 22 epochs); flags given explicitly win")
        p.add_argument("--input_size", type=int, bounds="[32, inf)",
                       help="side images are resized to for ResNet50, 32 at least (default: 224)")
        p.add_argument("--weights", help="ResNet50 weights: imagenet (Keras' download, cached in "
                       "~/.keras/models), none (random) or a local weights file (default: imagenet)")
        p.add_argument("--bn_momentum", type=float, bounds="[0, 1)",
                       help="momentum of ResNet50's batch-normalisation statistics (default: 0.9; "
                       "--protocol published: Keras' 0.99, slow for short runs from random weights)")
        p.add_argument("--freeze_until", metavar="LAYER",
                       help="freeze ResNet50 up to and including this layer (e.g. conv4_block6_out)")
        p.add_argument("--n_clusters", type=int, bounds="[2, inf)",
                       help="clusters of the clustering head and of k-means (default: the number of classes)")
        p.add_argument("--map_size", nargs=2, type=int, default=[8, 8], bounds="[1, inf)",
                       metavar=("ROWS", "COLS"), help="map of the SOM head")
        p.add_argument("--pretrain_epochs", type=int, bounds="[0, inf)",
                       help="epochs of reconstruction pretraining, 0: none (default: 10; --protocol "
                       "published: 22)")
        p.add_argument("--epochs", type=int, bounds="[1, inf)",
                       help="epochs of the joint phase (default: 10; --protocol published: 22)")
        p.add_argument("--recon_weight", type=float, bounds="[0, inf)",
                       help="clustering head: weight of the reconstruction error beside KL(P||Q) (default: "
                       "10; --protocol published: 0, KL alone, decoder frozen)")
        p.add_argument("--update_interval", type=int, bounds="[1, inf)",
                       help="clustering head: iterations between target refreshes (default: 140, or one "
                       "epoch when shorter); with the per-batch target (--protocol published) there are "
                       "none, and it only spaces the log rows")
        p.add_argument("--tol", type=float, default=0.001, bounds="[0, 1]",
                       help="clustering head: stop when fewer than this share of labels change at a refresh "
                       "(not with the per-batch target of --protocol published, which has no refreshes)")
        p.add_argument("--gamma", type=float, default=0.001, bounds="[0, inf)",
                       help="SOM head: weight of the SOM loss (DESOM's)")
        p.add_argument("--som_loss", choices=("normalized", "desom"), default="normalized",
                       help="SOM head: normalized divides the SOM loss by the batch's latent spread, so "
                       "the encoder cannot lower it by shrinking the codes; desom is the papers' loss "
                       "(on 2048-d latents its map collapses, see the README)")
        p.add_argument("--som_init", choices=("som", "random"), default="som",
                       help="SOM head: prototypes from a short batch SOM on the pretrained codes (an ordered "
                       "map from the start) or the codes of random samples (DESOM's benchmark)")
        add_temperature_arguments(p, what="SOM head: ")
        p.add_argument("--batch_size", type=int, bounds="[1, inf)", help="global batch size (default: 128)")
        p.add_argument("--lr", type=float, bounds="(0, inf)",
                       help="Adam learning rate of both phases (default: 0.001)")
        p.add_argument("--n_init", type=int, default=20, bounds="[1, inf)",
                       help="clustering head: k-means restarts for the initial centres")
        p.add_argument("--som_map_size", nargs=2, type=int, default=[2, 5], bounds="[1, inf)",
                       metavar=("ROWS", "COLS"),
                       help="comparison: the SOM trained on the latents (2x5 as published)")
        p.add_argument("--som_epochs", type=int, default=100, bounds="[1, inf)",
                       help="comparison: epochs of that SOM on the training latents")
        p.add_argument("--desom_iterations", type=int, default=0, bounds="[0, inf)",
                       help="comparison: train DESOM 8x8 on the pixels for this many iterations (the paper's "
                       "10000; on a CPU it costs more than the rest of a small run) and score it; 0: no "
                       "DESOM row unless --desom_model gives one")
        p.add_argument("--desom_model", metavar="MODEL.keras",
                       help="comparison: score this trained bin/desom map (of the same pixels) instead of "
                       "training one")
        p.add_argument("--internal_samples", type=int, default=5000, bounds="[1, inf)",
                       help="comparison: test samples on which the internal indices are computed")
        p.add_argument("--tsne_samples", type=int, default=2000, bounds="[2, inf)",
                       help="scored samples (test, else training) drawn in pca.png and tsne.png")
        p.add_argument("--save_dir", help="output folder (default: results/<data>_rswnet_<head>)")
        p.add_argument("--no_explorer", action="store_true",
                       help="SOM head: do not write explorer.html, the map explorer page of the scored "
                       "images (see `desom explore --help`)")

    def check(self, args):
        if args.data and is_array_source(args.data):
            raise UsageError(f"{args.data} holds arrays or a table; bin/rswnet reads image folders (--data "
                             "DIR, as bin/dcn) and the named image sets (--dataset): bin/dcn and bin/desom "
                             "take such files")
        protocol = PROTOCOLS[args.protocol]
        for name, value in protocol.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        if args.protocol == "published" and args.head != "clustering":
            raise UsageError("the published protocol trains the clustering head; use --protocol ours with "
                             "--head som")
        if str(args.weights).lower() == "none":
            args.weights = "none"  # as text: saved as null, a --resume would take the imagenet default
        from desom.layers import check_map, temperatures

        check_map(args.map_size, flag="--map_size")
        args.Tmax, args.Tmin = temperatures(args.map_size, args.Tmax, args.Tmin, args.schedule)
        check_map(args.som_map_size, flag="--som_map_size")

    def load(self, args) -> RunData:
        classes, paths = None, None
        if args.dataset:
            (x, y), (xt, yt) = load_data(args.dataset, validation=True, flatten=False, data_dir=args.data_dir)
            name = args.dataset
            where = f"{args.dataset}: {len(x)} training and {len(xt)} test images of {x.shape[1:]}"
        else:
            from common import folders as fold

            folders = fold.load_folders(args.data, (args.image_size, args.image_size), args.color,
                                        naming=False)  # scored by Hungarian matching, not named
            x, y = folders.train.x, None
            xt, yt = (folders.test.x, folders.test.labels) if folders.test is not None else (None, None)
            paths = [os.path.relpath(p, args.data) for p in (folders.test or folders.train).paths]
            classes = folders.test.classes if folders.test is not None else (
                folders.reference.classes if folders.reference is not None else None)
            name = Path(args.data).name
            where = f"{args.data}: {fold.describe(folders)}"
        if args.n_clusters is None:
            known = y if y is not None else yt
            if known is None and classes is None:
                raise UsageError("give --n_clusters (no labels or class folders to count classes from)")
            args.n_clusters = len(classes) if classes is not None else len(np.unique(known))
        scored = np.arange(len(x) if xt is None else len(xt))  # rows of the scored images in their part
        if args.subset:
            x, y, picked = _stratified(x, y, args.subset, args.seed, "--subset")
            scored = picked if xt is None else scored
        if args.test_subset and xt is not None:
            xt, yt, scored = _stratified(xt, yt, args.test_subset, args.seed, "--test_subset")
        if args.n_clusters > len(x):
            raise UsageError(f"--n_clusters {args.n_clusters} is more than the {len(x)} training images")
        description = where + (f"; training on {len(x)}" if args.subset else "") + (
            f", scoring on {len(xt)}" if args.test_subset and xt is not None else "")
        return RunData(x, y, xt, yt, name=name, description=description,
                       extra={"classes": classes if classes is not None else CLASS_NAMES.get(args.dataset),
                              "scored": scored, "paths": paths})

    def default_save_dir(self, args, data):
        return f"results/{data.name}_rswnet_{args.head}"

    def describe(self, run):
        a = run.args
        head = (f"clustering head, {a.n_clusters} clusters" if a.head == "clustering"
                else f"SOM head, {a.map_size[0]}x{a.map_size[1]} map")
        return (f"RSWNet ({head}; ResNet50 at {a.input_size}x{a.input_size}, weights "
                f"{a.weights}; protocol {a.protocol})")

    def build(self, run):
        import keras

        from rswnet.models import RSWNet, RSWNetSOM

        a = run.args
        run.optimizers = {"pretrain": keras.optimizers.Adam(a.lr), "train": keras.optimizers.Adam(a.lr)}
        shape = run.data.x.shape[1:]
        if a.head == "som":
            return RSWNetSOM(shape, a.map_size, a.input_size, a.weights, a.freeze_until, a.bn_momentum)
        return RSWNet(shape, a.n_clusters, a.input_size, a.weights, a.freeze_until, a.bn_momentum)

    def train(self, run):
        a, x, y, model = run.args, run.data.x, run.data.y, run.model
        # a --desom_model that cannot score these images is refused before training, not after
        run.kept["desom_model"] = _desom_model(a.desom_model, x)
        run.pretrain(model, run.optimizers["pretrain"])
        options = run.loop_options()
        eval_samples = min(2000, len(x))
        if a.head == "som":
            model.init_prototypes(x, method=a.som_init, seed=a.seed)
            per_epoch = max(len(x) // a.batch_size, 1)
            run.record("train", model.fit(x, y, iterations=a.epochs * per_epoch, gamma=a.gamma, Tmax=a.Tmax,
                                          Tmin=a.Tmin, normalize=a.som_loss == "normalized",
                                          eval_interval=per_epoch, eval_samples=eval_samples,
                                          optimizer=run.optimizers["train"], **options))
        else:
            model.init_centers(x, n_init=a.n_init, seed=a.seed)
            run.record("train", model.fit(x, y, max_epochs=a.epochs, update_interval=a.update_interval,
                                          tol=a.tol, recon_weight=a.recon_weight, target=a.target,
                                          eval_samples=eval_samples, optimizer=run.optimizers["train"],
                                          **options))

    def planned_steps(self, run):
        return [*run.pretrain_plan(), ("train", run.epoch_steps(run.args.epochs))]

    def results(self, run):
        from rswnet import compare

        a, d = run.args, run.data
        held_out = d.x_val is not None
        x_eval, y_eval = (d.x_val, d.y_val) if held_out else (d.x, d.y)
        comparison = compare.compare(
            run.model, d.x, x_eval, y_eval, n_clusters=a.n_clusters, som_map_size=a.som_map_size,
            som_epochs=a.som_epochs, desom_iterations=a.desom_iterations,
            desom_model=run.kept.get("desom_model"), internal_samples=a.internal_samples,
            batch_size=a.batch_size, seed=a.seed, verbose=a.verbose)
        run.data.extra["comparison"] = (comparison, x_eval, y_eval)
        write_csv(comparison.table, run.save_dir / "comparison.csv")
        scored = "the held-out test images" if held_out else "the training images (no test split)"
        if a.verbose:
            print(f"\ncomparison on {len(x_eval)} of {scored}; internal indices in the RSWNet latent space "
                  f"(2048-d) on {min(a.internal_samples, len(x_eval))} samples:")
            print(compare.text(comparison.table))
        model_row = comparison.table.set_index("method").loc[comparison.model_method]
        r = run.phases["train"]
        return {"n_train": len(d.x), "n_scored": len(x_eval), "scored_on": scored,
                "iterations": r.iterations, "stopped": r.stopped_early or "budget",
                "rswnet": {"method": comparison.model_method, **{
                    k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in model_row.to_dict().items()}},
                "internal_space": "RSWNet latents (2048-d) of the scored images",
                "comparison": comparison.table.to_dict(orient="records")}

    def predictions(self, run):
        """RSWNet's cluster (SOM head: unit) of every scored image: the test images, or the training
        images when there is no test split; ``index`` is its row in that part (before subsets)."""
        from common.command import prediction_frame
        from common.metrics import prototype_groups

        comparison, _, y_eval = run.data.extra["comparison"]
        d, model = run.data, run.model
        scored, paths = d.extra["scored"], d.extra["paths"]
        options = {}
        if run.args.head == "som":
            options["map_size"] = model.map_size
            if y_eval is not None:
                options["groups"] = prototype_groups(model.prototypes, len(np.unique(y_eval)), run.args.seed)
        frame = prediction_frame("test" if d.x_val is not None else "train",
                                 comparison.assignments[comparison.model_method], labels=y_eval,
                                 names=d.extra["classes"], images=None if paths is None else
                                 [paths[i] for i in scored], **options)
        frame["index"] = scored
        return frame

    def pictures(self, run, results):
        from rswnet import compare

        comparison, x_eval, y_eval = run.data.extra["comparison"]
        compare.figures(comparison, x_eval, y_eval, run.save_dir, samples=run.args.tsne_samples,
                        seed=run.args.seed, scored="test" if run.data.x_val is not None else "training")
        a = run.args
        if a.head == "som" and not a.no_explorer:
            from desom.explorer import write_explorer

            title = f"{run.data.name} RSWNet SOM head {a.map_size[0]}x{a.map_size[1]}"
            write_explorer(run.save_dir / "explorer.html", run.model, x_eval, y_eval, title=title,
                           image_shape=x_eval.shape[1:], class_names=run.data.extra["classes"],
                           results=results)

    def summary(self, run, results):
        m = results["rswnet"]
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("acc", "nmi", "ari", "purity", "silhouette")
                          if m.get(k) is not None)
        return (f"{results['iterations']} joint iterations ({results['stopped']}); RSWNet on "
                f"{results['scored_on']}: {shown}")


def _desom_model(path, x):
    """The bin/desom map at ``path`` (None: none), checked against the flattened images ``x``."""
    if path is None:
        return None
    from common.networks import load_keras_model
    from desom.models import DESOM

    model = load_keras_model(path, DESOM, "a DESOM map written by bin/desom --model desom")
    features = int(np.prod(x.shape[1:]))
    if tuple(model.sample_shape) != (features,):
        raise UsageError(f"--desom_model {path} takes samples of shape {tuple(model.sample_shape)}; the "
                         f"scored images have {features} pixels (train it with bin/desom on the same images)")
    return model


def train_main(argv):
    return RswnetCommand().main(argv)


def predict_parser():
    p = ArgumentParser(prog="rswnet predict",
                       description="Clusters (clustering head: cluster and probability) or map units (SOM "
                       "head: bmu, row, col, latent distance) of images under a trained RSWNet; one CSV row "
                       "per image.")
    add_predict_arguments(p, "rswnet", datasets=IMAGE_DATASETS)
    return p


def predict_main(argv):
    args = predict_parser().parse_args(argv)
    model, samples = model_and_samples(args, "rswnet.models")
    from desom.layers import pairwise_sq_distances
    from rswnet.models import RSWNetSOM
    x = samples.x
    if isinstance(model, RSWNetSOM):
        d = pairwise_sq_distances(model.transform(x), model.prototypes)
        bmu = d.argmin(axis=1)
        rows, cols = model.unit_coordinates(bmu)
        columns = {"bmu": bmu, "row": rows, "col": cols, "distance": np.sqrt(d[np.arange(len(d)), bmu])}
    else:
        q = model.soft_assign(x)
        columns = {"cluster": q.argmax(axis=1), "probability": q.max(axis=1).round(6)}
        if model.cluster_names:
            columns["class"] = [model.cluster_names[k] for k in columns["cluster"]]
    write_predictions(samples, columns, args)
    return 0


def main(argv=None):
    run(dispatch({"train": train_main, "predict": predict_main}, "train"), argv, prog="rswnet")


if __name__ == "__main__":
    main()
