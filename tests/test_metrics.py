"""Metrics against hand-computed cases and scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from common import metrics as m


def test_permuted_perfect_clustering_scores_one():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array([5, 5, 3, 3, 9, 9, 9])  # same partition, other names
    assert m.accuracy(y, p) == 1.0
    assert m.purity(y, p) == 1.0
    assert m.nmi(y, p) == pytest.approx(1.0)
    assert m.ari(y, p) == pytest.approx(1.0)
    assert m.hungarian_mapping(y, p) == {5: 0, 3: 1, 9: 2}


def test_purity_with_more_clusters_than_classes():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    # cluster majorities: c0 -> 2 of class 0, c1 -> 1, c2 -> 2 of class 1, c3 -> 1
    assert m.purity(y, p) == pytest.approx(6 / 8)
    # Hungarian: one cluster per class, so only 2 + 2 samples can be right
    assert m.accuracy(y, p) == pytest.approx(4 / 8)
    mapping = m.hungarian_mapping(y, p)
    assert len(mapping) == 2 and sorted(mapping.values()) == [0, 1]
    assert mapping[0] == 0 and mapping[2] == 1


def test_accuracy_picks_the_best_assignment_not_the_greedy_one():
    # Greedy would give cluster 0 to class 0 (3 hits) and leave 1 hit;
    # the optimum maps cluster 0 -> class 1 and cluster 1 -> class 0 (2 + 3).
    y = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    p = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert m.accuracy(y, p) == pytest.approx(5 / 8)
    assert m.hungarian_mapping(y, p) == {0: 1, 1: 0}


def test_accuracy_with_fewer_clusters_than_classes():
    y = np.array([0, 1, 2, 2])
    p = np.array([7, 7, 7, 7])
    assert m.accuracy(y, p) == pytest.approx(2 / 4)
    assert m.hungarian_mapping(y, p) == {7: 2}


def test_nmi_geometric_matches_sklearn_and_exceeds_arithmetic_with_many_clusters():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = y * 4 + rng.integers(0, 4, 300)  # 12 clusters, each inside one class
    assert m.nmi(y, p, "geometric") == pytest.approx(
        skm.normalized_mutual_info_score(y, p, average_method="geometric"))
    assert m.nmi(y, p, "geometric") > m.nmi(y, p)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        m.purity([0, 1, 2], [0, 1])


def test_quantization_error_is_mean_distance_to_best_unit():
    sq = np.array([[4.0, 9.0], [25.0, 1.0], [0.0, 16.0]])
    assert m.quantization_error(sq) == pytest.approx((2 + 1 + 0) / 3)


def test_rectangular_unit_distances():
    d = m.rectangular_unit_distances((2, 3))
    # unit 0 = (0, 0), unit 5 = (1, 2)
    assert d[0, 5] == 3 and d[2, 3] == 3 and d[1, 4] == 1 and d[4, 4] == 0
    assert d.shape == (6, 6) and (d == d.T).all()


def test_topographic_error_on_a_known_map():
    # 2 x 3 map: units 0 1 2 / 3 4 5
    sq = np.array([
        [0.0, 1.0, 9.0, 9.0, 9.0, 9.0],  # best 0, second 1: neighbours
        [9.0, 9.0, 0.0, 9.0, 9.0, 1.0],  # best 2, second 5: neighbours
        [0.0, 9.0, 9.0, 9.0, 1.0, 9.0],  # best 0, second 4: diagonal, not neighbours
        [9.0, 9.0, 1.0, 0.0, 9.0, 9.0],  # best 3, second 2: far apart
    ])
    assert m.topographic_error(sq, map_size=(2, 3)) == pytest.approx(0.5)
    # Any topology through an explicit distance matrix: call everything adjacent.
    assert m.topographic_error(sq, unit_distances=np.ones((6, 6))) == 0.0
    with pytest.raises(ValueError, match="map_size or unit_distances"):
        m.topographic_error(sq)


def test_internal_metrics_match_sklearn_and_subsample_is_fixed():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 2)), rng.normal(6, 1, (50, 2))])
    labels = np.repeat([0, 1], 50)
    full = m.internal_metrics(x, labels)
    assert full["silhouette"] == pytest.approx(skm.silhouette_score(x, labels))
    assert full["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(x, labels))
    assert full["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(x, labels))
    a = m.internal_metrics(x, labels, sample_size=30, seed=3)
    b = m.internal_metrics(x, labels, sample_size=30, seed=3)
    assert a == b and a != full
    assert m.internal_metrics(x, np.zeros(100)) == {}


def test_evaluate_clustering_reports_what_applies():
    rng = np.random.default_rng(1)
    sq = rng.random((40, 4))
    pred = sq.argmin(axis=1)
    y = rng.integers(0, 2, 40)
    feats = rng.random((40, 3))
    only_pred = m.evaluate_clustering(pred)
    assert set(only_pred) == {"n_samples", "n_clusters"}
    full = m.evaluate_clustering(pred, y, features=feats, sq_distances=sq, map_size=(2, 2))
    assert {"purity", "acc", "nmi", "nmi_geometric", "ari", "quantization_error",
            "topographic_error", "silhouette", "davies_bouldin", "calinski_harabasz"} <= set(full)
    assert full["purity"] == m.purity(y, pred)
    no_map = m.evaluate_clustering(pred, sq_distances=sq)
    assert "quantization_error" in no_map and "topographic_error" not in no_map


def test_prototype_kmeans_accuracy_on_a_constructed_map():
    # a 2x4 map: units 0-2 near (0, 0), 3-5 near (10, 0), 6-7 near (0, 10)
    protos = np.array([[0, 0], [0.2, 0], [0, 0.2], [10, 0], [10.2, 0], [10, 0.2], [0, 10], [0.2, 10]])
    units = np.array([0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 7, 1])
    classes = np.array([5, 5, 5, 5, 1, 1, 1, 1, 9, 9, 9, 1])  # the last sample sits in class 5's region
    assert m.prototype_kmeans_accuracy(classes, units, protos) == pytest.approx(11 / 12)
    assert m.accuracy(classes, units) == pytest.approx(6 / 12)  # one-to-one: 3 of the 8 units count
    with pytest.raises(ValueError, match="use accuracy"):
        m.prototype_kmeans_accuracy(classes, units % 3, protos[:3])
