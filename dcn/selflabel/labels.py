"""Pseudo-label algebra: alignment, stability, balance, confident shares, neighbours.

Plain numpy on label arrays (no model): :func:`align_labels` and
:func:`aligned_stability` compare two labellings, :func:`balanced_labels`
and :func:`class_offsets` make a labelling balanced (Sinkhorn-Knopp, as in
SeLa), :func:`select_confident` and :func:`neighbour_agreement` choose the
share of each cluster a classifier trains on, :func:`nearest_neighbours`
finds the neighbours SCAN's loss uses.
"""

from __future__ import annotations

import numpy as np

from common.errors import UsageError


def align_labels(new, previous, n_clusters: int) -> np.ndarray:
    """``new`` with its ids renamed to agree best with ``previous`` (Hungarian
    matching on the K x K contingency table; every id gets a partner)."""
    from scipy.optimize import linear_sum_assignment

    new, previous = np.asarray(new, np.int64), np.asarray(previous, np.int64)
    if new.shape != previous.shape:
        raise ValueError(f"labellings of different lengths: {new.shape} and {previous.shape}")
    k = int(n_clusters)
    table = np.bincount(new * k + previous, minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(-table)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping[new]


def aligned_stability(new, previous, n_clusters: int) -> float:
    """Share of samples whose label survives a relabelling, after aligning the
    new ids to the old ones (1.0 for a permuted copy of the same labelling)."""
    previous = np.asarray(previous)
    return float(np.mean(align_labels(new, previous, n_clusters) == previous)) if len(previous) else 1.0


def balanced_labels(probs, power: float = 10.0, iterations: int = 100) -> np.ndarray:
    """Labels of an equal-size partition close to the probabilities (SeLa).

    Sinkhorn-Knopp scales ``probs ** power`` until every column (cluster)
    sums to N/K and every row to 1; each sample takes the argmax of its row.
    A larger ``power`` stays closer to the plain argmax. This assumes
    clusters of about equal size (true of Fashion-MNIST and MNIST).
    """
    return _sinkhorn(probs, power, iterations)[0].argmax(axis=1)


def class_offsets(probs, power: float = 10.0, iterations: int = 100) -> np.ndarray:
    """Per-class shifts of the log-probabilities that make their argmax the
    :func:`balanced_labels` of ``probs`` (up to rounding).

    The Sinkhorn-Knopp scaling of a row does not change its argmax, so the
    balanced label of sample i is ``argmax_j(power * log p_ij + log c_j)``
    with ``c`` the product of the column scalings: ``log(c) / power`` added
    to a classifier's logits makes it predict that partition, on these
    samples and, as a fixed prior correction, on new ones.
    """
    log_c = _sinkhorn(probs, power, iterations)[1]
    return (log_c - log_c.mean()) / power


def _sinkhorn(probs, power: float, iterations: int):
    """(scaled matrix, log of the accumulated column scalings)."""
    p = np.asarray(probs, np.float64)
    n, k = p.shape
    logq = power * np.log(np.clip(p, 1e-30, None))
    q = np.exp(logq - logq.max(axis=1, keepdims=True))
    log_c = np.zeros(k)
    for _ in range(iterations):
        scale = (n / k) / np.maximum(q.sum(axis=0, keepdims=True), 1e-300)
        q *= scale
        log_c += np.log(scale[0])
        q /= q.sum(axis=1, keepdims=True)
    return q, log_c


def select_confident(labels, confidence, fraction: float, n_clusters: int) -> np.ndarray:
    """Mask of the ``fraction`` most confident members of each cluster (at
    least one per non-empty cluster), so every cluster keeps its share."""
    labels, confidence = np.asarray(labels), np.asarray(confidence)
    if not 0 < fraction <= 1:
        raise UsageError(f"the confident fraction must be in (0, 1], got {fraction}")
    keep = np.zeros(len(labels), bool)
    for k in range(n_clusters):
        members = np.flatnonzero(labels == k)
        if len(members):
            m = max(1, int(round(fraction * len(members))))
            keep[members[np.argsort(-confidence[members], kind="stable")[:m]]] = True
    return keep


def neighbour_agreement(labels, neighbours, confidence=None) -> np.ndarray:
    """Share of each sample's ``neighbours`` ((samples, k) indices) that carry
    its label; with ``confidence`` (values in [0, 1]), ties are broken by it
    (added at a weight below one neighbour's share, so the order of the
    shares is kept).

    A selection score for :func:`select_confident` that looks past the
    clustering's own posterior (SPICE's reliable labels, Niu et al. 2022):
    a label its neighbours in the initial features agree with is more often
    right.
    """
    labels = np.asarray(labels)
    neighbours = np.asarray(neighbours)
    share = np.mean(labels[neighbours] == labels[:, None], axis=1)
    if confidence is not None:
        share = share + np.clip(np.asarray(confidence, np.float64), 0.0, 1.0) / (2 * neighbours.shape[1])
    return share


def nearest_neighbours(z, k: int = 20) -> np.ndarray:
    """(samples, k) indices of each sample's ``k`` nearest others in ``z``
    (Euclidean; at most samples - 1)."""
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, np.float32).reshape(len(z), -1)
    k = min(int(k), len(z) - 1)
    if k < 1:
        raise UsageError("nearest neighbours need at least 2 samples")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    return idx[:, 1:].astype(np.int32)


def fraction_at(i: int, rounds: int, start: float, end: float) -> float:
    """The confident share of round ``i``: linear from ``start`` at round 0
    to ``end`` at round ``rounds - 1``, then ``end``."""
    return start if rounds <= 1 else start + (end - start) * min(i, rounds - 1) / (rounds - 1)


def label_scores(labels, y) -> dict:
    """Accuracy, NMI, purity, ARI of a labelling against true labels (reporting)."""
    from common.metrics import evaluate_clustering

    m = evaluate_clustering(labels, y)
    return {k: m[k] for k in ("acc", "nmi", "purity", "ari")}
