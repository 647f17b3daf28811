"""The library API: each system trains from Python with its program's flags as
keyword arguments, on arrays in memory (rswnet.fit is the same two lines over
bin/rswnet's command; its ResNet50 makes it the slow one to test here)."""

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from common.errors import UsageError


def digits(images: bool = False):
    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    return (x.reshape(-1, 8, 8, 1) if images else x), d.target


@pytest.mark.slow
@pytest.mark.parametrize("system", ["desom", "dcn.dec", "dcn.autoencoders", "dcn.selflabel"])
def test_each_system_fits_from_python_with_the_flags_of_its_program(system, tmp_path):
    import importlib

    from common.networks import load_model

    package = importlib.import_module(system)
    flags = {
        "desom": dict(map_size=(3, 3), iterations=60),
        "dcn.dec": dict(pretrain_epochs=1, max_iterations=20, centers="kmeans"),
        "dcn.autoencoders": dict(epochs=1, cluster=["kmeans"], som_map_size=(3, 3), tsne_samples=100),
        "dcn.selflabel": dict(rounds=1, first_features="random", manifold="none", clusterer="kmeans",
                              min_steps=0, epochs_per_round=1, knn_epochs=0, augmentations=[]),
    }[system]
    images = system in ("dcn.autoencoders", "dcn.selflabel")
    x, y = digits(images)
    run = package.fit(x, y, save_dir=str(tmp_path / "run"), verbose=0, **flags)
    assert (run.save_dir / "model.keras").is_file() and (run.save_dir / "results.json").is_file()
    assert run.results["command"].startswith("bin/")  # the same record as a command-line run
    written = pd.read_csv(run.save_dir / "predictions.csv")
    assert len(written) >= 1347  # every sample (selflabel: its training part at least)
    np.testing.assert_array_equal(np.load(run.save_dir / "data.npz")["x"], x)  # kept, for --resume
    again = load_model(run.save_dir / "model.keras")
    assert type(again) is type(run.model)


def test_a_flag_the_program_does_not_have_or_a_bad_value_is_one_usage_error(tmp_path):
    import desom

    x, _ = digits()
    with pytest.raises(UsageError, match="desom has no flag --nonsense"):
        desom.fit(x, nonsense=3, save_dir=str(tmp_path / "a"))
    with pytest.raises(UsageError, match=r"argument --iterations: must be in \[1, inf\), got -3"):
        desom.fit(x, iterations=-3, save_dir=str(tmp_path / "b"))
    with pytest.raises(UsageError, match="not both"):
        desom.fit(x, dataset="digits")
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text("{}")  # an earlier run's folder: its data are not written over
    with pytest.raises(UsageError, match="holds an earlier run; give resume=True to continue it"):
        desom.fit(x, save_dir=str(run))
    assert not (run / "data.npz").exists()
