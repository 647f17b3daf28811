"""bin/robustness-benchmark: every training program, with its defaults, on data nobody tuned it for.

Rows are the training programs as a user first runs them: only the flags
that name the data (``--dataset``/``--data``, ``--label_col`` and
``--scaling`` for a table, ``--n_clusters`` where the data have no labels),
``--seed`` and ``--save_dir``; ``bin/rswnet`` at a CPU's size (``--input_size
32 --weights none --subset 2000``: a ResNet50 at 224 px is GPU work). Columns
are data sets of different size, kind and difficulty, written under
``<save_dir>/data/`` from scikit-learn's digits and wine and from Fashion-MNIST:
the named sets, stratified subsets as ``.npz`` files, image folders of other
class sets, sizes, pixel sizes, colour modes and file types, a CSV table
with its labels in a named column, and a set without labels.

Every cell is scored on the same samples as the baselines of its data set,
the *evaluation samples*: the test split where the data have one (digits'
last 450, Fashion-MNIST's 10,000, a folder's ``test/``), else every sample.
A program's clusters of them come from its own ``predictions.csv``. The
baselines cluster the raw inputs (pixels in [0, 1]; a table standardised)
without labels: k-means (10 starts) and UMAP to k dimensions + a Gaussian
mixture (N2D without its autoencoder, :func:`common.clustering.umap_gmm`),
k = the number of classes, each fitted on every sample (test split
included) and, where there is a test split, also on the training part alone
(a program that held the test split out is measured against these). Columns:
accuracy (Hungarian; for a map, the k-means groups of its prototypes:
``acc_kmeans``), NMI, purity, ARI (a map's on those groups too, its units'
purity and NMI beside them), seconds and peak memory of the run, and the
margin of the accuracy over the best baseline. A data set without labels
gets silhouette, Davies-Bouldin and Calinski-Harabasz of every assignment
in its raw input space instead.

A cell that ran to the end with the same command (its ``cell.json``:
scored or refused) is read back and scored again, so a matrix of several
hours can be stopped and run on; a failed or stopped cell runs again. Writes
``matrix.csv`` (a row per cell, and per clustering of ``bin/ae``),
``margin.png`` (programs x data sets, coloured by the margin) and
``matrix.md`` (the table for RESULTS.md).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.errors import UsageError
from common.results import atomic_path, write_csv, write_json

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# Data sets
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class DataSpec:
    """One column of the matrix.

    ``kind``: ``named`` (a data set the programs know by name), ``array``
    (an ``.npz`` file of images), ``folder`` (train/, test/<class>/,
    reference/), ``table`` (a CSV file with a label column). ``source``: the
    named set, or what the file is written from (``fmnist``, ``digits``,
    ``wine``). Subsets: ``n`` samples (folders: ``n`` training images and
    ``n_test`` test images) of ``classes`` (all when empty), drawn class by
    class with ``seed``. Folders: image side ``size`` (one value, or the
    range of a random side per image), ``modes`` (PIL modes drawn per
    image), ``formats`` (file types drawn per image). ``labels``: False
    writes none (internal indices only).
    """

    name: str
    kind: str
    source: str
    description: str
    n: int | None = None
    n_test: int = 0
    classes: tuple = ()
    size: tuple = (28,)
    modes: tuple = ("L",)
    formats: tuple = ("png",)
    labels: bool = True
    seed: int = 0


DATASETS = (
    DataSpec("digits", "named", "digits", "scikit-learn's 8x8 digits (1,797; scored on the last 450)"),
    DataSpec("fmnist-2k", "array", "fmnist", "2,000 Fashion-MNIST images (.npz)", n=2000),
    DataSpec("fmnist-10k", "array", "fmnist", "10,000 Fashion-MNIST images (.npz)", n=10000, seed=1),
    DataSpec("fmnist", "named", "fmnist", "all 70,000 Fashion-MNIST images (scored on the 10,000 test)"),
    DataSpec("folder-2", "folder", "fmnist", "2 classes, 500 + 200 images, 28 px grey PNG", n=500, n_test=200,
             classes=(0, 7), seed=2),
    DataSpec("folder-4-mixed", "folder", "fmnist",
             "4 classes, 1,200 + 400 images, 20-96 px, grey, RGB and palette, PNG and JPEG", n=1200,
             n_test=400, classes=(1, 4, 5, 8), size=(20, 96), modes=("L", "RGB", "P"),
             formats=("png", "jpeg"), seed=3),
    DataSpec("folder-4-large", "folder", "fmnist", "4 classes, 8,000 + 1,000 images, 64 px RGB JPEG", n=8000,
             n_test=1000, classes=(2, 3, 7, 9), size=(64,), modes=("RGB",), formats=("jpeg",), seed=4),
    DataSpec("folder-10", "folder", "fmnist", "10 classes, 10,000 + 2,000 images, 32 px grey PNG", n=10000,
             n_test=2000, size=(32,), seed=5),
    DataSpec("wine-csv", "table", "wine", "scikit-learn's wine (178 x 13) as CSV, labels in 'cultivar'"),
    DataSpec("unlabelled-3k", "array", "fmnist", "3,000 Fashion-MNIST images without labels (.npz)", n=3000,
             labels=False, seed=6),
)
LABEL_COLUMN = "cultivar"
#: folder names of the classes of the sources images are written from
SOURCE_NAMES = {"fmnist": ("T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                           "Sneaker", "Bag", "Ankle-boot"),
                "digits": tuple(str(d) for d in range(10))}


@dataclass
class Prepared:
    """A data set written for the programs, with what scores them."""

    spec: DataSpec
    path: str                  # what the data flag names: the data set, the file or the folder
    x_raw: np.ndarray          # every sample's raw input, flattened (the baselines cluster these)
    eval_rows: np.ndarray      # rows of x_raw that are scored
    y_eval: np.ndarray | None  # their labels (None: no labels)
    n_clusters: int
    images: list | None = None  # folders: the evaluation images' paths inside the folder
    n_train: int = 0            # named sets: samples before the test split in the concatenated order


def _stratified(y, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples, the classes in their proportions."""
    from sklearn.model_selection import train_test_split

    if n >= len(y):
        return np.arange(len(y))
    pick, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(pick)


