"""bin/selflabel: aligned stability, balanced relabelling, the loop on digits, saved models, bad input."""

import argparse
import itertools
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.clustering import cluster_features, kmeans_backend, kmeans_labels
from common.errors import UsageError
from dcn.selflabel import (
    FIT_ATTEMPTS,
    FIT_THRESHOLD,
    INIT_MODEL,
    NeighbourTask,
    PseudoLabelTask,
    SelfLabelNet,
    align_labels,
    aligned_stability,
    balanced_labels,
    best_round,
    class_offsets,
    fraction_at,
    initial_features,
    load_model,
    nearest_neighbours,
    neighbour_agreement,
    nt_xent,
    refine,
    round_stretch,
    select_confident,
)
from dcn.selflabel.cli import SCORING, main
from tests.helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "selflabel"
#: digits, DeepCluster's start (k-means of the untrained CNN's features; neighbours of those features for
#: the default neighbour phase), a short run
SHORT = ["--dataset", "digits", "--first_features", "random", "--manifold", "none", "--clusterer", "kmeans",
         "--rounds", "3", "--epochs_per_round", "8", "--batch_size", "64", "--augmentations",
         "translate", "--min_steps", "0", "--verbose", "0"]


def run_bin(*args, timeout=300):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------ pseudo-labels
def brute_force_stability(new, previous, k):
    return max(np.mean(np.array(perm)[new] == previous) for perm in itertools.permutations(range(k)))


def test_aligned_stability_of_a_permuted_copy_is_one_and_matches_brute_force():
    rng = np.random.default_rng(0)
    previous = rng.integers(0, 4, size=200)
    permuted = np.array([2, 0, 3, 1])[previous]
    assert aligned_stability(permuted, previous, 4) == 1.0
    np.testing.assert_array_equal(align_labels(permuted, previous, 4), previous)
    # raw ids of the permuted copy agree on only the samples of the fixed points of the permutation
    assert np.mean(permuted == previous) < 0.1
    for _ in range(5):
        noisy = permuted.copy()
        flip = rng.random(200) < 0.3
        noisy[flip] = rng.integers(0, 4, size=flip.sum())
        expected = brute_force_stability(noisy, previous, 4)
        assert aligned_stability(noisy, previous, 4) == pytest.approx(expected)


def test_alignment_gives_every_id_a_partner_when_a_cluster_is_empty():
    previous = np.array([0, 0, 1, 1, 2, 2])
    new = np.array([1, 1, 1, 1, 0, 0])  # cluster 2 empty in the new labelling
    aligned = align_labels(new, previous, 3)
    assert set(aligned) <= {0, 1, 2} and aligned[4] == 2 and aligned[0] == aligned[2]


def test_balanced_labels_make_equal_clusters_and_keep_a_balanced_argmax():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=400)
    p[:, 0] += 2.0  # most samples prefer cluster 0
    p /= p.sum(axis=1, keepdims=True)
    assert np.bincount(p.argmax(axis=1), minlength=4)[0] > 300
    sizes = np.bincount(balanced_labels(p), minlength=4)
    assert sizes.min() >= 90 and sizes.max() <= 110, sizes
    sharp = np.eye(4)[np.repeat(np.arange(4), 50)] * 0.9 + 0.025  # already balanced and confident
    np.testing.assert_array_equal(balanced_labels(sharp), sharp.argmax(axis=1))


def test_class_offsets_make_the_argmax_the_balanced_labels_and_carry_to_new_samples():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2000, 5)) * 2.0
    logits[:, 1] += 1.5  # most samples prefer class 1
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    offsets = class_offsets(p)
    assert offsets.shape == (5,) and abs(offsets.sum()) < 1e-9 and offsets.argmin() == 1
    shifted = (np.log(p) + offsets).argmax(axis=1)
    np.testing.assert_array_equal(shifted, balanced_labels(p))
    assert np.bincount(shifted, minlength=5).max() <= 420  # 400 each
    # a fixed prior correction: new samples from the same distribution come out about balanced too
    new = rng.normal(size=(2000, 5)) * 2.0
    new[:, 1] += 1.5
    sizes = np.bincount((new - np.log(np.exp(new).sum(axis=1, keepdims=True)) + offsets).argmax(axis=1),
                        minlength=5)
    assert sizes.min() >= 330 and sizes.max() <= 470, sizes


def test_shift_classes_adds_the_offsets_to_the_logits():
    import keras

    keras.utils.set_random_seed(0)
    model = SelfLabelNet((8, 8, 1), 4, filters=(4,), dense=(8,), head=(8,))
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype("float32")
    before = np.log(model.predict_proba(x))
    offsets = np.array([0.5, -1.0, 0.0, 0.5])
    model.shift_classes(offsets)
    after = np.log(model.predict_proba(x))
    # log-softmax of shifted logits: the offsets, less a per-sample constant
    diff = after - before - offsets
    np.testing.assert_allclose(diff - diff[:, :1], 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="need 4 offsets"):
        model.shift_classes([1.0, 2.0])


def test_select_confident_keeps_the_top_share_of_every_cluster():
    labels = np.array([0] * 10 + [1] * 4)
    confidence = np.concatenate([np.arange(10) / 10, [0.9, 0.1, 0.5, 0.3]])
    keep = select_confident(labels, confidence, 0.5, 3)
    np.testing.assert_array_equal(np.flatnonzero(keep), [5, 6, 7, 8, 9, 10, 12])
    assert select_confident(labels, confidence, 0.01, 2).sum() == 2  # at least one per cluster
    assert fraction_at(0, 5, 0.5, 1.0) == 0.5 and fraction_at(4, 5, 0.5, 1.0) == 1.0
    assert fraction_at(2, 5, 0.5, 1.0) == pytest.approx(0.75)
    # --fraction_rounds 3 with more rounds: 0.5, 0.75, 1.0, then 1.0
    assert [fraction_at(i, 3, 0.5, 1.0) for i in range(5)] == [0.5, 0.75, 1.0, 1.0, 1.0]


