"""RSWNet: ResNet50 input preparation, weights, both heads end to end, the comparison, predict."""

import json
import subprocess
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from common.data import load_data
from common.errors import UsageError
from rswnet import ResNetInput, RSWNet, RSWNetSOM, load_model, resnet_decoder, resnet_encoder
from rswnet.cli import main
from rswnet.networks import imagenet_weights
from tests.helpers import assert_one_line_error, explorer_page, resumed_args

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "rswnet"
CAFFE_MEANS_BGR = np.array([103.939, 116.779, 123.68])
# a tiny run: the benchmark's own flags, then the ones it passes on to bin/rswnet (each test adds
# --pretrain_epochs: a phase traces ResNet50's whole training step, the costliest part of a run)
TINY_OWN = ["--dataset", "digits", "--input_size", "32", "--weights", "none", "--subset", "60"]
TINY_REST = ["--test_subset", "60", "--epochs", "1", "--batch_size", "30",
             "--desom_iterations", "5", "--som_epochs", "1", "--tsne_samples", "60",
             "--internal_samples", "60", "--n_init", "2", "--verbose", "0"]
TINY = TINY_OWN + TINY_REST


def run_bin(*args, timeout=600):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- networks
def test_resnet_input_is_resnet50s_preprocessing_of_resized_rgb():
    layer = ResNetInput(32)
    grey = np.full((2, 8, 8, 1), 0.4, np.float32)
    out = keras.ops.convert_to_numpy(layer(grey))
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to(255 * 0.4 - CAFFE_MEANS_BGR, out.shape), atol=1e-3)
    rgb = np.broadcast_to(np.array([0.1, 0.5, 0.9], np.float32), (1, 20, 12, 3))
    out = keras.ops.convert_to_numpy(layer(rgb))  # channels come out BGR, ImageNet means subtracted
    np.testing.assert_allclose(out[0, 5, 7], 255 * np.array([0.9, 0.5, 0.1]) - CAFFE_MEANS_BGR, atol=1e-3)
    assert ResNetInput.from_config(layer.get_config()).size == 32
    with pytest.raises(UsageError, match="at least 32x32"):
        ResNetInput(16)


def test_encoder_and_decoder_shapes_for_grey_and_colour_images():
    x = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    encoder, decoder = resnet_encoder((16, 16, 3), 32), resnet_decoder((16, 16, 3))
    z = encoder.predict(x, verbose=0)
    assert z.shape == (3, 2048) and (z >= 0).all()  # average of ReLU maps
    out = decoder.predict(z, verbose=0)
    assert out.shape == (3, 16, 16, 3) and out.min() >= 0 and out.max() <= 1
    assert resnet_decoder((28, 28, 1)).output_shape == (None, 28, 28, 1)
    assert resnet_decoder((30, 26, 1)).output_shape == (None, 30, 26, 1)  # cropped from 32x28


