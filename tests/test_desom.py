"""DESOM models, the shared training loop and bin/desom, on small real data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import desom.models as desom_models
from common.data import load_data
from common.errors import UsageError
from desom import DESOM, ConvDESOM, Kerasom, load_model
from desom.cli import main
from tests.helpers import assert_one_line_error, interrupt_on_call, run_ok

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "desom"
SMALL = {"hidden": (64, 64, 128)}  # a narrower autoencoder keeps the tests quick


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = load_data("digits")
    return x, y


def run_bin(*args, timeout=240, **kw):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kw)


run_main = partial(run_ok, main)  # bin/desom in this process, exit code 0 asserted


# ---------------------------------------------------------------- training
def test_short_run_raises_purity_well_above_the_untrained_map(digits, tmp_path):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = DESOM(64, (6, 6), **SMALL)
    model.init_prototypes(x, seed=0)
    before = model.evaluate_map(x, y, internal=False)["purity"]
    model.fit(x, y, iterations=800, batch_size=128, eval_interval=200, save_dir=tmp_path, verbose=0)
    after = model.evaluate_map(x, y)
    assert after["purity"] > before + 0.15 and after["purity"] > 0.75
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["iteration"].tolist() == [0, 200, 400, 600, 800]
    assert log["purity"].iloc[0] == pytest.approx(before)
    assert log["T"].iloc[-1] == pytest.approx(0.1)
    assert {"loss", "reconstruction", "som", "quantization_error", "topographic_error"} <= set(log)


def test_interrupted_fit_resumes_to_the_same_result(digits, tmp_path, monkeypatch):
    x, y = digits
    kwargs = dict(iterations=120, batch_size=64, eval_interval=40, checkpoint_minutes=0,
                  verbose=0, jit_compile=False)

    def fresh():
        keras.utils.set_random_seed(5)
        m = DESOM(64, (3, 3), **SMALL)
        m.init_prototypes(x, seed=5)
        return m

    reference = fresh()
    reference.fit(x, y, save_dir=tmp_path / "ref", **kwargs)

    restore = interrupt_on_call(monkeypatch, desom_models.SOMTask, "evaluate", 2)  # the row at 40
    with pytest.raises(KeyboardInterrupt):
        fresh().fit(x, y, save_dir=tmp_path / "run", **kwargs)
    restore()
    assert (tmp_path / "run" / "checkpoints" / "train").is_dir()

    resumed = fresh()
    result = resumed.fit(x, y, save_dir=tmp_path / "run", resume=True, **kwargs)
    assert (result.iterations, result.trained) == (120, 80)
    np.testing.assert_allclose(resumed.prototypes, reference.prototypes, rtol=1e-4, atol=1e-5)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log["iteration"].tolist() == [0, 40, 80, 120]
    ref_log = pd.read_csv(tmp_path / "ref" / "log.csv")
    np.testing.assert_allclose(log["loss"].iloc[2:], ref_log["loss"].iloc[2:], rtol=1e-4)


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpus_matches_the_default_strategy(tmp_path):
    script = textwrap.dedent("""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from common.data import load_data
        from common.runtime import make_strategy
        from desom import DESOM
        (x, y), _ = load_data("digits")
        for name in ("default", "mirrored"):
            strategy = make_strategy(name)
            keras.utils.set_random_seed(1)
            with strategy.scope():
                model = DESOM(64, (4, 4), hidden=(32, 32, 64))
            model.init_prototypes(x, seed=1)
            model.fit(x, y, iterations=60, batch_size=64, eval_interval=20, verbose=0, seed=1,
                      strategy=strategy, save_dir=sys.argv[1] + "/" + name)
            print(name, strategy.num_replicas_in_sync)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mirrored 2" in out.stdout
    default = pd.read_csv(tmp_path / "default" / "log.csv")
    mirrored = pd.read_csv(tmp_path / "mirrored" / "log.csv")
    for col in ("loss", "reconstruction", "som", "quantization_error"):
        np.testing.assert_allclose(mirrored[col], default[col], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_conv_desom_and_kerasom_train_save_and_load(digits, tmp_path):
    x, y = digits
    images = x.reshape(-1, 8, 8, 1)
    conv = ConvDESOM((8, 8, 1), (4, 4), filters=(8, 16))
    conv.init_prototypes(images, method="som")
    conv.pretrain(images, epochs=1, batch_size=128, save_dir=tmp_path / "c", verbose=0)
    assert (tmp_path / "c" / "ae.weights.h5").is_file()
    conv.fit(images, y, iterations=50, batch_size=128, save_dir=tmp_path / "c", verbose=0)
    assert conv.decode_prototypes().shape == (16, 8, 8, 1)

    som = Kerasom(64, (4, 6), topology="hexagonal", toroidal=True)
    som.init_prototypes(x)
    som.fit(x, y, iterations=200, batch_size=128, verbose=0)
    assert som.evaluate_map(x, y)["purity"] > 0.6
    for model, data in ((conv, images), (som, x)):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        again = load_model(path)
        np.testing.assert_array_equal(again.predict(data, verbose=0), model.predict(data, verbose=0))
    assert (again.topology, again.toroidal, again.map_size) == ("hexagonal", True, (4, 6))


def test_autoencoder_weights_round_trip_and_mismatch(digits, tmp_path):
    x, _ = digits
    a = DESOM(64, (2, 2), **SMALL)
    a.save_autoencoder_weights(tmp_path / "ae.weights.h5")
    b = DESOM(64, (2, 2), **SMALL)
    b.load_autoencoder_weights(tmp_path / "ae.weights.h5")
    np.testing.assert_allclose(b.transform(x[:5]), a.transform(x[:5]), rtol=1e-5)
    with pytest.raises(UsageError, match="does not fit this autoencoder"):
        DESOM(64, (2, 2)).load_autoencoder_weights(tmp_path / "ae.weights.h5")


@pytest.mark.slow
def test_saved_model_predicts_the_same_in_a_new_process(digits, tmp_path):
    x, _ = digits
    model = DESOM(64, (3, 3), **SMALL)
    model.init_prototypes(x)
    model.fit(x, iterations=30, batch_size=128, verbose=0, jit_compile=False)  # (XLA: longer than 30 steps)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, keras, desom\n"
              "m = keras.saving.load_model(sys.argv[1])\n"
              "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.keras"), str(tmp_path / "p.npy"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), model.predict(x, verbose=0))


