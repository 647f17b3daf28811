"""The comparison of ``bin/rswnet``: every method scored on the same held-out images.

Each method is fitted on the training images and scored on the test images:

* k-means on the raw pixels (k = the number of clusters);
* k-means on the RSWNet latents;
* RSWNet itself: argmax q (clustering head) or the best-matching unit (SOM head);
* a SOM (Kerasom) trained on the RSWNet latents (2x5 by default, as published;
  trained on the latents divided by their overall standard deviation, which
  leaves the best-matching units unchanged);
* the same SOM untrained (random prototypes), which is what the published
  "SOM" column measured;
* DESOM (dense autoencoder, 8x8 map) on the pixels, the SOM family's
  reference, when asked for (``desom_iterations``; it costs more than the rest
  on a CPU) or given trained (``desom_model``, a ``bin/desom`` map of the same
  pixels).

Columns: accuracy (Hungarian; clusters beyond the classes count as errors;
left out for maps with more units than classes), ``acc_kmeans`` for every
map (the DESOM paper's: k-means of the prototypes into as many groups as
classes, each sample taking its unit's group; see
:func:`common.metrics.prototype_kmeans_accuracy`), purity, NMI and ARI
against the labels; silhouette, Davies-Bouldin and
Calinski-Harabasz of each method's assignments in one feature space for all,
the RSWNet latents of the test images, on one fixed-seed subsample; the
clusters used, the share of the largest and every size (a collapse shows);
the method's own seconds. The published figures were internal indices of
k-means labels on the latents they were computed from; here they stand
beside the label-based ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.metrics import evaluate_clustering

KMEANS_PIXELS = "k-means, raw pixels"
KMEANS_LATENTS = "k-means, RSWNet latents"
SOM_TRAINED = "SOM {rows}x{cols} (Kerasom) on RSWNet latents"
SOM_UNTRAINED = "SOM {rows}x{cols} untrained (the published SOM column)"
DESOM_METHOD = "DESOM {rows}x{cols} (dense) on pixels"
COLUMNS = ("method", "clusters", "acc", "acc_kmeans", "purity", "nmi", "ari", "silhouette", "davies_bouldin",
           "calinski_harabasz", "largest_share", "sizes", "seconds")


@dataclass
class Comparison:
    table: pd.DataFrame        # one row per method, COLUMNS
    assignments: dict          # method -> cluster of each test image
    latents: np.ndarray        # RSWNet latents of the test images
    model_method: str          # the row of the trained RSWNet
    som_method: str            # the row of the trained SOM on the latents


def _flat(x):
    return np.asarray(x, np.float32).reshape(len(x), -1)


def _kmeans(train, test, k, seed):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(train).predict(test)


def compare(model, x_train, x_test, y_test=None, *, n_clusters: int, som_map_size=(2, 5),
            som_epochs: int = 20, desom_map_size=(8, 8), desom_iterations: int = 0, desom_model=None,
            internal_samples: int = 5000, batch_size: int = 256, seed: int = 0,
            verbose: int = 0) -> Comparison:
    """Fit every method on ``x_train`` and score it on ``x_test`` (see the module)."""
    import keras

    from desom.layers import pairwise_sq_distances
    from desom.models import DESOM, Kerasom, som_on_codes
    from rswnet.models import RSWNetSOM

    rows, assignments = [], {}
    z_train, z_test = model.transform(x_train), model.transform(x_test)

    def score(method, pred, seconds, prototypes=None):
        """``prototypes``: a map's, which ``pred`` (best-matching units) index."""
        pred = np.asarray(pred).ravel()
        m = evaluate_clustering(pred, y_test, features=z_test, sample_size=internal_samples, seed=seed)
        if prototypes is not None and y_test is not None:
            m["acc_kmeans"] = map_accuracy(y_test, pred, prototypes, seed)
            if len(prototypes) > len(np.unique(y_test)):
                m["acc"] = None  # one unit per class would count: acc_kmeans is the map's accuracy
        sizes = np.sort(np.bincount(pred))[::-1]
        sizes = sizes[sizes > 0]
        rows.append({"method": method, "clusters": m["n_clusters"], **{k: m.get(k) for k in COLUMNS[2:10]},
                     "largest_share": float(sizes[0] / len(pred)), "sizes": " ".join(map(str, sizes)),
                     "seconds": round(seconds, 1)})
        assignments[method] = pred

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    score(KMEANS_PIXELS, *timed(lambda: _kmeans(_flat(x_train), _flat(x_test), n_clusters, seed)))
    score(KMEANS_LATENTS, *timed(lambda: _kmeans(z_train, z_test, n_clusters, seed)))
    if isinstance(model, RSWNetSOM):
        rows_, cols_ = model.map_size
        model_method = f"RSWNet, SOM head {rows_}x{cols_} (best-matching unit)"
        prototypes = np.asarray(model.prototypes)
        score(model_method, pairwise_sq_distances(z_test, prototypes).argmin(axis=1), 0.0, prototypes)
    else:
        model_method = "RSWNet, clustering head (argmax q)"
        score(model_method, model.assign_embeddings(z_test).argmax(axis=1), 0.0)

    rows_, cols_ = som_map_size
    som_method = SOM_TRAINED.format(rows=rows_, cols=cols_)

    def som_trained():
        som, scale = som_on_codes(z_train, som_map_size, som_epochs, batch_size, seed, verbose,
                                  "som_on_latents")
        prototypes = np.asarray(som.prototypes)
        return pairwise_sq_distances(z_test / scale, prototypes).argmin(axis=1), prototypes

    (units, prototypes), seconds = timed(som_trained)
    score(som_method, units, seconds, prototypes)
    keras.utils.set_random_seed(seed)
    untrained = Kerasom(z_train.shape[1], som_map_size, name="untrained_som")
    prototypes = np.asarray(untrained.prototypes)
    units = pairwise_sq_distances(z_test, prototypes).argmin(axis=1)
    score(SOM_UNTRAINED.format(rows=rows_, cols=cols_), units, 0.0, prototypes)

    if desom_model is not None or desom_iterations:
        def desom():
            reference = desom_model
            if reference is None:
                keras.utils.set_random_seed(seed)
                train = _flat(x_train)
                reference = DESOM(train.shape[1], desom_map_size, name="desom_reference")
                reference.init_prototypes(train, seed=seed)
                reference.fit(train, iterations=desom_iterations, batch_size=min(256, len(train)),
                              eval_interval=desom_iterations, eval_samples=min(2000, len(train)), seed=seed,
                              verbose=verbose)
            return reference.predict(_flat(x_test), verbose=0, batch_size=1024), reference

        (units, reference), seconds = timed(desom)
        rows_, cols_ = reference.map_size
        method = DESOM_METHOD.format(rows=rows_, cols=cols_) + (" (given)" if desom_model is not None else "")
        score(method, units, seconds, np.asarray(reference.prototypes))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return Comparison(table, assignments, z_test, model_method, som_method)


