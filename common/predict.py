"""``predict``: how every program applies a saved model to samples.

One set of flags, one way to read the samples and one CSV for the five
programs::

    X predict --model MODEL.keras (--dataset NAME | --data PATH | IMAGE ...) [--out CSV]

A program adds the flags with :func:`add_predict_arguments`, reads the
samples shaped as its model takes them with :func:`read_samples`, computes
its own columns and writes them with :func:`write_predictions`: one row per
sample, first the sample (``index``, its row in the data, or ``image``, the
file's path), then the program's columns, then ``label`` when the data
carry labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import KNOWN_DATASETS, Scaler, is_array_source, label_names, load_data
from common.errors import DataError, UsageError
from common.results import write_csv

__all__ = ["Samples", "add_predict_arguments", "check_samples_given", "model_and_samples", "read_samples",
           "saved_scaler", "trained_on", "write_predictions"]


def add_predict_arguments(p, program: str, datasets=KNOWN_DATASETS):
    """``--model``, the samples (``IMAGE ...``, ``--dataset``, ``--data``
    with ``--data_dir`` and ``--label_col``) and ``--out``."""
    p.add_argument("--model", required=True, metavar="MODEL.keras", help=f"a model written by {program}")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files (PNG, JPEG, BMP, GIF; any size or colour: converted to the model's); "
                   "or give --dataset or --data")
    p.add_argument("--dataset", choices=datasets, help="every sample of a named data set (train and test)")
    p.add_argument("--data", metavar="PATH",
                   help="your data: a .npz (x, optional y), .csv or .npy file, a folder of .npy shards, or a "
                   "folder of images (every image under it)")
    p.add_argument("--data_dir", help="--dataset: folder searched first for its files")
    p.add_argument("--label_col",
                   help="--data CSV: the column holding labels (written beside the predictions)")
    p.add_argument("--out", metavar="CSV",
                   help="output file (default: predictions_<data>.csv beside the model; the run's own "
                   "predictions.csv stays)")


@dataclass
class Samples:
    """What :func:`read_samples` read: ``x`` shaped as the model takes its
    samples, ``frame`` the column naming each sample (``index`` or
    ``image``), ``labels`` (or None) and ``source``, a short name of the data
    (for messages and the default output file)."""

    x: np.ndarray
    frame: pd.DataFrame
    labels: np.ndarray | None
    source: str


def saved_scaler(model_path):
    """The scaling the run saved beside the model (``preprocessing.json``,
    ``--scaling``), or None."""
    prep = Path(model_path).parent / "preprocessing.json"
    return Scaler.from_dict(json.loads(prep.read_text())) if prep.is_file() else None


def trained_on(model_path) -> str:
    """'the model was trained on NAME and expects' (from the run's results.json), or 'the model expects'."""
    found = Path(model_path).parent / "results.json"
    try:
        data = json.loads(found.read_text()).get("data") if found.is_file() else None
    except (OSError, ValueError, AttributeError):
        data = None
    return f"the model was trained on {data} and expects" if data else "the model expects"


def _shaped(x, sample_shape: tuple, source: str, model_path) -> np.ndarray:
    """``x`` as the model takes it: flat vectors for a dense model, images
    (rows of as many values reshaped) for a convolutional one."""
    size = int(np.prod(sample_shape))
    if x.shape[1:] != sample_shape and int(np.prod(x.shape[1:])) == size:
        x = x.reshape(len(x), *sample_shape)
    if tuple(x.shape[1:]) != sample_shape:
        raise UsageError(f"{trained_on(model_path)} samples of shape {sample_shape}; {source} has "
                         f"{tuple(x.shape[1:])}")
    return x


def check_samples_given(args):
    """Exactly one of IMAGE files, ``--dataset`` or ``--data`` (checked before
    the model is loaded)."""
    given = [name for name, value in (("IMAGE files", args.images), ("--dataset", args.dataset),
                                      ("--data", args.data)) if value]
    if len(given) != 1:
        raise UsageError("give exactly one of IMAGE files, --dataset or --data"
                         + (f" (got {' and '.join(given)})" if given else ""))


def read_samples(args, sample_shape) -> Samples:
    """The samples named by the flags of :func:`add_predict_arguments`, shaped
    as a model whose samples have ``sample_shape`` takes them.

    Image files and image folders are resized and converted to the model's
    size and channels; arrays and tables are reshaped to ``sample_shape``
    when they hold as many values per sample. Every kind is scaled as the
    run saved beside the model (:func:`saved_scaler`)."""
    sample_shape = tuple(int(v) for v in sample_shape)
    check_samples_given(args)
    scaler = saved_scaler(args.model)  # the run's --scaling, for every kind of sample
    if args.images or (args.data and Path(args.data).is_dir() and not is_array_source(args.data)):
        if len(sample_shape) != 3:
            raise UsageError(f"{args.model} was trained on vectors of {sample_shape[0]} values, not images; "
                             "give them with --dataset or --data")
        from common.folders import load_image_files, load_images

        height, width, channels = sample_shape
        color = "grayscale" if channels == 1 else "rgb"
        if args.images:
            x, names = load_image_files(args.images, (height, width), color)
            source = "images"
        else:
            found = load_images(args.data, (height, width), color)
            x, names, source = found.x, found.paths, Path(args.data).name
            if len(x) == 0:
                raise DataError(f"no image could be read under {args.data}")
        if scaler is not None:
            x = scaler.apply(x)
        return Samples(x, pd.DataFrame({"image": [str(n) for n in names]}), None, source)
    name = args.dataset or args.data
    (x, labels), _ = load_data(name, flatten=False, data_dir=args.data_dir, label_col=args.label_col)
    if scaler is not None:
        x = scaler.apply(x)
    source = Path(name).stem if args.data else name
    x = _shaped(x, sample_shape, name, args.model)
    return Samples(x, pd.DataFrame({"index": np.arange(len(x))}), labels, source)


def model_and_samples(args, models: str):
    """The checks and loading every ``predict`` starts with: the samples
    named (one kind), TensorFlow started quietly, the model of ``--model``
    loaded by ``<models>.load_model`` (``models``: a module path, imported
    only now) and its samples read (:func:`read_samples`). Returns
    ``(model, samples)``."""
    from importlib import import_module

    from common.runtime import quiet_tensorflow

    check_samples_given(args)
    quiet_tensorflow()
    model = import_module(models).load_model(args.model)
    return model, read_samples(args, model.sample_shape)


def write_predictions(samples: Samples, columns: dict, args, note: str = "") -> Path:
    """Write one row per sample (``samples.frame``, then ``columns``, then
    the label when known) to ``--out`` or ``predictions_<data>.csv`` beside
    the model, and say where in one line (followed by ``note``)."""
    out = samples.frame.copy()
    for name, values in columns.items():
        out[name] = values
    if samples.labels is not None:
        names = label_names(samples.labels)  # a file's own label values, not their indices
        y = np.asarray(samples.labels)
        out["label"] = y if names is None else np.asarray(names, dtype=object)[y]
    path = Path(args.out) if args.out else Path(args.model).parent / f"predictions_{samples.source}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, path)
    print(f"{len(out)} predictions written to {path}{note}", flush=True)
    return path
