"""Figures: files are written, and the architecture plot degrades gracefully."""

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common import plots


def _size(path):
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("topology", ["rectangular", "hexagonal"])
def test_maps_are_drawn_for_both_topologies(tmp_path, topology):
    images = np.random.default_rng(0).random((12, 8, 8, 1))
    grid = plots.prototype_grid(images, (3, 4), tmp_path / "map.png", topology, title="t")
    heat = plots.map_heatmaps({"U-matrix": np.arange(12.0), "hits": np.ones(12)}, (3, 4),
                              tmp_path / "u.png", topology)
    assert min(_size(grid)) > 100 and min(_size(heat)) > 100


def test_training_curves_only_when_there_is_something_to_draw(tmp_path):
    log = pd.DataFrame({"iteration": [0, 10, 20], "loss": [np.nan, 2.0, 1.0], "purity": [0.1, 0.5, 0.6]})
    assert plots.training_curves(log, tmp_path / "c.png").is_file()
    assert plots.training_curves(log[["iteration"]], tmp_path / "d.png") is None


def test_confusion_matrix_with_an_extra_predicted_column(tmp_path):
    cm = np.array([[5, 0, 1], [2, 3, 0]])
    path = plots.confusion_matrix(cm, ["a", "b", "(unnamed)"], tmp_path / "cm.png", row_names=["a", "b"])
    assert path.is_file()


def _model():
    x = keras.Input((3,))
    return keras.Model(x, keras.layers.Dense(2)(x))


def test_architecture_falls_back_to_a_flat_plot_then_to_text(tmp_path, monkeypatch, capsys):
    calls = []

    def dot_crashes_when_nested(model, to_file, expand_nested, **kw):
        calls.append(expand_nested)
        if expand_nested:  # pydot prints dot's crash, then raises
            print('"dot" with args [...] returned code: -6\n\nstdout, stderr:\n b\'\'')
            raise AssertionError('"dot" with args [...] returned code: -6')
        open(to_file, "wb").write(b"png")

    monkeypatch.setattr(keras.utils, "plot_model", dot_crashes_when_nested)
    assert plots.architecture(_model(), tmp_path / "a.png") == tmp_path / "a.png"
    assert calls == [True, False]
    assert capsys.readouterr() == ("", "")  # the crash that was recovered from is not shown

    def no_graphviz(*a, **k):
        raise ImportError("You must install graphviz")

    monkeypatch.setattr(keras.utils, "plot_model", no_graphviz)
    written = plots.architecture(_model(), tmp_path / "b.png")
    assert written == tmp_path / "b.txt" and "dense" in written.read_text().lower()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "apt-get install graphviz" in err