def _source(name: str):
    """((x_train, y_train), (x_test, y_test)) of a source, images as (N, H, W) in [0, 1]."""
    from common.data import load_data

    if name == "wine":
        from sklearn.datasets import load_wine

        d = load_wine()
        return (d.data, d.target), (None, None)
    (x, y), (xt, yt) = load_data(name, validation=True, flatten=False)
    return (x[..., 0], np.asarray(y)), (xt[..., 0], np.asarray(yt))


def prepare(spec: DataSpec, folder: Path) -> Prepared:
    """Write ``spec``'s data under ``folder`` (once: kept for later cells) and
    return what scores it."""
    from common.data import load_data

    folder.mkdir(parents=True, exist_ok=True)
    if spec.kind == "named":
        (x, y), (xt, yt) = load_data(spec.source, validation=True)
        x_raw = np.concatenate([x, xt]).reshape(len(x) + len(xt), -1)
        return Prepared(spec, spec.source, x_raw, np.arange(len(x), len(x_raw)), np.asarray(yt),
                        len(np.unique(y)), n_train=len(x))
    if spec.kind == "table":
        from sklearn.preprocessing import StandardScaler

        (x, y), _ = _source(spec.source)
        path = folder / f"{spec.name}.csv"
        if not path.is_file():
            frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
            frame[LABEL_COLUMN] = y
            write_csv(frame, path)
        x_raw = StandardScaler().fit_transform(x).astype(np.float32)
        return Prepared(spec, str(path), x_raw, np.arange(len(x)), y, len(np.unique(y)))
    (x, y), (xt, yt) = _source(spec.source)
    if spec.classes:
        keep, keep_t = np.isin(y, spec.classes), np.isin(yt, spec.classes)
        x, y, xt, yt = x[keep], y[keep], xt[keep_t], yt[keep_t]
    if spec.kind == "array":
        pick = _stratified(y, spec.n, spec.seed)
        x, y = x[pick].astype(np.float32), y[pick]
        path = folder / f"{spec.name}.npz"
        if not path.is_file():
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, x=x, y=y) if spec.labels else np.savez(f, x=x)
        return Prepared(spec, str(path), x.reshape(len(x), -1), np.arange(len(x)),
                        y if spec.labels else None, len(np.unique(y)))
    if spec.kind != "folder":
        raise ValueError(f"unknown kind of data set '{spec.kind}'")
    return _write_folder(spec, folder / spec.name, x, y, xt, yt)


