"""bin/ae: the autoencoder family's losses, two-stage clustering, generation, the command end to end."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from common.errors import UsageError
from dcn.autoencoders.cli import main
from dcn.autoencoders.models import (
    CVAE,
    VAE,
    Autoencoder,
    SemiSupervisedAutoencoder,
    gaussian_kl,
    labeled_subset,
    load_model,
)
from dcn.autoencoders.twostage import choose_eps, cluster_codes, k_distances, knee
from tests.helpers import assert_one_line_error, run_ok

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "ae"
SHORT = ["--dataset", "digits", "--epochs", "2", "--batch_size", "64", "--som_epochs", "1",
         "--som_map_size", "3", "3", "--tsne_samples", "200", "--dbscan_samples", "400", "--verbose", "0"]


def run_bin(*args, timeout=600):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ losses
def test_gaussian_kl_against_numpy_and_zero_at_the_prior():
    rng = np.random.default_rng(0)
    mean, log_var = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    var = np.exp(log_var)
    expected = 0.5 * (var + mean**2 - 1.0 - log_var).sum(axis=1)  # KL(N(m, v) || N(0, 1)), summed
    got = gaussian_kl(tf.constant(mean), tf.constant(log_var)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(gaussian_kl(tf.zeros((2, 3)), tf.zeros((2, 3))).numpy(), 0.0, atol=1e-7)


def test_semisupervised_cross_entropy_counts_only_labelled_samples():
    keras.utils.set_random_seed(1)
    model = SemiSupervisedAutoencoder((6,), n_classes=3, latent_dim=2, hidden=(4,), classifier=(5,),
                                      alpha=2.0, beta=0.5)
    x = np.random.default_rng(1).random((6, 6)).astype(np.float32)
    y = np.array([0, -1, 2, -1, -1, 1])
    terms = model.loss_terms(x, tf.constant(y), labeled_fraction=0.25)
    out = model(x)
    rec = ((x - out["reconstruction"].numpy()) ** 2).mean(axis=1)
    logits = out["logits"].numpy()
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ce = np.where(y >= 0, -log_p[np.arange(6), np.maximum(y, 0)], 0.0) / 0.25
    np.testing.assert_allclose(terms["reconstruction"].numpy(), rec, rtol=1e-5)
    np.testing.assert_allclose(terms["cross_entropy"].numpy(), ce, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(terms["loss"].numpy(), 2.0 * rec + 0.5 * ce, rtol=1e-5)


def test_vae_loss_is_summed_bernoulli_cross_entropy_plus_beta_kl():
    keras.utils.set_random_seed(2)
    model = VAE((4,), latent_dim=2, hidden=(5,), dropout=0.0, beta=3.0)
    x = np.random.default_rng(2).random((7, 4)).astype(np.float32)
    terms = model.loss_terms(x)
    np.testing.assert_allclose(terms["loss"].numpy(), terms["bce"].numpy() + 3.0 * terms["kl"].numpy(),
                               rtol=1e-5)
    mean, log_var = (t.numpy() for t in model.encoder(x))
    np.testing.assert_allclose(terms["kl"].numpy(), gaussian_kl(mean, log_var).numpy(), rtol=1e-5)
    assert (terms["bce"].numpy() > 0).all()


def test_labeled_subset_is_stratified_deterministic_and_small():
    y = np.repeat(np.arange(4), [100, 50, 30, 1])
    a, b = labeled_subset(y, 0.1, seed=3), labeled_subset(y, 0.1, seed=3)
    np.testing.assert_array_equal(a, b)
    assert [int(np.sum(a == c)) for c in range(4)] == [10, 5, 3, 1]  # at least one per class
    assert np.all((a == -1) | (a == y))
    assert not np.array_equal(a, labeled_subset(y, 0.1, seed=4))
    with pytest.raises(UsageError, match="labeled_fraction"):
        labeled_subset(y, 0.0)


# ------------------------------------------------------------- two stages
def test_knee_of_a_constructed_k_distance_curve():
    curve = np.concatenate([np.linspace(0.0, 1.0, 90), np.linspace(2.0, 20.0, 10)])
    assert knee(curve) == 89
    assert knee(np.linspace(0, 1, 50)) in range(0, 50)  # a straight line has no knee; any index, no error


def test_eps_from_the_knee_separates_two_blobs_from_scattered_noise():
    rng = np.random.default_rng(5)
    blobs = np.concatenate([rng.normal(0, 0.05, (200, 2)), rng.normal(3, 0.05, (200, 2))])
    noise = rng.uniform(-2, 5, (20, 2))
    codes = np.concatenate([blobs, noise])
    eps, curve = choose_eps(codes, 5)
    np.testing.assert_allclose(curve, np.sort(curve))
    np.testing.assert_allclose(curve, k_distances(codes, 5))
    assert 0.02 < eps < 1.0
    y = np.array([0] * 200 + [1] * 200 + [2] * 20)
    result = cluster_codes(codes, y, methods=("kmeans", "dbscan"), n_clusters=2, min_samples=5)
    assert result.dbscan["clusters"] == 2 and 10 <= result.dbscan["noise"] <= 40
    rows = result.table.set_index("method")
    assert rows.loc["DBSCAN", "noise"] == result.dbscan["noise"] and rows.loc["DBSCAN", "clusters"] == 2
    assert rows.loc["DBSCAN", "purity"] > 0.95


@pytest.mark.slow
def test_umap_gmm_finds_curved_clusters_that_kmeans_cuts():
    """Two interleaved half-moons: UMAP's neighbour graph follows each moon,
    k-means on the codes cuts across them."""
    from sklearn.datasets import make_moons

    codes, y = make_moons(600, noise=0.05, random_state=0)
    table = cluster_codes(codes, y, methods=("kmeans", "umap_gmm"), n_clusters=2).table.set_index("method")
    assert table.loc["UMAP + GMM", "acc"] > 0.97 and table.loc["k-means", "acc"] < 0.9
    assert table.loc["UMAP + GMM", "samples"] == 600


def test_a_som_of_more_units_than_clusters_is_scored_by_its_grouped_prototypes():
    from common.metrics import accuracy, prototype_groups

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 150)
    codes = rng.normal(0, 0.3, (300, 2)) + 4 * y[:, None]
    result = cluster_codes(codes, y, methods=("som",), n_clusters=2, som_map_size=(3, 3), som_epochs=5)
    row = result.table.iloc[0]
    assert pd.isna(row["acc"]) and row["acc_kmeans"] > 0.95
    groups = result.groups["SOM 3x3 (Kerasom)"]
    assert len(groups) == 9 and set(groups) == {0, 1}
    assert accuracy(y, groups[result.assignments["SOM 3x3 (Kerasom)"]]) == pytest.approx(row["acc_kmeans"])
    assert prototype_groups(np.eye(2), 2).tolist() == [0, 1]  # a unit per cluster: one group each


def test_eps_from_the_knee_is_positive_or_a_clear_error():
    rng = np.random.default_rng(5)
    repeated = np.concatenate([np.zeros((150, 2)), rng.normal(0, 1, (50, 2))])  # most codes identical
    eps, curve = choose_eps(repeated, 10)
    assert eps > 0 and curve[knee(curve)] == 0  # the knee itself is 0: DBSCAN would refuse it
    with pytest.raises(UsageError, match="--min_samples 1 counts each code alone"):
        choose_eps(repeated, 1)
    with pytest.raises(UsageError, match="k-distances are 0 from the knee on"):
        choose_eps(np.zeros((50, 2)), 5)


# -------------------------------------------------------------- generation
@pytest.mark.parametrize("make", [
    lambda: Autoencoder((8, 8, 1), latent_dim=3, hidden=(16,), n_clusters=2),
    lambda: VAE((8, 8, 1), latent_dim=3, hidden=(16,), n_clusters=2),
])
def test_cluster_gaussians_and_generated_images(make):
    keras.utils.set_random_seed(6)
    model = make()
    rng = np.random.default_rng(6)
    codes = np.concatenate([rng.normal(-2, 0.5, (300, 3)), rng.normal(2, 0.1, (300, 3))])
    model.fit_clusters(codes, np.repeat([0, 1], 300))
    drawn = model.sample_codes(4000, cluster=1, seed=0)
    np.testing.assert_allclose(drawn.mean(axis=0), codes[300:].mean(axis=0), atol=0.02)
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), np.cov(codes[300:], rowvar=False), atol=0.003)
    images = model.generate(5, cluster=0, seed=1)
    assert images.shape == (5, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images, model.generate(5, cluster=0, seed=1))
    with pytest.raises(UsageError, match="cluster 7 does not exist"):
        model.generate(2, cluster=7)


def test_generation_needs_clusters_and_a_cvae_needs_a_label():
    ae = Autoencoder((4,), latent_dim=2, hidden=(3,))
    with pytest.raises(UsageError, match="no clusters yet"):
        ae.generate(2, cluster=0)
    cvae = CVAE((8, 8, 1), n_classes=3, latent_dim=2, hidden=(8,))
    images = cvae.generate(4, label=2)
    assert images.shape == (4, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(UsageError, match="give a label in 0..2"):
        cvae.generate(4)
    with pytest.raises(UsageError, match="give the labels"):
        cvae.embed(np.zeros((2, 8, 8, 1)))


# ----------------------------------------------------------------- command
@pytest.mark.slow
@pytest.mark.parametrize("model", ["ae", "semisupervised", "vae", "cvae"])
def test_bin_ae_writes_every_output_and_the_model_generates_in_a_new_process(model, tmp_path, capsys):
    out = tmp_path / model
    # ae: 2-d codes (the manifold grid too) and every clustering; the others without UMAP's start-up
    extra = ["--latent_dim", "2"] if model == "ae" else ["--cluster", "kmeans", "dbscan", "som"]
    with pytest.raises(SystemExit) as stop:
        main(["--model", model, *SHORT, *extra, "--save_dir", str(out)])
    assert stop.value.code == 0
    for name in ("model.keras", "log.csv", "clustering.csv", "results.json", "reconstructions.png",
                 "generated_from_clusters.png", "tsne.png", "pca.png", "training.png", "args.json"):
        assert (out / name).is_file(), name
    assert (out / "manifold.png").is_file() == (model == "ae")
    table = pd.read_csv(out / "clustering.csv")
    assert table["method"].tolist() == ["UMAP + GMM"] * (model == "ae") + ["k-means", "DBSCAN",
                                                                           "SOM 3x3 (Kerasom)"]
    rows = table.set_index("method")
    assert rows.loc["k-means", "samples"] == 1797 and rows.loc["DBSCAN", "samples"] == 400
    # the 3x3 SOM has fewer units than the 10 digits: scored one-to-one, as every other method
    assert table["acc"].between(0, 1).all() and table["acc_kmeans"].isna().all()
    assert table["nmi"].between(0, 1).all()
    results = json.loads((out / "results.json").read_text())
    assert results["dbscan"]["eps_from"] == "knee of the k-distance curve" and results["dbscan"]["eps"] > 0
    assert (out / "kdistance.png").is_file()
    written = pd.read_csv(out / "predictions.csv")  # a column per clustering; cluster: the first one's
    methods = ["umap_gmm"] * (model == "ae") + ["kmeans", "dbscan", "som"]
    assert written.columns.tolist() == ["part", "index", "cluster", *methods, "label"]
    assert len(written) == 1797
    np.testing.assert_array_equal(written["cluster"], written[methods[0]])  # the first clustering's
    assert written["dbscan"].notna().sum() == 400  # the codes DBSCAN saw
    from common.metrics import accuracy

    for method, acc in zip(methods, table["acc"]):
        seen = written[written[method].notna()]
        assert accuracy(seen["label"], seen[method]) == pytest.approx(acc)
    if model == "semisupervised":
        from sklearn.datasets import load_digits

        per_class = np.bincount(load_digits().target)
        assert results["classifier"]["labelled_samples"] == sum(max(1, round(0.01 * n)) for n in per_class)
        assert 0 <= results["classifier"]["accuracy_on_unlabelled"] <= 1
    log = pd.read_csv(out / "log.csv")
    assert {"loss", "kmeans_acc"} <= set(log.columns) and log["iteration"].iloc[-1] == 2 * (1797 // 64)

    png = tmp_path / "gen.png"
    args = ["generate", "--model", out / "model.keras", "--n", 5]
    args += ["--label", 3] if model == "cvae" else ["--cluster", 1]
    printed = run_ok(main, capsys, *args, "--out", png)
    assert png.is_file() and "5 samples written" in printed.out
    loaded = load_model(out / "model.keras")
    expected = (loaded.generate(5, label=3, seed=0) if model == "cvae"
                else loaded.generate(5, cluster=1, seed=0))
    res = run_bin(*args, "--out", tmp_path / "gen.csv")  # in a new process: the same draws
    assert res.returncode == 0, res.stderr[-2000:]
    assert "5 samples written" in res.stdout
    written = pd.read_csv(tmp_path / "gen.csv").drop(columns="row").to_numpy()
    np.testing.assert_allclose(written, expected.reshape(5, -1), atol=1e-6)
    if model == "cvae":  # a cluster is not what a CVAE draws from: refused, not ignored
        assert_one_line_error(main, ["generate", "--model", str(out / "model.keras"), "--cluster", "2",
                                     "--out", str(tmp_path / "c.png")],
                              "is a CVAE: it draws a class, not a cluster; use --label 0..9", capsys)


@pytest.mark.slow
def test_semisupervised_model_on_two_mirrored_cpus_matches_the_default_strategy(tmp_path):
    # the labels are looked up by sample index inside each replica's step
    script = textwrap.dedent("""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from common.data import load_data
        from common.runtime import make_strategy
        from dcn.autoencoders.models import SemiSupervisedAutoencoder, labeled_subset
        (x, y), _ = load_data("digits")
        for name in ("default", "mirrored"):
            strategy = make_strategy(name)
            keras.utils.set_random_seed(1)
            with strategy.scope():
                model = SemiSupervisedAutoencoder((64,), 10, latent_dim=8, hidden=(32,))
            model.fit(x, labeled_subset(y, 0.2, seed=1), epochs=2, batch_size=64, eval_interval=14, verbose=0,
                      seed=1, strategy=strategy, save_dir=sys.argv[1] + "/" + name, jit_compile=False)
            print(name, strategy.num_replicas_in_sync)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mirrored 2" in out.stdout
    default = pd.read_csv(tmp_path / "default" / "log.csv")
    mirrored = pd.read_csv(tmp_path / "mirrored" / "log.csv")
    assert default["cross_entropy"].notna().sum() == 4  # rows at 14, 28, 42, 56
    for col in ("loss", "reconstruction", "cross_entropy"):
        np.testing.assert_allclose(mirrored[col], default[col], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--model", "vae", "--data", "values.csv"], "rescale it to [0, 1] first"),
    (["--model", "cvae", "--data", "unlabelled.csv"], "--model cvae trains with labels"),
    (["--labeled_fraction", "0"], "argument --labeled_fraction: must be in (0, 1], got 0"),
    (["--labeled_fraction", "2"], "argument --labeled_fraction: must be in (0, 1], got 2"),
    (["--epochs", "nan"], "argument --epochs: must be a finite number in (0, inf), got nan"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["--som_map_size", "200", "200"], "--som_map_size 200 200 has 40000 units; at most 10000"),
    (["generate", "--model", "m.keras", "--out", "g.png", "--n", "0"],
     "argument --n: must be in [1, inf), got 0"),
    (["--n_clusters", "5000"], "--n_clusters 5000 is more than the 1797 samples"),
    (["--cluster", "spectral"], "invalid choice: 'spectral'"),
    (["generate", "--model", "none.keras", "--out", "g.png"], "model file none.keras not found"),
    (["generate", "--model", "m.keras", "--out", "g.gif"], "--out must end in .png or .csv"),
])
def test_bad_input_gets_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=20) * 5, "b": rng.random(20)}).to_csv("values.csv", index=False)
    pd.DataFrame({"a": rng.random(20), "b": rng.random(20)}).to_csv("unlabelled.csv", index=False)
    assert_one_line_error(main, argv, message, capsys)


