"""bin/dcn-deckeras: run DEC-keras itself on Fashion-MNIST, for one seed.

DEC-keras (github.com/XifengGuo/DEC-keras) is the Keras 2 code behind the
published DEC figures our ``bin/dcn-benchmark --protocol dec-keras`` stands
beside. This command runs its ``DEC.py --dataset fmnist`` unchanged, on
``tf_keras`` (Keras 2 for TensorFlow 2): what it imports from Keras 2.1 and
scikit-learn 0.19 is mapped onto today's equivalents so that it computes
what it computed then (:func:`shims` says how), and Fashion-MNIST comes
from the local IDX files instead of a download. It then writes the
autoencoder DEC-keras pretrained in our format,
``<save_dir>/ae_fmnist_seed<N>.weights.h5``, so that ``bin/dcn-benchmark
--protocol dec-keras --pretrained <save_dir>`` runs our clustering phase from the
very same weights, and a difference between the two phases can be told
from a difference between the two pretrainings.

Needs a DEC-keras checkout (``--deckeras``) and ``tf_keras`` for the
installed TensorFlow (``pip install tf_keras~=<TensorFlow's major.minor>.0``);
neither is a dependency of this project. Writes DEC-keras' own files
(``pretrain_log.csv`` and ``ae_weights.h5``, unless ``--ae_weights`` gives
them, ``dec_log.csv``, ``DEC_model_*.h5``) into ``<save_dir>/deckeras_seed<N>/``,
and its rows into ``<save_dir>/runs.csv`` (the columns of bin/dcn-benchmark's):
``ae+kmeans``, the k-means DEC.py starts from, and ``dec``, the labels of
its last target refresh (where it stopped; the last row of ``dec_log.csv``,
which DEC-keras' ``run_exp.py`` reports), scored with our metrics, with the
run's time and peak resident memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import runpy
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, run
from common.errors import UsageError
from common.processes import peak_rss_gb
from common.results import write_csv

DIMS = (784, 500, 500, 2000, 10)


def parser():
    p = ArgumentParser(prog="dcn-deckeras", description=__doc__.split("\n\n")[0])
    p.add_argument("--deckeras", required=True, help="folder of a DEC-keras checkout (holds DEC.py)")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS,
                   help="seed of TensorFlow's and numpy's generators (DEC-keras sets none)")
    p.add_argument("--pretrain_epochs", type=int, bounds="[1, inf)",
                   help="DEC.py's --pretrain_epochs (default: its own, 300 on Fashion-MNIST)")
    p.add_argument("--maxiter", type=int, bounds="[1, inf)",
                   help="DEC.py's --maxiter (default: its own, 20,000)")
    p.add_argument("--ae_weights", help="DEC.py's --ae_weights: start its clustering phase from this "
                   "ae_weights.h5 of an earlier run instead of pretraining")
    p.add_argument("--data_dir", help="folder searched first for the Fashion-MNIST IDX files")
    p.add_argument("--save_dir", default="bench/deckeras_reference",
                   help="output folder for runs.csv and the weights")
    p.rename("--out", "--save_dir")
    return p


def predict_in_batches(model, x, batch_size=None, verbose=0, **kwargs):
    """``model.predict(x)`` as Keras 2's: batches of ``batch_size`` (32)
    through ``model.predict_on_batch``, concatenated (no progress bar)."""
    n = 32 if batch_size is None else int(batch_size)
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + n])) for i in range(0, len(x), n)])


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def shims(deckeras: Path, data_dir=None):
    """Map the imports of DEC-keras (Keras 2.1, scikit-learn 0.19) onto
    tf_keras and today's scikit-learn / scipy while the block runs; yields
    the list of the KMeans objects it creates. No computation is changed:

    * ``keras.optimizers.SGD``: tf_keras' legacy SGD (Keras 2.1's: ``lr=``,
      momentum as v = m v - lr g, w += v);
    * ``keras.initializers.VarianceScaling``: a fresh seed at every call, as
      Keras 2.1's stateful draws (tf_keras' unseeded initialisers repeat their
      values: DEC.py's one instance would start all 500x500 layers equal);
    * ``normalized_mutual_info_score``: the geometric mean of the entropies,
      scikit-learn 0.19's (its default until 0.22), so dec_log.csv holds the
      NMI DEC-keras published; ``linear_assignment`` from scipy;
      ``KMeans(n_jobs=...)`` (removed in scikit-learn 1.0) drops ``n_jobs``;
    * ``keras.datasets.fashion_mnist.load_data``: the local IDX files;
    * ``Model.predict``: :func:`predict_in_batches`, the same batches of 32
      through ``predict_on_batch``. tf_keras' own keeps memory at every
      call (about 200 MB on the 70,000 images), and DEC.py calls it every
      140 iterations: its runs grew to 8.9 GB by iteration 6,000.
    """
    try:
        import tf_keras
    except ImportError:
        import tensorflow as tf

        minor = ".".join(tf.__version__.split(".")[:2])
        raise UsageError("DEC-keras runs on Keras 2: install tf_keras for this TensorFlow "
                         f"(pip install tf_keras~={minor}.0)") from None
    import scipy.optimize
    import sklearn.cluster
    import sklearn.metrics
    from tf_keras.src import backend as keras_backend

    from common.data import _load_mnist_like

    class VarianceScaling(tf_keras.initializers.VarianceScaling):
        def __call__(self, shape, dtype=None, **kwargs):
            self._random_generator = keras_backend.RandomGenerator(self.seed, rng_type="stateless")
            self._used = False
            return super().__call__(shape, dtype, **kwargs)

    def linear_assignment(cost):  # scikit-learn 0.19's: (row, column) pairs
        return np.stack(scipy.optimize.linear_sum_assignment(cost), axis=1)

    created = []  # the KMeans objects DEC-keras makes, in order: the last is its initial clustering
    kmeans, nmi = sklearn.cluster.KMeans, sklearn.metrics.normalized_mutual_info_score
    predict = tf_keras.Model.predict

    def KMeans(*args, n_jobs=None, **kwargs):  # noqa: N802
        created.append(kmeans(*args, **kwargs))
        return created[-1]

    def geometric_nmi(labels_true, labels_pred):
        return nmi(labels_true, labels_pred, average_method="geometric")

    def ours(name, module) -> bool:  # a module set here, or one of DEC-keras' own (metrics, datasets)
        where = getattr(module, "__file__", None) or ""
        return (name == "keras" or name.startswith(("keras.", "sklearn.utils.linear_assignment_"))
                or Path(where).parent == deckeras)

    saved = {name: module for name, module in sys.modules.items() if ours(name, module)}
    try:
        sys.modules["keras"] = tf_keras
        for sub in ("backend", "layers", "models", "callbacks"):
            sys.modules[f"keras.{sub}"] = getattr(tf_keras, sub)
        _module("keras.initializers", VarianceScaling=VarianceScaling)
        _module("keras.engine")
        _module("keras.engine.topology", Layer=tf_keras.layers.Layer, InputSpec=tf_keras.layers.InputSpec)
        _module("keras.optimizers", SGD=tf_keras.optimizers.legacy.SGD, Adam=tf_keras.optimizers.legacy.Adam)
        _module("keras.datasets")
        _module("keras.datasets.fashion_mnist", load_data=lambda: _load_mnist_like("fmnist", data_dir, False))
        _module("sklearn.utils.linear_assignment_", linear_assignment=linear_assignment)
        sklearn.cluster.KMeans, sklearn.metrics.normalized_mutual_info_score = KMeans, geometric_nmi
        tf_keras.Model.predict = predict_in_batches
        yield created
    finally:
        tf_keras.Model.predict = predict
        sklearn.cluster.KMeans, sklearn.metrics.normalized_mutual_info_score = kmeans, nmi
        for name, module in list(sys.modules.items()):
            if ours(name, module):
                del sys.modules[name]
        sys.modules.update(saved)  # Keras 3 back


def run_deckeras(args, save_dir: Path):
    """``DEC.py --dataset fmnist`` in this process; returns its globals and
    the KMeans objects it made."""
    script = Path(args.deckeras) / "DEC.py"
    argv = ["DEC.py", "--dataset", "fmnist", "--save_dir", str(save_dir)]
    if args.pretrain_epochs:
        argv += ["--pretrain_epochs", str(args.pretrain_epochs)]
    if args.maxiter:
        argv += ["--maxiter", str(args.maxiter)]
    if args.ae_weights:
        argv += ["--ae_weights", str(args.ae_weights)]
    old_argv, sys.argv = sys.argv, argv
    sys.path.insert(0, str(script.parent))
    try:
        with shims(script.parent.resolve(), args.data_dir) as created:
            import tf_keras

            tf_keras.utils.set_random_seed(args.seed)
            return runpy.run_path(str(script), run_name="__main__"), created
    finally:
        sys.argv = old_argv
        sys.path.remove(str(script.parent))


def read_autoencoder(h5) -> list[np.ndarray]:
    """Kernels and biases of DEC-keras' autoencoder from its ``ae_weights.h5``
    (Keras 2's HDF5 weights file), in its layer order: encoder_0..3, then
    decoder_3..0."""
    import h5py

    with h5py.File(h5, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        layers = [n for n in names if n.startswith(("encoder_", "decoder_"))]
        weights = []
        for name in layers:
            group = f[name]
            for w in group.attrs["weight_names"]:
                weights.append(np.asarray(group[w.decode() if isinstance(w, bytes) else str(w)]))
    return weights


def save_ours(weights: list, path: Path, dims=DIMS):
    """DEC-keras' autoencoder weights (:func:`read_autoencoder`) into our
    autoencoder of the same ``dims`` (d-500-500-2000-10), saved as our
    weights file."""
    from dcn.dec.models import DCN

    model = DCN((dims[0],), 10, embedding_dim=dims[-1], hidden=dims[1:-1], init="dec")
    ours = model._autoencoder()
    expected = [tuple(w.shape) for w in ours.get_weights()]
    if expected != [tuple(w.shape) for w in weights]:
        raise UsageError(f"the autoencoder DEC-keras saved is not {'-'.join(map(str, dims))}: run an "
                         "unmodified DEC-keras checkout")
    ours.set_weights(weights)
    model.save_autoencoder_weights(path)


def _main(argv=None):
    from dcn.dec.benchmark import score_labels

    args = parser().parse_args(argv)
    if not (Path(args.deckeras) / "DEC.py").is_file():
        raise UsageError(f"{Path(args.deckeras) / 'DEC.py'} not found: --deckeras must name a DEC-keras "
                         "checkout (git clone https://github.com/XifengGuo/DEC-keras)")
    out = Path(args.save_dir)
    save_dir = out / f"deckeras_seed{args.seed}"
    if args.ae_weights and not Path(args.ae_weights).is_file():
        raise UsageError(f"--ae_weights {args.ae_weights} not found: give the ae_weights.h5 of an earlier "
                         "run (<save_dir>/deckeras_seed<N>/ae_weights.h5)")
    save_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g, created = run_deckeras(args, save_dir)
    seconds = time.perf_counter() - t0
    weights = out / f"ae_fmnist_seed{args.seed}.weights.h5"
    pretrained = Path(args.ae_weights) if args.ae_weights else save_dir / "ae_weights.h5"
    save_ours(read_autoencoder(pretrained), weights)  # as pretrained, before DEC's phase

    # DEC.py logs every refresh and stops at one; with no stop it trains maxiter iterations
    last = int(pd.read_csv(save_dir / "dec_log.csv")["iter"].iloc[-1])
    iterations = last if last + g["update_interval"] < g["args"].maxiter else g["args"].maxiter
    row = {"dataset": "fmnist", "protocol": "deckeras", "seed": args.seed,
           "pretrained": args.ae_weights or ""}
    rows = [{**row, "method": "ae+kmeans", **score_labels(created[-1].labels_, g["y"]),
             "iterations": 0},
            {**row, "method": "dec", **score_labels(g["y_pred"], g["y"]),
             "iterations": iterations, "seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2)}]
    path = out / "runs.csv"
    with open(out / ".runs.lock", "w") as lock:  # seeds run at once, one per core, share the table
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame()
        if len(old):
            old = old[old["seed"] != args.seed]
        table = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
        write_csv(table.sort_values(["seed", "method"], kind="stable"), path)
    for r in rows:
        print(f"DEC-keras {r['method']} seed {args.seed}: acc {r['acc']:.4f}, NMI {r['nmi_geometric']:.4f} "
              f"(geometric, as DEC-keras'), {r['iterations']} iterations")
    print(f"its autoencoder in our format: {weights}; our phase from it: bin/dcn-benchmark --protocol "
          f"dec-keras --methods ae+kmeans dec --pretrained {out} --seed {args.seed} --runs 1")
    return 0


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(_main, argv, prog="dcn-deckeras")


if __name__ == "__main__":
    sys.exit(main())
