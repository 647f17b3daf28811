"""The deep clustering network: mathematics, naming, image folders, bin/dcn."""

import json
import os
import subprocess
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import dcn.dec.models as dcn_models
from common.errors import DataError, UsageError
from common.folders import load_folders, reference_class
from dcn import DCN, ClusteringLayer, kl_divergence, load_model, target_distribution
from dcn.dec.cli import main
from dcn.dec.naming import name_from_labels, name_from_references
from tests.helpers import assert_one_line_error, interrupt_on_call, resumed_args, run_ok

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "dcn"
NAMES = {0: "zero", 1: "one", 2: "two"}


def run_bin(*args, timeout=300):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


run_main = partial(run_ok, main)  # bin/dcn in this process, exit code 0 asserted


# ---------------------------------------------------------------- mathematics
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_clustering_layer_is_students_t_soft_assignment(alpha):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 3)).astype(np.float32)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    q = keras.ops.convert_to_numpy(ClusteringLayer(4, alpha, centers=centers)(z))
    sq = ((z[:, None, :] - centers[None]) ** 2).sum(-1)
    expected = (1 + sq / alpha) ** (-(alpha + 1) / 2)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(q, expected, rtol=1e-5)
    clone = ClusteringLayer.from_config(ClusteringLayer(4, alpha).get_config())
    assert (clone.n_clusters, clone.alpha) == (4, alpha)


def test_target_distribution_and_kl_against_numpy():
    q = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    f = q.sum(axis=0)
    w = q**2 / f
    expected = w / w.sum(axis=1, keepdims=True)
    p = target_distribution(q)
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    assert p[0].argmax() == 0 and p[0, 0] > q[0, 0]  # sharper than q where q is confident
    kl = keras.ops.convert_to_numpy(kl_divergence(p, q))
    np.testing.assert_allclose(kl, (expected * np.log(expected / q)).sum(axis=1), rtol=1e-5)


def test_per_batch_target_is_decs_target_of_the_batch_in_the_graph():
    import tensorflow as tf

    from dcn.dec.layers import batch_target_distribution

    q = np.random.default_rng(3).dirichlet(np.ones(4), size=7).astype(np.float32)
    graph = tf.function(batch_target_distribution, jit_compile=True)
    np.testing.assert_allclose(graph(tf.constant(q)).numpy(), target_distribution(q), rtol=1e-5)
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((20, 6)).astype(np.float32)
    model = DCN((6,), 3, embedding_dim=2, hidden=(5,))
    task = dcn_models.ClusteringTask(model, x, recon_weight=0.0, tol=0.0, target="batch")
    idx = np.array([3, 11, 5, 0])
    q = model.soft_assign(x[idx])
    p = target_distribution(q)  # from these four samples only
    kl = task.loss_terms(x[idx], idx, {})["kl"].numpy()
    np.testing.assert_allclose(kl, (p * np.log(p / q)).sum(axis=1), rtol=1e-4, atol=1e-7)


def test_clustering_loss_gathers_each_samples_target():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((20, 6)).astype(np.float32)
    model = DCN((6,), 3, embedding_dim=2, hidden=(5,))
    task = dcn_models.ClusteringTask(model, x, recon_weight=2.0, tol=0.0)
    task.refresh(0)
    idx = np.array([4, 0, 17])
    terms = task.loss_terms(x[idx], idx, {})
    q = model.soft_assign(x[idx])
    p = target_distribution(model.soft_assign(x))[idx]
    np.testing.assert_allclose(terms["kl"].numpy(), (p * np.log(p / q)).sum(axis=1), rtol=1e-4)
    rec = ((x[idx] - model.decoder.predict(model.transform(x[idx]), verbose=0)) ** 2).mean(axis=1)
    np.testing.assert_allclose(terms["loss"].numpy(), terms["kl"].numpy() + 2.0 * rec, rtol=1e-4)


def test_dec_initialisation_is_kept_by_save_and_load(tmp_path):
    model = DCN((50,), 3, hidden=(40,), init="dec")
    kernel = model.encoder.get_layer("encoder_0").kernel.numpy()
    assert np.abs(kernel).max() <= np.sqrt(1 / 50) and np.abs(kernel).max() > 0.8 * np.sqrt(1 / 50)
    model.save(tmp_path / "m.keras")
    assert load_model(tmp_path / "m.keras").init == "dec"


