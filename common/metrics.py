"""Clustering and self-organizing-map quality, scored as the papers do.

Label-based (need the true classes): :func:`purity`, :func:`accuracy` with
its Hungarian cluster-to-class :func:`hungarian_mapping`, NMI and ARI
(scikit-learn). Map-based: :func:`quantization_error` and
:func:`topographic_error` from the squared distances between samples and
prototypes (what ``SOMLayer`` outputs). Internal (no labels):
:func:`internal_metrics`. :func:`evaluate_clustering` returns every metric
that applies to what it is given.

NMI uses scikit-learn's arithmetic normalisation (its default since 0.22).
The DESOM and DEC papers used the older default, the geometric mean, which
gives higher values when there are many more clusters than classes; the
benchmarks report ``nmi_geometric`` beside it for comparison.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.metrics.cluster import contingency_matrix


def _check_pair(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ValueError("no samples to score")
    return y_true, y_pred


def purity(y_true, y_pred) -> float:
    """Fraction of samples whose cluster's majority class is their own class.

    Every cluster counts its most frequent class as correct, so purity grows
    with the number of clusters (it is 1 with one cluster per sample); it is
    the measure used for SOMs with more units than classes.
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    cm = contingency_matrix(y_true, y_pred)  # classes x clusters
    return float(cm.max(axis=0).sum() / cm.sum())


def _match(y_true, y_pred):
    """Hungarian matching of clusters to classes: (mapping, agreements)."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = {clusters[r].item(): classes[c].item() for r, c in zip(rows, cols)}
    return mapping, int(counts[rows, cols].sum())


def hungarian_mapping(y_true, y_pred) -> dict:
    """The one-to-one cluster -> class matching with the most agreements.

    Solved with the Hungarian method (``scipy.optimize.linear_sum_assignment``)
    on the contingency table. When clusters outnumber classes, the surplus
    clusters get no class: they are missing from the mapping and their
    samples count as errors in :func:`accuracy`.
    """
    return _match(y_true, y_pred)[0]


def accuracy(y_true, y_pred) -> float:
    """Unsupervised clustering accuracy: agreement under :func:`hungarian_mapping`."""
    return _match(y_true, y_pred)[1] / len(np.ravel(y_true))


def prototype_kmeans_accuracy(y_true, units, prototypes, seed: int = 0) -> float:
    """The DESOM paper's accuracy of a map with more units than classes.

    k-means (k = the number of classes, scikit-learn, 10 starts) groups the
    prototypes; every sample takes its unit's group, scored by
    :func:`accuracy`. (The one-to-one :func:`accuracy` over units lets at most
    k units count: 10 of the 400 of a 20x20 map.)
    ``units`` are the samples' best-matching units (indices of ``prototypes``).
    """
    y_true, units = _check_pair(y_true, units)
    k = len(np.unique(y_true))
    if len(prototypes) <= k:
        raise ValueError(f"{len(prototypes)} prototypes for {k} classes: use accuracy() when units <= "
                         "classes")
    return accuracy(y_true, prototype_groups(prototypes, k, seed)[units])


def prototype_groups(prototypes, k: int, seed: int = 0) -> np.ndarray:
    """The group (0..k-1) of each of a map's prototypes: k-means (scikit-learn,
    10 starts), as :func:`prototype_kmeans_accuracy` groups them; a map of at
    most k units keeps one group per unit."""
    from sklearn.cluster import KMeans

    p = np.asarray(prototypes, np.float64).reshape(len(prototypes), -1)
    if len(p) <= k:
        return np.arange(len(p))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(p)


def nmi(y_true, y_pred, average_method: str = "arithmetic") -> float:
    """Normalised mutual information (scikit-learn)."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(skm.normalized_mutual_info_score(y_true, y_pred, average_method=average_method))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index (scikit-learn)."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(skm.adjusted_rand_score(y_true, y_pred))


def quantization_error(sq_distances) -> float:
    """Mean Euclidean distance from each sample to its best-matching prototype.

    ``sq_distances`` is the (samples, units) matrix of squared Euclidean
    distances. This is Kohonen's quantization error, and the original DESOM
    code's (somperf's, on the square roots of its distances; its own
    ``metrics.quantization_error``, the mean squared distance, is never called).
    """
    d = np.asarray(sq_distances, dtype=np.float64)
    return float(np.sqrt(np.maximum(d.min(axis=1), 0.0)).mean())