# ---------------------------------------------------------------- bin/desom
@pytest.mark.slow
def test_bin_desom_writes_every_output_and_predicts_in_a_new_process(tmp_path, capsys):
    out_dir = tmp_path / "run"
    run_main(capsys, "--iterations", 60, "--eval_interval", 30, "--map_size", 3, 4, "--save_dir", out_dir,
             "--batch_size", 128, "--verbose", 0)
    for name in ("model.keras", "log.csv", "results.json", "map.png", "umatrix.png", "training.png",
                 "args.json"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "architecture.png").is_file() or (out_dir / "architecture.txt").is_file()
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("purity", "nmi", "ari", "acc_kmeans", "quantization_error", "topographic_error", "args"):
        assert key in results
    assert "acc" not in results  # 12 units for 10 classes: the paper's accuracy, not the one-to-one
    assert results["iterations"] == 60 and results["args"]["map_size"] == [3, 4]
    assert results["args"]["Tmax"] == 10.0  # the paper's, up to 20x20
    assert "acc_kmeans" in pd.read_csv(out_dir / "log.csv")

    res = run_bin("predict", "--model", out_dir / "model.keras", "--dataset", "digits",
                  "--out", tmp_path / "preds.csv")
    assert res.returncode == 0, res.stderr[-2000:]
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert list(preds.columns) == ["index", "bmu", "row", "col", "distance", "label"] and len(preds) == 1797
    np.testing.assert_array_equal(preds["bmu"], preds["row"] * 4 + preds["col"])
    model = load_model(out_dir / "model.keras")
    (x, _), _ = load_data("digits")
    np.testing.assert_array_equal(preds["bmu"], model.predict(x, verbose=0))
    assert results["purity"] == pytest.approx(
        json.loads((out_dir / "results.json").read_text())["train"]["purity"])
    # the run's own predictions.csv: every sample's unit, its group as acc_kmeans groups them
    from common.metrics import accuracy

    written = pd.read_csv(out_dir / "predictions.csv")
    assert written.columns.tolist() == ["part", "index", "cluster", "unit", "row", "col", "group", "label"]
    assert (written["part"] == "train").all() and written["index"].tolist() == list(range(1797))
    np.testing.assert_array_equal(written["unit"], preds["bmu"])
    np.testing.assert_array_equal(written["label"], preds["label"])
    assert accuracy(written["label"], written["group"]) == pytest.approx(results["acc_kmeans"])


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])  # Ctrl-C; a scheduler
def test_bin_desom_resumes_after_ctrl_c_or_sigterm(tmp_path, sig, code, said, capsys):
    out_dir = tmp_path / "run"
    args = ["--iterations", 200, "--eval_interval", 50, "--map_size", 3, 3,
            "--batch_size", 64, "--save_dir", out_dir, "--verbose", 2, "--no_jit"]
    # A shell without job control starts background jobs with SIGINT ignored, and
    # Python keeps it so: give the child the default, as a terminal would.
    proc = subprocess.Popen([str(BIN), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    log = out_dir / "log.csv"
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(pd.read_csv(log)) >= 2:  # rows at 0 and 50: 150 steps to go
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert said in err and "continue with --resume" in out
    rows_before = pd.read_csv(log)["iteration"].tolist()
    assert 0 < rows_before[-1] < 200

    run_main(capsys, "--resume", "--save_dir", out_dir, "--verbose", 0)  # as a new process would
    iterations = pd.read_csv(log)["iteration"].tolist()
    assert iterations[: len(rows_before)] == rows_before
    assert iterations == sorted(set(iterations)) and iterations[-1] == 200
    assert json.loads((out_dir / "results.json").read_text())["iterations"] == 200


@pytest.mark.slow
def test_bin_desom_csv_with_scaling_and_predict(tmp_path, capsys):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 3)) * [1, 100, 0.01], columns=["a", "b", "c"])
    frame["kind"] = np.where(frame["a"] > 0, "up", "down")
    frame.to_csv(tmp_path / "t.csv", index=False)
    out_dir = tmp_path / "run"
    run_main(capsys, "--data", tmp_path / "t.csv", "--label_col", "kind", "--scaling", "standard",
             "--model", "som", "--map_size", 2, 3, "--iterations", 50, "--batch_size", 32,
             "--som_loss", "normalized", "--save_dir", out_dir, "--verbose", 0)
    assert (pd.read_csv(out_dir / "log.csv")["latent_spread"].dropna() > 0).any()
    assert json.loads((out_dir / "preprocessing.json").read_text())["scaling"] == "standard"
    assert (out_dir / "map.png").is_file()
    res = run_main(capsys, "predict", "--model", out_dir / "model.keras", "--data", tmp_path / "t.csv",
                   "--label_col", "kind")
    assert "purity" in res.out
    preds = pd.read_csv(out_dir / "predictions_t.csv")  # beside the run's own predictions.csv
    model = load_model(out_dir / "model.keras")
    x = frame[["a", "b", "c"]].to_numpy()
    scaled = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    np.testing.assert_array_equal(preds["bmu"], model.predict(scaled, verbose=0))