def test_generate_refuses_a_label_for_an_unconditional_model(tmp_path, capsys):
    model = VAE((8, 8, 1), latent_dim=2, hidden=(8,))
    model.save(tmp_path / "vae.keras")
    assert_one_line_error(main, ["generate", "--model", str(tmp_path / "vae.keras"), "--label", "1", "--out",
                                 str(tmp_path / "g.png")], "not conditioned on labels: use --cluster", capsys)


@pytest.mark.slow
def test_benchmark_writes_runs_and_summary(tmp_path, capsys):
    from dcn.autoencoders.benchmark import main as bench

    with pytest.raises(SystemExit) as stop:
        bench(["--datasets", "digits", "reuters10k", "--configs", "vae", "ae-desom", "--runs", "1",
               "--save_dir", str(tmp_path / "b"), "--epochs", "1", "--batch_size", "128", "--som_epochs", "1",
               "--tsne_samples", "100"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "reuters10k: files not found here, skipped" in printed and "±" in printed
    runs = pd.read_csv(tmp_path / "b" / "runs.csv")
    assert runs[["config", "method"]].values.tolist() == [
        ["vae", "k-means"], ["ae-desom", "k-means"], ["ae-desom", "SOM 8x8 (Kerasom)"]]
    assert (runs["samples"] == 1797).all() and (runs["run_seconds"] > 0).all()
    args = json.loads((tmp_path / "b" / "digits_ae-desom_seed0" / "args.json").read_text())
    assert (args["hidden"], args["latent_dim"], args["epochs"]) == ([500, 500, 2000], 10, 1)
    summary = pd.read_csv(tmp_path / "b" / "summary.csv")
    assert len(summary) == 3 and (summary["runs"] == 1).all()