def test_neighbour_agreement_is_the_share_of_neighbours_with_the_label_ties_by_confidence():
    labels = np.array([0, 0, 0, 1, 1, 1])
    neighbours = np.array([[1, 2], [0, 3], [3, 4], [4, 5], [3, 0], [3, 4]])
    share = neighbour_agreement(labels, neighbours)
    np.testing.assert_allclose(share, [1.0, 0.5, 0.0, 1.0, 0.5, 1.0])
    confidence = np.array([0.2, 0.9, 1.0, 0.1, 1.0, 0.3])
    scored = neighbour_agreement(labels, neighbours, confidence)
    # the shares keep their order (0.5 with confidence 1 stays below 1.0 with confidence 0.1) ...
    assert scored[3] > scored[4] and scored[0] > scored[1] > scored[2]
    # ... and equal shares are ordered by confidence
    assert scored[5] > scored[3]
    keep = select_confident(labels, scored, 0.34, 2)  # the one most agreed-with member of each cluster
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 5])
    with pytest.raises(UsageError, match="needs the neighbours"):
        refine(SelfLabelNet((8, 8, 1), 2, filters=(4,), dense=(8,), head=(4,)), np.zeros((6, 8, 8, 1)),
               labels, confidence, select="neighbours")


def test_refine_trains_on_the_labels_their_neighbours_agree_with():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:400] / 16.0)[..., None].astype(np.float32)
    y = d.target[:400]
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(400) < 0.3, rng.integers(0, 10, 400), y)  # 30 % of the labels redrawn
    kwargs = dict(rounds=1, epochs_per_round=1, batch_size=64, verbose=0, jit_compile=False,
                  confident_fraction=(0.5, 0.5), neighbours=nearest_neighbours(x.reshape(400, -1), 10), y=y)
    trained_right = {}
    for select in ("probability", "neighbours"):
        model = SelfLabelNet((8, 8, 1), 10, filters=(4,), dense=(8,), head=(4,))
        row = refine(model, x, noisy, np.ones(400), select=select, **kwargs)[0]
        trained_right[select] = row["label_acc_trained_on"]
    # equal confidences keep the first half of each cluster; neighbours keep the labels that are right
    assert trained_right["neighbours"] > 0.95 > 0.8 > trained_right["probability"]