@pytest.mark.parametrize("argv, message", [
    (["--map_size", "0", "4"], "argument --map_size: must be in [1, inf), got 0"),
    (["--map_size", "1000", "1000"], "--map_size 1000 1000 has 1000000 units; at most 10000 are supported"),
    (["--map_size", "101", "100", "--topology", "hexagonal"], "--map_size 101 100 has 10100 units"),
    (["--batch_size", "5000"], "larger than the 1797 training samples"),
    (["--data", "missing.npz"], "data file missing.npz not found"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--iterations", "0"], "argument --iterations: must be in [1, inf), got 0"),
    (["--gamma", "nan"], "argument --gamma: must be a finite number in [0, inf), got nan"),
    (["--gamma", "-1"], "argument --gamma: must be in [0, inf), got -1"),
    (["--Tmax", "0"], "argument --Tmax: must be in (0, inf), got 0"),
    (["--Tmin", "5", "--Tmax", "2"], "need --Tmin <= --Tmax, got 5 > 2"),
    (["--lr", "1e999"], "argument --lr: must be a finite number in (0, inf), got 1e999"),
    (["--batch_size", "many"], "argument --batch_size: must be an integer, got 'many'"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["--model", "convdesom", "--dataset", "digits", "--data", "x.csv"], "not allowed with argument"),
    (["--resume", "--save_dir", "nowhere"], "nothing to resume"),
    (["--model", "som", "--pretrain_epochs", "2"], "--model som has no autoencoder: drop --pretrain_epochs"),
    (["--model", "som", "--gamma", "7", "--latent_dim", "99", "--batchnorm"],
     "--model som has no autoencoder: drop --latent_dim --gamma --batchnorm"),
    (["--ae_weights", "ae.weights.h5", "--pretrain_epochs", "3"],
     "--ae_weights ae.weights.h5 is an autoencoder pretrained already, and --pretrain_epochs 3 would not "
     "run"),
    (["predict", "--model", "nothing.keras", "--dataset", "digits"], "model file nothing.keras not found"),
])
def test_bad_arguments_get_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(main, argv, message, capsys)


@pytest.mark.slow
def test_mixed_precision_path_runs_on_cpu(tmp_path):
    # float16 compute is for GPUs; on a CPU it is emulated, about 50 times slower (a second a step
    # of this tiny model), but must still work: loss scaling, and a SOM layer that stays in float32.
    # 128 samples: every evaluation, prediction and picture runs in float16 too.
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "small.npz", x=digits.data[:128] / 16, y=digits.target[:128])
    res = run_bin("--mixed_precision", "--data", tmp_path / "small.npz", "--iterations", 4, "--eval_interval",
                  2, "--map_size", 2, 2, "--batch_size", 32, "--save_dir", tmp_path / "run", "--verbose", 0,
                  "--no_jit", "--no_explorer")
    assert res.returncode == 0, res.stderr[-2000:]
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert np.isfinite(log["loss"].iloc[1:]).all()