@pytest.mark.slow
def test_weights_from_a_local_file_and_clear_errors(tmp_path):
    frozen = resnet_encoder((8, 8, 1), 32, freeze_until="conv2_block3_out", bn_momentum=0.9)
    resnet = frozen.get_layer("resnet50")  # its weights, whatever is frozen
    resnet.save_weights(tmp_path / "resnet.weights.h5")
    again = resnet_encoder((8, 8, 1), 32, weights=str(tmp_path / "resnet.weights.h5"))
    for a, b in zip(resnet.weights, again.get_layer("resnet50").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    small.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(UsageError, match="does not hold weights of ResNet50"):
        resnet_encoder((8, 8, 1), 32, weights=str(tmp_path / "other.weights.h5"))
    with pytest.raises(UsageError, match="weights file nothing.h5 not found"):
        resnet_encoder((8, 8, 1), 32, weights="nothing.h5")
    with pytest.raises(UsageError, match="has no layer 'conv9'; e.g. conv3_block4_out"):
        resnet_encoder((8, 8, 1), 32, freeze_until="conv9")
    layers = resnet.layers
    names = [layer.name for layer in layers]
    assert not any(layer.trainable for layer in layers[: names.index("conv2_block3_out") + 1])
    assert all(layer.trainable for layer in layers[names.index("conv2_block3_out") + 1:])
    assert {layer.momentum for layer in layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}



def test_imagenet_weights_offline_give_one_line(monkeypatch):
    # the tests forbid downloads and use an empty Keras home: no cached file
    with pytest.raises(UsageError, match="downloads are off .* use --weights none"):
        imagenet_weights()

    def failing(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x: None -- [Errno -2] "
                        "Name or service not known")

    monkeypatch.setenv("DESOM_NO_DOWNLOAD", "0")
    monkeypatch.setattr(keras.utils, "get_file", failing)
    with pytest.raises(UsageError, match=r"could not download the ImageNet weights of ResNet50 \(URL fetch "
                                         r"failure.*\); use --weights none"):
        imagenet_weights()


# ---------------------------------------------------------------- models
@pytest.mark.slow
def test_models_save_and_load_with_their_settings(tmp_path):
    x = np.random.default_rng(1).random((40, 8, 8, 1)).astype(np.float32)
    model = RSWNet((8, 8, 1), 3, input_size=32, freeze_until="conv2_block1_out", bn_momentum=0.9)
    model.init_centers(x, n_init=1)
    model.save(tmp_path / "c.keras")
    back = load_model(tmp_path / "c.keras")
    assert (back.input_size, back.freeze_until, back.bn_momentum, back.n_clusters) == (32, "conv2_block1_out",
                                                                                       0.9, 3)
    assert len(back.trainable_variables) == len(model.trainable_variables)
    np.testing.assert_allclose(back.soft_assign(x), model.soft_assign(x), rtol=1e-5, atol=1e-6)
    # RSWNetSOM (its settings, a frozen encoder too) is saved by bin/rswnet and predicts the same after
    # loading in another process in test_benchmark_with_the_som_head_end_to_end


# ---------------------------------------------------------------- bin/rswnet
def check_run(out: Path, model_row: str, pretrained: bool, n: int = 60):
    """Every file of a bin/rswnet run, and a comparison of every method on the same images."""
    for name in ("model.keras", "log.csv", "comparison.csv", "results.json", "pca.png", "tsne.png",
                 "args.json"):
        assert (out / name).is_file(), name
    assert (out / "pretrain_log.csv").is_file() == pretrained  # --pretrain_epochs 0: no pretraining
    assert (out / "architecture.png").is_file() or (out / "architecture.txt").is_file()
    table = pd.read_csv(out / "comparison.csv")
    assert table["method"].tolist() == [
        "k-means, raw pixels", "k-means, RSWNet latents", model_row, "SOM 2x5 (Kerasom) on RSWNet latents",
        "SOM 2x5 untrained (the published SOM column)", "DESOM 8x8 (dense) on pixels"]
    for column in ("acc", "acc_kmeans", "purity", "nmi", "ari", "silhouette", "davies_bouldin",
                   "calinski_harabasz", "largest_share", "sizes", "clusters"):
        assert column in table, column
    maps = table["method"].str.contains("SOM")
    assert table["acc_kmeans"][maps].between(0, 1).all() and table["acc_kmeans"][~maps].isna().all()
    larger = table["method"].str.contains("8x8")  # maps of more units than classes: acc_kmeans only
    assert table["acc"][larger].isna().all() and table["acc"][~larger].between(0, 1).all()
    assert table["nmi"].between(0, 1).all()
    assert [sum(map(int, s.split())) for s in table["sizes"]] == [n] * len(table)  # the same n test images
    written = pd.read_csv(out / "predictions.csv")  # RSWNet's cluster of each scored image
    assert len(written) == n and (written["part"] == "test").all()
    from common.metrics import nmi

    assert nmi(written["label"], written["cluster"]) == pytest.approx(
        table.set_index("method").loc[model_row, "nmi"])
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] == n and results["n_scored"] == n
    assert results["scored_on"] == "the held-out test images"
    assert results["rswnet"]["method"] == model_row and len(results["comparison"]) == 6
    assert set(results["timings"]) >= {"train", "stages"}
    assert ("pretrain" in results["timings"]) == pretrained


