"""Data sets of the DESOM lineage, loaded offline first.

:func:`load_data` is the single entry point::

    (x, y), _ = load_data("fmnist")                    # train + test, (70000, 784)
    (x, y), (x_val, y_val) = load_data("fmnist", validation=True)
    (x, y), _ = load_data("my_table.csv", label_col="species", scaling="standard")

It always returns ``(x, y), (x_val, y_val)``: float32 features and int64
labels (``y`` is None when the data carry no labels; the second pair is
``(None, None)`` unless ``validation=True``). Images are scaled to [0, 1] as in
the DESOM code (pixels / 255).

Where files are looked for, in order: ``data_dir``, the system copy under
``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` installs
Fashion-MNIST there), the Keras cache ``$KERAS_HOME/datasets`` (default
``~/.keras/datasets``), then a Keras download where the network allows it
(MNIST and Fashion-MNIST only). Set ``DESOM_NO_DOWNLOAD=1`` (the tests do) to
never download. Every failure raises :class:`common.errors.DataError` with one
line saying what was looked for, where, and how to get it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from common.diskarray import DiskArray, open_npy
from common.errors import DataError

#: Names accepted by :func:`load_data` (besides paths to .npz/.csv files).
KNOWN_DATASETS = ("digits", "mnist", "fmnist", "usps", "reuters10k")

#: Image height and width of the image data sets (one channel each).
IMAGE_SHAPES = {"digits": (8, 8), "mnist": (28, 28), "fmnist": (28, 28), "usps": (16, 16)}

#: Feature scalings for :func:`load_data` (``scaling=``).
SCALINGS = ("none", "minmax", "standard")
#: Names of the classes (in label order) of the named data sets that have them.
CLASS_NAMES = {
    "fmnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"),
    **{name: tuple(str(d) for d in range(10)) for name in ("digits", "mnist", "usps")},
}

SYSTEM_DIR = Path("/usr/share/datasets")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Sub-folders of the system directory and of the Keras cache, per data set.
_SUBDIRS = {
    "mnist": ("mnist", ""),
    "fmnist": ("fashion-mnist", "fashion-mnist"),
    "usps": ("usps", ""),
    "reuters10k": ("reuters10k", ""),
}
_HOW_TO_GET = {
    "mnist": "run once on a machine with network (Keras downloads it to ~/.keras/datasets/mnist.npz), "
    "or put the four MNIST IDX .gz files in --data_dir",
    "fmnist": "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    "or put the four Fashion-MNIST IDX .gz files in --data_dir",
    "usps": "download usps.h5 (Kaggle 'USPS dataset') or the libsvm files usps.bz2 and usps.t.bz2 "
    "into --data_dir",
    "reuters10k": "build reutersidf10k.npz on a machine with network with "
    "`python -m common.data make-reuters10k DIR` and pass --data_dir DIR",
}


def keras_cache_dir() -> Path:
    """The Keras data cache: ``$KERAS_HOME/datasets`` or ``~/.keras/datasets``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets"


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the files of data set ``name``, in order."""
    system_sub, cache_sub = _SUBDIRS[name]
    dirs = [Path(data_dir)] if data_dir is not None else []
    dirs += [SYSTEM_DIR / system_sub, keras_cache_dir() / cache_sub]
    return dirs


def downloads_allowed(download: bool | None = None) -> bool:
    """``download`` when given, else yes unless ``DESOM_NO_DOWNLOAD=1``."""
    if download is not None:
        return download
    return os.environ.get("DESOM_NO_DOWNLOAD", "") in ("", "0")


def _where(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


# --------------------------------------------------------------------------- #
# File formats
# --------------------------------------------------------------------------- #
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, file holds {len(raw) - header} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _idx_pair(d: Path, part: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``part`` in folder ``d``, .gz or not."""
    found = []
    for stem in _IDX_FILES[part]:
        p = _find([d], (stem + ".gz", stem))
        if p is None:
            return None
        found.append(p)
    return found[0], found[1]