def map_accuracy(y, units, prototypes, seed: int = 0) -> float:
    """Accuracy of a map's best-matching ``units``: :func:`~common.metrics.accuracy`
    when it has at most one unit per class, else the DESOM paper's k-means of
    the prototypes (:func:`~common.metrics.prototype_kmeans_accuracy`)."""
    from common.metrics import accuracy, prototype_kmeans_accuracy

    if len(prototypes) <= len(np.unique(y)):
        return accuracy(y, units)
    return prototype_kmeans_accuracy(y, units, prototypes, seed)


def text(table: pd.DataFrame, max_sizes: int = 6) -> str:
    """The comparison as a fixed-width table (sizes cut to the largest few)."""
    shown = table.copy()
    shown["sizes"] = [" ".join(s.split()[:max_sizes]) + (" ..." if len(s.split()) > max_sizes else "")
                      for s in shown["sizes"]]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def figures(comparison: Comparison, x_test, y_test, save_dir, *, samples: int = 2000, seed: int = 0,
            scored: str = "test"):
    """``pca.png`` and ``tsne.png``: raw pixels coloured by k-means on pixels;
    the RSWNet latents coloured by RSWNet, by the trained SOM and by the true
    classes (when known); ``scored`` names the images in the title ("test",
    or "training" when there is no test split). Returns the paths written."""
    from common import plots

    n = len(x_test)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, samples), replace=False))
    pixels, latents = _flat(x_test)[pick], comparison.latents[pick]

    written = []
    for kind, label in (("pca", "PCA"), ("tsne", "t-SNE")):
        xy_pixels, xy_latents = plots.project_2d(pixels, kind, seed), plots.project_2d(latents, kind, seed)
        a = comparison.assignments
        panels = [("raw pixels, coloured by k-means on the pixels", xy_pixels, a[KMEANS_PIXELS][pick]),
                  (f"latents, coloured by {comparison.model_method}", xy_latents,
                   a[comparison.model_method][pick]),
                  (f"latents, coloured by the {comparison.som_method.split(' on ')[0]}", xy_latents,
                   a[comparison.som_method][pick])]
        if y_test is not None:
            panels.append(("latents, coloured by the true classes", xy_latents, np.asarray(y_test)[pick]))
        written.append(plots.scatter_panels(panels, f"{save_dir}/{kind}.png",
                                            title=f"{label} of {len(pick)} {scored} images"))
    return written