def scored_images(out: Path, tmp_path: Path):
    """The run's predictions.csv, its scored test images and their labels, the
    images also in an .npz file for `bin/rswnet predict --data` (a few images:
    ResNet50 on all 1,797 digits takes seconds in each process)."""
    written = pd.read_csv(out / "predictions.csv")
    _, (x_test, y_test) = load_data("digits", validation=True, flatten=False)
    x, y = x_test[written["index"]], y_test[written["index"]]
    np.testing.assert_array_equal(written["label"], y)
    np.savez(tmp_path / "scored.npz", x=x, y=y)
    return written, x, y, tmp_path / "scored.npz"


def predict_here(*argv) -> pd.DataFrame:
    """``bin/rswnet predict ARGV --out CSV`` in this process (a new one
    imports TensorFlow and rebuilds ResNet50 again); the CSV read back."""
    from rswnet.cli import predict_main

    assert predict_main(list(map(str, argv))) == 0
    return pd.read_csv(argv[argv.index("--out") + 1])


@pytest.mark.slow
def test_clustering_head_end_to_end_with_the_comparison_and_predict(tmp_path):
    from rswnet.cli import RswnetCommand

    out = tmp_path / "run"  # trained here (what bin/rswnet's `main` runs), without pretraining (the SOM
    # head's test pretrains); the trained model kept
    trained = RswnetCommand().execute([*TINY, "--pretrain_epochs", "0", "--save_dir", str(out)]).model
    assert isinstance(trained, RSWNet)
    check_run(out, "RSWNet, clustering head (argmax q)", pretrained=False)
    # the saved model in a new process: the run's own clusters of its scored test images, the trained
    # model's
    written, x, y, scored = scored_images(out, tmp_path)
    res = run_bin("predict", "--model", out / "model.keras", "--data", scored, "--out", tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_array_equal(preds["label"], y)
    np.testing.assert_array_equal(preds["cluster"], written["cluster"])
    np.testing.assert_array_equal(preds["cluster"], trained.cluster(x))
    assert preds["probability"].between(0, 1).all()
    # image files, named as positional arguments, as in `bin/dcn predict`
    from PIL import Image

    from common.folders import load_image_files

    files = [tmp_path / f"digit{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        Image.fromarray((x[i, ..., 0] * 255).round().astype(np.uint8)).save(f)
    preds = predict_here("--model", out / "model.keras", *files, "--out", tmp_path / "files.csv")
    images, _ = load_image_files(files, trained.sample_shape[:2], "grayscale")
    assert preds["image"].tolist() == [str(f) for f in files]
    np.testing.assert_array_equal(preds["cluster"], trained.cluster(images))


@pytest.mark.slow
def test_benchmark_with_the_som_head_end_to_end(tmp_path, capsys):
    from rswnet.benchmark import main as bench

    # passed on to bin/rswnet: pretraining, and ResNet50 trained from conv5 on (tracing the whole network's
    # training step twice costs half a minute; the clustering head's test trains all of it)
    with pytest.raises(SystemExit) as stop:
        bench([*TINY_OWN, "--heads", "som", "--runs", "1", "--save_dir", str(tmp_path / "b"),
               "--map_size", "2", "3", *TINY_REST, "--pretrain_epochs", "1",
               "--freeze_until", "conv4_block6_out"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "som seed 0: RSWNet, SOM head 2x3" in printed and "±" in printed
    runs = pd.read_csv(tmp_path / "b" / "runs.csv")
    assert len(runs) == 6 and set(runs["head"]) == {"som"} and (runs["run_seconds"] > 0).all()
    summary = pd.read_csv(tmp_path / "b" / "summary.csv")
    assert (summary["runs"] == 1).all() and len(summary) == 6
    out = tmp_path / "b" / "som_seed0"
    check_run(out, "RSWNet, SOM head 2x3 (best-matching unit)", pretrained=True)
    log = pd.read_csv(out / "log.csv")  # the default normalized SOM loss logs the spread it divides by
    assert (log["latent_spread"].dropna() > 0).all() and log["latent_spread"].notna().any()
    page = explorer_page(out / "explorer.html")  # the map explorer of the 60 scored images
    assert page["map"]["rows"] == 2 and page["map"]["cols"] == 3 and sum(page["hits"]) == 60
    assert page["images"] == {"height": 8, "width": 8, "channels": 1} and len(page["labels"]) == 10
    # the model bin/rswnet saved, loaded in this (another) process: the run's own units of its scored
    # test images, from `bin/rswnet predict --data` as from the loaded model
    written, x, y, scored = scored_images(out, tmp_path)
    preds = predict_here("--model", out / "model.keras", "--data", scored, "--out", tmp_path / "p.csv")
    np.testing.assert_array_equal(preds["label"], y)
    np.testing.assert_array_equal(preds["bmu"], written["unit"])
    model = load_model(out / "model.keras")
    assert isinstance(model, RSWNetSOM)
    assert model.freeze_until == "conv4_block6_out" and tuple(model.map_size) == (2, 3)
    np.testing.assert_array_equal(preds["bmu"], model.predict(x, verbose=0))
    np.testing.assert_array_equal(preds["bmu"], preds["row"] * 3 + preds["col"])


class BlobEncoder:
    """A stand-in for RSWNet in :func:`rswnet.compare.compare`: its latents are
    the flattened images, its clusters the nearest of ``centres``."""

    def __init__(self, centres):
        self.centres = centres

    def transform(self, x):
        return np.asarray(x, np.float32).reshape(len(x), -1)

    def assign_embeddings(self, z):
        d = ((z[:, None, :] - self.centres[None]) ** 2).sum(axis=-1)
        return np.exp(-d) / np.exp(-d).sum(axis=1, keepdims=True)


def test_comparison_scores_every_map_by_acc_kmeans_and_has_desom_only_when_asked():
    from common.metrics import accuracy, prototype_kmeans_accuracy
    from desom.models import DESOM
    from rswnet.compare import compare, map_accuracy

    rng = np.random.default_rng(0)
    centres = np.eye(3, 4, dtype=np.float32) * 4
    y = np.repeat(np.arange(3), 40)
    x = (centres[y] + rng.normal(0, 0.3, (120, 4))).astype(np.float32).reshape(120, 2, 2, 1)
    options = dict(n_clusters=3, som_map_size=(2, 3), som_epochs=5, internal_samples=60, batch_size=20)
    table = compare(BlobEncoder(centres), x, x, y, **options).table.set_index("method")
    assert not table.index.str.contains("DESOM").any()  # not asked for: no DESOM row
    som = table.loc["SOM 2x3 (Kerasom) on RSWNet latents"]
    assert np.isnan(som["acc"]) and som["acc_kmeans"] > 0.9  # 6 units for 3 classes: grouped by k-means
    assert np.isnan(table.loc["RSWNet, clustering head (argmax q)", "acc_kmeans"])
    # given a trained map instead of training one
    keras.utils.set_random_seed(0)
    desom = DESOM(4, (2, 2), latent_dim=2)
    desom.init_prototypes(x.reshape(120, 4), seed=0)
    table = compare(BlobEncoder(centres), x, x, y, desom_model=desom, **options).table.set_index("method")
    row = table.loc["DESOM 2x2 (dense) on pixels (given)"]
    units = desom.predict(x.reshape(120, 4), verbose=0)
    assert row["acc_kmeans"] == pytest.approx(prototype_kmeans_accuracy(y, units, desom.prototypes))
    assert np.isnan(row["acc"])
    assert map_accuracy(y, y, np.zeros((3, 2))) == accuracy(y, y) == 1.0  # a unit per class: plain accuracy


def test_published_protocol_sets_the_notebook_defaults_and_explicit_flags_win():
    from rswnet.cli import RswnetCommand

    command = RswnetCommand()
    args = command.parser().parse_args(["--dataset", "digits", "--protocol", "published",
                                        "--input_size", "40", "--weights", "none"])
    command.check(args)
    assert (args.pretrain_epochs, args.epochs, args.recon_weight, args.target, args.batch_size, args.lr,
            args.bn_momentum) == (22, 22, 0.0, "batch", 128, 0.001, 0.99)
    assert (args.input_size, args.weights) == (40, "none")
    args = command.parser().parse_args(["--dataset", "digits"])
    command.check(args)
    assert (args.pretrain_epochs, args.epochs, args.recon_weight, args.target, args.weights,
            args.bn_momentum) == (10, 10, 10.0, "refresh", "imagenet", 0.9)


def test_resume_keeps_random_resnet_weights(tmp_path, monkeypatch):
    """--weights none is saved as such: a resume must not take the protocol's imagenet."""
    from rswnet.cli import RswnetCommand

    args = resumed_args(monkeypatch, RswnetCommand,
                        ["--dataset", "digits", "--weights", "none", "--save_dir", str(tmp_path)],
                        ["--dataset", "digits", "--resume", "--save_dir", str(tmp_path), "--verbose", "0"])
    assert args.weights == "none"


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "digits"], "downloads are off"),  # default weights: ImageNet, not cached here
    (["--dataset", "digits", "--input_size", "16"], "argument --input_size: must be in [32, inf), got 16"),
    (["--dataset", "digits", "--weights", "missing.h5", "--input_size", "32"],
     "weights file missing.h5 not found"),
    (["--dataset", "digits", "--bn_momentum", "1"], "argument --bn_momentum: must be in [0, 1), got 1"),
    (["--dataset", "digits", "--lr", "inf"], "argument --lr: must be a finite number in (0, inf), got inf"),
    (["--dataset", "digits", "--Tmin", "3", "--Tmax", "2"], "need --Tmin <= --Tmax, got 3 > 2"),
    (["--dataset", "digits", "--som_map_size", "101", "100"],
     "--som_map_size 101 100 has 10100 units; at most 10000 are supported"),
    (["--dataset", "digits", "--head", "som", "--map_size", "0", "8"],
     "argument --map_size: must be in [1, inf), got 0"),
    (["--dataset", "digits", "--protocol", "published", "--head", "som"],
     "the published protocol trains the"),
    (["--dataset", "digits", "--subset", "5", "--weights", "none"],
     "--subset 5 is smaller than the 10 classes"),
    (["--dataset", "digits", "--subset", "1342", "--weights", "none"],  # of 1,347 training images
     "--subset 1342 leaves out 5 of the 1347 images, fewer than the 10 classes; give at most 1337"),
    (["--dataset", "reuters10k"], "invalid choice: 'reuters10k'"),
    (["--data", "points.npz"], "points.npz holds arrays or a table; bin/rswnet reads image folders"),
    (["predict", "--model", "none.keras", "--dataset", "digits"], "model file none.keras not found"),
    (["predict", "--model", "none.keras"], "give exactly one of IMAGE files, --dataset or --data"),
    (["predict", "--model", "m.keras", "a.png", "--dataset", "digits"],
     "(got IMAGE files and --dataset)"),
])
def test_bad_input_gets_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(main, argv, message, capsys)


def test_image_folders_give_training_images_test_classes_and_subsets(tmp_path):
    from PIL import Image

    from rswnet.cli import RswnetCommand

    rng = np.random.default_rng(0)

    def image(path, shape):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)

    for i in range(30):
        image(tmp_path / "d" / "train" / f"img{i}.png", (12, 10))
    for c in ("cat", "dog"):
        for i in range(4):
            image(tmp_path / "d" / "test" / c / f"{i}.png", (9, 9))
    command = RswnetCommand()
    args = command.parser().parse_args(["--data", str(tmp_path / "d"), "--image_size", "16", "--weights",
                                        "none", "--subset", "20"])
    command.check(args)
    data = command.load(args)
    assert data.x.shape == (20, 16, 16, 1) and data.y is None  # a random subset of the unlabelled images
    assert data.x_val.shape == (8, 16, 16, 1) and sorted(data.y_val.tolist()) == [0] * 4 + [1] * 4
    assert args.n_clusters == 2  # the test classes
    assert command.default_save_dir(args, data) == "results/d_rswnet_clustering"
