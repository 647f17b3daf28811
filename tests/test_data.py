"""Loaders against real digits, small files written here, and real Fashion-MNIST."""

import bz2
import gzip
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common import data
from common.data import label_names, load_data
from common.errors import DataError


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist_idx(folder, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    parts = {}
    for part, n, (img, lab) in (("train", n_train, data._IDX_FILES["train"]),
                                ("test", n_test, data._IDX_FILES["test"])):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{img}.gz", x)
        write_idx(folder / f"{lab}.gz", y)
        parts[part] = (x, y)
    return parts


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Point the system data folder at an empty place."""
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")


# ---------------------------------------------------------------- digits
def test_digits_scaled_and_concatenated():
    (x, y), (xv, yv) = load_data("digits")
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() == 1.0
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert xv is None and yv is None


def test_digits_split_and_images():
    (x, y), (xv, yv) = load_data("digits", validation=True, flatten=False)
    assert x.shape == (1347, 8, 8, 1) and xv.shape == (450, 8, 8, 1)
    (xa, _), _ = load_data("digits")
    np.testing.assert_array_equal(xv.reshape(450, -1), xa[1347:])


# ---------------------------------------------------------------- IDX files
def test_mnist_from_idx_files_in_data_dir(tmp_path, no_system_copy):
    parts = write_mnist_idx(tmp_path)
    (x, y), _ = load_data("mnist", data_dir=tmp_path)
    assert x.shape == (10, 784) and x.dtype == np.float32
    expected = np.concatenate([parts["train"][0], parts["test"][0]]).reshape(10, -1) / 255.0
    np.testing.assert_array_equal(x, expected.astype(np.float32))  # exactly pixels / 255, as in DESOM
    np.testing.assert_array_equal(y, np.concatenate([parts["train"][1], parts["test"][1]]))

    (xt, yt), (xv, yv) = load_data("mnist", validation=True, flatten=False, data_dir=tmp_path)
    assert xt.shape == (6, 28, 28, 1) and xv.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(yv, parts["test"][1])


def test_mnist_npz_in_keras_cache(tmp_path, no_system_copy, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    x = np.full((3, 28, 28), 255, np.uint8)
    np.savez(tmp_path / "datasets" / "mnist.npz", x_train=x, y_train=[1, 2, 3],
             x_test=x[:1], y_test=[4])
    (xa, ya), _ = load_data("mnist")
    assert xa.shape == (4, 784) and xa.max() == 1.0
    np.testing.assert_array_equal(ya, [1, 2, 3, 4])


def test_fmnist_prefers_data_dir_over_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system" / "fashion-mnist"
    system.mkdir(parents=True)
    write_mnist_idx(system, n_train=2, n_test=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    write_mnist_idx(mine, n_train=3, n_test=1)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    assert load_data("fmnist")[0][0].shape == (4, 784)
    assert load_data("fmnist", data_dir=mine)[0][0].shape == (4, 784)
    (x, _), (xv, _) = load_data("fmnist", data_dir=mine, validation=True)
    assert (len(x), len(xv)) == (3, 1)


def test_missing_mnist_names_places_and_remedy(tmp_path, no_system_copy):
    with pytest.raises(DataError) as err:
        load_data("mnist", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "keras_home" in msg.lower() and "downloads are off" in msg
    assert "\n" not in msg


def test_truncated_idx_file(tmp_path, no_system_copy):
    write_mnist_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_data("mnist", data_dir=tmp_path)


def test_not_an_idx_file(tmp_path, no_system_copy):
    write_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(DataError, match="magic number"):
        load_data("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------- USPS
def test_usps_h5(tmp_path, no_system_copy):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "usps.h5", "w") as f:
        for part, n in (("train", 5), ("test", 3)):
            g = f.create_group(part)
            g.create_dataset("data", data=rng.random((n, 256)))
            g.create_dataset("target", data=rng.integers(0, 10, n))
    (x, y), _ = load_data("usps", data_dir=tmp_path)
    assert x.shape == (8, 256) and y.shape == (8,)
    (x, _), (xv, _) = load_data("usps", data_dir=tmp_path, validation=True, flatten=False)
    assert x.shape == (5, 16, 16, 1) and xv.shape == (3, 16, 16, 1)


def test_usps_h5_wrong_width(tmp_path, no_system_copy):
    with h5py.File(tmp_path / "usps.h5", "w") as f:
        for part in ("train", "test"):
            f.create_group(part).create_dataset("data", data=np.zeros((2, 100)))
            f[part].create_dataset("target", data=np.zeros(2))
    with pytest.raises(DataError, match=r"\(N, 256\)"):
        load_data("usps", data_dir=tmp_path)


def test_usps_libsvm_rescaled(tmp_path, no_system_copy):
    for name, rows in (("usps.bz2", [(1, -1.0), (10, 1.0)]), ("usps.t.bz2", [(5, 0.0)])):
        lines = "".join(f"{lab} 1:{v} 256:{v}\n" for lab, v in rows)
        (tmp_path / name).write_bytes(bz2.compress(lines.encode()))
    (x, y), _ = load_data("usps", data_dir=tmp_path)
    np.testing.assert_array_equal(y, [0, 9, 4])
    np.testing.assert_allclose(x[:, 0], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(x[:, 1], [0.5, 0.5, 0.5])  # absent features were 0 in [-1, 1]


def test_usps_missing(tmp_path, no_system_copy):
    with pytest.raises(DataError, match="usps.h5 or usps.bz2"):
        load_data("usps", data_dir=tmp_path)


# ---------------------------------------------------------------- REUTERS-10k
def test_reuters10k_npz_and_dec_npy(tmp_path, no_system_copy):
    x = np.random.default_rng(0).random((7, 2000)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2])
    np.savez(tmp_path / "reutersidf10k.npz", data=x, label=y)
    (xa, ya), _ = load_data("reuters10k", data_dir=tmp_path)
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(ya, y)

    other = tmp_path / "dec"
    other.mkdir()
    np.save(other / "reutersidf10k.npy", {"data": x, "label": y})
    (xb, yb), _ = load_data("reuters10k", data_dir=other)
    np.testing.assert_array_equal(xb, x)
    with pytest.raises(DataError, match="no canonical"):
        load_data("reuters10k", data_dir=other, validation=True)
    assert load_data("reuters10k", data_dir=other, flatten=False)[0][0].shape == (7, 2000)


def test_reuters10k_missing_says_how_to_build(tmp_path, no_system_copy):
    with pytest.raises(DataError, match="make-reuters10k"):
        load_data("reuters10k", data_dir=tmp_path)


def test_make_reuters10k_follows_dec_recipe(tmp_path, monkeypatch):
    import scipy.sparse as sp
    from sklearn.utils import Bunch

    rng = np.random.default_rng(0)
    n, terms = 40, 30
    names = ["C15", "CCAT", "ECAT", "GCAT", "MCAT"]
    target = np.zeros((n, len(names)), dtype=int)
    roots = rng.integers(1, 5, n)
    target[np.arange(n), roots] = 1
    target[:5, 2] = 1  # five documents with two root categories: dropped
    x = sp.csr_matrix(rng.random((n, terms)) * (rng.random((n, terms)) < 0.5))
    fake = Bunch(data=x, target=sp.csr_matrix(target), target_names=np.array(names))
    import sklearn.datasets

    monkeypatch.setattr(sklearn.datasets, "fetch_rcv1", lambda **kw: fake)
    path = data.make_reuters10k(tmp_path, n_samples=20, n_features=10, seed=1)
    with np.load(path) as f:
        xs, ys = f["data"], f["label"]
    assert xs.shape == (20, 10) and set(np.unique(ys)) <= {0, 1, 2, 3}
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), np.sqrt(10), rtol=1e-5)


# ---------------------------------------------------------------- user files
def test_npz_with_and_without_labels(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array(["cat", "dog", "cat", "eel"]))
    (xa, ya), _ = load_data(str(tmp_path / "a.npz"))
    assert xa.dtype == np.float32
    np.testing.assert_array_equal(ya, [0, 1, 0, 2])
    np.savez(tmp_path / "b.npz", x=x)
    (_, yb), _ = load_data(str(tmp_path / "b.npz"), scaling="minmax")
    assert yb is None


@pytest.mark.parametrize("labels, codes, names", [
    ([-1, 1, 1, -1], [0, 1, 1, 0], ["-1", "1"]),           # a classifier's +-1 labels
    ([2.0, -3.0, 2.0, 10.0], [1, 0, 1, 2], ["-3", "2", "10"]),  # sorted as numbers, not as text
    ([0.5, 1.5, 0.5, 0.5], [0, 1, 0, 0], ["0.5", "1.5"]),
    (["cat", "dog", "cat", "eel"], [0, 1, 0, 2], ["cat", "dog", "eel"]),
    ([7, 0, 3, 3], [7, 0, 3, 3], None),                     # class ids of 0 or more stay as they are
])
def test_file_labels_are_numbered_from_zero_and_keep_their_values_as_names(tmp_path, labels, codes, names):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), y=np.array(labels))
    (_, y), _ = load_data(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(y, codes)
    assert y.dtype == np.int64 and label_names(y) == names and label_names(y[1:]) == names
    assert np.bincount(y).sum() == 4  # what the majority-class maps and the metrics compute


def test_npz_images_keep_their_shape(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.zeros((5, 6, 7)))
    assert load_data(str(tmp_path / "img.npz"), flatten=False)[0][0].shape == (5, 6, 7, 1)
    assert load_data(str(tmp_path / "img.npz"))[0][0].shape == (5, 42)


def test_csv_with_label_column_and_scalings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,kind\n1,10,x\n2,10,y\n3,10,x\n")
    (x, y), _ = load_data(str(path), label_col="kind")
    np.testing.assert_array_equal(x, [[1, 10], [2, 10], [3, 10]])
    np.testing.assert_array_equal(y, [0, 1, 0])
    (xm, _), _ = load_data(str(path), label_col="kind", scaling="minmax")
    np.testing.assert_allclose(xm, [[0, 0], [0.5, 0], [1, 0]])
    (xs, _), _ = load_data(str(path), label_col="kind", scaling="standard")
    np.testing.assert_allclose(xs[:, 0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    np.testing.assert_allclose(xs[:, 1], 0)


@pytest.mark.parametrize("content, kwargs, pattern", [
    ("", {}, "is empty"),
    ("a,b\n1,x\n2,y\n", {}, "non-numeric columns b; drop them \\(or name it with --label_col\\)"),
    ("a,b\n1,2\n", {"label_col": "c"}, "no column 'c'"),
    ("a,b\n1,2\n3,nan\n", {}, "1 samples contain NaN or inf values \\(first at row 1\\)"),
    ("a,b\n1,2\n3,inf\n", {}, "NaN or inf"),
    ("a,b\n", {}, "no data rows"),
])
def test_bad_csv_files(tmp_path, content, kwargs, pattern):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_data(str(path), **kwargs)


@pytest.mark.parametrize("arrays, pattern", [
    ({"features": np.zeros((3, 2))}, "has no array 'x' \\(found: features\\)"),
    ({"x": np.zeros(3)}, "must have shape"),
    ({"x": np.zeros((0, 3))}, "must have shape"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2)}, "'y' has 2 labels but 'x' has 3 samples"),
    ({"x": np.array([["a", "b"]])}, "must be numeric"),
    ({"x": np.array([[1.0, np.inf]])}, "NaN or inf"),
])
def test_bad_npz_files(tmp_path, arrays, pattern):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=pattern):
        load_data(str(tmp_path / "bad.npz"))


def test_corrupt_npz_and_missing_and_unsupported_files(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(str(tmp_path / "c.npz"))
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "absent.csv"))
    (tmp_path / "d.txt").write_text("1 2")
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(str(tmp_path / "d.txt"))


def test_unknown_name_lists_known_ones():
    with pytest.raises(DataError) as err:
        load_data("cifar")
    for name in data.KNOWN_DATASETS:
        assert name in str(err.value)


def test_bad_options(tmp_path):
    with pytest.raises(DataError, match="unknown scaling 'zscore'"):
        load_data("digits", scaling="zscore")
    with pytest.raises(DataError, match="CSV files only"):
        load_data("digits", label_col="y")
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no canonical train/test split"):
        load_data(str(tmp_path / "u.npz"), validation=True)


def test_pickle_is_refused_in_user_npz(tmp_path):
    obj = np.array([{"a": 1}], dtype=object)
    with open(tmp_path / "p.npz", "wb") as f:
        np.savez(f, x=obj)
    with pytest.raises(DataError, match="not objects"):
        load_data(str(tmp_path / "p.npz"))


# ---------------------------------------------------------------- real data
@pytest.mark.fmnist
def test_real_fashion_mnist(require_fmnist):
    (x, y), _ = load_data("fmnist")
    assert x.shape == (70000, 784) and x.dtype == np.float32
    assert 0.0 == x.min() and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [7000] * 10)
    (xt, yt), (xv, yv) = load_data("fmnist", validation=True, flatten=False)
    assert xt.shape == (60000, 28, 28, 1) and xv.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(yv), [1000] * 10)


# ---------------------------------------------------------------- .npy shards left on disk
def _shards(folder, x, cuts):
    folder.mkdir()
    for i, part in enumerate(np.split(x, cuts)):
        np.save(folder / f"part-{i:02d}.npy", part)
    return folder


def test_disk_array_reads_the_rows_numpy_would(tmp_path):
    from common.diskarray import DiskArray

    x = np.random.default_rng(0).normal(size=(50, 3, 2)).astype(np.float32)
    (d, _), _ = load_data(str(_shards(tmp_path / "s", x, [7, 8, 30])), flatten=False)
    assert isinstance(d, DiskArray) and d.shape == (50, 3, 2, 1) and d.dtype == np.float32
    ref = x[..., None]
    rng = np.random.default_rng(1)
    for key in (3, -1, slice(None), slice(5, 33), slice(40, 2, -3), rng.integers(0, 50, 200),
                np.array([49, 0, 7, 7, 8, -50]), rng.random(50) < 0.3, np.array([], np.int64), [6, 7, 8, 9]):
        np.testing.assert_array_equal(d[key], ref[key], err_msg=str(key))
    flat = d.reshape(len(d), -1)
    assert flat.shape == (50, 6) and isinstance(flat, DiskArray)
    np.testing.assert_array_equal(flat[[2, 31]], x.reshape(50, -1)[[2, 31]])
    np.testing.assert_array_equal(np.asarray(d), ref)  # explicit whole reads still work
    for bad in (50, -51, [0, 50], np.array([0.5])):
        with pytest.raises(IndexError):
            d[bad]


def test_npy_shards_with_labels_and_their_errors(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    folder = _shards(tmp_path / "ok", x, [3])
    np.save(folder / "labels.npy", np.array([-1, 1] * 5))
    (d, y), _ = load_data(str(folder))
    assert d.shape == (10, 4) and label_names(y) == ["-1", "1"] and list(y[:2]) == [0, 1]
    bad = _shards(tmp_path / "mixed", x, [3])
    np.save(bad / "part-02.npy", np.zeros((2, 5), np.float32))
    short = _shards(tmp_path / "short", x, [3])
    with open(short / "part-01.npy", "r+b") as f:
        f.truncate(150)  # the header whole, the rows cut
    for where, message in (
            (tmp_path, "has no .npy shards"),
            (bad, "part-02.npy holds rows of float32 (5,), part-00.npy of float32 (4,)"),
            (short, "part-01.npy is not a readable .npy file: is shorter than its header says"),
    ):
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_data(str(where))
    np.save(folder / "labels.npy", np.zeros(9))
    with pytest.raises(DataError, match="has 9 labels but the shards hold 10 samples"):
        load_data(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no .npy shards"):
        load_data(str(tmp_path / "empty"))
    (tmp_path / "images" / "train").mkdir(parents=True)  # an image folder given where arrays are read
    with pytest.raises(DataError, match="images is an image folder .train/.: bin/dcn and bin/rswnet take"):
        load_data(str(tmp_path / "images"))


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="POSIX only")
def test_more_shards_than_the_soft_limit_on_open_files(tmp_path):
    # Each shard keeps a descriptor open: a folder of 400 shards under a soft
    # limit of 128 open files raises the limit and reads; under a hard limit
    # of 128 it is one clear error (in a child process, whose limits are its own).
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 400 + 256:
        pytest.skip(f"the hard limit on open files here is {hard}")
    x = np.arange(800, dtype=np.float32).reshape(400, 2)
    folder = tmp_path / "many"
    folder.mkdir()
    for i, row in enumerate(x):
        np.save(folder / f"part-{i:03d}.npy", row[None])
    child = f"""
import resource, sys, numpy as np
from common.data import load_data
from common.errors import DataError
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128 if sys.argv[1] == 'hard' else hard))
try:
    (d, _), _ = load_data({str(folder)!r})
except DataError as e:
    print('error:', e); sys.exit(0)
assert np.array_equal(d[[0, 399, 200]], np.array([[0, 1], [798, 799], [400, 401]], np.float32))
print('read', len(d), 'soft limit', resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    refused = ("error: 400 shards need 400 open files, and 256 are kept for the rest of the run, but this "
               "process may open at most 128 (ulimit -Hn); merge the shards into fewer, larger .npy files")
    for limit, expected in (("soft", "read 400 soft limit 656"), ("hard", refused)):
        out = subprocess.run([sys.executable, "-c", child, limit], cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


def test_datatool_info_prints_shape_classes_and_range(capsys):
    from common.datatool import main

    main(["info", "digits"])
    printed = capsys.readouterr().out.strip()
    assert printed == "digits: 1797 samples, 64 features, 10 classes, values in [0, 1]"