# ---------------------------------------------------------------- naming
def test_naming_resolves_a_collision_one_to_one():
    # Both classes' references prefer cluster 0; cat prefers it more.
    q = np.array([[0.8, 0.2, 0.0], [0.7, 0.3, 0.0],   # cat
                  [0.6, 0.1, 0.3], [0.5, 0.1, 0.4]])  # dog
    naming = name_from_references(q, np.array([0, 0, 1, 1]), ["cat", "dog"])
    assert naming.names == ["cat", None, "dog"]
    assert any("all prefer cluster 0" in w for w in naming.warnings)
    assert any("stay unnamed: 1" in w for w in naming.warnings)
    assert naming.scores[0] == pytest.approx(0.75) and naming.scores[2] == pytest.approx(0.35)


def test_naming_warns_about_split_references_and_missing_clusters():
    q = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    # class scores per cluster: a (.55, .45), b (.6, .4), c (.5, .5); the best
    # one-to-one total is b -> 0, c -> 1 (1.1), which leaves 'a' without a cluster
    naming = name_from_references(q, np.array([0, 0, 1, 2]), ["a", "b", "c"])
    assert naming.names == ["b", "c"]
    assert any("references of 'a' fall into different clusters: 0, 1" in w for w in naming.warnings)
    assert any("no cluster for a" in w for w in naming.warnings)
    assert naming.to_json()["clusters"]["1"] == {"class": "c", "score": 0.5}


def test_naming_from_labels_maximises_agreement():
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    labels = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    naming = name_from_labels(clusters, labels, ["x", "y"], 3)
    # cluster 2 holds three 'y', cluster 0 two: 'y' goes to cluster 2, 'x' to cluster 1
    assert naming.names == [None, "x", "y"]
    assert naming.source.startswith("test labels")


def test_reference_class_names():
    root = Path("/r")
    assert reference_class(root / "cat.png", root) == "cat"
    assert reference_class(root / "cat_2.jpg", root) == "cat"
    assert reference_class(root / "sea-lion-3.png", root) == "sea-lion"
    assert reference_class(root / "dog" / "x_1.png", root) == "dog"
    known = ["class_1", "class_2", "covid-19"]  # test/'s classes keep their numbers
    assert reference_class(root / "class_1.png", root, known) == "class_1"
    assert reference_class(root / "covid-19.png", root, known) == "covid-19"
    assert reference_class(root / "covid-19_2.png", root, known) == "covid-19"
    assert reference_class(root / "cat_2.png", root, known) == "cat"