def test_smoothed_cross_entropy_against_numpy():
    model = SelfLabelNet((8, 8, 1), 3, filters=(4,), dense=(8,), head=(4,))
    x = np.random.default_rng(2).random((5, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    idx = np.array([6, 0, 3, 1, 2])
    terms = PseudoLabelTask(model, labels, smoothing=0.3).loss_terms(x, idx, {})
    logits = np.asarray(model.logits(x, training=True), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = np.eye(3)[labels[idx]] * 0.7 + 0.1
    np.testing.assert_allclose(np.asarray(terms["loss"]), -(target * log_p).sum(axis=1), rtol=1e-5)
    probs = np.asarray(model(x))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_neighbour_loss_against_numpy():
    import tensorflow as tf

    model = SelfLabelNet((8, 8, 1), 3, filters=(4,), dense=(8,), head=(4,))
    x = np.random.default_rng(4).random((6, 8, 8, 1)).astype(np.float32)
    neighbours = np.array([[1], [0], [3], [2], [5], [4]])  # one neighbour each: the draw is fixed
    idx = np.array([4, 0, 3])
    terms = NeighbourTask(model, x, neighbours, entropy_weight=2.0).loss_terms(
        tf.constant(x[idx]), tf.constant(idx, tf.int64), {"iteration": tf.constant(7, tf.int64)})
    # the same forward pass (batch normalisation sees the images and their neighbours together)
    logits = np.asarray(model.logits(np.concatenate([x[idx], x[[5, 1, 2]]]), training=True), np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    agreement = -np.log((p[:3] * p[3:]).sum(axis=1))
    mean = p[:3].mean(axis=0)
    entropy = -(mean * np.log(mean)).sum()
    np.testing.assert_allclose(np.asarray(terms["agreement"]), agreement, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(terms["entropy"]), entropy, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(terms["loss"]), agreement - 2.0 * entropy, rtol=1e-4, atol=1e-6)


def test_augmentation_layers_draw_independently_and_in_their_ranges():
    import keras

    from dcn.selflabel import augmenter

    # left half dark, right half bright: a flip shows as a bright left half, brightness as the mean
    x = np.zeros((2000, 8, 8, 1), np.float32)
    x[:, :, :4], x[:, :, 4:] = 0.3, 0.6
    out = np.asarray(augmenter(["flip", "brightness"], seed=3)(x))
    flipped = out[:, :, :4].mean(axis=(1, 2, 3)) > out[:, :, 4:].mean(axis=(1, 2, 3))
    shift = out.mean(axis=(1, 2, 3)) - 0.45
    assert 0.4 < flipped.mean() < 0.6
    assert -0.3 <= shift.min() < -0.25 and 0.25 < shift.max() <= 0.3  # +-0.3 (nothing clipped here)
    # one seed for every layer would tie each flip to the same brightness draw (correlation ~0.87)
    assert abs(np.corrcoef(flipped, shift)[0, 1]) < 0.1
    contrast = augmenter(["contrast"], seed=1)
    spread = np.asarray(contrast(x)).std(axis=(1, 2, 3)) / x[0].std()
    assert spread.min() < 0.55 and spread.max() > 1.45  # contrast scaled by 0.5-1.5
    assert isinstance(contrast.pipeline, keras.Sequential)


def test_nt_xent_against_numpy():
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for a in range(8):  # each view against the 7 others, its partner the positive
        others = [b for b in range(8) if b != a]
        logits = np.array([z[a] @ z[b] / 0.5 for b in others])
        partner = others.index((a + 4) % 8)
        losses.append(np.log(np.exp(logits).sum()) - logits[partner])
    losses = np.array(losses)
    got = np.asarray(nt_xent(z1.astype(np.float32), z2.astype(np.float32), 0.5))
    np.testing.assert_allclose(got, (losses[:4] + losses[4:]) / 2, rtol=1e-5)
    # two views pointing the same way and away from the rest: a lower loss than random pairs
    assert np.asarray(nt_xent(z1.astype(np.float32), 2 * z1.astype(np.float32), 0.5)).mean() < got.mean()


def test_contrastive_pretraining_trains_the_features_not_the_classifier(tmp_path):
    import keras
    from sklearn.datasets import load_digits

    x = (load_digits().images[:256] / 16.0)[..., None].astype(np.float32)
    model = SelfLabelNet((8, 8, 1), 4, filters=(8,), dense=(16,), head=(8,))
    head, features = model.classifier.get_weights(), model.features.get_weights()
    z = initial_features("contrastive", x, model, epochs=12, seed=0, batch_size=64, verbose=0,
                         save_dir=tmp_path, jit_compile=False)
    # the convolutional output (8 filters on 4x4 after pooling), not the 16 dense features, L2-normalised
    conv = keras.Model(model.features.input, model.features.get_layer("flatten").output)(x)
    conv = np.asarray(conv).reshape(256, -1)
    np.testing.assert_allclose(z, conv / np.linalg.norm(conv, axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert z.shape == (256, 128)
    for a, b in zip(head, model.classifier.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(features, model.features.get_weights()))
    log = pd.read_csv(tmp_path / "init_log.csv")
    assert log["nt_xent"].iloc[-3:].mean() < log["nt_xent"].iloc[:3].mean(), log["nt_xent"].tolist()
    with pytest.raises(UsageError, match="needs the classifier"):
        initial_features("contrastive", x, None)


def grid_blobs(seed=0):
    """Nine blobs on a grid, the four small ones easy to miss: single k-means or mixture starts often merge
    two large blobs and leave a small one out."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(9), [300, 8] * 4 + [300])
    centres = np.array([(i, j) for i in range(3) for j in range(3)], float) * 5
    return centres[y] + rng.normal(0, 0.4, (len(y), 2)), y


@pytest.mark.slow
@pytest.mark.parametrize("method, kmeans", [("gmm", "auto"), ("kmeans", "sklearn"), ("kmeans", "faiss")])
def test_first_clustering_keeps_the_best_of_its_starts(method, kmeans):
    # with ten starts the fit kept (highest likelihood / lowest inertia) finds every blob, for every seed
    from sklearn.metrics import adjusted_rand_score

    z, y = grid_blobs()
    one = [adjusted_rand_score(y, cluster_features(z, 9, method, seed, 1, kmeans)[0]) for seed in range(10)]
    assert min(one) < 0.99  # the data do trip single starts
    for seed in range(10):
        labels, confidence = cluster_features(z, 9, method, seed, 10, kmeans)
        assert adjusted_rand_score(y, labels) == 1.0
        assert confidence.shape == (len(y),) and np.all((confidence >= 0) & (confidence <= 1))


def test_faiss_and_scikit_learn_kmeans_agree_and_follow_the_previous_ids():
    z, y = grid_blobs(1)
    assert kmeans_backend("auto") == "faiss"  # installed with the dev extra
    fast, fast_margin = kmeans_labels(z, 9, seed=3, backend="faiss")
    slow, slow_margin = kmeans_labels(z, 9, seed=3, backend="sklearn")
    assert aligned_stability(fast, slow, 9) == 1.0
    np.testing.assert_allclose(fast_margin, slow_margin, atol=1e-4)  # 1 - nearest / second distance
    # started from the centres of a labelling, the ids stay those of the labelling (relabel --relabel cluster)
    for backend in ("faiss", "sklearn"):
        labels, _ = kmeans_labels(z, 9, seed=0, init_labels=y, backend=backend)
        np.testing.assert_array_equal(labels, y)


def test_kmeans_faiss_without_faiss_installed_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    assert kmeans_backend("auto") == "sklearn"
    with pytest.raises(UsageError, match="--kmeans faiss needs the faiss-cpu package: pip install faiss-cpu"):
        kmeans_backend("faiss")


def test_nearest_neighbours_leave_out_the_sample_itself():
    z = np.array([[0.0], [1.0], [1.5], [10.0], [10.2]])
    nb = nearest_neighbours(z, 2)
    assert nb.shape == (5, 2) and nb.dtype == np.int32
    np.testing.assert_array_equal(nb[:, 0], [1, 2, 1, 4, 3])
    assert not np.any(nb == np.arange(5)[:, None])
    assert nearest_neighbours(z, 50).shape == (5, 4)  # at most the other samples


def test_best_round_is_the_most_stable_and_later_on_ties():
    rows = [{"round": 0, "stability": 0.8}, {"round": 1, "stability": 0.9},
            {"round": 2, "stability": 0.9}, {"round": 3}]
    assert best_round(rows) == 2
    assert best_round([{"round": 0}, {"round": 1}]) == 1


# ------------------------------------------------------------------ the loop
@pytest.mark.slow
def test_a_run_folder_from_before_rounds_had_that_name_is_upgraded_to_resume(tmp_path):
    from dcn.selflabel.refine import first_labels_file, upgrade_names

    for name in ("iteration_00.keras", "pseudo_labels/iteration_00.npz", "pseudo_labels/iteration_01.npz",
                 "logs/iteration_00_knn.csv", "checkpoints/iteration_01/ckpt", "init_model.keras"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    pd.DataFrame({"iteration": [0], "rounds": [1], "fit": [0.9]}).to_csv(tmp_path / "history.csv",
                                                                         index=False)
    assert first_labels_file(tmp_path) == tmp_path / "pseudo_labels" / "iteration_00.npz"  # read as it is
    upgrade_names(tmp_path)
    for name in ("round_00.keras", "pseudo_labels/round_00.npz", "pseudo_labels/round_01.npz",
                 "logs/round_00_knn.csv", "checkpoints/round_01/ckpt", "init_model.keras"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "round_00.keras").read_text() == "iteration_00.keras"
    assert not list(tmp_path.rglob("iteration_*"))
    assert pd.read_csv(tmp_path / "history.csv").columns.tolist() == ["round", "attempts", "fit"]
    assert first_labels_file(tmp_path) == tmp_path / "pseudo_labels" / "round_00.npz"


def test_refine_resumes_after_the_last_finished_round(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:256] / 16.0)[..., None].astype(np.float32)
    labels = d.target[:256] % 4
    kwargs = dict(epochs_per_round=1, batch_size=64, verbose=0, jit_compile=False, save_dir=tmp_path,
                  threshold=1.0, neighbours=nearest_neighbours(x, 5), knn_epochs=1, min_steps=0,
                  fit_threshold=0.0)
    model = SelfLabelNet((8, 8, 1), 4, filters=(8,), dense=(16,), head=(8,))
    def on_rows(rows):
        pd.DataFrame(rows).to_csv(tmp_path / "history.csv", index=False)

    rows = refine(model, x, labels, np.ones(256), rounds=2, on_rows=on_rows, **kwargs)
    assert [r["round"] for r in rows] == [0, 1]
    assert (tmp_path / "round_01.keras").is_file()
    for phase in ("round_01", "round_01_knn"):  # removed once the model is saved
        assert not (tmp_path / "checkpoints" / phase).exists()
    assert (tmp_path / "logs" / "round_01_knn.csv").is_file() and rows[1]["agreement"] > 0
    assert 0 <= rows[1]["stability"] <= 1  # the last round is relabelled too, for its stability
    saved = np.load(tmp_path / "pseudo_labels" / "round_01.npz")["labels"]
    next_labels = np.load(tmp_path / "pseudo_labels" / "round_02.npz")["labels"]
    stability = rows[1]["stability"]
    before = load_model(tmp_path / "round_01.keras").get_weights()
    # as if the last round had not been relabelled (an interval, or an earlier version)
    (tmp_path / "pseudo_labels" / "round_02.npz").unlink()
    pd.DataFrame(rows).drop(columns="stability").to_csv(tmp_path / "history.csv", index=False)
    # a longer run resumed: rounds 0 and 1 are kept, 1 is relabelled from its saved model, 2 starts
    # from the weights of 1 and those labels
    fresh = SelfLabelNet((8, 8, 1), 4, filters=(8,), dense=(16,), head=(8,))
    rows = refine(fresh, x, np.zeros(256, int), np.ones(256), rounds=3, resume=True, on_rows=on_rows,
                  **kwargs)
    assert [r["round"] for r in rows] == [0, 1, 2]
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["round"].tolist() == [0, 1, 2]
    assert history["stability"].iloc[1] == pytest.approx(stability)
    np.testing.assert_array_equal(np.load(tmp_path / "pseudo_labels" / "round_02.npz")["labels"],
                                  next_labels)
    after = load_model(tmp_path / "round_01.keras").get_weights()
    for a, b in zip(before, after):  # round 1 was not trained again
        np.testing.assert_array_equal(a, b)
    assert np.array_equal(np.load(tmp_path / "pseudo_labels" / "round_01.npz")["labels"], saved)
    assert (tmp_path / "pseudo_labels" / "round_03.npz").is_file()
    assert (tmp_path / "round_02.keras").is_file()


def test_a_round_on_few_samples_is_stretched_to_the_floor_of_steps():
    assert round_stretch(672, 256, 2, 300) == 75  # 2 batches an epoch: 150 epochs make 300 steps
    assert round_stretch(30000, 256, 2, 200) == 1.0  # 234 steps already
    assert round_stretch(672, 256, 2, 0) == 1.0
    assert round_stretch(100, 256, 1, 10) == 10  # fewer samples than a batch: one step an epoch


def test_a_classifier_that_cannot_learn_its_labels_never_relabels_and_the_first_labels_model_is_kept(
        tmp_path):
    """The guard: with a learning rate too small to learn anything, the
    round trains FIT_ATTEMPTS times, does not relabel from its chance-level
    predictions, and the run stops; round 0 is the model kept and the
    note says why. A classifier that can learn relabels after one round."""
    from sklearn.datasets import load_digits

    from dcn.selflabel.cli import _first_labels_note

    d = load_digits()
    x = (d.images[:256] / 16.0)[..., None].astype(np.float32)
    labels = d.target[:256] % 4
    kwargs = dict(epochs_per_round=1, batch_size=64, verbose=0, jit_compile=False, min_steps=12,
                  threshold=1.1, rounds=3)

    def net():
        return SelfLabelNet((8, 8, 1), 4, filters=(8,), dense=(16,), head=(8,))

    rows = refine(net(), x, labels, np.ones(256), lr=1e-9, save_dir=tmp_path / "stuck", **kwargs)
    assert len(rows) == 1 and "stability" not in rows[0]
    assert rows[0]["attempts"] == FIT_ATTEMPTS and rows[0]["fit"] < FIT_THRESHOLD
    assert rows[0]["epochs"] == 6  # the confident half, 2 batches an epoch: stretched to the 12 steps
    assert "the classifier fits only" in rows[0]["stopped"]
    for r in range(FIT_ATTEMPTS):  # every attempt logged, its checkpoints removed with the round's
        assert (tmp_path / "stuck" / "logs" / f"round_00{f'_more{r}' if r else ''}.csv").is_file()
    assert not list((tmp_path / "stuck" / "checkpoints").glob("round_00*"))
    kept = np.load(tmp_path / "stuck" / "pseudo_labels" / "round_01.npz")["labels"]
    np.testing.assert_array_equal(kept, labels)  # not replaced
    assert best_round(rows) == 0
    note = _first_labels_note(rows, 0)
    assert note.startswith("refinement stopped: the classifier fits only") and "round 0" in note

    learnt = refine(net(), x, labels, np.ones(256), lr=0.01, fit_threshold=0.5, save_dir=tmp_path / "ok",
                    **kwargs)
    assert [r["attempts"] for r in learnt] == [1, 1, 1] and all(r["fit"] >= 0.5 for r in learnt)
    assert all(0 <= r["stability"] <= 1 for r in learnt)
    rows = [{"round": 0, "stability": 0.9}, {"round": 1, "stability": 0.8}]
    assert _first_labels_note(rows, 0).startswith("refinement did not improve on the first pseudo-labels: "
                                                   "aligned stability 0.9000 at round 0, at most 0.8000")
    assert _first_labels_note(rows, 1) is None
    assert _first_labels_note(rows[:1], 0) is None  # one round: nothing to improve with


def test_refine_stopped_between_rounds_keeps_the_labels_of_a_non_relabelling_one(tmp_path):
    """With --recluster_interval 2, round 1 trains on round 0's labels;
    a run stopped right after round 0 must do the same when resumed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:256] / 16.0)[..., None].astype(np.float32)
    kwargs = dict(rounds=3, recluster_interval=2, epochs_per_round=1, batch_size=64, verbose=0,
                  jit_compile=False, save_dir=tmp_path, threshold=1.1, min_steps=0, fit_threshold=0.0)

    def stop_after_first(rows):
        pd.DataFrame(rows).to_csv(tmp_path / "history.csv", index=False)
        raise KeyboardInterrupt

    def on_rows(rows):
        pd.DataFrame(rows).to_csv(tmp_path / "history.csv", index=False)

    def net():
        return SelfLabelNet((8, 8, 1), 4, filters=(8,), dense=(16,), head=(8,))

    with pytest.raises(KeyboardInterrupt):
        refine(net(), x, d.target[:256] % 4, np.ones(256), on_rows=stop_after_first, **kwargs)
    first = np.load(tmp_path / "pseudo_labels" / "round_00.npz")["labels"]
    np.testing.assert_array_equal(np.load(tmp_path / "pseudo_labels" / "round_01.npz")["labels"], first)
    for written_before in (True, False):  # this version's files, and an earlier one's (labels of 1 missing)
        if not written_before:
            (tmp_path / "pseudo_labels" / "round_01.npz").unlink()
            for name in ("round_01.keras", "round_02.keras", "pseudo_labels/round_02.npz",
                         "pseudo_labels/round_03.npz"):
                (tmp_path / name).unlink()
            pd.read_csv(tmp_path / "history.csv").iloc[:1].drop(columns="stability").to_csv(
                tmp_path / "history.csv", index=False)
        rows = refine(net(), x, np.zeros(256, int), np.ones(256), resume=True, on_rows=on_rows, **kwargs)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert "stability" not in rows[0]  # round 0 kept its labels
        assert 0 <= rows[1]["stability"] <= 1  # 1 relabelled
        np.testing.assert_array_equal(np.load(tmp_path / "pseudo_labels" / "round_01.npz")["labels"],
                                      first)


def test_history_plots_of_a_run_without_test_images_say_so_without_a_warning(tmp_path):
    from dcn.selflabel.cli import history_plots

    frame = pd.DataFrame({"round": [0, 1], "label_acc": [0.5, 0.6], "label_nmi": [0.4, 0.5],
                          "loss": [1.0, 0.8], "stability": [0.9, 0.95], "confident_fraction": [0.5, 1.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history_plots(frame, tmp_path / "quality.png", tmp_path / "progress.png", threshold=0.99)
    assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "progress.png").stat().st_size > 0


@pytest.mark.slow
def test_bin_selflabel_on_digits_improves_on_its_first_clustering_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([*SHORT, "--save_dir", str(out)])
    assert stop.value.code == 0
    for name in ("model.keras", "history.csv", "test_metrics.json", "results.json", "confusion_matrix.png",
                 "clustering_quality.png", "training_progress.png", "round_00.keras",
                 "round_02.keras", "pseudo_labels/round_00.npz", "logs/round_00.csv",
                 "logs/round_00_knn.csv", "neighbours.npy"):
        assert (out / name).is_file(), name
    history = pd.read_csv(out / "history.csv")
    assert history["round"].tolist() == [0, 1, 2]
    assert {"label_acc", "label_nmi", "label_purity", "test_acc", "test_nmi", "stability", "loss",
            "trained_on", "agreement"} <= set(history.columns)
    assert history["stability"].between(0, 1).all()  # the last round too: any model can be chosen
    # the plan the whole run's time to go is costed from: the phases it trained, with their steps
    from common.command import Run, RunData
    from dcn.selflabel.cli import SelfLabelCommand

    command = SelfLabelCommand()
    args = command.parser().parse_args([*SHORT, "--save_dir", str(out)])
    command.check(args)
    planned = dict(command.planned_steps(Run(args=args, data=RunData(x=np.zeros((1347, 1))), save_dir=out)))
    assert list(planned) == [f"round_{i:02d}{knn}" for i in range(3) for knn in ("", "_knn")]
    for phase, steps in planned.items():  # the confident share is rounded per cluster: a batch or so apart
        assert abs(pd.read_csv(out / "logs" / f"{phase}.csv")["iteration"].iloc[-1] - steps) <= 8, phase
    results = json.loads((out / "results.json").read_text())
    from sklearn.datasets import load_digits

    neighbours, y = np.load(out / "neighbours.npy"), load_digits().target
    y = y[:len(neighbours)]  # the training part of digits' split comes first
    assert results["neighbours_same_class"] == pytest.approx(np.mean(y[neighbours] == y[:, None]), abs=1e-4)
    assert results["chosen_round"] == max(zip(history["stability"], history["round"]))[1]
    assert results["kmeans"] == "faiss"  # --clusterer kmeans, faiss installed with the dev extra
    # the saved model predicts the balanced partition of the chosen round's predictions
    from dcn.selflabel.cli import load_images

    x = load_images(argparse.Namespace(data=None, dataset="digits", data_dir=None, label_col=None))[0]
    raw = load_model(out / f"round_{results['chosen_round']:02d}.keras").predict_proba(x)
    final = load_model(out / "model.keras").predict_proba(x).argmax(axis=1)
    assert np.mean(final == balanced_labels(raw)) > 0.995
    assert len(results["class_offsets"]) == 10 and 0 <= results["shift_changed"] <= 1
    assert results["shift_changed"] == pytest.approx(np.mean(raw.argmax(axis=1) != balanced_labels(raw)),
                                                     abs=1e-4)
    # the loop labels the training images better than the first clustering did
    assert history["label_acc"].iloc[-1] > history["label_acc"].iloc[0] + 0.03, history
    assert results["train"]["acc"] > history["label_acc"].iloc[0] + 0.02, (results["train"], history)
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["n_images"] == 450 and set(metrics["per_class"]) == {str(d) for d in range(10)}
    written = pd.read_csv(out / "predictions.csv")  # the kept model's class of every image, both parts
    assert written.groupby("part").size().to_dict() == {"test": 450, "train": 1347}
    test = written[written["part"] == "test"]
    from common.metrics import accuracy

    assert accuracy(test["label"], test["cluster"]) == pytest.approx(metrics["accuracy"])
    assert test["probability"].between(0, 1).all() and test["name"].notna().all()
    assert metrics["targets"]["accuracy"]["target"] == 0.72
    assert sorted(metrics["cluster_names"]) == [str(d) for d in range(10)]
    # evaluate in a new process: the same numbers from the saved model
    res = run_bin("evaluate", "--model", out / "model.keras", "--dataset", "digits", "--out",
                  tmp_path / "e.json")
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["nmi"] == pytest.approx(metrics["nmi"])
    assert f"accuracy {metrics['accuracy']:.4f}" in res.stdout
    # another loop setting from the same first labels and neighbours, without the init phase
    other = tmp_path / "other"
    with pytest.raises(SystemExit) as stop:
        main([*SHORT, "--rounds", "1", "--select", "neighbours", "--first_labels", str(out),
              "--save_dir", str(other)])
    assert stop.value.code == 0
    for name in ("pseudo_labels/round_00.npz", "neighbours.npy"):
        np.testing.assert_array_equal(*(np.load(run / name)["labels"] if name.endswith("npz")
                                        else np.load(run / name) for run in (out, other)))
    assert "init_features_seconds" in results["timings"]["stages"]
    stages = json.loads((other / "results.json").read_text())["timings"]["stages"]
    assert "init_features_seconds" not in stages and "refine_seconds" in stages
    # resuming a run that lost its neighbours: one line, and advice --resume accepts
    (other / "neighbours.npy").unlink()
    assert_one_line_error(main, ["--resume", "--save_dir", str(other)],
                          f"cannot resume {other}: its neighbours.npy is missing (its --knn_epochs or "
                          "--select neighbours need it); start the run again in a new --save_dir", capsys)


@pytest.mark.slow
def test_bin_selflabel_init_contrastive_starts_the_loop_from_the_pretrained_cnn(tmp_path):
    out, other = tmp_path / "contrastive", tmp_path / "other"
    # one start of the first clustering: what is kept is the point here, not how good it is
    short = [*SHORT, "--rounds", "1", "--epochs_per_round", "1", "--knn_epochs", "0", "--n_init", "1"]
    with pytest.raises(SystemExit) as stop:
        main([*short, "--first_features", "contrastive", "--init_epochs", "1", "--save_dir", str(out)])
    assert stop.value.code == 0
    assert "nt_xent" in pd.read_csv(out / "init_log.csv")
    pretrained = load_model(out / INIT_MODEL)
    # another loop setting from that start: the same first labels and the same pretrained CNN
    with pytest.raises(SystemExit) as stop:
        main([*short, "--first_labels", str(out), "--save_dir", str(other)])
    assert stop.value.code == 0
    for a, b in zip(pretrained.get_weights(), load_model(other / INIT_MODEL).get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not (other / "init_log.csv").exists()
    # a fresh run of another --first_features in that folder does not start from the CNN left there
    with pytest.raises(SystemExit) as stop:
        main([*short, "--save_dir", str(out), "--overwrite"])
    assert stop.value.code == 0 and not (out / INIT_MODEL).exists()


BENCH = ["--dataset", "digits", "--first_features", "random", "--manifold", "none", "--clusterer", "kmeans",
         "--rounds", "1", "--epochs_per_round", "1", "--batch_size", "64", "--knn_epochs", "0"]


@pytest.mark.slow
def test_selflabel_benchmark_reads_back_finished_runs_and_resumes_stopped_ones(tmp_path, capsys):
    from dcn.selflabel.benchmark import main as bench

    def run(*argv):
        with pytest.raises(SystemExit) as stop:
            bench([*BENCH, *argv])
        assert stop.value.code == 0
        return capsys.readouterr().out

    out = tmp_path / "b"
    run("--runs", "2", "--jobs", "2", "--save_dir", str(out))
    runs = pd.read_csv(out / "runs.csv")
    assert runs["seed"].tolist() == [0, 1] and not runs["resumed"].any()
    assert (runs["accuracy"] == [json.loads((out / f"digits_n2d_seed{s}" / "test_metrics.json").read_text())
                                 ["accuracy"] for s in (0, 1)]).all()
    assert (out / "summary.csv").is_file() and (out / "digits_n2d_seed1.log").is_file()
    # the same command again: both read back, nothing run
    for log in out.glob("*.log"):
        log.unlink()
    printed = run("--runs", "2", "--jobs", "2", "--save_dir", str(out))
    assert "read back: digits_n2d_seed0, digits_n2d_seed1" in printed and not list(out.glob("*.log"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), runs)
    # a run stopped half-way (its model and results not yet written) goes on with --resume, without the
    # init phase it had finished; the other is read back
    first_stages = json.loads((out / "digits_n2d_seed1" / "results.json").read_text())["timings"]["stages"]
    for name in ("finished.json", "test_metrics.json", "results.json", "model.keras", "round_00.keras"):
        (out / "digits_n2d_seed1" / name).unlink()
    printed = run("--runs", "2", "--jobs", "2", "--save_dir", str(out))
    assert "running digits_n2d_seed1 (" in printed and not (out / "digits_n2d_seed0.log").exists()
    assert pd.read_csv(out / "runs.csv")["resumed"].tolist() == [False, True]
    stages = json.loads((out / "digits_n2d_seed1" / "results.json").read_text())["timings"]["stages"]
    assert "init_features_seconds" in first_stages and "init_features_seconds" not in stages
    assert (out / "digits_n2d_seed1" / "round_00.keras").is_file()
    # another command in the same folders is refused before anything runs
    assert_one_line_error(bench, [*BENCH, "--runs", "1", "--lr", "0.002", "--save_dir", str(out)],
                          "digits_n2d_seed0 holds a run of another command", capsys)
    assert_one_line_error(bench, [*BENCH, "--first_labels_from", str(out), "--save_dir", str(out)],
                          "--first_labels_from names the --save_dir folder itself", capsys)
    # so is a run made when a default was another: the same command now means another run
    saved = json.loads((out / "digits_n2d_seed0" / "args.json").read_text())
    (out / "digits_n2d_seed0" / "args.json").write_text(json.dumps({**saved, "label_smoothing": 0.2}))
    assert_one_line_error(bench, [*BENCH, "--runs", "2", "--jobs", "2", "--save_dir", str(out)],
                          "digits_n2d_seed0 was run with --label_smoothing 0.2, the default when it ran; the "
                          "same command now means --label_smoothing 0.1: give another --save_dir", capsys)
    (out / "digits_n2d_seed0" / "args.json").write_text(json.dumps(saved))
    # a run scored by an earlier bin/selflabel (no "scoring" in results.json) is scored again, not retrained,
    # and keeps its own wall time
    seed0 = out / "digits_n2d_seed0"
    results, metrics = (json.loads((seed0 / f).read_text()) for f in ("results.json", "test_metrics.json"))
    (seed0 / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "scoring"}))
    (seed0 / "test_metrics.json").write_text(json.dumps({**metrics, "accuracy": -1.0}))
    before = pd.read_csv(out / "runs.csv")
    history = (seed0 / "history.csv").read_text()
    printed = run("--runs", "2", "--jobs", "2", "--save_dir", str(out))
    assert "scored again by today's bin/selflabel (nothing trained): digits_n2d_seed0" in printed
    assert "running digits_n2d_seed0 (" in printed and "read back: digits_n2d_seed1" in printed
    after = pd.read_csv(out / "runs.csv")
    assert after["rescored"].tolist() == [True, False]
    assert after["run_seconds"].tolist() == before["run_seconds"].tolist()
    assert after["accuracy"].iloc[0] == pytest.approx(metrics["accuracy"])
    assert json.loads((seed0 / "results.json").read_text())["scoring"] == SCORING
    assert (seed0 / "history.csv").read_text() == history
    # another loop setting from the same first labels, seed by seed
    other = tmp_path / "other"
    run("--runs", "1", "--seed", "1", "--rounds", "2", "--fraction_rounds", "2",
        "--convergence_threshold", "1", "--first_labels_from", str(out), "--save_dir", str(other))
    history = pd.read_csv(other / "digits_n2d_seed1" / "history.csv")
    assert history["confident_fraction"].tolist() == [0.5, 1]  # the flags reach bin/selflabel: full at 1
    row = pd.read_csv(other / "runs.csv").iloc[0]  # the pseudo-labels' accuracy at the start and the end
    np.testing.assert_allclose([row["first_label_acc"], row["last_label_acc"]],
                               history["label_acc"].iloc[[0, -1]])
    record = json.loads((other / "digits_n2d_seed1" / "finished.json").read_text())
    assert record["command"][-2:] == ["--first_labels", str(out / "digits_n2d_seed1")]
    first = [np.load(d / "digits_n2d_seed1/pseudo_labels/round_00.npz")["labels"] for d in (out, other)]
    np.testing.assert_array_equal(*first)


def test_selflabel_benchmark_accepts_its_own_run_of_one_confident_fraction(tmp_path):
    """bin/selflabel saves --confident_fraction 0.7 as [0.7, 0.7]: the same
    benchmark command must read that run back, not call it another run."""
    from common.results import write_json
    from dcn.selflabel.benchmark import _check_settings
    from dcn.selflabel.cli import SelfLabelCommand

    cmd = [*BENCH, "--confident_fraction", "0.7", "--save_dir", str(tmp_path)]
    command = SelfLabelCommand()
    args = command.parser().parse_args(cmd)
    command.check(args)
    write_json(tmp_path / "args.json", vars(args))
    _check_settings(tmp_path, cmd)  # no UsageError
    write_json(tmp_path / "args.json", {**vars(args), "confident_fraction": [0.6, 0.6]})
    with pytest.raises(UsageError, match="was run with --confident_fraction 0.6 0.6, the default when it"):
        _check_settings(tmp_path, cmd)


def test_selflabel_benchmark_needs_first_labels_for_every_run(tmp_path, capsys):
    from dcn.selflabel.benchmark import main as bench

    assert_one_line_error(bench, [*BENCH, "--runs", "1", "--first_labels_from", str(tmp_path), "--save_dir",
                                  str(tmp_path / "b")], "--first_labels_from: no first labels in", capsys)


@pytest.mark.slow
def test_predict_names_image_files_of_any_size_in_a_new_process(tmp_path, capsys):
    import keras

    from common.folders import load_image_files

    model = SelfLabelNet((8, 8, 1), 3, filters=(4,), dense=(8,), head=(4,), cluster_names=["a", "b", "a"])
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(3)
    paths = []
    for i, shape in enumerate([(30, 20, 3), (8, 8, 1)]):
        path = tmp_path / f"img{i}.png"
        keras.utils.save_img(path, (rng.random(shape) * 255).astype(np.uint8), scale=False)
        paths.append(path)
    res = run_bin("predict", "--model", tmp_path / "m.keras", *paths, "--top_k", "2", "--out",
                  tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "p.csv")
    x, _ = load_image_files(paths, (8, 8), "grayscale")
    p = load_model(tmp_path / "m.keras").predict_proba(x)
    expected = np.stack([p[:, 0] + p[:, 2], p[:, 1]], axis=1)  # clusters named "a" add up
    names = np.array(["a", "b"])
    assert table["class_1"].tolist() == names[expected.argmax(axis=1)].tolist()
    np.testing.assert_allclose(table["probability_1"], expected.max(axis=1), atol=1e-4)
    assert len(res.stdout.strip().splitlines()) == 3  # a line per image, and where the CSV went


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "m.keras", "missing.png"], "image file not found: missing.png"),
    (["predict", "--model", "m.keras", "broken.png"], "none of the images could be read"),
    (["predict", "--model", "none.keras", "broken.png"], "model file none.keras not found"),
    (["predict", "--model", "notes.txt", "broken.png"], "notes.txt is not a .keras model (a zip archive"),
    (["predict", "--model", "fake.keras", "broken.png"], "fake.keras is not a .keras model (a zip archive"),
    (["--rounds", "0"], "argument --rounds: must be in [1, inf), got 0"),
    (["--confident_fraction", "0"], "argument --confident_fraction: must be in (0, 1], got 0"),
    (["--confident_fraction", "0.2", "0.5", "1"], "--confident_fraction takes one or two shares, got 3"),
    (["--convergence_threshold", "1.5"], "argument --convergence_threshold: must be in (0, 1], got 1.5"),
    (["--label_smoothing", "1"], "argument --label_smoothing: must be in [0, 1), got 1"),
    (["--lr", "nan"], "argument --lr: must be a finite number in (0, inf), got nan"),
    (["--knn", "0"], "argument --knn: must be in [1, inf), got 0"),
    (["--knn_epochs", "-1"], "argument --knn_epochs: must be in [0, inf), got -1"),
    (["--neighbors", "1"], "argument --neighbors: must be in [2, inf), got 1"),
    (["--n_init", "0"], "argument --n_init: must be in [1, inf), got 0"),
    (["--cluster_starts", "3"], "--cluster_starts is now --n_init"),
    (["--init", "ae"], "--init is now --first_features"),
    (["predict", "--model", "m.keras", "broken.png", "--top_k", "0"],
     "argument --top_k: must be in [1, inf), got 0"),
    (["--data", "vectors.npz"], "bin/selflabel classifies images"),
    (["--n_clusters", "5000"], "--n_clusters 5000 is more than the 1347 images"),
    (["--first_labels", "nowhere"], "--first_labels: no nowhere/pseudo_labels/round_00.npz; give the"),
    (["--rounds", "3", "--fraction_rounds", "4"],
     "--fraction_rounds 4 is more than --rounds 3"),
    (["--first_labels", "short"], "short/pseudo_labels/round_00.npz labels 20 images in 2 clusters, this "
                                  "run has 1347 images"),
])
def test_bad_input_gets_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    SelfLabelNet((8, 8, 1), 3, filters=(4,), dense=(8,), head=(4,)).save("m.keras")
    Path("broken.png").write_text("not an image")
    Path("notes.txt").write_text("not a model")
    Path("fake.keras").write_text("not a model")
    np.savez("vectors.npz", x=np.random.default_rng(0).random((20, 5)))
    Path("short/pseudo_labels").mkdir(parents=True)
    np.savez("short/pseudo_labels/round_00.npz", labels=np.arange(20) % 2, confidence=np.ones(20))
    assert_one_line_error(main, argv, message, capsys)


def test_first_labels_take_the_nearest_knn_of_the_saved_neighbours(tmp_path):
    from dcn.selflabel.cli import _first_labels

    (tmp_path / "pseudo_labels").mkdir()
    np.savez(tmp_path / "pseudo_labels" / "round_00.npz", labels=np.arange(30) % 3,
             confidence=np.ones(30))
    saved = np.stack([(np.arange(30) + j) % 30 for j in range(1, 6)], axis=1)  # 5 per image, nearest first
    np.save(tmp_path / "neighbours.npy", saved)
    labels, _, neighbours = _first_labels(tmp_path, 30, 3, 2)
    np.testing.assert_array_equal(labels, np.arange(30) % 3)
    np.testing.assert_array_equal(neighbours, saved[:, :2])
    np.testing.assert_array_equal(_first_labels(tmp_path, 30, 3, 5)[2], saved)
    assert _first_labels(tmp_path, 30, 3, 0)[2] is None  # no neighbour phase, no --select neighbours
    with pytest.raises(UsageError, match=r"saved 5 neighbours per image, fewer than --knn 8; give --knn 5"):
        _first_labels(tmp_path, 30, 3, 8)