@pytest.mark.slow
def test_bad_argument_from_the_real_executable():
    res = run_bin("--map_size", 0, 3, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == ("desom: error: argument --map_size: must be in [1, inf), got 0 "
                                  "(see desom --help)")


def test_convdesom_refuses_vector_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "v.npz", x=np.zeros((20, 5)))
    assert_one_line_error(main, ["--model", "convdesom", "--data", str(tmp_path / "v.npz")],
                          "convdesom needs images", capsys)


@pytest.mark.slow
@pytest.mark.fmnist
def test_fashion_mnist_run_through_the_command(require_fmnist, tmp_path, capsys):
    run_main(capsys, "--dataset", "fmnist", "--iterations", 100, "--eval_interval", 50, "--eval_samples",
             2000, "--save_dir", tmp_path, "--verbose", 0)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_samples"] == 70000 and results["purity"] > 0.3
    assert os.path.getsize(tmp_path / "map.png") > 10000


@pytest.mark.slow
def test_benchmark_writes_runs_summary_table_and_figure(tmp_path, capsys):
    from desom.benchmark import main as bench

    with pytest.raises(SystemExit) as stop:
        bench(["--datasets", "digits", "mnist", "--models", "desom", "som", "kmeans", "--runs", "2",
               "--iterations", "40", "--batch_size", "128", "--map_size", "4", "4", "--save_dir",
               str(tmp_path / "b"), "--fig_dir", str(tmp_path / "fig")])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "skipping mnist" in printed  # no MNIST files in the test environment
    runs = pd.read_csv(tmp_path / "b" / "runs.csv")
    assert len(runs) == 6 and set(runs["model"]) == {"desom", "som", "kmeans"}
    assert runs["seed"].tolist() == [0, 1] * 3
    # 16 units for 10 classes: every model scored by the paper's accuracy, none by the one-to-one one
    assert runs["acc_kmeans"].between(0, 1).all() and "acc" not in runs
    assert (runs["quantization_error"] > 0).all()
    summary = pd.read_csv(tmp_path / "b" / "summary.csv")
    desom_rows = runs[runs["model"] == "desom"]
    got = summary.set_index("model").loc["desom", "purity_mean"]
    assert got == pytest.approx(desom_rows["purity"].mean())
    assert "purity" in printed and "±" in printed
    assert (tmp_path / "fig" / "desom_map_digits.png").is_file()
    assert not (tmp_path / "b" / "digits_desom_seed0" / "checkpoints").exists()