def _load_mnist_like(name: str, data_dir, download: bool | None):
    """MNIST or Fashion-MNIST as uint8 (train, test) pairs."""
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        train, test = _idx_pair(d, "train"), _idx_pair(d, "test")
        if train and test:
            return tuple((read_idx(i), read_idx(lab)) for i, lab in (train, test))
        npz = d / "mnist.npz"
        if name == "mnist" and npz.is_file():
            with np.load(npz) as f:
                return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    if downloads_allowed(download):
        try:
            import keras

            module = keras.datasets.mnist if name == "mnist" else keras.datasets.fashion_mnist
            return module.load_data()
        except Exception as e:  # network errors take many forms
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            reason = f"a download failed ({first})"
    else:
        reason = "downloads are off"
    raise DataError(
        f"{name}: IDX files (train-images-idx3-ubyte.gz, ...) not found in {_where(dirs)} and "
        f"{reason}; {_HOW_TO_GET[name]}"
    )


def _load_usps(data_dir):
    import h5py

    dirs = search_dirs("usps", data_dir)
    h5 = _find(dirs, ("usps.h5",))
    if h5 is not None:
        try:
            with h5py.File(h5, "r") as f:
                parts = tuple((f[p]["data"][:], f[p]["target"][:]) for p in ("train", "test"))
        except (OSError, KeyError) as e:
            raise DataError(
                f"{h5} is not a USPS HDF5 file with groups train/test holding data and target ({e})"
            ) from None
        for x, _ in parts:
            if x.ndim != 2 or x.shape[1] != 256:
                raise DataError(f"{h5}: expected data of shape (N, 256), found {x.shape}")
        return parts
    for d in dirs:
        train = _find([d], ("usps.bz2", "usps"))
        test = _find([d], ("usps.t.bz2", "usps.t"))
        if train and test:
            return tuple(_read_libsvm_usps(p) for p in (train, test))
    raise DataError(f"usps: usps.h5 or usps.bz2 + usps.t.bz2 not found in {_where(dirs)}; "
                    f"{_HOW_TO_GET['usps']}")


def _read_libsvm_usps(path: Path):
    from sklearn.datasets import load_svmlight_file

    try:
        x, y = load_svmlight_file(str(path), n_features=256)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a libsvm USPS file: {e}") from None
    # libsvm's copy has features in [-1, 1] and labels 1..10.
    return (np.asarray(x.todense()) + 1.0) / 2.0, y.astype(np.int64) - 1


def _load_reuters10k(data_dir):
    dirs = search_dirs("reuters10k", data_dir)
    path = _find(dirs, ("reutersidf10k.npz", "reutersidf10k.npy"))
    if path is None:
        raise DataError(f"reuters10k: reutersidf10k.npz/.npy not found in {_where(dirs)}; "
                        f"{_HOW_TO_GET['reuters10k']}")
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                x, y = f["data"], f["label"]
        else:  # DEC's format: a pickled dict saved with np.save
            d = np.load(path, allow_pickle=True).item()
            x, y = d["data"], d["label"]
    except (KeyError, ValueError, OSError, AttributeError) as e:
        raise DataError(f"{path} must hold arrays 'data' (N, 2000) and 'label' (N,): {e}") from None
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x), np.asarray(y)


