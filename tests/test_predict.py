"""`X predict` for every program and every model type it saves (common/predict.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from common.errors import UsageError
from common.predict import read_samples, write_predictions

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
from importlib import import_module
folder, jobs = sys.argv[1], sys.argv[2:]
for job in jobs:
    program, name = job.split(":")
    module = {"desom": "desom.cli", "dcn": "dcn.dec.cli", "ae": "dcn.autoencoders.cli",
              "selflabel": "dcn.selflabel.cli", "rswnet": "rswnet.cli"}[program]
    import_module(module).predict_main(["--model", f"{folder}/{name}.keras", "--data", f"{folder}/data.npz",
                                        "--out", f"{folder}/{name}.csv"])
"""


def _args(**given):
    base = dict(images=[], dataset=None, data=None, data_dir=None, label_col=None, out=None, model="m.keras")
    return SimpleNamespace(**{**base, **given})


@pytest.mark.slow
def test_every_program_predicts_each_model_type_it_saves_in_a_fresh_process(tmp_path):
    """desom, dcn, ae and selflabel `predict` on a .npz of images, run in one
    new process, write what the models compute here (rswnet's, with ResNet50
    inside, in tests/test_rswnet.py)."""
    import keras

    from common.networks import save_keras_model
    from dcn.autoencoders.models import build
    from dcn.dec.models import DCN
    from dcn.selflabel.network import SelfLabelNet
    from desom.models import DESOM, ConvDESOM, Kerasom

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((6, 28, 28, 1)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "data.npz", x=x, y=y)
    flat = x.reshape(len(x), -1)
    maps = {"desom-DESOM": DESOM(784, (2, 2), hidden=(16,)), "desom-ConvDESOM": ConvDESOM(x.shape[1:], (2, 2),
            filters=(4,)), "desom-Kerasom": Kerasom(784, (2, 2))}
    expected = {}
    for name, model in maps.items():
        xin = flat if len(model.sample_shape) == 1 else x
        model.init_prototypes(xin, seed=0)
        expected[name] = {"bmu": model.assign_codes(model.transform(xin))[0]}
    clusterers = {"dcn-DCN": DCN(x.shape[1:], 3, architecture="conv", filters=(4, 4, 4)),
                  "dcn-DCNmlp": DCN((784,), 3, architecture="mlp", hidden=(8,))}
    for name, model in clusterers.items():
        q = model.soft_assign(flat if len(model.sample_shape) == 1 else x)
        expected[name] = {"cluster": q.argmax(axis=1)}
    net = SelfLabelNet(x.shape[1:], 3, filters=(4,), dense=(8,), head=(8,), cluster_names=["a", "b", "a"])
    p = net.predict_proba(x)
    p = np.stack([p[:, 0] + p[:, 2], p[:, 1]], axis=1)
    expected["selflabel-SelfLabelNet"] = {"class_1": np.array(["a", "b"])[p.argmax(axis=1)]}
    models = {**maps, **clusterers, "selflabel-SelfLabelNet": net}
    for kind in ("ae", "semisupervised", "vae", "cvae"):
        model = build(kind, x.shape[1:], 3, hidden=(8,), latent_dim=2)
        labels = y if model.needs_labels else None
        codes = model.embed(x, labels)
        model.fit_clusters(codes, np.arange(len(x)) % 3)
        expected[f"ae-{kind}"] = {"code_1": codes[:, 0], "code_2": codes[:, 1],
                                  "cluster": ((codes[:, None] - model.cluster_means.numpy()[None]) ** 2)
                                  .sum(axis=2).argmin(axis=1)}
        models[f"ae-{kind}"] = model
    for name, model in models.items():
        save_keras_model(model, tmp_path / f"{name}.keras")

    jobs = [f"{name.split('-')[0]}:{name}" for name in models]
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *jobs], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for name, columns in expected.items():
        table = pd.read_csv(tmp_path / f"{name}.csv")
        assert table["index"].tolist() == list(range(len(x))), name
        assert table["label"].tolist() == y.tolist(), name
        for column, values in columns.items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(table[column], values, rtol=1e-4, atol=1e-5, err_msg=name)
            else:
                assert table[column].tolist() == values.tolist(), f"{name}: {column}"
    assert done.stdout.count("predictions written to") == len(models)


def test_image_folder_files_and_arrays_are_read_as_the_model_takes_them(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, size in enumerate([(20, 30), (8, 8)]):
        image = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))
        image.save(tmp_path / "imgs" / "sub" / f"{i}.png")
    folder = read_samples(_args(data=str(tmp_path / "imgs")), (8, 8, 1))
    assert folder.x.shape == (2, 8, 8, 1) and folder.source == "imgs" and folder.labels is None
    assert [Path(p).name for p in folder.frame["image"]] == ["0.png", "1.png"]
    files = read_samples(_args(images=[str(tmp_path / "imgs" / "sub" / "1.png")]), (8, 8, 3))
    assert files.x.shape == (1, 8, 8, 3) and files.source == "images"
    np.savez(tmp_path / "a.npz", x=rng.random((5, 16)), y=np.array([3, 1, 3, 1, 1]))
    arrays = read_samples(_args(data=str(tmp_path / "a.npz")), (4, 4, 1))  # rows of 16 values as 4x4 images
    assert arrays.x.shape == (5, 4, 4, 1) and arrays.frame.columns.tolist() == ["index"]
    assert read_samples(_args(dataset="digits"), (64,)).x.shape == (1797, 64)

    model = str(tmp_path / "run" / "m.keras")
    path = write_predictions(arrays, {"cluster": np.arange(5)}, _args(model=model))
    assert path == tmp_path / "run" / "predictions_a.csv"  # the run's own predictions.csv is left alone
    written = pd.read_csv(path)
    assert written.columns.tolist() == ["index", "cluster", "label"]
    assert written["label"].tolist() == [3, 1, 3, 1, 1]


