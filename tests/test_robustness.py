"""The robustness matrix: data sets written as a user would have them, cells scored on the same samples."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import UsageError
from common.metrics import accuracy, nmi
from common.robustness import (
    _FILES,
    DataSpec,
    Prepared,
    Program,
    _main,
    evaluation_rows,
    margins,
    prepare,
)

#: digits written as the matrix writes Fashion-MNIST: an array file, a folder of mixed images, a table
#: and a set without labels
TINY_DATA = (
    DataSpec("digits-array", "array", "digits", "300 digits (.npz)", n=300),
    DataSpec("digits-folder", "folder", "digits", "3 classes, 60 + 30 images", n=60, n_test=30,
             classes=(0, 1, 7), size=(8, 16), modes=("L", "RGB", "P"), formats=("png", "jpeg"), seed=1),
    DataSpec("wine", "table", "wine", "wine as CSV"),
    DataSpec("unlabelled", "array", "digits", "200 digits without labels", n=200, labels=False, seed=2),
)
#: a plain SOM, short (XLA off: compiling took longer than the 100 steps); self-labelling where it refuses
#: the data at once (a table: its own refusal; a folder it refuses with the line bin/desom's cell gives, a
#: program launch that would show nothing more)
TINY_PROGRAMS = (
    Program("som", "desom", ("--model", "som", "--iterations", "100", "--map_size", "3", "3", "--batch_size",
                             "64", "--jit", "off"), data_flags=_FILES, map=True, needs_k=False),
    Program("selflabel", "selflabel", data_flags={"table": _FILES["table"]},
            not_run={"array": "left out of this test (minutes)", "folder": "left out of this test"}),
)


def test_a_folder_is_written_as_a_user_has_it_and_scored_by_its_test_images(tmp_path):
    spec = TINY_DATA[1]
    data = prepare(spec, tmp_path)
    root = tmp_path / "digits-folder"
    train, test = sorted((root / "train").iterdir()), sorted((root / "test").rglob("*.*"))
    assert len(train) == 60 and len(test) == 30
    assert sorted(p.name for p in (root / "test").iterdir()) == ["0", "1", "7"]
    references = sorted(p.stem for p in (root / "reference").iterdir())
    assert references == [f"{c}_{i}" for c in "017" for i in "123"]
    files = train + test
    assert {p.suffix for p in files} == {".png", ".jpg"}
    modes, sides = set(), set()
    for p in files:
        with Image.open(p) as image:
            modes.add(image.mode)
            sides.add(image.size[0])
    assert modes >= {"L", "RGB", "P"} and min(sides) >= 8 and max(sides) <= 16 and len(sides) > 3
    assert sorted(data.images) == sorted(str(p.relative_to(root)) for p in test)
    assert [p.split("/")[1] for p in data.images] == [str(v) for v in data.y_eval]  # test/<class>/...
    assert data.x_raw.shape == (90, 784) and 0 <= data.x_raw.min() and data.x_raw.max() <= 1
    np.testing.assert_array_equal(data.eval_rows, np.arange(60, 90))
    again = prepare(spec, tmp_path)  # written once: read back, the same evaluation samples
    assert again.images == data.images and np.array_equal(again.x_raw, data.x_raw)


def test_evaluation_rows_are_the_test_split_whichever_way_a_program_loaded_it():
    data = Prepared(DataSpec("d", "named", "digits", ""), "digits", np.zeros((10, 2)), np.arange(7, 10),
                    np.array([0, 1, 2]), 3, n_train=7)
    everything = pd.DataFrame({"part": "train", "index": np.arange(10), "cluster": np.arange(10) % 4})
    rows, held_out = evaluation_rows(everything, data)
    assert rows["cluster"].tolist() == [3, 0, 1] and not held_out  # rows 7-9 of all ten, clustered with them
    split = pd.DataFrame({"part": ["train"] * 7 + ["test"] * 3, "index": [*range(7), 2, 0, 1],
                          "cluster": [9] * 7 + [5, 6, 7]})
    rows, held_out = evaluation_rows(split, data)
    assert rows["cluster"].tolist() == [6, 7, 5] and held_out  # its test part, in order
    folder = Prepared(DataSpec("f", "folder", "digits", ""), "f", np.zeros((4, 2)), np.arange(2, 4),
                      np.array([0, 1]), 2, images=["test/0/a.png", "test/1/b.png"])
    rows = pd.DataFrame({"part": ["train", "test", "test"], "index": [0, 0, 1],
                         "image": ["train/x.png", "test/1/b.png", "test/0/a.png"], "cluster": [0, 1, 2]})
    assert evaluation_rows(rows, folder)[0]["cluster"].tolist() == [2, 1]
    with pytest.raises(UsageError, match="no row for 1 of the test images"):
        evaluation_rows(rows.iloc[:2], folder)


def test_self_labelling_is_compared_with_its_own_first_labels(tmp_path):
    from common.robustness import first_labels

    pd.DataFrame({"iteration": [0, 1], "label_acc": [0.6, 0.7], "test_acc": [0.55, 0.72]}).to_csv(
        tmp_path / "history.csv", index=False)
    assert first_labels(tmp_path, held_out=False) == {"first_labels_acc": 0.6}  # the labels themselves
    assert first_labels(tmp_path, held_out=True) == {"first_labels_acc": 0.55}  # their classifier's, held out
    assert first_labels(tmp_path / "other", held_out=True) == {}


def test_the_margin_is_over_the_best_baseline_fitted_as_the_program_was_on_the_same_data_set():
    frame = pd.DataFrame({"dataset": ["a", "a", "a", "a", "a", "b", "b"],
                          "program": ["k-means (raw)", "UMAP + GMM (raw)", "UMAP + GMM (raw, held out)",
                                      "dcn", "desom", "k-means (raw)", "dcn"],
                          "held_out": [False, False, True, True, False, False, None],
                          "acc": [0.6, 0.9, 0.8, 0.85, 0.85, 0.5, 0.7]})
    assert margins(frame)["margin"].round(3).tolist() == [-0.3, 0.0, 0.0, 0.05, -0.05, 0.0, 0.2]


@pytest.mark.slow
def test_matrix_runs_scores_refusals_and_reads_back_finished_cells(tmp_path, capsys):
    out = tmp_path / "robust"
    argv = ["--save_dir", str(out), "--datasets", *[d.name for d in TINY_DATA], "--programs", "som",
            "selflabel"]
    assert _main(argv, TINY_DATA, TINY_PROGRAMS) == 0
    printed = capsys.readouterr().out
    frame = pd.read_csv(out / "matrix.csv").fillna({"method": "", "reason": ""})
    for name in ("margin.png", "matrix.md"):
        assert (out / name).is_file()
    cell = frame.set_index(["dataset", "program"])
    # a map scored by the k-means groups of its prototypes, on the same samples as the baselines
    som = cell.loc[("digits-array", "som")]
    written = pd.read_csv(out / "runs" / "digits-array" / "som" / "run" / "predictions.csv")
    assert som["acc"] == pytest.approx(accuracy(written["label"], written["group"]))
    assert som["unit_nmi"] == pytest.approx(nmi(written["label"], written["unit"]))
    best = frame[(frame["dataset"] == "digits-array") & frame["program"].str.endswith("(raw)")]["acc"].max()
    assert not som["held_out"]  # a file has no split: clustered with every sample, as the first baselines
    assert som["margin"] == pytest.approx(som["acc"] - best) and som["seconds"] > 0 and som["peak_rss_gb"] > 0
    assert cell.loc[("digits-array", "selflabel"), "status"] == "not run"
    # the programs' own one-line refusals
    assert cell.loc[("digits-folder", "som"), "status"] == "refused"
    assert cell.loc[("wine", "selflabel"), "status"] == "refused"
    assert "classifies images" in cell.loc[("wine", "selflabel"), "reason"]
    assert cell.loc[("wine", "som"), "status"] == "ok"  # a table with its labels in a named column
    # no labels: internal indices only, the baselines' too
    unlabelled = frame[frame["dataset"] == "unlabelled"]
    assert unlabelled["acc"].isna().all() and unlabelled["silhouette"].notna().sum() == 3
    for dataset, count in (("digits-array", 2), ("digits-folder", 4), ("wine", 2)):  # a split: held out too
        baseline = frame[(frame["dataset"] == dataset) & frame["program"].str.contains("(raw", regex=False)]
        assert len(baseline) == count and baseline["acc"].between(0, 1).all()
        assert baseline["held_out"].sum() == count - 2
    table = (out / "matrix.md").read_text()
    assert "| som |" in table and "refused" in table and "UMAP + GMM (raw)" in table
    assert "digits-array / som: " in printed
    # run again: a finished cell is read back, not run again; a failed or stopped cell runs again
    record = out / "runs" / "digits-array" / "som" / "cell.json"
    before = record.stat().st_mtime
    stopped = out / "runs" / "wine" / "som" / "cell.json"
    saved = json.loads(stopped.read_text())
    stopped.write_text(json.dumps({**saved, "status": "failed", "reason": "exit 143: terminated"}))
    assert _main(argv, TINY_DATA, TINY_PROGRAMS) == 0
    printed = capsys.readouterr().out
    assert "digits-array / som: " not in printed and record.stat().st_mtime == before
    assert json.loads(record.read_text())["status"] == "ok"
    assert "wine / som: " in printed and json.loads(stopped.read_text())["status"] == "ok"