def make_reuters10k(out_dir: str | os.PathLike, n_samples: int = 10000, n_features: int = 2000,
                    seed: int = 0, data_home: str | None = None) -> Path:
    """Build ``reutersidf10k.npz`` from scikit-learn's RCV1 (needs network once).

    Follows DEC's recipe as closely as scikit-learn's copy allows: keep the
    documents labelled with exactly one of the four root categories (CCAT 0,
    GCAT 1, MCAT 2, ECAT 3), keep the ``n_features`` most frequent terms,
    re-normalise each row to unit L2 norm and multiply by sqrt(n_features),
    then draw ``n_samples`` documents at random. DEC computed its tf-idf from
    raw counts; RCV1 in scikit-learn ships cosine-normalised log tf-idf, so
    values differ slightly from DEC's file while the protocol is the same.
    """
    from sklearn.datasets import fetch_rcv1

    rcv1 = fetch_rcv1(subset="all", data_home=data_home)
    names = list(rcv1.target_names)
    roots = ["CCAT", "GCAT", "MCAT", "ECAT"]
    cols = [names.index(r) for r in roots]
    root = rcv1.target[:, cols].toarray()
    keep = np.flatnonzero(root.sum(axis=1) == 1)
    x = rcv1.data[keep]
    y = root[keep].argmax(axis=1)
    df = np.asarray((x > 0).sum(axis=0)).ravel()
    top = np.sort(np.argsort(-df, kind="stable")[:n_features])
    x = x[:, top].toarray().astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    nonzero = norms > 0
    x, y, norms = x[nonzero], y[nonzero], norms[nonzero]
    x = x / norms[:, None] * np.sqrt(n_features)
    pick = np.random.default_rng(seed).choice(len(x), size=min(n_samples, len(x)), replace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reutersidf10k.npz"
    np.savez_compressed(path, data=x[pick].astype(np.float32), label=y[pick].astype(np.int64))
    return path


# --------------------------------------------------------------------------- #
# A user's own files
# --------------------------------------------------------------------------- #
class Labels(np.ndarray):
    """Class indices 0..k-1 numbering a file's own label values; ``names[i]``
    is the value (as text) that index i stands for, for reports."""

    def __new__(cls, codes, names):
        labels = np.asarray(codes, dtype=np.int64).view(cls)
        labels.names = [str(n) for n in names]
        return labels

    def __array_finalize__(self, obj):
        self.names = getattr(obj, "names", None)


def label_names(y) -> list[str] | None:
    """The original label values of a user's file (see :class:`Labels`), or None."""
    return getattr(y, "names", None)


def _as_labels(y, source: str) -> np.ndarray:
    """Integer labels of 0 or more stay as they are (data sets' class ids);
    text, negative or fractional labels are numbered 0..k-1 in sorted order,
    keeping the values as :class:`Labels` names."""
    if isinstance(y, Labels):
        return y
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be one value per sample, found shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise DataError(f"{source}: labels contain NaN or inf")
    if y.dtype.kind in "iubf" and np.all(y == np.round(y)) and (len(y) == 0 or y.min() >= 0):
        return y.astype(np.int64)
    values, codes = np.unique(y if y.dtype.kind in "iuf" else y.astype(str), return_inverse=True)
    if y.dtype.kind == "f" and np.all(values == np.round(values)):
        values = values.astype(np.int64)  # -1.0 reads as -1
    return Labels(codes, values)


def _load_npz(path: Path):
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    with f:
        if "x" not in f.files:
            raise DataError(f"{path} has no array 'x' (found: {', '.join(f.files) or 'nothing'}); "
                            "save it with np.savez(path, x=features, y=labels)")
        try:
            x = f["x"]
            y = f["y"] if "y" in f.files else None
        except ValueError as e:  # object arrays would need unpickling: refused
            raise DataError(f"{path}: arrays must be plain numbers or text, not objects ({e})") from None
    if x.size == 0 or x.ndim < 2:
        raise DataError(f"{path}: 'x' must have shape (samples, features...) with data, found {x.shape}")
    if x.dtype.kind not in "iufb":
        raise DataError(f"{path}: 'x' must be numeric, found dtype {x.dtype}")
    if y is not None:
        y = _as_labels(y, str(path))
        if len(y) != len(x):
            raise DataError(f"{path}: 'y' has {len(y)} labels but 'x' has {len(x)} samples")
    return x, y


def _chunks(x):
    """(start, rows) of ``x``, about 64 MB of float32 at a time (a
    :class:`~common.diskarray.DiskArray` stays on disk)."""
    step = max(1, 2**24 // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), step):
        yield start, np.asarray(x[start:start + step])


def value_range(x) -> tuple[float, float]:
    """(smallest, largest) value of ``x``, read a chunk at a time."""
    low, high = np.inf, -np.inf
    for _, part in _chunks(x):
        low, high = min(low, float(part.min())), max(high, float(part.max()))
    return low, high


def as_float32(x) -> np.ndarray:
    """``x`` as float32 without a copy where it already is; a
    :class:`~common.diskarray.DiskArray` (float32) stays on disk (the training
    loop then reads it batch by batch)."""
    if isinstance(x, DiskArray):
        return x
    return np.asarray(x, np.float32)


def _load_npy(paths, source: Path) -> DiskArray:
    """Features larger than memory: float32 ``.npy`` files, left on disk."""
    try:
        x = open_npy(paths)
    except ValueError as e:
        raise DataError(str(e)) from None
    if x.dtype != np.float32:
        raise DataError(f"{source} holds {x.dtype}; .npy files are read from disk as they are, so save them "
                        f"as float32: np.save(path, x.astype(np.float32))")
    return x


#: The optional labels file of a folder of ``.npy`` shards.
SHARD_LABELS = "labels.npy"


def _load_shards(folder: Path):
    """A folder of float32 ``.npy`` shards (in name order) and optional ``labels.npy``."""
    paths = sorted(p for p in folder.glob("*.npy") if p.name != SHARD_LABELS)
    if not paths and (folder / "train").is_dir():
        raise DataError(f"{folder} is an image folder (train/): bin/dcn and bin/rswnet take image folders "
                        "(--data); this program takes arrays: a .npz file (x: images, y: labels) or .npy "
                        "shards")
    if not paths:
        raise DataError(f"{folder} has no .npy shards; save the features as float32 .npy files there "
                        f"(e.g. part-000.npy, part-001.npy, ...), the labels (optional) as {SHARD_LABELS}")
    x = _load_npy(paths, folder)
    y = None
    if (folder / SHARD_LABELS).is_file():
        try:
            y = np.load(folder / SHARD_LABELS, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{folder / SHARD_LABELS} is not a readable .npy file of labels: {e}") from None
        y = _as_labels(y, str(folder / SHARD_LABELS))
        if len(y) != len(x):
            raise DataError(f"{folder / SHARD_LABELS} has {len(y)} labels but the shards hold "
                            f"{len(x)} samples")
    return x, y


def _load_csv(path: Path, label_col: str | None):
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected a header row and numeric rows") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path} is not a readable CSV file: {e}") from None
    y = None
    if label_col is not None:
        if label_col not in df.columns:
            raise DataError(f"{path}: no column '{label_col}' for the labels "
                            f"(columns: {', '.join(map(str, df.columns))})")
        labels = df.pop(label_col)
        if labels.isna().any():
            raise DataError(f"{path}: label column '{label_col}' has empty values")
        y = _as_labels(labels.to_numpy(), str(path))
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"{path} has no data rows or no feature columns")
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])
           or pd.api.types.is_bool_dtype(df[c])]
    if bad:
        hint = " (or name it with --label_col)" if len(bad) == 1 and label_col is None else ""
        raise DataError(f"{path}: non-numeric columns {', '.join(bad)}; drop them{hint}")
    return df.to_numpy(dtype=np.float64), y


