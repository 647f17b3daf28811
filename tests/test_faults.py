"""Faults a long unattended run meets: SIGKILL at any moment, --resume with
changed flags, and reproducibility with --deterministic (issue 12)."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from desom import load_model
from desom.cli import main, train_main
from tests.helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "desom"
TINY = ["--map_size", "3", "3", "--batch_size", "64", "--latent_dim", "4", "--verbose", "0"]


def _weights(path):
    return [w.numpy() for w in load_model(path).weights]


def _log(run_dir):
    return pd.read_csv(run_dir / "log.csv").drop(columns="time")


# ---------------------------------------------------------------- --resume with flags
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    assert train_main([*TINY, "--iterations", "60", "--eval_interval", "20", "--save_dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("argv, message", [
    (["--map_size", "4", "4"], "--map_size 4 4 differs from its 3 3; only --iterations may change: drop "
                               "--map_size, or start a new run in another --save_dir"),
    (["--gamma", "0.01"], "--gamma 0.01 differs from its 0.001"),
    (["--dataset", "usps"], "--dataset usps differs from its digits"),
    (["--lr", "0.001", "--Tmin", "0.2"], "--Tmin 0.2 differs from its 0.1"),  # --lr is as saved
])
def test_resume_refuses_flags_that_would_change_the_run(finished_run, argv, message, capsys):
    before = (finished_run / "args.json").read_text()
    assert_one_line_error(main, ["--resume", "--save_dir", str(finished_run), *argv], message, capsys)
    assert (finished_run / "args.json").read_text() == before


def test_resume_with_the_saved_values_or_runtime_flags_changes_nothing(finished_run, capsys):
    log = _log(finished_run)
    assert train_main(["--resume", "--save_dir", str(finished_run), "--map_size", "3", "3", "--iterations",
                       "60", "--verbose", "2", "--steps_per_execution", "7"]) == 0
    assert "resuming with" not in capsys.readouterr().out
    pd.testing.assert_frame_equal(_log(finished_run), log)


def test_resume_with_more_iterations_trains_on_at_the_final_radius(finished_run, capsys):
    argv = ["--resume", "--save_dir", str(finished_run), "--iterations", "100", "--verbose", "2"]
    assert train_main(argv) == 0
    assert "resuming with --iterations 100 (was 60)" in capsys.readouterr().out
    log = _log(finished_run)
    assert log["iteration"].tolist() == [0, 20, 40, 60, 80, 100]
    # the schedule of the first 60 iterations stays: the extra ones run at T = Tmin
    assert log["T"].iloc[3:].tolist() == pytest.approx([0.1, 0.1, 0.1])
    saved = json.loads((finished_run / "args.json").read_text())
    assert (saved["iterations"], saved["som_iterations"]) == (100, 60)
    assert json.loads((finished_run / "results.json").read_text())["iterations"] == 100


def test_resume_with_fewer_iterations_keeps_the_temperature_schedule():
    from argparse import Namespace

    from desom.cli import DesomCommand

    args = Namespace(iterations=30000, som_iterations=None)
    DesomCommand().resumed_with_changes(args, {"iterations": (400000, 30000)})
    assert args.som_iterations == 400000  # T goes on decaying as before, and stops where the run stops
    args = Namespace(iterations=30000, som_iterations=5000)  # given explicitly: kept
    DesomCommand().resumed_with_changes(args, {"iterations": (400000, 30000)})
    assert args.som_iterations == 5000


# ---------------------------------------------------------------- --deterministic
@pytest.mark.slow
def test_two_deterministic_runs_give_identical_results(tmp_path):
    for name in ("a", "b"):  # processes of their own: op determinism, once on, stays on in a process
        subprocess.run([str(BIN), *TINY, "--iterations", "60", "--eval_interval", "20", "--seed", "4",
                        "--deterministic", "--save_dir", str(tmp_path / name)], check=True, timeout=300,
                       capture_output=True)
    pd.testing.assert_frame_equal(_log(tmp_path / "a"), _log(tmp_path / "b"), check_exact=True)
    for wa, wb in zip(_weights(tmp_path / "a" / "model.keras"), _weights(tmp_path / "b" / "model.keras")):
        np.testing.assert_array_equal(wa, wb)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["args"]["deterministic"] is True


# ---------------------------------------------------------------- SIGKILL at random points
@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    """kill -9 twice at random moments (the second time a resumed run), --resume after each: the run
    ends at the same iteration, with one log row per interval and the model of an uninterrupted run."""
    # long enough to be killed twice on a machine 3 times as fast as a loaded 2-core one (34 steps a
    # second; a kill comes at most a log row and 1 s after the last one: both here by iteration 60)
    args = [*TINY, "--iterations", "300", "--eval_interval", "25", "--deterministic"]
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    # checkpoints change nothing: the reference (and the last, uninterrupted part) keep only the one at
    # the end; the killed runs save one after every call of the compiled loop (a runtime flag)
    every_call = ["--checkpoint_minutes", "0.002"]
    subprocess.run([str(BIN), *args, "--save_dir", str(reference)], check=True, timeout=600, env=env,
                   capture_output=True)
    rng = random.Random(12)
    kills, resumed = 0, False
    while kills < 2:
        cmd = [str(BIN), *args, *every_call, "--save_dir", str(run_dir)] + (["--resume"] if resumed else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        # wait for training to be under way (a log row beyond the ones kept), then kill at a random moment
        log = run_dir / "log.csv"
        rows = len(pd.read_csv(log)) if resumed else 0
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len(pd.read_csv(log)) > rows:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:  # finished before the kill: the run was too short for this machine
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills, resumed = kills + 1, True
    assert kills == 2, "the run ended before it could be killed twice"
    res = subprocess.run([str(BIN), *args, "--save_dir", str(run_dir), "--resume"], timeout=600, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    log, ref_log = _log(run_dir), _log(reference)
    assert log["iteration"].tolist() == list(range(0, 325, 25))  # no gap, no duplicate
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == 300
    map_columns = ["quantization_error", "topographic_error", "purity", "nmi"]
    np.testing.assert_allclose(log[map_columns].iloc[-1], ref_log[map_columns].iloc[-1], rtol=1e-4)
    for wa, wb in zip(_weights(run_dir / "model.keras"), _weights(reference / "model.keras")):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad data files
@pytest.mark.parametrize("name, content, message", [
    ("empty.npz", {"x": np.zeros((0, 4))}, "must have shape (samples, features...) with data, found (0, 4)"),
    ("flat.npz", {"x": np.zeros(12)}, "'x' must have shape (samples, features...) with data, found (12,)"),
    ("nan.npz", {"x": np.array([[0.0, 1.0], [np.nan, 2.0]] * 40)}, "contain NaN or inf values"),
    ("text.npz", {"x": np.array([["a", "b"]] * 80)}, "'x' must be numeric"),
    ("short.npz", {"x": np.zeros((80, 3)), "y": np.zeros(79)}, "'y' has 79 labels but 'x' has 80 samples"),
    ("text.csv", "a,b\n1,x\n2,y\n", "non-numeric columns b"),
    ("empty.csv", "", "is empty"),
    ("garbage.npz", b"not a zip file", "is not a readable .npz file"),
])
def test_bad_data_files_get_one_line_and_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert_one_line_error(main, ["--data", str(path), "--save_dir", str(tmp_path / "run")], message, capsys)
    assert not (tmp_path / "run" / "model.keras").exists()


@pytest.mark.slow
def test_labels_of_any_values_are_numbered_and_named_in_the_results(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "pm.npz", x=d.data / 16.0, y=np.where(d.target < 5, -1, 1))  # a classifier's labels
    run_dir = tmp_path / "run"
    assert train_main(["--data", str(tmp_path / "pm.npz"), *TINY, "--iterations", "40",
                       "--save_dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["label_names"] == ["-1", "1"] and 0.5 <= results["purity"] <= 1.0
    assert (run_dir / "map.png").is_file()  # the majority-class map needed labels from 0


# ---------------------------------------------------------------- data larger than memory
@pytest.mark.parametrize("layout", ["file", "shards"])
def test_npy_data_on_disk_trains_exactly_like_the_array_in_memory(tmp_path, monkeypatch, layout):
    import keras

    import common.training as training
    from common.data import load_data
    from common.diskarray import DiskArray
    from desom import DESOM

    reads = []
    read = training._Batches._read

    def counted(batches, idx):
        reads.append(len(idx))
        return read(batches, idx)

    monkeypatch.setattr(training._Batches, "_read", counted)
    (x, y), _ = load_data("digits")
    if layout == "file":
        np.save(tmp_path / "x.npy", x)
        source = tmp_path / "x.npy"
    else:  # three shards of unequal sizes
        source = tmp_path / "shards"
        source.mkdir()
        for i, part in enumerate(np.split(x, [500, 1300])):
            np.save(source / f"part-{i}.npy", part)
    (xm, ym), _ = load_data(str(source))
    assert isinstance(xm, DiskArray) and ym is None and xm.shape == x.shape
    monkeypatch.setattr(DiskArray, "__array__", None)  # nothing may read the whole array
    prototypes = []
    for data in (x, xm):
        keras.utils.set_random_seed(1)
        model = DESOM(64, (3, 3), hidden=(32, 32, 64))
        model.init_prototypes(data, seed=1)
        model.fit(data, iterations=60, batch_size=64, eval_interval=30, verbose=0, jit_compile="off",
                  steps_per_execution=7)
        prototypes.append(model.prototypes)
        assert len(reads) == (0 if data is x else 60)  # the file is read batch by batch, never whole
    np.testing.assert_allclose(prototypes[1], prototypes[0], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bin_desom_trains_on_npy_shards_and_refuses_what_would_load_them(tmp_path, capsys, monkeypatch):
    from common.data import load_data
    from common.diskarray import DiskArray
    from desom.cli import predict_main

    (x, y), _ = load_data("digits")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.array_split(x, 4)):
        np.save(shards / f"part-{i:03d}.npy", part)
    np.save(shards / "labels.npy", np.array(["abcdefghij"[v] for v in y]))  # text labels too
    monkeypatch.setattr(DiskArray, "__array__", None)  # training, results and pictures stream
    assert train_main(["--data", str(shards), *TINY, "--iterations", "30",
                       "--save_dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n_samples"] == len(x) and results["label_names"] == list("abcdefghij")
    assert 0 < results["train"]["purity"] <= 1 and (tmp_path / "run" / "map.png").is_file()
    assert predict_main(["--model", str(tmp_path / "run" / "model.keras"), "--data", str(shards)]) == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert len(predictions) == len(x) and list(predictions["label"][:3]) == ["abcdefghij"[v] for v in y[:3]]
    monkeypatch.undo()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x64.npy", x.astype(np.float64))
    for argv, message in (
            (["--data", str(tmp_path / "x64.npy")], "holds float64; .npy files are read from disk as they "
                                                     "are, so save them as float32"),
            (["--data", str(tmp_path / "x.npy"), "--scaling", "minmax"], "scale it before saving it")):
        assert_one_line_error(main, [*argv, *TINY, "--iterations", "5", "--save_dir", str(tmp_path / "bad")],
                              message, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("program", ["dcn", "ae"])
def test_resume_trains_dcn_and_ae_on_for_a_longer_budget(tmp_path, program, capsys):
    if program == "dcn":
        from dcn.dec.cli import train_main as command

        # k-means centres: UMAP + GMM (the default) would take most of the test's time, before and after
        first = ["--dataset", "digits", "--pretrain_epochs", "1", "--max_iterations", "20", "--tol", "0",
                 "--eval_interval", "10", "--centers", "kmeans"]
        more, column, ends = ["--max_iterations", "40"], "iteration", (20, 40)
    else:
        from dcn.autoencoders.cli import train_main as command

        # one clustering of the codes, not every one (UMAP + GMM, DBSCAN, a SOM: most of the test's time)
        first = ["--dataset", "digits", "--epochs", "1", "--tsne_samples", "50", "--cluster", "kmeans"]
        more, column, ends = ["--epochs", "2"], "epoch", (1.0, 2.0)
    run_dir = str(tmp_path / "run")
    assert command([*first, "--batch_size", "64", "--verbose", "0", "--save_dir", run_dir]) == 0
    assert pd.read_csv(tmp_path / "run" / "log.csv")[column].iloc[-1] == ends[0]
    capsys.readouterr()
    assert command(["--resume", "--save_dir", run_dir, "--verbose", "2", *more]) == 0
    assert f"resuming with {more[0]} {more[1]}" in capsys.readouterr().out
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log[column].iloc[-1] == ends[1] and log["iteration"].is_unique