def test_benchmark_latent_dim_sets_the_code_size(tmp_path, monkeypatch, capsys):
    from desom.benchmark import main as bench
    from desom.models import DESOM

    sizes, init = [], DESOM.init_prototypes

    def spy(self, *args, **kwargs):
        sizes.append(self.encoder.output_shape[-1])
        return init(self, *args, **kwargs)

    monkeypatch.setattr(DESOM, "init_prototypes", spy)
    with pytest.raises(SystemExit) as stop:
        bench(["--datasets", "digits", "--runs", "1", "--iterations", "2", "--batch_size", "64",
               "--map_size", "2", "2", "--latent_dim", "3", "--save_dir", str(tmp_path)])
    assert stop.value.code == 0
    assert sizes == [3] and "latent 3" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_jobs_run_each_seed_in_its_own_process(tmp_path, capsys):
    from desom.benchmark import main as bench

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as stop:
        bench(["--datasets", "digits", "--models", "desom", "kmeans", "--runs", "2", "--jobs", "2",
               "--iterations", "20", "--batch_size", "128", "--map_size", "3", "3", "--save_dir", str(out),
               "--fig_dir", str(tmp_path / "fig")])
    assert stop.value.code == 0
    runs = pd.read_csv(out / "runs.csv")  # in the order of a one-process run
    assert runs["model"].tolist() == ["desom", "desom", "kmeans", "kmeans"]
    assert runs["seed"].tolist() == [0, 1] * 2
    cores = len(os.sched_getaffinity(0))
    for seed in (0, 1):
        log = (out / f"seed{seed}" / "log.txt").read_text()
        assert f"{max(cores // 2, 1)} of {os.cpu_count()} CPU cores" in log and "T 10 -> 0.1" in log
        assert (out / f"seed{seed}" / f"digits_desom_seed{seed}" / "log.csv").is_file()
    assert (tmp_path / "fig" / "desom_map_digits.png").is_file()  # drawn by the first seed
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    assert summary.loc["kmeans", "runs"] == 2
    assert "desom seed 1: purity" in capsys.readouterr().out


@pytest.mark.slow
def test_bin_desom_scales_image_files_for_convdesom_and_predict(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "img.npz", x=rng.random((40, 8, 8)) * 50, y=rng.integers(0, 2, 40))
    out_dir = tmp_path / "run"
    run_main(capsys, "--data", tmp_path / "img.npz", "--model", "convdesom", "--scaling", "minmax",
             "--map_size", 2, 2, "--iterations", 5, "--batch_size", 8, "--save_dir", out_dir, "--verbose", 0)
    run_main(capsys, "predict", "--model", out_dir / "model.keras", "--data", tmp_path / "img.npz")
    assert len(pd.read_csv(out_dir / "predictions_img.csv")) == 40


@pytest.mark.slow
def test_memory_benchmark_parts_write_noisy_shards_and_measure_a_child_run(tmp_path):
    from common.data import load_data
    from desom.benchmark import _measured_run, _write_shards

    (x, y), _ = load_data("digits")
    folder = _write_shards(tmp_path / "shards", x, y, copies=2, seed=0, rows_per_shard=500)
    assert len(list(folder.glob("part-*.npy"))) == 8  # 4 shards per copy
    (xs, ys), _ = load_data(str(folder))
    assert xs.shape == (2 * len(x), 64) and np.array_equal(np.asarray(ys), np.tile(y, 2))
    np.testing.assert_array_equal(xs[:len(x)], x)  # the first copy as it is
    noise = xs[len(x):] - x
    assert 0.01 < np.abs(noise).mean() < 0.06 and xs[len(x):].min() >= 0 and xs[len(x):].max() <= 1
    row = _measured_run(["--data", str(folder), "--map_size", "3", "3", "--iterations", "20",
                         "--batch_size", "64"], tmp_path / "run")
    assert 0.1 < row["peak_rss_gb"] < 20 and 0 < row["purity"] <= 1 and row["seconds"] > 0