@pytest.mark.parametrize("given, shape, message", [
    ({}, (64,), "give exactly one of IMAGE files, --dataset or --data"),
    ({"dataset": "digits", "images": ["a.png"]}, (64,), "(got IMAGE files and --dataset)"),
    ({"images": ["a.png"]}, (64,), "was trained on vectors of 64 values, not images"),
    ({"dataset": "digits"}, (28, 28, 1),
     "the model expects samples of shape (28, 28, 1); digits has (8, 8, 1)"),
    ({"data": "nowhere.npz"}, (64,), "nowhere.npz"),
])
def test_bad_samples_get_one_clear_error(given, shape, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as caught:
        read_samples(_args(**given), shape)
    assert message in str(caught.value)


def test_a_table_scaled_in_training_is_scaled_alike_by_predict(tmp_path):
    """bin/ae on a CSV with --label_col and --scaling minmax (its values outside [0, 1] are refused
    without it): preprocessing.json beside the model, and predict scales new rows the same way."""
    from dcn.autoencoders.cli import AeCommand, predict_main
    from dcn.autoencoders.models import load_model

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(64, 4)) * [1, 50, 0.1, 5] + [0, 100, 0, -3], columns=list("abcd"))
    frame["kind"] = np.where(frame["a"] > 0, "up", "down")
    frame.to_csv(tmp_path / "t.csv", index=False)
    base = ["--data", str(tmp_path / "t.csv"), "--label_col", "kind", "--epochs", "1", "--batch_size", "16",
            "--cluster", "kmeans", "--tsne_samples", "20", "--verbose", "0"]
    with pytest.raises(UsageError, match="give --scaling minmax"):
        AeCommand().main([*base, "--save_dir", str(tmp_path / "refused")])
    run = tmp_path / "run"
    AeCommand().main([*base, "--scaling", "minmax", "--save_dir", str(run)])
    assert json.loads((run / "preprocessing.json").read_text())["scaling"] == "minmax"
    predict_main(["--model", str(run / "model.keras"), "--data", str(tmp_path / "t.csv"), "--label_col",
                  "kind"])
    table = pd.read_csv(run / "predictions_t.csv")
    x = frame[list("abcd")].to_numpy()
    scaled = ((x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))).astype(np.float32)
    codes = load_model(run / "model.keras").embed(scaled)
    np.testing.assert_allclose(table[["code_1", "code_2"]], codes[:, :2], rtol=1e-4, atol=1e-5)
    assert table["label"].tolist() == frame["kind"].tolist()


def test_an_overwritten_run_without_scaling_leaves_no_scaling_for_predict(tmp_path):
    from desom.cli import DesomCommand

    rng = np.random.default_rng(2)
    pd.DataFrame(rng.normal(size=(40, 3)) * [1, 100, 5], columns=list("abc")).to_csv(tmp_path / "t.csv",
                                                                                  index=False)
    base = ["--data", str(tmp_path / "t.csv"), "--model", "som", "--map_size", "2", "2", "--iterations", "4",
            "--batch_size", "8", "--save_dir", str(tmp_path / "run"), "--verbose", "0", "--no_explorer"]
    DesomCommand().main([*base, "--scaling", "standard"])
    assert (tmp_path / "run" / "preprocessing.json").is_file()
    DesomCommand().main([*base, "--overwrite"])
    assert not (tmp_path / "run" / "preprocessing.json").exists()  # predict must not scale this model's input


def test_ae_predict_numbers_labels_as_training_did():
    from dcn.autoencoders.cli import _class_indices

    assert _class_indices(np.array([3, 1, 3]), ["1", "3"], "m.keras").tolist() == [1, 0, 1]
    assert _class_indices(np.array([5, 7]), None, "m.keras").tolist() == [0, 1]  # no record: as training
    with pytest.raises(UsageError, match="labels 9 were not among the classes m.keras was trained with"):
        _class_indices(np.array([1, 9]), ["1", "3"], "m.keras")


def test_a_dcn_run_saved_when_dataset_took_files_resumes_with_data():
    from dcn.dec.cli import DcnCommand

    saved = {"dataset": "points.npz", "data": None}
    DcnCommand().upgrade_saved_args(saved)
    assert saved == {"dataset": None, "data": "points.npz"}
    named = {"dataset": "digits", "data": None}
    DcnCommand().upgrade_saved_args(named)
    assert named == {"dataset": "digits", "data": None}
