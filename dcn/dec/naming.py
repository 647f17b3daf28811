"""Naming clusters after classes, from reference images or from test labels.

From references: every (cluster, class) pair is scored by the mean soft
assignment of that class's reference images to the cluster, and the
Hungarian method picks the one-to-one matching with the highest total score,
so two classes can never silently take the same cluster. Warnings say when a
class's references fall into different clusters, when two classes prefer the
same cluster, and when clusters and classes do not pair up (surplus clusters
stay unnamed; surplus classes get no cluster).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class Naming:
    """Cluster id -> class name (None: unnamed), with the matching's scores."""

    names: list[str | None]
    scores: list[float | None]
    source: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "clusters": {str(k): {"class": n, "score": None if s is None else round(float(s), 4)}
                         for k, (n, s) in enumerate(zip(self.names, self.scores))},
            "warnings": self.warnings,
        }

    def name(self, clusters) -> list[str | None]:
        return [self.names[int(k)] for k in clusters]


def _match(score: np.ndarray, class_names, source: str, warnings: list[str], weights=None) -> Naming:
    """Hungarian matching on a (clusters x classes) table (``weights``, default
    ``score``); each named cluster keeps its ``score``."""
    n_clusters, n_classes = score.shape
    rows, cols = linear_sum_assignment(score if weights is None else weights, maximize=True)
    names: list[str | None] = [None] * n_clusters
    scores: list[float | None] = [None] * n_clusters
    for k, c in zip(rows, cols):
        names[k], scores[k] = class_names[c], float(score[k, c])
    unnamed = [k for k in range(n_clusters) if names[k] is None]
    if unnamed:
        warnings.append(f"{len(unnamed)} clusters outnumber the {n_classes} classes and stay unnamed: "
                        f"{', '.join(map(str, unnamed))}")
    lost = sorted(set(class_names) - set(n for n in names if n is not None))
    if lost:
        warnings.append(f"more classes than clusters: no cluster for {', '.join(lost)}")
    return Naming(names, scores, source, warnings)


def name_from_references(q_ref: np.ndarray, ref_labels: np.ndarray, class_names: list[str]) -> Naming:
    """Name clusters from the soft assignments ``q_ref`` of labelled references."""
    q_ref = np.asarray(q_ref, np.float64)
    ref_labels = np.asarray(ref_labels)
    n_clusters = q_ref.shape[1]
    score = np.zeros((n_clusters, len(class_names)))
    warnings: list[str] = []
    favourite = {}
    for c, name in enumerate(class_names):
        mine = q_ref[ref_labels == c]
        score[:, c] = mine.mean(axis=0)
        hard = np.unique(mine.argmax(axis=1))
        if len(hard) > 1:
            warnings.append(f"references of '{name}' fall into different clusters: "
                            f"{', '.join(map(str, hard))}")
        favourite.setdefault(int(score[:, c].argmax()), []).append(name)
    naming = _match(score, class_names, "reference images", warnings)
    for k, names in sorted(favourite.items()):
        if len(names) > 1:
            given = {n: naming.names.index(n) if n in naming.names else None for n in names}
            detail = ", ".join(f"'{n}' -> {'none' if g is None else g}" for n, g in given.items())
            naming.warnings.append(f"classes {', '.join(repr(n) for n in names)} all prefer cluster {k}; "
                                   f"the one-to-one matching gave {detail}")
    return naming


def name_from_labels(clusters: np.ndarray, labels: np.ndarray, class_names: list[str],
                     n_clusters: int, source: str = "test labels (no reference images)") -> Naming:
    """Name clusters by Hungarian matching on labelled samples (e.g. test/).

    The matching maximises the number of agreeing samples (as clustering
    accuracy does); the score of a named cluster is the share of its samples
    that belong to its class.
    """
    counts = np.zeros((n_clusters, len(class_names)))
    np.add.at(counts, (np.asarray(clusters), np.asarray(labels)), 1)
    score = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return _match(score, class_names, source, [], weights=counts)