def feature_names(source, label_col: str | None = None) -> list[str] | None:
    """The column names of a CSV file's features (its header without
    ``label_col``); None for other sources."""
    import pandas as pd

    path = Path(source)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    return [str(c) for c in pd.read_csv(path, nrows=0).columns if str(c) != label_col]


def _load_file(path: Path, label_col: str | None):
    if path.is_dir():
        return _load_shards(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".csv":
        return _load_csv(path, label_col)
    if suffix == ".npy":
        return _load_npy([path], path), None
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .npz (x, optional y), .csv, .npy "
                    f"(features only, read from disk as needed) or a folder of .npy shards")


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def is_array_source(path: str | os.PathLike) -> bool:
    """True for the data ``load_data`` reads from a path (a ``.npz``, ``.csv``
    or ``.npy`` file, or a folder of ``.npy`` shards), False for anything else
    (an image folder)."""
    p = Path(path)
    return (p.is_file() or (p.is_dir() and any(p.glob("*.npy")))
            or p.suffix.lower() in (".npz", ".csv", ".npy"))


def is_file_name(name: str | os.PathLike) -> bool:
    """True when ``name`` designates a user's file rather than a known data set."""
    s = str(name)
    return s not in KNOWN_DATASETS and (s.lower().endswith((".npz", ".csv", ".npy")) or os.sep in s
                                        or os.path.isdir(s))


