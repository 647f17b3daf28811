"""--strategy multiworker: two worker processes on 127.0.0.1, configured by
TF_CONFIG, against one process with the same global batch (issue 12)."""

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _two_workers(program, args, timeout=240):
    """Run ``bin/<program> ARGS --strategy multiworker`` as worker 0 (chief) and 1."""
    ports = _free_ports(2)
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                  "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config)}
        procs.append(subprocess.Popen([str(ROOT / "bin" / program), *args, "--strategy", "multiworker"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:  # a worker waiting for a dead peer never ends by itself
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return outputs


def _one_process(program, args):
    """The same run in this process (no TF_CONFIG here: one replica), as ``bin/<program>`` runs it."""
    import importlib

    module = {"desom": "desom.cli", "dcn": "dcn.dec.cli", "selflabel": "dcn.selflabel.cli"}[program]
    assert importlib.import_module(module).train_main([*args, "--strategy", "default", "--jit", "off"]) == 0


#: the workers checkpoint after every call of the compiled loop (each by its own clock: they must agree
#: when, and on auto's K, in one round of collectives a call)
WORKERS = ["--checkpoint_minutes", "0.002"]


def _weights(path):
    import keras

    import dcn  # noqa: F401  (registers the models)
    import desom  # noqa: F401

    return [w.numpy() for w in keras.saving.load_model(path).weights]


@pytest.mark.slow
@pytest.mark.parametrize("program, args, columns", [
    ("desom", ["--map_size", "3", "3", "--latent_dim", "4", "--iterations", "60", "--eval_interval", "20"],
     ["loss", "reconstruction", "som", "quantization_error"]),
    # k-means centres: after umap_gmm's one-hot first target the KL is ~0.005, too small for rtol=0.05
    ("dcn", ["--dataset", "digits", "--pretrain_epochs", "1", "--max_iterations", "40",
             "--centers", "kmeans"],
     ["loss", "kl", "reconstruction"]),
])
def test_two_workers_train_like_one_process_with_the_same_global_batch(tmp_path, program, args, columns):
    common = [*args, "--batch_size", "64", "--verbose", "2"]
    _two_workers(program, [*common, *WORKERS, "--save_dir", str(tmp_path / "workers")])
    _one_process(program, [*common, "--save_dir", str(tmp_path / "single")])
    workers, single = (pd.read_csv(tmp_path / d / "log.csv") for d in ("workers", "single"))
    assert workers["iteration"].tolist() == single["iteration"].tolist()  # one log, one row per interval
    # the same steps, summed in another order: float32 round-off grows over the run
    np.testing.assert_allclose(workers[columns].iloc[1:], single[columns].iloc[1:], rtol=0.05)
    # all weights as one vector: Adam turns round-off in near-zero gradients (biases, rarely used
    # units) into whole steps, so single entries may differ while the model is the same
    a, b = (np.concatenate([w.ravel() for w in _weights(tmp_path / d / "model.keras")])
            for d in ("workers", "single"))
    assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b)  # measured: 1.1-1.5 %
    results = json.loads((tmp_path / "workers" / "results.json").read_text())
    assert results["environment"]["replicas"] == 2
    # only the chief kept files: the other worker's checkpoints went to a folder of its own, then removed
    assert sorted(p.name for p in (tmp_path / "workers" / "checkpoints").iterdir()) == (
        ["som_schedule.json", "train"] if program == "desom" else sorted(["pretrain", "train"]))


@pytest.mark.slow
def test_two_workers_run_selflabel_on_the_chiefs_pseudo_labels(tmp_path):
    # k-means of 2 starts, not 10: every process clusters the first features, which took most of its time
    args = ["--dataset", "digits", "--first_features", "random", "--manifold", "none", "--clusterer",
            "kmeans", "--rounds", "2", "--epochs_per_round", "2", "--knn_epochs", "0.5",
            "--batch_size", "64", "--augmentations", "translate", "--convergence_threshold", "1",
            "--min_steps", "0", "--fit_threshold", "0", "--verbose", "2", "--n_init", "2"]
    _two_workers("selflabel", [*args, *WORKERS, "--save_dir", str(tmp_path / "workers")])
    _one_process("selflabel", [*args, "--save_dir", str(tmp_path / "single")])
    runs = {d: tmp_path / d for d in ("workers", "single")}
    history = {d: pd.read_csv(path / "history.csv") for d, path in runs.items()}
    assert history["workers"]["round"].tolist() == history["single"]["round"].tolist() == [0, 1]
    # the same first clustering (same weights, features and k-means); then each worker's batch
    # normalisation sees its half of each batch (and sums round off in another order): the next
    # labels mostly agree
    labels = {d: [np.load(path / "pseudo_labels" / f"round_{i:02d}.npz")["labels"] for i in range(3)]
              for d, path in runs.items()}
    np.testing.assert_array_equal(labels["workers"][0], labels["single"][0])
    for i in (1, 2):
        assert np.mean(labels["workers"][i] == labels["single"][i]) > 0.7  # measured 0.86, 0.87
    results = {d: json.loads((path / "results.json").read_text()) for d, path in runs.items()}
    assert results["workers"]["environment"]["replicas"] == 2 and results["workers"]["rounds_run"] == 2
    assert abs(results["workers"]["train"]["acc"] - results["single"]["train"]["acc"]) < 0.1  # measured 0.06
    assert not list((runs["workers"] / "checkpoints").rglob("*worker*"))  # the other worker kept nothing


def test_multiworker_needs_tf_config(monkeypatch, capsys):
    from desom.cli import main as desom_main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert_one_line_error(desom_main, ["--strategy", "multiworker", "--iterations", "5"],
                          "--strategy multiworker needs TF_CONFIG", capsys)


def test_a_lost_peer_ends_the_run_with_one_line_and_exit_4(monkeypatch, capsys):
    import tensorflow as tf

    from common.cli import run

    def main(argv):  # what a collective raises when worker 1 died (seen with kill -9)
        raise tf.errors.UnavailableError(None, None, "Graph execution error:\n\nAdditional GRPC error "
                                         "information from remote target /job:worker/replica:0/task:1")

    monkeypatch.setenv("TF_CONFIG", "{}")
    with pytest.raises(SystemExit) as stop:
        run(main, [], prog="desom")
    assert stop.value.code == 4
    err = capsys.readouterr().err.strip()
    assert err == ("desom: error: worker 1 of this multi-worker run stopped answering (UnavailableError); "
                   "the last checkpoint is kept: start every worker again with --resume")
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(tf.errors.UnavailableError):  # without TF_CONFIG it is not ours to explain
        run(main, [], prog="desom")
