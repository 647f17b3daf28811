"""The self-labelling loop: first features, training on pseudo-labels, relabelling.

See :mod:`dcn.selflabel` for the method; :func:`refine` is the loop,
:func:`initial_features` the features the first labels come from.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import keras
import numpy as np

from common.clustering import kmeans_labels
from common.errors import UsageError
from common.results import atomic_path
from common.runtime import from_chief, is_chief
from common.training import train
from dcn.selflabel.labels import (
    align_labels,
    aligned_stability,
    balanced_labels,
    fraction_at,
    label_scores,
    neighbour_agreement,
    select_confident,
)
from dcn.selflabel.network import (
    CONTRASTIVE_AUGMENT,
    ContrastiveTask,
    NeighbourTask,
    PseudoLabelTask,
    SelfLabelNet,
    augmenter,
    load_model,
)

INITS = ("ae", "desom", "random", "contrastive")
MANIFOLDS = ("umap", "none")
SELECTIONS = ("probability", "neighbours")
RELABELS = ("predict", "cluster")
#: The CNN after contrastive pretraining, in a run's folder (where the loop starts from; for --resume
#: and --first_labels).
INIT_MODEL = "init_model.keras"
#: Optimizer steps a round takes at least (its epochs are stretched to reach them). On the 1,347
#: training digits 2 epochs were 6 steps, after which the classifier predicted its labels at chance and
#: its relabelling replaced them (test accuracy 0.86 -> 0.51); with 200, 300 or 500 steps it ended at
#: 0.924 / 0.922 / 0.918. On Fashion-MNIST's 60,000 a round takes 234 steps or more already.
MIN_STEPS = 200
#: Share of the labels it trained on that the classifier must predict (after the neighbour phase) before
#: it relabels; below it, the round trains again, FIT_ATTEMPTS times at most. Not higher: on
#: Fashion-MNIST the classifier of round 0 predicts 69 % of its first labels, and where it departs
#: from them it is more often right than they are (test accuracy 0.695, the labels 0.628).
FIT_THRESHOLD = 0.5
FIT_ATTEMPTS = 3


def relabel(model: SelfLabelNet, x, previous, method: str = "predict", balance: bool = True, seed: int = 0,
            kmeans: str = "auto"):
    """New (labels, confidence) from the trained classifier, aligned to ``previous``.

    ``predict``: the classifier's predictions (balanced with Sinkhorn-Knopp
    when ``balance``), confidence = the probability of the chosen label;
    ``cluster``: k-means on the L2-normalised features started from the
    previous clusters' centres (backend ``kmeans``), confidence = the k-means
    margin.
    """
    k = model.n_clusters
    if method == "predict":
        p = model.predict_proba(x)
        labels = balanced_labels(p) if balance else p.argmax(axis=1)
        confidence = p[np.arange(len(p)), labels]
    elif method == "cluster":
        labels, confidence = kmeans_labels(model.embed(x), k, seed, init_labels=previous, backend=kmeans)
    else:
        raise UsageError(f"unknown relabelling '{method}'; choose {' or '.join(RELABELS)}")
    return align_labels(labels, previous, k), confidence


# --------------------------------------------------------------------------- #
# Initial features
# --------------------------------------------------------------------------- #
def initial_features(kind: str, x, model: SelfLabelNet | None = None, *, epochs: float = 50,
                     iterations: int = 10000, seed: int = 0, **loop) -> np.ndarray:
    """Features the first pseudo-labels come from.

    ``ae``: codes of a d-500-500-2000-10 autoencoder trained ``epochs`` epochs
    (phase ``init``, log ``init_log.csv``); ``desom``: codes of an 8x8 DESOM
    trained ``iterations`` iterations; ``random``: ``model``'s features at
    initialisation; ``contrastive``: ``model``'s convolutional features
    (:meth:`SelfLabelNet.embed_conv`) after ``epochs`` epochs of
    :class:`ContrastiveTask` (phase ``init``; the model keeps the trained
    weights). Other keyword arguments go to
    :func:`common.training.train`.
    """
    x = np.asarray(x, np.float32)
    if kind in ("random", "contrastive") and model is None:
        raise UsageError(f"--first_features {kind} needs the classifier")
    if kind == "random":
        return model.embed(x)
    if kind == "contrastive":
        with _scope(loop.get("strategy")):
            task = ContrastiveTask(model, augmenter(CONTRASTIVE_AUGMENT, seed))
            optimizer = keras.optimizers.Adam(0.001)
        train(task, x, epochs=epochs, seed=seed, optimizer=optimizer, phase="init", log_name="init_log.csv",
              **loop)
        # the convolutional output, not the dense features under the projection head: on Fashion-MNIST
        # after 15 epochs 83.5 % of an image's 20 nearest neighbours share its class there, 79.7 % in
        # the dense features (the untrained CNN's: 81.0 % and 79.8 %)
        return model.embed_conv(x)
    if kind == "ae":
        from dcn.autoencoders.models import Autoencoder

        with _scope(loop.get("strategy")):
            ae = Autoencoder(x.shape[1:], latent_dim=10, hidden=(500, 500, 2000), name="init_ae")
            optimizer = keras.optimizers.Adam(0.001)
        ae.fit(x, epochs=epochs, seed=seed, optimizer=optimizer, phase="init", log_name="init_log.csv",
               **loop)
        return ae.embed(x)
    if kind == "desom":
        from desom.models import DESOM

        flat = x.reshape(len(x), -1)
        with _scope(loop.get("strategy")):
            som = DESOM(flat.shape[1], map_size=(8, 8), name="init_desom")
            optimizer = keras.optimizers.Adam(0.001)
        som.init_prototypes(flat, method="random", seed=seed)
        som.fit(flat, iterations=iterations, seed=seed, optimizer=optimizer, phase="init",
                log_name="init_log.csv", **loop)
        return som.transform(flat)
    raise UsageError(f"unknown initialisation '{kind}'; choose {', '.join(INITS)}")


def _scope(strategy):
    """A fresh ``strategy.scope()`` (the current strategy's when None)."""
    import tensorflow as tf

    return (strategy or tf.distribute.get_strategy()).scope()


def round_stretch(n_trained: int, batch_size: int, epochs: float, min_steps: int) -> float:
    """How many times ``epochs`` a round trains so that it takes at
    least ``min_steps`` optimizer steps (1.0 when it already does)."""
    steps_per_epoch = max(1, n_trained // max(1, batch_size))
    return max(1.0, min_steps / (epochs * steps_per_epoch)) if min_steps else 1.0


def refine(model: SelfLabelNet, x, labels, confidence, *, rounds: int = 10,
           epochs_per_round: float = 2, recluster_interval: int = 1, relabelling: str = "predict",
           kmeans: str = "auto",
           balance: bool = True, confident_fraction=(0.5, 1.0), fraction_rounds: int | None = None,
           smoothing: float = 0.1, threshold: float = 0.95, lr: float = 0.001, augment=None, neighbours=None,
           knn_epochs: float = 0,
           entropy_weight: float = 5.0, select: str = "probability", min_steps: int = MIN_STEPS,
           fit_threshold: float = FIT_THRESHOLD, save_dir=None, resume: bool = False,
           seed: int = 0, y=None, x_test=None, y_test=None, on_rows=None, **loop) -> list[dict]:
    """Rounds of training on pseudo-labels and relabelling (module docstring).

    Round i trains on labels L_i (its confident share) for
    ``epochs_per_round`` epochs with a fresh Adam (``lr``), then, given
    ``neighbours`` ((samples, k) indices into ``x``), ``knn_epochs`` epochs
    of :class:`NeighbourTask` on every image (phase ``round_<i>_knn``),
    saves ``round_<i>.keras`` and, on relabelling rounds (every
    ``recluster_interval``-th and the last, so that every model can be
    chosen by its stability), computes L_{i+1} (:func:`relabel` with
    ``relabelling``, ``balance`` and the k-means backend ``kmeans``) and its
    aligned stability against L_i. The confident share of each cluster rises linearly from
    ``confident_fraction[0]`` to ``[1]`` over ``fraction_rounds``
    rounds (default: all of them), then stays; it is chosen by the
    labels' confidence (``select="probability"``) or by
    :func:`neighbour_agreement` over ``neighbours`` (``"neighbours"``, ties
    by the confidence). With ``save_dir`` every
    round's labels are kept in ``pseudo_labels/`` and ``resume`` skips
    finished rounds (the one in progress resumes from its checkpoint).
    ``y`` / ``y_test`` (optional) are scored in each row, for reporting only.
    ``on_rows(rows)`` is called with every row so far after each round
    (to write history.csv). Returns the rows.
    """
    k = model.n_clusters
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection '{select}'; choose {' or '.join(SELECTIONS)}")
    if select == "neighbours" and neighbours is None:
        raise UsageError("selecting the confident share by neighbours needs the neighbours")
    x = np.asarray(x, np.float32)
    strategy = loop.get("strategy")
    save = None if save_dir is None else Path(save_dir)
    write = save is not None and is_chief(strategy)  # the other workers of a multi-worker run write nothing
    if write:
        (save / "pseudo_labels").mkdir(parents=True, exist_ok=True)
        (save / "logs").mkdir(exist_ok=True)
    rows, start = [], 0

    def shared(new_labels, new_confidence):
        # every worker trains on the chief's labels: equal sizes keep their steps in step
        return (from_chief(strategy, np.asarray(new_labels, np.int64)),
                from_chief(strategy, np.asarray(new_confidence, np.float64)))

    labels, confidence = shared(labels, confidence)
    if resume and save is not None:
        rows, start, labels, confidence = _resume_state(model, save, labels, confidence)
        if rows and rows[-1].get("stopped"):
            return rows
        if start and not (save / "pseudo_labels" / f"round_{start:02d}.npz").is_file():
            # written by an earlier version, which saved a non-relabelling round's labels only when the
            # next one began: do what the run would have done
            with np.load(save / "pseudo_labels" / f"round_{start - 1:02d}.npz") as f:
                previous, previous_confidence = f["labels"], f["confidence"]
            if start % recluster_interval and start != rounds:  # round start-1 kept its labels
                labels, confidence = shared(previous, previous_confidence)
            else:
                labels, confidence = shared(*relabel(model, x, previous, relabelling, balance, seed, kmeans))
                rows[-1]["stability"] = aligned_stability(labels, previous, k)
                if rows[-1]["stability"] >= threshold:
                    rows[-1]["stopped"] = f"aligned stability {rows[-1]['stability']:.4f} >= {threshold}"
                if write:
                    _save_labels(save / "pseudo_labels" / f"round_{start:02d}.npz", labels, confidence)
                if on_rows is not None:
                    on_rows(rows)
                if rows[-1].get("stopped"):
                    return rows
    knn = None
    if neighbours is not None and knn_epochs > 0:
        with _scope(loop.get("strategy")):
            knn = NeighbourTask(model, x, neighbours, entropy_weight, augment)
    for i in range(start, rounds):
        if write:
            _save_labels(save / "pseudo_labels" / f"round_{i:02d}.npz", labels, confidence)
        fraction = fraction_at(i, fraction_rounds or rounds, *confident_fraction)
        score = confidence if select == "probability" else neighbour_agreement(labels, neighbours, confidence)
        keep = select_confident(labels, score, fraction, k)
        phase = f"round_{i:02d}"
        stretch = round_stretch(int(keep.sum()), loop.get("batch_size", 256), epochs_per_round,
                                    min_steps)
        row = {"round": i, "confident_fraction": round(fraction, 4), "trained_on": int(keep.sum()),
               "epochs": round(epochs_per_round * stretch, 3), "seconds": 0.0}
        for attempt in range(FIT_ATTEMPTS):  # until the classifier fits the labels it trains on
            name = phase if attempt == 0 else f"{phase}_more{attempt}"
            with _scope(loop.get("strategy")):
                task = PseudoLabelTask(model, labels[keep], smoothing)
                optimizer = keras.optimizers.Adam(lr)
            result = train(task, x[keep], epochs=epochs_per_round * stretch, optimizer=optimizer,
                           save_dir=save, phase=name, log_name=f"logs/{name}.csv", resume=resume,
                           seed=seed + 1000 * i + 100 * attempt, map_fn=augment, **loop)
            row.update(loss=_last_value(result), seconds=round(row["seconds"] + result.seconds, 2))
            if knn is not None:
                with _scope(loop.get("strategy")):
                    optimizer = keras.optimizers.Adam(lr)
                knn.seed = seed + 1000 * i + 100 * attempt + 1
                knn_result = train(knn, x, epochs=knn_epochs * stretch, optimizer=optimizer, save_dir=save,
                                   phase=f"{name}_knn", log_name=f"logs/{name}_knn.csv", resume=resume,
                                   seed=knn.seed, map_fn=augment, **loop)
                row.update(knn_loss=_last_value(knn_result), agreement=_last_value(knn_result, "agreement"),
                           seconds=round(row["seconds"] + knn_result.seconds, 2))
            fitted = model.predict_proba(x[keep]).argmax(axis=1) == labels[keep]
            fit = float(from_chief(strategy, np.array([fitted.mean()]))[0])
            row.update(attempts=attempt + 1, fit=round(fit, 4))
            if fit >= fit_threshold:
                break
        if y is not None:
            row.update({f"label_{n}": v for n, v in label_scores(labels, y).items()})
            row["label_acc_trained_on"] = label_scores(labels[keep], np.asarray(y)[keep])["acc"]
        if x_test is not None and y_test is not None:
            pred = model.predict_proba(x_test).argmax(axis=1)
            row.update({f"test_{n}": v for n, v in label_scores(pred, y_test).items()})
        relabelled = (i + 1) % recluster_interval == 0 or i + 1 == rounds
        unfit = row["fit"] < fit_threshold
        if unfit:  # its predictions would replace labels it has not learned: no relabelling from it
            relabelled = False
            row["stopped"] = (f"the classifier fits only {row['fit']:.1%} of the labels it trains on after "
                              f"{row['attempts']} attempts of {row['epochs']:g} epochs (--fit_threshold "
                              f"{fit_threshold:g})")
        if relabelled:
            new, new_conf = shared(*relabel(model, x, labels, relabelling, balance, seed, kmeans))
            row["stability"] = aligned_stability(new, labels, k)
            labels, confidence = new, new_conf
        if relabelled and row["stability"] >= threshold:
            row["stopped"] = f"aligned stability {row['stability']:.4f} >= {threshold}"
        if write:  # the next labels first (the same ones when not relabelled): a finished model implies them
            from common.networks import save_keras_model

            _save_labels(save / "pseudo_labels" / f"round_{i + 1:02d}.npz", labels, confidence)
            save_keras_model(model, save / f"round_{i:02d}.keras")
            for done in (save / "checkpoints").glob(f"{phase}*"):
                shutil.rmtree(done, ignore_errors=True)
        rows.append(row)
        if on_rows is not None:
            on_rows(rows)
        if row.get("stopped"):
            break
    return rows


def _save_labels(path, labels, confidence):
    with atomic_path(path) as tmp:
        np.savez(tmp, labels=labels, confidence=confidence)


def best_round(rows: list[dict]) -> int:
    """The round with the highest aligned stability (later on ties; the
    last one when none was measured)."""
    scored = [(r["stability"], r["round"]) for r in rows if r.get("stability") is not None
              and not math.isnan(r["stability"])]
    return max(scored)[1] if scored else rows[-1]["round"]


def _last_value(result, column: str = "loss") -> float | None:
    """The last logged value of ``column`` in a training call's log."""
    import pandas as pd

    if result.log_path is None or not Path(result.log_path).is_file():
        return None
    log = pd.read_csv(result.log_path)
    values = log[column].dropna() if column in log else log.iloc[:0, 0]
    return None if values.empty else round(float(values.iloc[-1]), 5)


def first_labels_file(run_dir) -> Path:
    """Where a run folder keeps its first pseudo-labels (``round_00.npz``;
    ``iteration_00.npz`` in a folder written before rounds had that name)."""
    labels = Path(run_dir) / "pseudo_labels"
    old = labels / "iteration_00.npz"
    return old if old.is_file() and not (labels / "round_00.npz").is_file() else labels / "round_00.npz"


def upgrade_names(save: Path):
    """Give a run folder written before rounds had that name today's names,
    so that it resumes: ``iteration_NN*`` files and folders become
    ``round_NN*``, history.csv's ``iteration`` and ``rounds`` columns
    ``round`` and ``attempts``."""
    import pandas as pd

    for folder in (save, save / "pseudo_labels", save / "logs", save / "checkpoints"):
        for old in sorted(folder.glob("iteration_[0-9][0-9]*")) if folder.is_dir() else []:
            old.rename(old.with_name("round_" + old.name[len("iteration_"):]))
    history = save / "history.csv"
    if history.is_file():
        frame = pd.read_csv(history)
        if "iteration" in frame:
            frame.rename(columns={"iteration": "round", "rounds": "attempts"}).to_csv(history, index=False)


def _resume_state(model, save: Path, labels, confidence):
    """Rows of history.csv, the first unfinished round, its labels; the
    model gets the weights of the last finished round."""
    import pandas as pd

    history = save / "history.csv"
    rows = pd.read_csv(history).to_dict(orient="records") if history.is_file() else []
    rows = [{key: v for key, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in rows]
    # keep only rounds whose model was written
    rows = [r for r in rows if (save / f"round_{int(r['round']):02d}.keras").is_file()]
    start = len(rows)
    if start:
        model.set_weights(load_model(save / f"round_{start - 1:02d}.keras").get_weights())
    saved = save / "pseudo_labels" / f"round_{start:02d}.npz"
    if saved.is_file():
        with np.load(saved) as f:
            labels, confidence = f["labels"], f["confidence"]
    return rows, start, labels, confidence