class Scaler:
    """Per-feature scaling fitted on training data, reusable on new data.

    ``none`` leaves values as they are; ``minmax`` maps each column of the
    training data to [0, 1]; ``standard`` gives each column zero mean and unit
    variance. Constant columns become 0 under both. :meth:`to_dict` and
    :meth:`from_dict` store the statistics (JSON-friendly) beside a model.
    """

    def __init__(self, method: str = "none", shift=None, span=None):
        if method not in SCALINGS:
            raise DataError(f"unknown scaling '{method}'; choose one of {', '.join(SCALINGS)}")
        self.method = method
        self.shift = None if shift is None else np.asarray(shift, np.float64)
        self.span = None if span is None else np.asarray(span, np.float64)

    def fit(self, x: np.ndarray) -> Scaler:
        if isinstance(x, DiskArray) and self.method != "none":
            raise DataError(f"{Path(x.filename).name} is read from disk as it is; scale it before saving it "
                            f"(--scaling {self.method} would hold a scaled copy in memory)")
        if self.method == "minmax":
            self.shift = x.min(axis=0)
            span = x.max(axis=0) - self.shift
        elif self.method == "standard":
            self.shift = x.mean(axis=0)
            span = x.std(axis=0)
        else:
            return self
        self.span = np.where(span > 0, span, 1.0)
        return self

    def transform(self, x: np.ndarray | None) -> np.ndarray | None:
        if x is None or self.method == "none":
            return x
        if self.shift is None:
            raise ValueError("Scaler.transform before fit")
        if x.shape[1:] != self.shift.shape:
            raise DataError(f"data have feature shape {x.shape[1:]}, the scaling was fitted on "
                            f"{self.shift.shape}")
        return ((x - self.shift) / self.span).astype(np.float32)

    def apply(self, x):
        """:meth:`transform` of samples of any shape (images: each pixel a
        feature), keeping the shape; None stays None."""
        if x is None or self.method == "none":
            return x
        return self.transform(x.reshape(len(x), -1)).reshape(x.shape)

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        """Scaled values back in the units of the training data."""
        if self.method == "none":
            return x
        if self.shift is None:
            raise ValueError("Scaler.inverse_transform before fit")
        return (np.asarray(x) * self.span + self.shift).astype(np.float32)

    def to_dict(self) -> dict:
        out = {"scaling": self.method}
        if self.shift is not None:
            out.update(shift=self.shift.tolist(), span=self.span.tolist())
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        return cls(d.get("scaling", "none"), d.get("shift"), d.get("span"))


