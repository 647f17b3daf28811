"""Two-stage clustering: an autoencoder's codes, then k-means, DBSCAN or a SOM.

* k-means (scikit-learn, k = the number of clusters, 10 restarts);
* DBSCAN (scikit-learn) with ``eps`` from the knee of the k-distance curve
  when not given (:func:`choose_eps`), run on at most ``dbscan_samples``
  codes (its neighbourhoods grow quadratically); its noise points form one
  group of their own in the scores, and their number is reported;
* a SOM (the Kerasom of desom, 8x8) trained on the codes: the AE + SOM
  baseline of the DESOM papers (:func:`desom.models.som_on_codes`);
* UMAP of the codes to k dimensions, then a Gaussian mixture (N2D,
  McConville et al. 2020; :func:`common.clustering.umap_gmm`).

Every method is fitted and scored on the same codes (the DESOM and DEC
protocol: the whole data set), in one table: accuracy (Hungarian; for a map
of more units than clusters ``acc_kmeans`` instead, its prototypes grouped
by k-means as in ``bin/desom``), purity,
NMI, ARI against the labels when known; silhouette of each method's
assignments in the code space on one fixed-seed subsample; clusters used,
noise points, seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.errors import UsageError
from common.metrics import accuracy, evaluate_clustering, prototype_groups

#: in the order of ``--cluster all``; the first is the program's answer (``cluster`` in predictions.csv):
#: UMAP + GMM, which beat k-means on the codes on every labelled data set of the robustness matrix
METHODS = ("umap_gmm", "kmeans", "dbscan", "som")
COLUMNS = ("method", "samples", "clusters", "noise", "acc", "acc_kmeans", "purity", "nmi", "ari",
           "silhouette", "seconds")


def k_distances(codes, k: int) -> np.ndarray:
    """Each code's distance to its ``k``-th nearest code, counting itself as
    DBSCAN's ``min_samples`` does (so the (k-1)-th other code), sorted
    ascending: the k-distance curve."""
    from sklearn.neighbors import NearestNeighbors

    codes = np.asarray(codes, np.float32).reshape(len(codes), -1)
    if not 1 <= k <= len(codes):
        raise UsageError(f"--min_samples must be between 1 and the {len(codes)} samples, got {k}")
    distances, _ = NearestNeighbors(n_neighbors=k).fit(codes).kneighbors(codes)
    return np.sort(distances[:, -1])


def knee(curve) -> int:
    """Index of the knee of an increasing curve: the point farthest below the
    straight line joining its ends, both axes scaled to [0, 1] (the "Kneedle"
    idea of Satopää et al., 2011, in its simplest form)."""
    y = np.asarray(curve, np.float64)
    if len(y) < 3 or y[-1] == y[0]:
        return len(y) // 2
    x = np.linspace(0.0, 1.0, len(y))
    y = (y - y[0]) / (y[-1] - y[0])
    return int(np.argmax(x - y))


def choose_eps(codes, min_samples: int) -> tuple[float, np.ndarray]:
    """DBSCAN's ``eps``: the k-distance (k = ``min_samples``) at the curve's knee,
    or the smallest positive one after it when codes repeat (DBSCAN needs
    eps > 0). Returns it and the curve."""
    if min_samples < 2:
        raise UsageError("--min_samples 1 counts each code alone, so every k-distance is 0 and has no "
                         "knee: give --min_samples 2 or more, or --eps")
    curve = k_distances(codes, min_samples)
    positive = curve[knee(curve):]
    positive = positive[positive > 0]
    if not len(positive):
        raise UsageError(f"the codes' k-distances are 0 from the knee on (at least {min_samples} identical "
                         "codes per point: has the encoder collapsed?); give --eps")
    return float(positive[0]), curve


@dataclass
class TwoStage:
    table: pd.DataFrame                         # one row per method, COLUMNS
    assignments: dict                           # method -> cluster of each scored sample (-1: noise)
    samples: dict                               # method -> indices of the scored samples
    dbscan: dict = field(default_factory=dict)  # eps, chosen or given, min_samples, clusters, noise, curve
    groups: dict = field(default_factory=dict)  # method -> the k-means group of each unit (maps of > k units)


def method_name(method: str, map_size=(8, 8)) -> str:
    return {"kmeans": "k-means", "dbscan": "DBSCAN",
            "som": f"SOM {map_size[0]}x{map_size[1]} (Kerasom)", "umap_gmm": "UMAP + GMM"}[method]


def cluster_codes(codes, y=None, *, methods=METHODS, n_clusters: int = 10, eps: float | None = None,
                  min_samples: int = 10, dbscan_samples: int = 10000, som_map_size=(8, 8),
                  som_epochs: float = 20, internal_samples: int = 5000, seed: int = 0,
                  verbose: int = 0, prefix: str = "") -> TwoStage:
    """Cluster ``codes`` with each of ``methods`` and score them (see the module)."""
    from sklearn.cluster import DBSCAN, KMeans

    from desom.models import som_on_codes

    codes = np.asarray(codes, np.float32).reshape(len(codes), -1)
    y = None if y is None else np.asarray(y).ravel()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown clustering '{unknown[0]}'; choose from {', '.join(METHODS)}")
    rows, assignments, samples, dbscan_info, groups = [], {}, {}, {}, {}
    everyone = np.arange(len(codes))

    def score(name, pred, seconds, pick, noise=0, prototypes=None):
        """``prototypes``: a map's, indexed by ``pred``; it is then scored by acc_kmeans as in bin/desom."""
        pred = np.asarray(pred).ravel()
        truth = None if y is None else y[pick]
        m = evaluate_clustering(pred, truth, features=codes[pick], sample_size=internal_samples, seed=seed)
        if prototypes is not None and len(prototypes) > n_clusters:
            groups[name] = prototype_groups(prototypes, n_clusters, seed)
            if truth is not None:
                m["acc"], m["acc_kmeans"] = None, accuracy(truth, groups[name][pred])
        rows.append({"method": prefix + name, "samples": len(pick), "clusters": m["n_clusters"] - (noise > 0),
                     "noise": int(noise), **{k: m.get(k) for k in COLUMNS[4:10]},
                     "seconds": round(seconds, 1)})
        assignments[name], samples[name] = pred, pick

    for method in methods:
        t = time.perf_counter()
        name = method_name(method, som_map_size)
        if method == "kmeans":
            pred = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(codes)
            score(name, pred, time.perf_counter() - t, everyone)
        elif method == "dbscan":
            pick = everyone
            if len(codes) > dbscan_samples:
                pick = np.sort(np.random.default_rng(seed).choice(len(codes), dbscan_samples, replace=False))
            chosen, curve = (eps, None) if eps is not None else choose_eps(codes[pick], min_samples)
            pred = DBSCAN(eps=chosen, min_samples=min_samples).fit_predict(codes[pick])
            noise = int(np.sum(pred < 0))
            dbscan_info = {"eps": chosen,
                           "eps_from": "given" if eps is not None else "knee of the k-distance curve",
                           "min_samples": int(min_samples), "clusters": int(len(np.unique(pred[pred >= 0]))),
                           "noise": noise, "samples": int(len(pick)), "curve": curve}
            score(name, pred, time.perf_counter() - t, pick, noise)
        elif method == "umap_gmm":
            from common.clustering import umap_gmm

            pred, _ = umap_gmm(codes, n_clusters, seed)
            score(name, pred, time.perf_counter() - t, everyone)
        else:
            som, scale = som_on_codes(codes, som_map_size, som_epochs, seed=seed, verbose=verbose)
            pred = som.predict(codes / scale, batch_size=1024, verbose=0)
            score(name, pred, time.perf_counter() - t, everyone, prototypes=np.asarray(som.prototypes))
    return TwoStage(pd.DataFrame(rows, columns=list(COLUMNS)), assignments, samples, dbscan_info, groups)


def text(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
