"""Shared test set-up: no downloads, a private Keras home, real-data fixtures."""

import os
from pathlib import Path

import pytest

# Tests never download anything, and never read the user's Keras cache.
os.environ["DESOM_NO_DOWNLOAD"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# OpenMP threads (scikit-learn's and faiss' k-means, t-SNE) sleep instead of spinning while they wait:
# with two test processes on two cores, spinning made a k-means of digits ~40x slower under load.
# Subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _private_keras_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))


@pytest.fixture
def require_fmnist():
    """Skip without the Debian Fashion-MNIST files; fail instead in CI.

    `.ci/run` sets DESOM_REQUIRE_FMNIST=1 after installing
    dataset-fashion-mnist, so a broken install cannot pass silently.
    """
    missing = [f for f in FMNIST_FILES if not (FMNIST_DIR / f).is_file()]
    if missing:
        msg = f"Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("DESOM_REQUIRE_FMNIST") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return FMNIST_DIR