# ---------------------------------------------------------------- image folders
def _save(img8, path, size, rgb=False):
    image = Image.fromarray((img8 / 16 * 255).astype(np.uint8)).resize((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("RGB") if rgb else image).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """digits 0/1/2 as PNG and JPEG of mixed sizes and colour modes, a text file
    and a corrupt PNG in train/, class folders in test/, named references."""
    root = tmp_path_factory.mktemp("images")
    digits = load_digits()
    idx = [i for i in range(len(digits.target)) if digits.target[i] in NAMES]
    rng = np.random.default_rng(0)
    for n, i in enumerate(idx[:240]):
        ext = ".png" if n % 2 else ".jpg"
        sub = "batch_a" if n % 3 else "batch_b"
        _save(digits.images[i], root / "train" / sub / f"img{n}{ext}", int(rng.integers(12, 40)), n % 5 == 0)
    for n, i in enumerate(idx[240:300]):
        _save(digits.images[i], root / "test" / NAMES[digits.target[i]] / f"t{n}.png", 20)
    count = dict.fromkeys(NAMES, 0)
    for i in idx[300:]:
        c = digits.target[i]
        if count[c] < 2:
            count[c] += 1
            _save(digits.images[i], root / "reference" / f"{NAMES[c]}_{count[c]}.png", 24)
    (root / "train" / "notes.txt").write_text("not an image")
    (root / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


@pytest.mark.slow
def test_load_folders_skips_and_reports(image_folder, capsys):
    folders = load_folders(image_folder, (16, 16))
    err = capsys.readouterr().err
    assert "skipped 1 file that is not an image" in err
    assert "corrupt image" in err and "broken.png" in err
    assert folders.train.x.shape == (240, 16, 16, 1)
    assert 0.0 <= folders.train.x.min() and folders.train.x.max() <= 1.0
    assert folders.test.classes == ["one", "two", "zero"] and len(folders.test.x) == 60
    assert folders.reference.classes == ["one", "two", "zero"] and len(folders.reference.x) == 6
    assert load_folders(image_folder, (10, 12), color="rgb").train.x.shape == (240, 10, 12, 3)


@pytest.mark.slow
def test_images_are_turned_upright_and_laid_over_white_as_pil_shows_them(tmp_path):
    """Phone photos carry their turn in EXIF: each of the 8 orientations is
    decoded as PIL's exif_transpose shows it; transparent pixels are white,
    in every colour mode."""
    from PIL import ImageOps

    from common.folders import decode_images

    rng = np.random.default_rng(0)
    picture = np.kron(rng.integers(0, 256, (3, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 24x32 blocks
    paths = []
    for code in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = code
        path = tmp_path / f"o{code}.png"  # lossless, so the pixels can be compared exactly
        Image.fromarray(picture).save(path, exif=exif.tobytes())
        paths.append(path)
    for path in paths:
        with Image.open(path) as image:
            shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), np.float32) / 255
        x, _, _ = decode_images([path], shown.shape[:2], color="rgb")
        np.testing.assert_allclose(x[0], shown, atol=1e-3, err_msg=path.name)
    half = np.zeros((4, 4, 4), np.uint8)
    half[:, :2] = (0, 0, 0, 255)  # left half opaque black, right half transparent (black beneath)
    images = {"rgba.png": Image.fromarray(half, "RGBA"),
              "la.png": Image.fromarray(half[..., [0, 3]], "LA"),
              "p.png": Image.fromarray(half, "RGBA").convert("P"),
              "grey.png": Image.fromarray(half[..., 0], "L")}
    for name, image in images.items():
        image.save(tmp_path / name)
    x, kept, corrupt = decode_images([tmp_path / n for n in images], (4, 4))
    assert not corrupt
    for name, image in zip(kept, x):
        assert image[:, :2].max() < 0.01, name
        expected = 0.0 if name.endswith("grey.png") else 1.0  # no alpha: black stays black
        np.testing.assert_allclose(image[:, 2:], expected, atol=0.01, err_msg=name)


def test_bad_folders(tmp_path, capsys):
    with pytest.raises(DataError, match="data folder .* not found"):
        load_folders(tmp_path / "nope")
    with pytest.raises(DataError, match="has no train/ folder"):
        load_folders(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"no readable images .*\(non-image files: 1, corrupt images: 0\)"):
        load_folders(tmp_path)
    _save(np.eye(8) * 16, tmp_path / "train" / "a.png", 8)
    _save(np.eye(8) * 16, tmp_path / "test" / "cat" / "b.png", 8)
    _save(np.eye(8) * 16, tmp_path / "reference" / "dog.png", 8)
    load_folders(tmp_path, (8, 8))
    assert "test classes without reference images: cat" in capsys.readouterr().err


@pytest.mark.slow
def test_folder_run_end_to_end_and_predict_in_a_new_process(image_folder, tmp_path, capsys):
    out = tmp_path / "report"
    res = run_main(capsys, "--data", image_folder, "--image_size", 16, "--pretrain_epochs", 3, "--batch_size",
                   32, "--max_iterations", 60, "--update_interval", 20, "--save_dir", out, "--augment",
                   "--verbose", 0)
    assert "skipped 1 file that is not an image" in res.err and "broken.png" in res.err
    for name in ("model.keras", "pretrain_log.csv", "log.csv", "class_mappings.json", "test_metrics.json",
                 "test_cm.png", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "architecture.png").is_file() or (out / "architecture.txt").is_file()
    mapping = json.loads((out / "class_mappings.json").read_text())
    assert mapping["source"] == "reference images"
    assert sorted(c["class"] for c in mapping["clusters"].values()) == ["one", "two", "zero"]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["n_images"] == 60 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_class"]) == {"one", "two", "zero"}
    assert {"precision", "recall", "f1-score"} <= set(metrics["per_class"]["one"])
    log = pd.read_csv(out / "log.csv")
    assert log["iteration"].tolist() == [0, 20, 40, 60] and "label_change" in log
    # predictions.csv: every training and test image by its path in the folder, the test ones labelled
    written = pd.read_csv(out / "predictions.csv")
    test = written[written["part"] == "test"]
    train = load_folders(image_folder, (8, 8)).train
    assert len(test) == 60 and written["image"][written["part"] == "train"].tolist() == [
        str(Path(p).relative_to(image_folder)) for p in train.paths]
    assert test["image"].str.startswith("test/").all() and set(test["label"]) == {"one", "two", "zero"}
    named = json.loads((out / "class_mappings.json").read_text())["clusters"]
    assert [named[str(k)]["class"] for k in test["cluster"]] == test["name"].tolist()
    from common.metrics import nmi

    assert nmi(test["label"], test["cluster"]) == pytest.approx(metrics["nmi"])

    run_main(capsys, "--resume", "--save_dir", out, "--verbose", 0)  # finished: nothing left but the reports
    assert json.loads((out / "results.json").read_text())["iterations"] == 60

    images = sorted((image_folder / "test" / "two").glob("*.png"))[:3]
    res = run_bin("predict", "--model", out / "model.keras", *images, "--out", tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_csv(tmp_path / "p.csv")
    model = load_model(out / "model.keras")
    x = load_folders(image_folder, (16, 16)).test
    expected = model.cluster(x.x[[x.paths.index(str(p)) for p in images]])
    np.testing.assert_array_equal(preds["cluster"], expected)
    assert preds["class"].tolist() == [model.cluster_names[k] for k in expected]
    assert (preds["probability"] > 0).all()
    assert len(res.stdout.strip().splitlines()) == 4  # a line per image, and where the CSV went


def test_resume_with_a_new_max_epochs_replaces_the_saved_max_iterations(tmp_path, monkeypatch):
    """--max_iterations overrides --max_epochs: a run started with the one and
    resumed with the other must train for the new budget, not the old one."""
    from dcn.dec.cli import DcnCommand

    args = resumed_args(monkeypatch, DcnCommand,
                        ["--dataset", "digits", "--max_iterations", "5000", "--save_dir", str(tmp_path)],
                        ["--resume", "--save_dir", str(tmp_path), "--max_epochs", "100", "--verbose", "0"])
    assert args.max_iterations is None and args.max_epochs == 100
    _, iterations = dcn_models.clustering_schedule(1797, 256, None, args.max_iterations, args.max_epochs)
    assert iterations == 700  # 100 epochs of 7 batches of 256, not the saved 5,000 iterations


@pytest.mark.slow
def test_dec_on_digits_vectors(tmp_path, capsys):
    out = tmp_path / "dec"
    run_main(capsys, "--dataset", "digits", "--recon_weight", 0, "--optimizer", "sgd", "--centers", "kmeans",
             "--pretrain_epochs", 10, "--batch_size", 128, "--update_interval", 14, "--max_iterations", 140,
             "--save_dir", out, "--verbose", 0)  # acc 0.77, NMI 0.73-0.77 over seeds 0-2
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["acc"] > 0.5 and results["train"]["nmi"] > 0.4
    assert json.loads((out / "class_mappings.json").read_text())["source"] == "the data set's labels"
    assert "reconstruction" not in pd.read_csv(out / "log.csv")  # DEC: no decoder term


@pytest.mark.slow
def test_tolerance_stops_training_and_resume_keeps_the_targets(tmp_path, monkeypatch):
    (x, y) = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)

    def fresh():
        keras.utils.set_random_seed(2)
        m = DCN((64,), 10, hidden=(32, 32))
        m.init_centers(x, n_init=2, seed=2)
        return m

    stopped = fresh().fit(x, y, max_iterations=200, update_interval=20, tol=1.0, batch_size=64, verbose=0)
    assert stopped.iterations == 20 and "labels changed" in stopped.stopped_early

    kwargs = dict(max_iterations=90, update_interval=30, tol=0.0, batch_size=64, verbose=0, jit_compile=False)
    reference = fresh()
    reference.fit(x, y, save_dir=tmp_path / "ref", **kwargs)
    # the row at iteration 60, after the refresh at 30
    restore = interrupt_on_call(monkeypatch, dcn_models.ClusteringTask, "evaluate", 3)
    with pytest.raises(KeyboardInterrupt):
        fresh().fit(x, y, save_dir=tmp_path / "run", **kwargs)
    restore()
    resumed = fresh()
    result = resumed.fit(x, y, save_dir=tmp_path / "run", resume=True, **kwargs)
    assert (result.iterations, result.trained) == (90, 30)
    np.testing.assert_allclose(resumed.centers, reference.centers, rtol=1e-4, atol=1e-5)


def test_centres_from_umap_gmm_are_its_cluster_means_and_its_labels_the_first_target():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    x = (np.eye(3, 8)[y] * 3 + rng.normal(0, 0.2, (180, 8))).astype(np.float32)
    keras.utils.set_random_seed(0)
    m = DCN((8,), 3, hidden=(16,), embedding_dim=4)
    labels = m.init_centers(x, n_init=2, method="umap_gmm")
    z = m.transform(x)
    expected = np.stack([z[labels == k].mean(axis=0) for k in range(3)])
    np.testing.assert_allclose(m.centers, expected, rtol=1e-5, atol=1e-5)
    assert max(np.bincount(labels[y == c]).max() for c in range(3)) == 60  # blobs kept whole
    first = np.eye(3, dtype=np.float32)[(labels + 1) % 3]  # a first target that Q does not give
    task = dcn_models.ClusteringTask(m, x, recon_weight=1.0, tol=0.0, initial_targets=first)
    assert task.refresh(0) is None
    np.testing.assert_array_equal(task.targets.numpy(), first)
    np.testing.assert_array_equal(task.labels.numpy(), (labels + 1) % 3)
    task.refresh(20)  # later refreshes are DEC's, from Q
    np.testing.assert_allclose(task.targets.numpy(), dcn_models.target_distribution(m.soft_assign(x)),
                               rtol=1e-5)
    with pytest.raises(UsageError, match="unknown initialisation of the centres 'dbscan'"):
        m.init_centers(x, method="dbscan")


def test_images_pretrain_for_a_number_of_steps_vectors_for_decs_epochs():
    from dcn.dec.models import PRETRAIN_EPOCHS, PRETRAIN_STEPS, pretrain_epochs

    assert pretrain_epochs(8000, 128, images=True) == PRETRAIN_STEPS / 62  # 62 batches an epoch
    assert pretrain_epochs(70000, 256, images=False) == PRETRAIN_EPOCHS
    assert pretrain_epochs(100, 256, images=True) == PRETRAIN_STEPS  # one step an epoch


def test_default_image_size_is_the_images_median_side_within_64(tmp_path):
    from common.folders import typical_side
    from dcn.dec.cli import DcnCommand

    for i, side in enumerate((12, 20, 20, 30, 300)):
        _save(np.eye(8) * 16, tmp_path / "d" / "train" / f"{i}.png", side)
    assert typical_side(tmp_path / "d" / "train") == 20 and typical_side(tmp_path / "d" / "train", 16) == 16
    command = DcnCommand()
    args = command.parser().parse_args(["--data", str(tmp_path / "d"), "--n_clusters", "2"])
    command.check(args)
    data = command.load(args)
    assert args.image_size == [20, 20] and data.x.shape == (5, 20, 20, 1)  # saved so in args.json
    assert args.batch_size == 5 and args.pretrain_epochs == dcn_models.PRETRAIN_STEPS  # a step an epoch


@pytest.mark.parametrize("argv, message", [
    ([], "give --data PATH"),
    (["--data", "missing_dir"], "data folder missing_dir not found"),
    (["--dataset", "digits", "--n_clusters", "1"], "argument --n_clusters: must be in [2, inf), got 1"),
    (["--dataset", "digits", "--batch_size", "4000"], "larger than the 1797 training samples"),
    (["predict", "--model", "none.keras", "a.png"], "model file none.keras not found"),
    (["--dataset", "digits", "--max_epochs", "0"], "argument --max_epochs: must be in (0, inf), got 0"),
    (["--dataset", "digits", "--update_interval", "0"],
     "argument --update_interval: must be in [1, inf), got 0"),
    (["--dataset", "digits", "--alpha", "0"], "argument --alpha: must be in (0, inf), got 0"),
    (["--dataset", "digits", "--tol", "nan"], "argument --tol: must be a finite number in [0, 1], got nan"),
    (["--dataset", "digits", "--lr", "0"], "argument --lr: must be in (0, inf), got 0"),
    (["--dataset", "digits", "--image_size", "4"], "argument --image_size: must be in [8, inf), got 4"),
    (["--dataset", "digits", "--image_size", "8", "8", "8"], "--image_size takes one or two sizes, got 3"),
    (["--dataset", "digits", "--checkpoint_minutes", "-2"], "must be a finite number of at least 0, got -2"),
    (["--dataset", "digitz"], "--dataset digitz: unknown; give one of digits, mnist"),
    (["--data", "shards"], "give --n_clusters (shards has no labels to count classes from)"),
    (["--data", "nothing.npy"], "data file nothing.npy not found"),
    (["--dataset", "shards"], "--dataset shards: give your own files with --data"),
    (["--data", "shards", "--scaling", "zscore"], "argument --scaling: invalid choice"),
    (["--dataset", "digits", "--scaling", "minmax"], "--scaling applies to --data files"),
])
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "part-0.npy", np.zeros((20, 4), np.float32))
    assert_one_line_error(main, argv, message, capsys)


def test_folder_without_references_needs_n_clusters(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(np.eye(8) * 16, tmp_path / "d" / "train" / "a.png", 8)
    assert_one_line_error(main, ["--data", str(tmp_path / "d"), "--image_size", "8"], "give --n_clusters",
                          capsys)


def test_predict_reports_missing_images(image_folder, tmp_path, capsys):
    model = DCN((8, 8, 1), 2, filters=(4, 8), embedding_dim=2)
    model.save(tmp_path / "m.keras")
    argv = ["predict", "--model", str(tmp_path / "m.keras"), str(tmp_path / "ghost.png")]
    assert_one_line_error(main, argv, "image file not found", capsys)


@pytest.mark.slow
def test_dcn_benchmark_jobs_run_each_seed_in_its_own_process(tmp_path, capsys):
    from dcn.dec.benchmark import main as bench

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as stop:
        bench(["--dataset", "digits", "--methods", "ae+kmeans", "dec", "--runs", "2", "--jobs", "2",
               "--pretrain_epochs", "1", "--max_iterations", "20", "--batch_size", "128",
               "--save_dir", str(out)])
    assert stop.value.code == 0
    runs = pd.read_csv(out / "runs.csv")
    assert runs["method"].tolist() == ["ae+kmeans", "dec"] * 2 and runs["seed"].tolist() == [0, 0, 1, 1]
    cores = len(os.sched_getaffinity(0))
    for seed in (0, 1):
        child = out / f"seed{seed}"
        pd.testing.assert_frame_equal(pd.read_csv(child / "runs.csv"),
                                      runs[runs["seed"] == seed].reset_index(drop=True))
        assert (child / f"ae_digits_seed{seed}.weights.h5").exists()
        # pinned to its share of the cores
        assert f"{max(cores // 2, 1)} of {os.cpu_count()} CPU cores" in (child / "log.txt").read_text()
    assert pd.read_csv(out / "summary.csv").set_index("method").loc["dec", "runs"] == 2
    assert "dec seed 1: acc" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.fmnist
def test_dcn_benchmark_writes_tables_and_runs_the_folder_benchmark(require_fmnist, tmp_path, capsys):
    from dcn.dec.benchmark import main as bench

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as stop:
        # one seed: the tables over several seeds are the jobs test's (and common.results')
        bench(["--dataset", "digits", "--methods", "ae+kmeans", "dec", "--runs", "1",
               "--pretrain_epochs", "2", "--max_iterations", "30", "--batch_size", "128", "--folder",
               "--folder_train", "40", "--folder_test", "50", "--folder_references", "2",
               "--folder_epochs", "1", "--folder_image_size", "16", "--folder_max_iterations", "30",
               "--save_dir", str(out)])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv")
    assert runs["method"].tolist() == ["ae+kmeans", "dec"] and runs["seed"].tolist() == [0, 0]
    assert (runs.loc[runs["method"] == "dec", "iterations"] <= 30).all()
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["dec", "runs"] == 1
    assert np.isclose(summary.loc["dec", "acc_mean"], runs.loc[runs["method"] == "dec", "acc"].mean())
    assert "ae+kmeans" in printed and "folder benchmark" in printed
    # four classes written as PNG files, named from the references, scored on all their test images
    root = out / "fmnist_folders"
    assert len(list((root / "train").glob("*.png"))) == 4 * 40
    assert len(list((root / "reference").glob("*.png"))) == 4 * 2
    folder = pd.read_csv(out / "folder_runs.csv")
    assert folder["seed"].tolist() == [0] and (folder["n_test"] == 4 * 50).all()
    assert folder["test_accuracy"].between(0, 1).all() and (folder["iterations"] <= 30).all()
    assert pd.read_csv(out / "folder_summary.csv")["runs"].tolist() == [1]
    mapping = json.loads((out / "folder_report_seed0" / "class_mappings.json").read_text())
    assert mapping["source"] == "reference images"


# ------------------------------------------------- against DEC-keras' trials
def test_welch_p_matches_the_closed_form_for_two_degrees_of_freedom():
    from dcn.dec.published import welch_p

    # means 0.5 and 2.5, variances 0.5: t = -2 sqrt(2), 2 degrees of freedom, p = 1 - 2 / sqrt(5)
    assert welch_p([0, 1], [2, 3]) == pytest.approx(1 - 2 / np.sqrt(5))
    assert np.isnan(welch_p([0.5], [2, 3]))


def test_comparison_with_dec_keras_trials_gives_differences_and_gains_by_seed():
    from dcn.dec.published import DEC_KERAS_FMNIST, GAIN, compare_dec_keras

    theirs = DEC_KERAS_FMNIST
    rows = []
    for seed in range(4):  # our "runs": their first 4 trials, DEC shifted down by 0.05
        for method, shift in (("ae+kmeans", 0.0), ("dec", -0.05), ("idec", 0.0)):
            scores = theirs["dec" if method == "idec" else method]
            rows.append({"method": method, "seed": seed, "acc": scores["acc"][seed] + shift,
                         "nmi_geometric": scores["nmi"][seed] + shift, "nmi": 0.0})
    # rows in reverse order: the gain must still pair each seed's own two runs
    table = compare_dec_keras(pd.DataFrame(rows[::-1])).set_index(["method", "score"])
    assert set(table.index.get_level_values(0)) == {"ae+kmeans", "dec", GAIN}  # no published IDEC trials
    start = table.loc[("ae+kmeans", "acc")]
    assert start["runs"] == 4 and start["published_trials"] == 10
    assert start["mean"] == pytest.approx(np.mean(theirs["ae+kmeans"]["acc"][:4]))
    assert start["published_std"] == pytest.approx(np.std(theirs["ae+kmeans"]["acc"]))
    # the gain is DEC minus AE + k-means of the same seed: their gains of trials 0-3, less 0.05
    gain = table.loc[(GAIN, "acc")]
    expected = np.subtract(theirs["dec"]["acc"], theirs["ae+kmeans"]["acc"])[:4] - 0.05
    assert gain["mean"] == pytest.approx(expected.mean())
    assert gain["runs_positive"] == (expected > 0).sum() and gain["published_positive"] == 9
    assert gain["welch_p"] < 0.05 < table.loc[("ae+kmeans", "acc"), "welch_p"]
    # DEC-keras' NMI is the geometric one (scikit-learn 0.19): ours is read from nmi_geometric, not nmi
    assert table.loc[("ae+kmeans", "nmi"), "mean"] == pytest.approx(np.mean(theirs["ae+kmeans"]["nmi"][:4]))
    with pytest.raises(ValueError, match="nmi_geometric"):
        compare_dec_keras(pd.DataFrame(rows).drop(columns="nmi_geometric"))


def test_dcn_benchmark_writes_the_comparison_with_dec_keras(tmp_path, capsys):
    from dcn.dec.benchmark import compare_published

    rows = [{"method": m, "seed": s, "acc": 0.6 + 0.01 * s, "nmi": 0.63, "nmi_geometric": 0.63 + 0.01 * s}
            for s in range(3) for m in ("ae+kmeans", "dec")]
    compare_published(rows, tmp_path)
    table = pd.read_csv(tmp_path / "published.csv")
    assert table["method"].tolist() == ["ae+kmeans", "ae+kmeans", "dec", "dec", "dec-(ae+kmeans)",
                                        "dec-(ae+kmeans)"]
    assert "gain > 0 in 0 of 3 / 9 of 10" in capsys.readouterr().out


# ------------------------------------------------- DEC-keras itself, beside ours
def _keras2_weights_file(path, layers):
    """A Keras 2 HDF5 weights file (as DEC-keras' ae_weights.h5): the model's
    layer names, and per layer its weight names and arrays."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        for name, weights in layers:
            group = f.create_group(name)
            names = [f"{name}/{w}:0" for w in ("kernel", "bias")][: len(weights)]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, w in zip(names, weights):
                group[n] = w


def test_dec_keras_autoencoder_file_gives_our_autoencoder_the_same_function(tmp_path):
    from dcn.dec.deckeras_reference import read_autoencoder, save_ours

    dims = (6, 5, 4, 3, 2)
    pairs = list(zip(dims[:-1], dims[1:]))  # DEC-keras' layer order: encoder_0..3, then decoder_3..0
    pairs += [(b, a) for a, b in pairs[::-1]]
    names = [f"encoder_{i}" for i in range(4)] + [f"decoder_{i}" for i in range(3, -1, -1)]
    rng = np.random.default_rng(0)
    weights = [(rng.normal(size=(i, o)).astype(np.float32), rng.normal(size=o).astype(np.float32))
               for i, o in pairs]
    _keras2_weights_file(tmp_path / "ae_weights.h5", [("input", []), *zip(names, weights)])
    save_ours(read_autoencoder(tmp_path / "ae_weights.h5"), tmp_path / "ae.weights.h5", dims=dims)
    model = DCN((6,), 3, embedding_dim=2, hidden=(5, 4, 3), init="dec")
    model.load_autoencoder_weights(tmp_path / "ae.weights.h5")

    x = rng.normal(size=(7, 6)).astype(np.float32)
    h, codes = x, None
    for n, (kernel, bias) in enumerate(weights):
        h = h @ kernel + bias
        if n == 3:  # DEC-keras: ReLU on the hidden layers, the code and the output linear
            codes = h
        elif n < 7:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(model.encoder.predict(x, verbose=0), codes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.decoder.predict(codes, verbose=0), h, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match="DEC-keras saved is not 6-5-4-3-2"):
        save_ours(read_autoencoder(tmp_path / "ae_weights.h5")[:-2], tmp_path / "bad.weights.h5", dims=dims)


def test_dcn_deckeras_names_what_it_needs(tmp_path, monkeypatch, capsys):
    import sys

    from dcn.dec.deckeras_reference import main as deckeras

    out = tmp_path / "o"
    assert_one_line_error(deckeras, ["--deckeras", str(tmp_path), "--save_dir", str(out)],
                          "--deckeras must name a DEC-keras checkout", capsys)
    assert not out.exists()
    (tmp_path / "DEC.py").write_text("raise SystemExit('must not run')\n")
    monkeypatch.setitem(sys.modules, "tf_keras", None)  # not installed
    assert_one_line_error(deckeras, ["--deckeras", str(tmp_path), "--save_dir", str(out)],
                          "install tf_keras for this TensorFlow (pip install tf_keras~=", capsys)
    assert_one_line_error(deckeras, ["--deckeras", str(tmp_path), "--save_dir", str(out),
                                     "--ae_weights", "no.h5"],
                          "--ae_weights no.h5 not found: give the ae_weights.h5 of an earlier run", capsys)


def test_deckeras_predict_goes_through_predict_on_batch_in_batches_of_32():
    # tf_keras' Model.predict, which leaks memory at every call, is replaced by this during a DEC-keras run
    from dcn.dec.deckeras_reference import predict_in_batches

    class Model:
        sizes = []

        def predict_on_batch(self, x):
            self.sizes.append(len(x))
            return x * 2.0

    x = np.random.default_rng(0).random((70, 3))
    np.testing.assert_array_equal(predict_in_batches(Model(), x, verbose=0), x * 2.0)
    assert Model.sizes == [32, 32, 6]
    Model.sizes.clear()
    np.testing.assert_array_equal(predict_in_batches(Model(), x, batch_size=50), x * 2.0)
    assert Model.sizes == [50, 20]


@pytest.mark.slow
def test_dcn_benchmark_starts_from_pretrained_weights(tmp_path, capsys):
    import shutil

    from dcn.dec.benchmark import main as bench

    def run(*argv):
        with pytest.raises(SystemExit) as stop:
            bench([*flags, *map(str, argv)])
        assert stop.value.code == 0
        return pd.read_csv(argv[-1] / "runs.csv")[["method", "seed", "acc", "nmi", "ari"]]

    first, again, swapped = tmp_path / "first", tmp_path / "again", tmp_path / "swapped"
    flags = ["--dataset", "digits", "--methods", "ae+kmeans", "dec", "--max_iterations", "20",
             "--batch_size", "128"]
    assert_one_line_error(bench, [*flags, "--pretrained", str(first), "--save_dir", str(again)],
                          "--pretrained: no ae_digits_seed0.weights.h5 in", capsys)
    assert not again.exists()  # refused before any run
    ran = run("--pretrain_epochs", "1", "--runs", "2", "--jobs", "2", "--save_dir", first)  # seed<N>/ folders
    rerun = run("--runs", "2", "--jobs", "2", "--pretrained", first, "--save_dir", again)
    assert not list(again.rglob("*.weights.h5"))  # nothing pretrained
    table = pd.read_csv(again / "runs.csv")
    assert table["pretrain_seconds"].isna().all() and table["pretrained"].str.startswith(str(first)).all()
    # the same weights and seeds: the same k-means start and the same clustering phase
    pd.testing.assert_frame_equal(ran, rerun)
    capsys.readouterr()
    run("--runs", "2", "--jobs", "2", "--pretrained", first, "--save_dir", again)
    assert "seeds 0, 1 finished earlier with the same flags" in capsys.readouterr().out
    later = (again / "seed1" / "finished.json").stat().st_mtime + 10
    os.utime(first / "seed1" / "ae_digits_seed1.weights.h5", (later, later))  # new weights for seed 1
    run("--runs", "2", "--jobs", "2", "--pretrained", first, "--save_dir", again)
    assert "seeds 0 finished earlier" in capsys.readouterr().out  # seed 1 runs again
    # seed 1's autoencoder given as seed 0's: seed 0 then clusters other codes
    (swapped / "in").mkdir(parents=True)
    shutil.copy(first / "seed1" / "ae_digits_seed1.weights.h5", swapped / "in" / "ae_digits_seed0.weights.h5")
    other = run("--methods", "ae+kmeans", "--runs", "1", "--pretrained", swapped / "in", "--save_dir",
                swapped)  # (its k-means start is the row compared)
    assert other.loc[0, "acc"] != ran.loc[0, "acc"] or other.loc[0, "nmi"] != ran.loc[0, "nmi"]
    assert "autoencoder from" in capsys.readouterr().out
    assert_one_line_error(bench, [*flags, "--pretrained", str(first), "--pretrain_epochs", "2", "--save_dir",
                                  str(again)], "--pretrain_epochs has no effect with --pretrained", capsys)


def test_data_takes_a_file_as_well_as_an_image_folder(tmp_path):
    from dcn.dec.cli import DcnCommand

    command = DcnCommand()
    np.savez(tmp_path / "points.npz", x=np.zeros((40, 3), np.float32))
    args = command.parser().parse_args(["--data", str(tmp_path / "points.npz"), "--n_clusters", "2"])
    command.check(args)
    data = command.load(args)  # read as arrays, not as a folder
    assert data.x.shape == (40, 3) and data.extra["folders"] is None and data.name == "points"
    (tmp_path / "photos" / "train").mkdir(parents=True)
    args = command.parser().parse_args(["--data", str(tmp_path / "photos"), "--label_col", "kind"])
    with pytest.raises(UsageError, match="--label_col and --scaling apply to tables and arrays"):
        command.check(args)