def rectangular_unit_distances(map_size) -> np.ndarray:
    """Manhattan distances between the units of a rectangular (rows, cols) map.

    Units are numbered row by row. The SOM layer offers hexagonal and
    toroidal maps too (``desom.layers.map_distances``).
    """
    rows, cols = int(map_size[0]), int(map_size[1])
    rc = np.indices((rows, cols)).reshape(2, -1).T
    return np.abs(rc[:, None, :] - rc[None, :, :]).sum(axis=-1)


def topographic_error(sq_distances, map_size=None, unit_distances=None) -> float:
    """Fraction of samples whose two best-matching units are not neighbours.

    Neighbours are units at map distance 1: the four nearest units of a
    rectangular map, the six of a hexagonal one. Give ``unit_distances``
    (units x units) for any topology, or ``map_size`` for a rectangular map.
    """
    d = np.asarray(sq_distances)
    if unit_distances is None:
        if map_size is None:
            raise ValueError("topographic_error needs map_size or unit_distances")
        unit_distances = rectangular_unit_distances(map_size)
    unit_distances = np.asarray(unit_distances)
    if unit_distances.shape != (d.shape[1], d.shape[1]):
        raise ValueError(f"unit_distances has shape {unit_distances.shape} for {d.shape[1]} units")
    if d.shape[1] < 2:
        return 0.0
    two = np.argpartition(d, 1, axis=1)[:, :2]
    # argpartition puts the smallest first, the second smallest second.
    return float(np.mean(unit_distances[two[:, 0], two[:, 1]] > 1))


def internal_metrics(features, labels, sample_size: int | None = None, seed: int = 0) -> dict:
    """Silhouette, Davies-Bouldin and Calinski-Harabasz of ``labels`` on ``features``.

    With ``sample_size`` the three are computed on the same fixed-seed random
    subsample of that many samples (silhouette is quadratic in the sample
    count). Returns an empty dict when fewer than two clusters, or as many
    clusters as samples, remain.
    """
    x, labels = features, np.asarray(labels).ravel()
    if sample_size is not None and sample_size < len(x):
        pick = np.random.default_rng(seed).choice(len(x), size=sample_size, replace=False)
        x, labels = x[pick], labels[pick]  # before any copy: features may be a DiskArray
    x = np.asarray(x).reshape(len(x), -1)
    k = len(np.unique(labels))
    if k < 2 or k >= len(x):
        return {}
    from sklearn import config_context

    with config_context(working_memory=64):  # MB of distances at a time (default 1024: the run's peak)
        silhouette = float(skm.silhouette_score(x, labels))
    return {
        "silhouette": silhouette,
        "davies_bouldin": float(skm.davies_bouldin_score(x, labels)),
        "calinski_harabasz": float(skm.calinski_harabasz_score(x, labels)),
    }


def evaluate_clustering(y_pred, y_true=None, *, features=None, sq_distances=None, map_size=None,
                        unit_distances=None, sample_size: int | None = 10000,
                        seed: int = 0) -> dict:
    """Every metric that applies, in one dict.

    Always ``n_samples`` and ``n_clusters`` (clusters actually used); with
    ``y_true``: ``purity``, ``acc``, ``nmi``, ``nmi_geometric``, ``ari``; with
    ``sq_distances``: ``quantization_error``, and ``topographic_error`` when the
    map is known (``map_size`` or ``unit_distances``); with ``features``:
    ``silhouette``, ``davies_bouldin``, ``calinski_harabasz`` on a fixed-seed
    subsample of ``sample_size`` samples (None: all).
    """
    y_pred = np.asarray(y_pred).ravel()
    out = {"n_samples": int(len(y_pred)), "n_clusters": int(len(np.unique(y_pred)))}
    if y_true is not None:
        out.update(purity=purity(y_true, y_pred), acc=accuracy(y_true, y_pred),
                   nmi=nmi(y_true, y_pred), nmi_geometric=nmi(y_true, y_pred, "geometric"),
                   ari=ari(y_true, y_pred))
    if sq_distances is not None:
        out["quantization_error"] = quantization_error(sq_distances)
        if map_size is not None or unit_distances is not None:
            out["topographic_error"] = topographic_error(sq_distances, map_size, unit_distances)
    if features is not None:
        out.update(internal_metrics(features, y_pred, sample_size, seed))
    return out