def _write_folder(spec: DataSpec, root: Path, x, y, xt, yt) -> Prepared:
    """train/ (unnamed images), test/<class>/ and reference/<class>_<i>.<ext>
    (3 a class, from test images not in test/), as ``spec`` describes."""
    from PIL import Image

    names = SOURCE_NAMES[spec.source]
    train, test = _stratified(y, spec.n, spec.seed), _stratified(yt, spec.n_test, spec.seed)
    rest = np.setdiff1d(np.arange(len(yt)), test)
    rng = np.random.default_rng(spec.seed)
    reference = np.concatenate([rng.choice(rest[yt[rest] == c], 3, replace=False) for c in np.unique(yt)])
    done = root / "written.json"  # the folder is complete (written last)
    plan = []  # (relative path, image)
    for i in train:
        plan.append((f"train/img{i:05d}", x[i]))
    for i in test:
        plan.append((f"test/{names[yt[i]]}/img{i:05d}", xt[i]))
    for j, i in enumerate(reference):
        plan.append((f"reference/{names[yt[i]]}_{j % 3 + 1}", xt[i]))
    paths = []
    for rel, image in plan:
        fmt = spec.formats[rng.integers(len(spec.formats))]
        mode = spec.modes[rng.integers(len(spec.modes))]
        side = int(spec.size[0] if len(spec.size) == 1 else rng.integers(spec.size[0], spec.size[1] + 1))
        tint = rng.uniform(0.6, 1.0, 3)
        paths.append(f"{rel}.{'jpg' if fmt == 'jpeg' else 'png'}")
        if done.is_file():
            continue
        grey = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        if mode == "L":
            out = grey
        else:  # a colour image: the grey one tinted
            rgb = np.asarray(grey, np.float32)[..., None] * tint
            out = Image.fromarray(np.round(rgb).astype(np.uint8))
            if mode == "P":
                out = out.convert("P", palette=Image.ADAPTIVE, colors=64)
                if fmt == "jpeg":
                    out = out.convert("RGB")
        target = root / paths[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        out.save(target, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    if not done.is_file():
        write_json(done, {"images": len(plan)})
    n_train = len(train)
    x_raw = _decode([root / p for p in paths[:n_train + len(test)]])
    return Prepared(spec, str(root), x_raw, np.arange(n_train, n_train + len(test)), yt[test],
                    len(np.unique(yt)), images=paths[n_train:n_train + len(test)])


def _decode(paths) -> np.ndarray:
    """Images as the baselines take them: grey, 28x28, [0, 1], flattened."""
    from PIL import Image

    out = np.empty((len(paths), 28 * 28), np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as image:
            out[i] = np.asarray(image.convert("L").resize((28, 28), Image.BILINEAR), np.float32).ravel() / 255
    return out


# --------------------------------------------------------------------------- #
# Programs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Program:
    """One row: ``bin/<command>`` with ``flags`` besides the data flags.

    ``data_flags[kind]`` is how a user names each kind of data to it (a
    format string of the path); a kind missing from it is not run, and
    ``not_run[kind]`` says why. ``map``: its clusters are map units (scored
    through their ``group``).
    """

    name: str
    command: str
    flags: tuple = ()
    data_flags: dict = field(default_factory=dict)
    not_run: dict = field(default_factory=dict)
    map: bool = False
    needs_k: bool = True  # takes --n_clusters when the data have no labels


_FILES = {"named": ("--dataset", "{path}"), "array": ("--data", "{path}"), "folder": ("--data", "{path}"),
          "table": ("--data", "{path}", "--label_col", LABEL_COLUMN)}
PROGRAMS = (
    Program("desom", "desom", data_flags={**_FILES, "table": (*_FILES["table"], "--scaling", "standard")},
            map=True, needs_k=False),
    Program("kerasom", "desom", ("--model", "som"),
            data_flags={**_FILES, "table": (*_FILES["table"], "--scaling", "standard")}, map=True,
            needs_k=False),
    Program("dcn", "dcn", data_flags={**_FILES, "table": (*_FILES["table"], "--scaling", "standard")}),
    Program("ae", "ae", data_flags={**_FILES, "table": (*_FILES["table"], "--scaling", "minmax")}),
    Program("selflabel", "selflabel", data_flags=_FILES),
    Program("rswnet", "rswnet", ("--input_size", "32", "--weights", "none", "--subset", "2000"),
            data_flags=_FILES),
)


def command(program: Program, data: Prepared, save_dir: Path, seed: int) -> list[str] | None:
    """The command line of a cell (None when the program is not run on that kind)."""
    flags = program.data_flags.get(data.spec.kind)
    if flags is None:
        return None
    argv = [str(ROOT / "bin" / program.command), *program.flags, *(f.format(path=data.path) for f in flags)]
    if data.y_eval is None and program.needs_k:
        argv += ["--n_clusters", str(data.n_clusters)]
    return argv + ["--seed", str(seed), "--save_dir", str(save_dir), "--verbose", "0"]


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #
def evaluation_rows(predictions: pd.DataFrame, data: Prepared) -> tuple[pd.DataFrame, bool]:
    """The rows of a program's ``predictions.csv`` for the evaluation samples,
    in their order, and whether the program held them out of training (its
    ``test`` part) rather than clustering them with the rest."""
    if data.images is not None:  # a folder: by the image's path
        test = predictions[predictions["part"] == "test"].set_index("image")
        missing = [p for p in data.images if p not in test.index]
        if missing:
            raise UsageError(f"predictions.csv has no row for {len(missing)} of the test images "
                             f"(first: {missing[0]})")
        return test.loc[data.images].reset_index(), True
    tests = predictions[predictions["part"] == "test"]
    if len(tests):  # the program held the test split out itself
        rows = tests.set_index("index")
        return rows.loc[np.arange(len(data.eval_rows))].reset_index(), True
    rows = predictions.set_index("index")  # one part: the evaluation samples by their row in it
    return rows.loc[data.eval_rows].reset_index(), False


def scores(assignment, data: Prepared, units=None) -> dict:
    """Accuracy, NMI, purity, ARI of ``assignment`` against the evaluation
    labels (``units``: a map's units, whose purity and NMI come beside its
    groups'); without labels, the internal indices in the raw input space."""
    from common.metrics import evaluate_clustering, internal_metrics

    assignment = np.asarray(assignment)
    if data.y_eval is None:
        return internal_metrics(data.x_raw[data.eval_rows], assignment, sample_size=5000)
    m = evaluate_clustering(assignment, data.y_eval)
    out = {k: m[k] for k in ("acc", "nmi", "purity", "ari")}
    if units is not None:
        u = evaluate_clustering(np.asarray(units), data.y_eval)
        out.update(unit_purity=u["purity"], unit_nmi=u["nmi"])
    return out


def first_labels(run_dir: Path, held_out: bool) -> dict:
    """bin/selflabel's own baseline, from its history.csv: the accuracy of its
    first pseudo-labels on the evaluation samples (those of the training
    images: a run without a test split) or, on held-out samples, of the
    classifier trained on them (round 0); empty for other programs."""
    path = run_dir / "history.csv"
    column = "test_acc" if held_out else "label_acc"
    if not path.is_file():
        return {}
    history = pd.read_csv(path)
    return {"first_labels_acc": float(history[column].iloc[0])} if column in history else {}


def program_scores(run_dir: Path, program: Program, data: Prepared) -> list[dict]:
    """One row per clustering a run reports on the evaluation samples (``bin/ae``: one per method)."""
    rows, held_out = evaluation_rows(pd.read_csv(run_dir / "predictions.csv"), data)
    protocol = {"held_out": held_out}
    if "label" in rows and data.y_eval is not None:  # the program scored the samples we score, in our order
        pairs = set(zip(data.y_eval.tolist(), rows["label"].astype(str)))  # its label names may be its own
        if not len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}):
            raise UsageError(f"{run_dir}/predictions.csv: its labels are not those of the evaluation samples")
    if program.map:
        if "group" in rows:
            return [{"method": "", **protocol, **scores(rows["group"], data, units=rows["unit"])}]
        return [{"method": "units", **protocol, **scores(rows["unit"], data)}]
    out = [{"method": "", **protocol, **scores(rows["cluster"], data), **first_labels(run_dir, held_out)}]
    methods = [c for c in rows.columns if c not in ("part", "index", "image", "cluster", "label", "name",
                                                    "probability", "unit", "row", "col", "group")]
    for method in methods:  # bin/ae: every clustering of the codes
        if method.endswith("_group"):
            continue
        seen = rows[method].notna().to_numpy()
        if not seen.all():  # DBSCAN ran on a sample: scored where it did
            continue
        group = rows.get(f"{method}_group")
        out.append({"method": method, **protocol, **scores(rows[method] if group is None else group, data,
                                                            units=None if group is None else rows[method])})
    return out


BASELINES = ("k-means (raw)", "UMAP + GMM (raw)")


def baselines(data: Prepared, seed: int) -> list[dict]:
    """k-means and UMAP + GMM on the raw inputs, scored on the evaluation
    samples: fitted on every sample, and, where the data have a test split,
    also fitted on the training part alone and applied to the held-out test
    samples (as a program that trains on the training part is)."""
    from sklearn.cluster import KMeans

    from common.clustering import umap_gmm

    k, x, rows = data.n_clusters, data.x_raw, []
    train = np.setdiff1d(np.arange(len(x)), data.eval_rows)
    for held_out in (False, True) if len(train) else (False,):
        for name in BASELINES:
            t = time.perf_counter()
            fit, new = (x[train], x[data.eval_rows]) if held_out else (x, None)
            if name.startswith("k-means"):
                km = KMeans(k, n_init=10, random_state=seed).fit(fit)
                labels = km.predict(new) if held_out else km.labels_[data.eval_rows]
            else:
                labels = umap_gmm(fit, k, seed, new=new)[0]
                labels = labels if held_out else labels[data.eval_rows]
            rows.append({"program": name.replace(")", ", held out)") if held_out else name, "method": "",
                         "held_out": held_out,
                         "seconds": round(time.perf_counter() - t, 1), **scores(labels, data)})
    return rows


# --------------------------------------------------------------------------- #
# The matrix
# --------------------------------------------------------------------------- #
def run_cell(program: Program, data: Prepared, out: Path, seed: int, timeout: float,
             rerun: bool = False) -> dict:
    """Run (or, unless ``rerun``, read back) one cell; returns its record: the
    command, how it ended, seconds, peak memory, and its rows of scores."""
    import shutil

    from common.processes import read_record, run_measured

    cell = out / "runs" / data.spec.name / program.name
    argv = command(program, data, cell / "run", seed)
    if argv is None:
        return {"status": "not run", "reason": program.not_run.get(data.spec.kind, "")}
    key = [f"bin/{program.command}", *argv[1:]]  # the record holds the command as typed in the repository
    record = read_record(cell / "cell.json", key)
    # read back unless asked to rerun; a failed or stopped run runs again
    if record is not None and not rerun and record["status"] != "failed":
        if record["status"] == "ok":  # scored again: today's scoring of the run's predictions
            record["rows"] = program_scores(cell / "run", program, data)
        return record
    shutil.rmtree(cell / "run", ignore_errors=True)  # a fresh run, not a resumed one
    cell.mkdir(parents=True, exist_ok=True)
    print(f"{data.spec.name} / {program.name}: {shlex.join(argv)}", flush=True)
    ended = run_measured(argv, stderr_path=cell / "stderr.txt", timeout=timeout)
    record = {"command": key, "seconds": round(ended.seconds, 1), "peak_rss_gb": round(ended.peak_rss_gb, 2)}
    if ended.code == 0:
        try:
            record.update(status="ok", rows=program_scores(cell / "run", program, data))
        except (OSError, KeyError, UsageError) as e:
            record.update(status="failed", reason=f"scoring: {e}")
    elif ended.code == 2:  # the program refused the data, with its one line
        record.update(status="refused", reason=ended.last_error_line())
    else:
        how = f"stopped after {timeout:g} s" if ended.seconds > timeout else f"exit {ended.code}"
        record.update(status="failed", reason=f"{how}: {ended.last_error_line()}")
    write_json(cell / "cell.json", record)
    return record


def margins(frame: pd.DataFrame) -> pd.DataFrame:
    """``margin``: each row's accuracy minus the best baseline's on its data
    set, of the baselines fitted as the row's program was (on every sample,
    or on the training part with the evaluation samples held out)."""
    frame = frame.copy()
    frame["held_out"] = frame["held_out"].fillna(False).astype(bool) if "held_out" in frame else False
    baseline = frame["program"].str.contains("(raw", regex=False)
    best = frame[baseline].groupby(["dataset", "held_out"])["acc"].max()
    frame["margin"] = [row.acc - best.get((row.dataset, row.held_out), np.nan) for row in frame.itertuples()]
    return frame


def heat_map(frame: pd.DataFrame, path: Path, datasets, programs):
    """Programs x data sets, coloured by the margin over the best baseline,
    each cell's accuracy written in it (blank: not run or refused)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plots

    main = frame[frame["method"].fillna("").isin(["", "units"])]
    grid = np.full((len(programs), len(datasets)), np.nan)
    text = [["" for _ in datasets] for _ in programs]
    for i, program in enumerate(programs):
        for j, dataset in enumerate(datasets):
            cell = main[(main["program"] == program) & (main["dataset"] == dataset)]
            if not len(cell):
                continue
            r = cell.iloc[0]
            if r["status"] != "ok":
                text[i][j] = r["status"]
            elif pd.notna(r.get("acc")):
                grid[i, j] = r["margin"]
                text[i][j] = f"{r['acc']:.2f}\n{r['margin']:+.2f}"
            elif pd.notna(r.get("silhouette")):
                text[i][j] = f"sil {r['silhouette']:.2f}"
    fig, ax = plt.subplots(figsize=(1.3 * len(datasets) + 2, 0.75 * len(programs) + 1.5))
    span = max(0.05, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 0.1
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#e8e8e8")  # grey: no accuracy (not run, ...)
    image = ax.imshow(grid, cmap=cmap, vmin=-span, vmax=span, aspect="auto")
    for i in range(len(programs)):
        for j in range(len(datasets)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(programs)), programs, fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy minus the best baseline's")
    ax.set_title("accuracy on the evaluation samples (top) and margin over the best baseline (bottom)",
                 fontsize=9)
    fig.tight_layout()
    plots.save_figure(fig, path, bbox_inches=None)


def markdown(frame: pd.DataFrame, datasets, programs) -> str:
    """Programs x data sets: accuracy and margin (or why a cell has none)."""
    main = frame[frame["method"].fillna("").isin(["", "units"])]
    lines = ["| program | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for program in programs:
        cells = []
        for dataset in datasets:
            cell = main[(main["program"] == program) & (main["dataset"] == dataset)]
            if not len(cell):
                cells.append("")
                continue
            r = cell.iloc[0]
            if r["status"] != "ok":
                cells.append(r["status"])
            elif pd.notna(r.get("acc")):
                cells.append(f"{r['acc']:.3f} ({r['margin']:+.3f})")
            else:
                cells.append(f"silhouette {r['silhouette']:.3f}")
        lines.append(f"| {program} | " + " | ".join(cells) + " |")
    why = main[(main["status"] != "ok") & main["dataset"].isin(datasets) & main["program"].isin(programs)]
    if len(why):
        lines.append("")
        lines += [f"- {r['dataset']} / {r['program']}: {r['status']}: {r['reason']}"
                  for _, r in why.iterrows()]
    return "\n".join(lines)


#: the columns of :func:`cell_table`, as named there
CELL_COLUMNS = {"acc": "accuracy", "nmi": "NMI", "purity": "purity", "ari": "ARI", "margin": "margin",
                "unit_purity": "unit purity", "unit_nmi": "unit NMI", "first_labels_acc": "first labels",
                "silhouette": "silhouette", "seconds": "seconds", "peak_rss_gb": "peak GB"}


def cell_table(frame: pd.DataFrame, datasets) -> str:
    """Every scored row (bin/ae's clusterings too) with all its numbers, by data set."""
    ok = frame[(frame["status"] == "ok") & frame["dataset"].isin(datasets)]
    shown = [c for c in CELL_COLUMNS if c in ok and ok[c].notna().any()]
    lines = ["| data set | program | held out | " + " | ".join(CELL_COLUMNS[c] for c in shown) + " |",
             "|---" * (len(shown) + 3) + "|"]
    formats = {"margin": "{:+.3f}", "seconds": "{:.0f}", "peak_rss_gb": "{:.2f}"}
    for dataset in datasets:
        for _, r in ok[ok["dataset"] == dataset].iterrows():
            method = r["method"] if isinstance(r["method"], str) else ""
            cells = ["" if pd.isna(r.get(c)) else formats.get(c, "{:.3f}").format(r[c]) for c in shown]
            lines.append(f"| {dataset} | {r['program']}{f' ({method})' if method else ''} | "
                         f"{'yes' if r['held_out'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser(datasets=DATASETS, programs=PROGRAMS):
    p = ArgumentParser(prog="robustness-benchmark", description=__doc__.split("\n\n")[0])
    names, rows = [d.name for d in datasets], [q.name for q in programs]
    p.add_argument("--datasets", nargs="+", choices=names, metavar="NAME", default=names,
                   help=f"data sets (columns): {', '.join(names)}")
    p.add_argument("--programs", nargs="+", choices=rows, metavar="NAME", default=rows,
                   help=f"programs (rows): {', '.join(rows)}")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="seed of every run and baseline")
    p.add_argument("--rerun", nargs="+", choices=rows, default=[], metavar="PROGRAM",
                   help="run these programs' cells again though they finished with the same command (after a "
                   "change of their code or defaults)")
    p.add_argument("--timeout", type=float, default=7200, bounds="(0, inf)",
                   help="seconds after which a run is stopped (and its cell marked failed)")
    p.add_argument("--save_dir", default="bench/robust",
                   help="output folder for the data, the runs and the tables")
    p.rename("--out", "--save_dir")
    return p


def _main(argv=None, datasets=DATASETS, programs=PROGRAMS):
    args = parser(datasets, programs).parse_args(argv)
    out = Path(args.save_dir)
    specs = [d for d in datasets if d.name in args.datasets]
    chosen = [q for q in programs if q.name in args.programs]
    rows = []
    for spec in specs:
        t = time.perf_counter()
        data = prepare(spec, out / "data")
        print(f"{spec.name}: {spec.description}; {len(data.eval_rows)} evaluation samples "
              f"({time.perf_counter() - t:.0f} s to prepare)", flush=True)
        from common.processes import read_record

        key = ["baselines", spec.name, args.seed]
        saved = read_record(out / "runs" / spec.name / "baselines.json", key)
        if saved is None:
            (out / "runs" / spec.name).mkdir(parents=True, exist_ok=True)
            saved = {"command": key, "rows": baselines(data, args.seed)}
            write_json(out / "runs" / spec.name / "baselines.json", saved)
        for row in saved["rows"]:
            rows.append({"dataset": spec.name, "status": "ok", **row})
        for program in chosen:
            record = run_cell(program, data, out, args.seed, args.timeout, program.name in args.rerun)
            base = {"dataset": spec.name, "program": program.name, "status": record["status"],
                    "reason": record.get("reason", ""), "seconds": record.get("seconds"),
                    "peak_rss_gb": record.get("peak_rss_gb")}
            cell = record.get("rows") or [{"method": ""}]
            rows += [{**base, **row} for row in cell]
            first = cell[0]  # the program's own answer (bin/ae: then one row per clustering)
            shown = (f"accuracy {first['acc']:.3f}" if pd.notna(first.get("acc")) else record["status"]
                     + (f" ({record.get('reason')})" if record.get("reason") else ""))
            print(f"  {program.name}: {shown}", flush=True)
        frame = margins(pd.DataFrame(rows))
        write_csv(frame, out / "matrix.csv")  # after every data set: nothing lost when stopped
    names = [s.name for s in specs]
    shown = [q.name for q in chosen] + [*BASELINES, *(b.replace(")", ", held out)") for b in BASELINES)]
    heat_map(frame, out / "margin.png", names, shown)
    table = markdown(frame, names, shown)
    with atomic_path(out / "matrix.md") as tmp:
        tmp.write_text(table + "\n\n" + cell_table(frame, names) + "\n")
    print("\n" + table)
    print(f"\nwritten: {out}/matrix.csv, {out}/margin.png, {out}/matrix.md")
    return 0


def main(argv=None):
    run(_main, argv, prog="robustness-benchmark")


if __name__ == "__main__":
    sys.exit(main())