def _finish(name: str, x, y, flatten: bool):
    """Common checks and shaping: float32, finite, (N, d) or (N, H, W, C).
    A :class:`~common.diskarray.DiskArray` (``.npy``) stays on disk: checked in chunks,
    reshaped as a view."""
    if not isinstance(x, DiskArray):
        x = np.asarray(x)
        if x.dtype.kind not in "iufb":
            raise DataError(f"{name}: features must be numeric, found dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
    if x.shape[0] == 0:
        raise DataError(f"{name}: no samples")
    rows = []
    for start, part in _chunks(x):
        rows.extend(start + np.flatnonzero(~np.isfinite(part.reshape(len(part), -1)).all(axis=1)))
    if len(rows):
        raise DataError(f"{name}: {len(rows)} samples contain NaN or inf values "
                        f"(first at row {rows[0]}); clean or impute them first")
    shape = IMAGE_SHAPES.get(name)
    if flatten:
        x = x.reshape(len(x), -1)
    elif x.ndim == 2 and shape is not None and x.shape[1] == shape[0] * shape[1]:
        x = x.reshape(len(x), *shape, 1)
    elif x.ndim == 3:
        x = x.reshape(*x.shape, 1)
    if y is not None:
        y = _as_labels(y, name)
    return x, y


def load_data(name: str | os.PathLike, validation: bool = False, flatten: bool = True,
              data_dir: str | os.PathLike | None = None, *, label_col: str | None = None,
              scaling: str = "none", download: bool | None = None):
    """Load a data set by name or a user's .npz/.csv file.

    Args:
        name: one of :data:`KNOWN_DATASETS`, or a path to a ``.npz`` file
            (array ``x``, optional ``y``), a ``.csv`` file (numeric columns,
            a header row; ``label_col`` names an optional label column), a
            float32 ``.npy`` file of features, or a folder of float32 ``.npy``
            shards (name order) with optional ``labels.npy``; these two are
            returned as a :class:`~common.diskarray.DiskArray` left on disk
            (data larger than memory: the training loop reads each batch's
            rows, evaluation and prediction read in chunks).
        validation: return the canonical train/test split instead of the
            concatenation of both parts. MNIST and Fashion-MNIST: 60000/10000;
            USPS: 7291/2007; digits (no canonical split exists): the first
            1347 samples / the last 450 (fixed, unshuffled). REUTERS-10k and
            user files have no split and raise an error.
        flatten: vectors (N, d) when True; when False, images keep their
            shape (N, H, W, C) and vectors stay (N, d).
        data_dir: a folder searched first for the data set's files.
        label_col: CSV only: the column holding the labels.
        scaling: ``none`` (default; the named data sets are already scaled
            as in DESOM), ``minmax`` or ``standard`` per feature, with
            statistics of the training part; see :class:`Scaler`.
        download: allow a Keras download of MNIST/Fashion-MNIST when no file
            is found; default: yes unless ``DESOM_NO_DOWNLOAD=1``.

    Returns:
        ``(x, y), (x_val, y_val)``: float32 features and int64 labels or None.
    """
    Scaler(scaling)  # validates the name before any loading
    key = str(name)
    if is_file_name(key):
        x, y = _load_file(Path(key), label_col)
        if validation:
            raise DataError(f"{key}: a single file has no canonical train/test split; "
                            "drop --validation or split the file yourself")
        x, y = _finish(key, x, y, flatten)
        return (Scaler(scaling).fit(x).transform(x), y), (None, None)
    if label_col is not None:
        raise DataError(f"label_col applies to CSV files only, not to '{key}'")
    if key not in KNOWN_DATASETS:
        raise DataError(f"unknown data set '{key}'; known: {', '.join(KNOWN_DATASETS)}, "
                        "or a path to a .npz or .csv file")

    if key == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x_all, y_all = d.data / 16.0, d.target  # pixel values are 0..16
        train, test = (x_all[:1347], y_all[:1347]), (x_all[1347:], y_all[1347:])
    elif key in ("mnist", "fmnist"):
        (xa, ya), (xb, yb) = _load_mnist_like(key, data_dir, download)
        # in float32: the same values as dividing in float64 for all 256 pixel values, a quarter
        # of the memory (loading Fashion-MNIST peaked at 1.15 GB, most of it float64 copies)
        train, test = (np.divide(xa, 255, dtype=np.float32), ya), (np.divide(xb, 255, dtype=np.float32), yb)
    elif key == "usps":
        train, test = _load_usps(data_dir)
    else:  # reuters10k
        if validation:
            raise DataError("reuters10k has no canonical train/test split; drop --validation")
        x, y = _finish(key, *_load_reuters10k(data_dir), flatten)
        return (Scaler(scaling).fit(x).transform(x), y), (None, None)

    if not validation:
        x, y = _finish(key, np.concatenate([train[0], test[0]]),
                       np.concatenate([train[1], test[1]]), flatten)
        return (Scaler(scaling).fit(x).transform(x), y), (None, None)
    x, y = _finish(key, *train, flatten)
    x_val, y_val = _finish(key, *test, flatten)
    scaler = Scaler(scaling).fit(x)
    return (scaler.transform(x), y), (scaler.transform(x_val), y_val)
