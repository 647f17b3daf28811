"""DESOM, ConvDESOM and Kerasom: self-organizing maps trained with Keras.

* :class:`DESOM`: a dense autoencoder (d-500-500-2000-latent, mirrored
  decoder) and a SOM on its latent codes, trained jointly on reconstruction
  error + gamma * SOM loss (Forest et al., ESANN 2019; NCA 2021).
* :class:`ConvDESOM`: the same with a convolutional autoencoder for images.
* :class:`Kerasom`: a plain SOM on the inputs, trained with the SOM loss.

All three are Keras models: ``model.predict(x)`` gives each sample's
best-matching unit, ``model.save("m.keras")`` writes one file, and
``keras.saving.load_model("m.keras")`` restores it in a new process after
``import desom``. Training goes through :func:`common.training.train`::

    model = DESOM(input_dim=784, map_size=(8, 8))
    model.init_prototypes(x, method="random", seed=0)
    model.fit(x, y, iterations=10000, save_dir="results/fmnist")
    bmu = model.predict(x)
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import ops

from common.data import as_float32
from common.errors import UsageError
from common.metrics import (
    evaluate_clustering,
    prototype_kmeans_accuracy,
    quantization_error,
    topographic_error,
)
from common.networks import (
    AutoencoderModel,
    conv_autoencoder,
    load_keras_model,
    mlp_autoencoder,
    mse_per_sample,
    predict_in_batches,
)
from common.training import Task, batch_mean, checkpoint_exists, train
from desom.layers import (
    KERNELS,
    SOMLayer,
    batch_som,
    default_tmax,
    distance_chunks,
    pairwise_sq_distances,
    temperature,
    temperature_op,
    umatrix,
    unit_coordinates,
)

SOM_INITS = ("random", "som")


def latent_spread(z):
    """Mean squared distance of a batch's codes to their mean (the trace of their covariance).

    Dividing the SOM loss by it (``normalize``) makes the loss blind to the
    scale of the latent space: an encoder can no longer lower it by
    shrinking every code towards one point, which is what a wide latent
    (ResNet50's 2048-d) does under DESOM's plain loss. The gradient flows
    through it, so collapsing the codes raises the loss instead.
    """
    centred = z - ops.expand_dims(batch_mean(z), 0)  # the global batch's, on several devices too
    return batch_mean(ops.sum(ops.square(centred), axis=1))


class SOMTask(Task):
    """The DESOM loss (or Kerasom's, without an autoencoder) for the shared loop."""

    def __init__(self, model: SOMModel, *, gamma: float, Tmax: float, Tmin: float, decay: str,
                 neighborhood: str, som_iterations: int, update_interval: int,
                 normalize: bool = False, x_eval=None, y_eval=None):
        self.model = model
        self.gamma, self.neighborhood, self.normalize = float(gamma), neighborhood, bool(normalize)
        self.Tmax, self.Tmin, self.decay = float(Tmax), float(Tmin), decay
        self.som_iterations, self.update_interval = int(som_iterations), int(update_interval)
        self.x_eval, self.y_eval = x_eval, y_eval

    def scalars(self, iteration):
        return {"T": temperature_op(iteration, self.som_iterations, self.Tmax, self.Tmin, self.decay,
                                    self.update_interval)}

    def loss_terms(self, x, idx, scalars):
        out = self.model(x, training=True)
        som = self.model.som.loss(out["distances"], scalars["T"], self.neighborhood)
        terms = {}
        if self.normalize:
            spread = latent_spread(out["latent"])
            som = som / (spread + keras.config.epsilon())
            terms["latent_spread"] = ops.broadcast_to(spread, ops.shape(som))
        if self.model.decoder is None:
            return {"loss": som, "som": som, **terms}
        rec = mse_per_sample(x, out["reconstruction"])
        return {"loss": rec + self.gamma * som, "reconstruction": rec, "som": som, **terms}

    def evaluate(self):
        if self.x_eval is None:
            return {}
        metrics = self.model.evaluate_map(self.x_eval, self.y_eval, internal=False)
        keys = ("quantization_error", "topographic_error", "n_clusters", "purity", "nmi", "ari", "acc",
                "acc_kmeans")
        return {k: metrics[k] for k in keys if k in metrics}


class SOMModel(AutoencoderModel):
    """Shared behaviour of the SOM models: an optional autoencoder + a SOMLayer.

    Subclasses build ``self.encoder`` and ``self.decoder`` (None for a plain
    SOM) in ``__init__`` and call :meth:`_finish_init`.
    """

    def _finish_init(self, input_shape, latent_dim, map_size, topology, toroidal):
        self.sample_shape = tuple(int(v) for v in input_shape)
        self.map_size = tuple(int(v) for v in map_size)
        self.topology, self.toroidal = topology, bool(toroidal)
        self.som = SOMLayer(map_size, topology=topology, toroidal=toroidal, name="som")
        self.som.build((None, latent_dim))
        self.build((None, *self.sample_shape))

    def call(self, x, training=False):
        if self.encoder is None:
            z = ops.reshape(x, (ops.shape(x)[0], -1))
            return {"latent": z, "distances": self.som(z)}
        z = self.encoder(x, training=training)
        return {"reconstruction": self.decoder(z, training=training), "latent": z,
                "distances": self.som(z)}

    def predict_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        return ops.argmin(self(x, training=False)["distances"], axis=1)

    # ------------------------------------------------------------------ queries
    @property
    def n_units(self) -> int:
        return self.som.n_units

    @property
    def unit_distances(self) -> np.ndarray:
        """(units, units) grid distances between the units of the map."""
        return self.som.unit_distances

    @property
    def prototypes(self) -> np.ndarray:
        """The prototypes in latent space, (units, latent_dim)."""
        return ops.convert_to_numpy(self.som.prototypes)

    def set_prototypes(self, values):
        self.som.prototypes.assign(np.asarray(values, np.float32).reshape(self.som.prototypes.shape))

    def unit_coordinates(self, units=None):
        """(rows, cols) of the given unit indices (all units by default)."""
        return unit_coordinates(self.map_size, units)

    def distances(self, x, batch_size: int = 1024) -> np.ndarray:
        """(samples, units) squared Euclidean distances in latent space."""
        return pairwise_sq_distances(self.transform(x, batch_size), self.prototypes)

    def decode_prototypes(self) -> np.ndarray:
        """The prototypes mapped back to input space, shaped like the inputs."""
        p = self.prototypes
        if self.decoder is not None:
            p = predict_in_batches(self.decoder, p)
        return np.asarray(p).reshape(self.n_units, *self.sample_shape)

    def umatrix(self) -> np.ndarray:
        """Mean latent distance of each unit's prototype to its neighbours'."""
        return umatrix(self.prototypes, self.unit_distances)

    def evaluate_map(self, x, y=None, *, internal: bool = True, sample_size: int = 10000,
                     seed: int = 0, codes=None, assignment=None) -> dict:
        """Every applicable metric of the best-matching-unit clustering of ``x``.

        Quantization and topographic error in latent space; purity, NMI, ARI
        and accuracy when labels ``y`` are given (on a map with more units
        than classes, ``acc_kmeans``, the paper's accuracy: see
        :func:`common.metrics.prototype_kmeans_accuracy`; else ``acc``, the
        one-to-one accuracy); silhouette, Davies-Bouldin and
        Calinski-Harabasz of the latent codes (fixed-seed subsample of
        ``sample_size``) when ``internal``. ``codes`` (``transform(x)``) and
        ``assignment`` (``assign_codes(codes)``) skip those passes when the
        caller already has them.
        """
        z = self.transform(x) if codes is None else codes
        bmu, _, qe, te = self.assign_codes(z) if assignment is None else assignment
        out = evaluate_clustering(bmu, y, features=z if internal else None, sample_size=sample_size,
                                  seed=seed)
        if y is not None and self.n_units > len(np.unique(y)):  # the paper's accuracy, not one-to-one
            del out["acc"]
            out["acc_kmeans"] = prototype_kmeans_accuracy(y, bmu, self.prototypes, seed)
        return {**out, "quantization_error": qe, "topographic_error": te}

    def assign_codes(self, z):
        """``(bmu, sq, qe, te)`` of latent codes ``z``: each code's best-matching
        unit and squared distance to it, the quantization and topographic errors;
        computed chunk by chunk (no samples x units matrix)."""
        n = len(z)
        bmu, sq, qe, te = np.empty(n, np.int64), np.empty(n, np.float32), 0.0, 0.0
        for s, d in distance_chunks(z, self.prototypes):
            bmu[s:s + len(d)] = d.argmin(axis=1)
            sq[s:s + len(d)] = d[np.arange(len(d)), bmu[s:s + len(d)]]
            qe += quantization_error(d) * len(d)
            te += topographic_error(d, unit_distances=self.unit_distances) * len(d)
        return bmu, sq, qe / max(n, 1), te / max(n, 1)

    # ------------------------------------------------------------- training
    def init_prototypes(self, x, method: str = "random", seed: int = 0, max_samples: int = 20000):
        """Initialise the prototypes from data.

        ``random``: the codes of ``units`` random samples (DESOM's benchmark
        initialisation). ``som``: a short batch-SOM fit (10 epochs, T from half
        the map's larger side down to 1) on the codes of up to ``max_samples``
        samples, starting from ``random``; gives an ordered map from the start.
        """
        if method not in SOM_INITS:
            raise UsageError(f"unknown prototype initialisation '{method}'; "
                             f"choose one of {', '.join(SOM_INITS)}")
        rng = np.random.default_rng(seed)
        n = len(x)
        pick = rng.choice(n, size=self.n_units, replace=n < self.n_units)
        init = self.transform(x[pick])
        if method == "som":
            sub = x if n <= max_samples else x[rng.choice(n, size=max_samples, replace=False)]
            init = batch_som(self.transform(sub), self.unit_distances, init,
                             Tmax=max(max(self.map_size) / 2.0, 1.0), Tmin=1.0)
        self.set_prototypes(init)

    def fit(self, x, y=None, *, iterations: int = 10000, gamma: float = 0.001, Tmax: float | None = None,
            Tmin: float = 0.1, decay: str = "exponential", neighborhood: str = "gaussian",
            som_iterations: int | None = None, update_interval: int = 1, normalize: bool = False,
            eval_interval: int = 500, eval_samples: int = 10000, seed: int = 0, **loop):
        """Train the map (and the autoencoder) for ``iterations`` batches.

        The temperature T decays from ``Tmax`` (default:
        :func:`desom.layers.default_tmax` of the map) to ``Tmin`` over
        ``som_iterations`` (default: all iterations) following ``decay``, and
        is updated every ``update_interval`` iterations. ``normalize`` divides
        the SOM loss by the batch's latent spread (:func:`latent_spread`; not
        in the papers). Every
        ``eval_interval`` iterations a row of losses and map quality on
        ``eval_samples`` fixed random samples (with their labels ``y`` when
        given) goes to ``save_dir/log.csv``. Other keyword arguments go to
        :func:`common.training.train` (``batch_size``, ``optimizer``,
        ``strategy``, ``save_dir``, ``checkpoint_minutes``, ``resume``,
        ``jit_compile``, ``steps_per_execution``, ``verbose``). Returns the
        :class:`common.training.TrainResult`.

        Resumed from a checkpoint with another ``iterations`` (and no
        ``som_iterations``), T keeps the schedule it had (saved beside the
        checkpoints): extra iterations run at ``Tmin``, fewer stop it early.
        """
        if neighborhood not in KERNELS:
            raise UsageError(f"unknown neighborhood '{neighborhood}'; choose one of {', '.join(KERNELS)}")
        for name, value in (("iterations", iterations), ("update_interval", update_interval),
                            ("eval_interval", eval_interval)):
            if value < 1:
                raise UsageError(f"{name} must be positive, got {value}")
        Tmax = default_tmax(self.map_size) if Tmax is None else Tmax
        if not 0 < Tmin <= Tmax:
            raise UsageError(f"need 0 < Tmin <= Tmax, got Tmin={Tmin}, Tmax={Tmax}")
        temperature(0, 2, Tmax, Tmin, decay)  # validates decay
        x = as_float32(x)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(x), size=min(eval_samples, len(x)), replace=False))
        som_iterations = self._schedule_length(som_iterations, iterations, loop)
        task = SOMTask(self, gamma=gamma, Tmax=Tmax, Tmin=Tmin, decay=decay,
                       neighborhood=neighborhood, som_iterations=som_iterations,
                       update_interval=update_interval, normalize=normalize, x_eval=x[pick],
                       y_eval=None if y is None else np.asarray(y)[pick])
        return train(task, x, iterations=iterations, eval_interval=eval_interval, seed=seed, **loop)

    @staticmethod
    def _schedule_length(som_iterations, iterations: int, loop: dict) -> int:
        """``som_iterations``, else the one of the checkpoint a resume continues
        (``<save_dir>/checkpoints/som_schedule.json``), else ``iterations``;
        written there for a later resume."""
        import json

        from common.results import write_json
        from common.runtime import is_chief

        save_dir, phase = loop.get("save_dir"), loop.get("phase", "train")
        path = None if save_dir is None else Path(save_dir) / "checkpoints" / "som_schedule.json"
        if (som_iterations is None and path is not None and loop.get("resume") and path.is_file()
                and checkpoint_exists(save_dir, phase)):
            som_iterations = int(json.loads(path.read_text())["som_iterations"])
        som_iterations = int(som_iterations or iterations)
        if path is not None and is_chief(loop.get("strategy")):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"som_iterations": som_iterations})
        return som_iterations

    def get_config(self):
        config = super().get_config()
        config.update(map_size=list(self.map_size), topology=self.topology, toroidal=self.toroidal)
        return config


@keras.saving.register_keras_serializable(package="desom")
class DESOM(SOMModel):
    """Deep Embedded SOM: dense autoencoder + SOM on the latent codes.

    Args:
        input_dim: number of input features.
        map_size: (rows, cols) of the map.
        latent_dim: size of the latent code (10 in the papers).
        hidden: encoder layer sizes (the decoder mirrors them).
        batchnorm: batch normalisation after each hidden layer.
        topology, toroidal: the map's grid (see :class:`desom.layers.SOMLayer`).
    """

    def __init__(self, input_dim: int, map_size=(8, 8), latent_dim: int = 10, hidden=(500, 500, 2000),
                 batchnorm: bool = False, topology: str = "rectangular", toroidal: bool = False,
                 **kwargs):
        kwargs.setdefault("name", "desom")
        super().__init__(**kwargs)
        self.input_dim, self.latent_dim = int(input_dim), int(latent_dim)
        self.hidden, self.batchnorm = tuple(int(h) for h in hidden), bool(batchnorm)
        self.encoder, self.decoder = mlp_autoencoder(self.input_dim, self.latent_dim, self.hidden,
                                                     batchnorm=self.batchnorm)
        self._finish_init((self.input_dim,), self.latent_dim, map_size, topology, toroidal)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, latent_dim=self.latent_dim, hidden=list(self.hidden),
                      batchnorm=self.batchnorm)
        return config


@keras.saving.register_keras_serializable(package="desom")
class ConvDESOM(SOMModel):
    """DESOM with a convolutional autoencoder, for (H, W, C) images.

    Args:
        input_shape: (height, width, channels) of the images.
        filters, kernel_size: convolution stages of the encoder (mirrored).
        Others as :class:`DESOM`.
    """

    def __init__(self, input_shape=(28, 28, 1), map_size=(8, 8), latent_dim: int = 10,
                 filters=(32, 64, 64), kernel_size: int = 3, batchnorm: bool = False,
                 topology: str = "rectangular", toroidal: bool = False, **kwargs):
        kwargs.setdefault("name", "convdesom")
        super().__init__(**kwargs)
        self.image_shape = tuple(int(v) for v in input_shape)
        if len(self.image_shape) != 3:
            raise UsageError(f"ConvDESOM needs images of shape (height, width, channels), "
                             f"got {self.image_shape}")
        self.latent_dim, self.filters = int(latent_dim), tuple(int(f) for f in filters)
        self.kernel_size, self.batchnorm = int(kernel_size), bool(batchnorm)
        self.encoder, self.decoder = conv_autoencoder(self.image_shape, self.latent_dim, self.filters,
                                                      self.kernel_size, batchnorm=self.batchnorm)
        self._finish_init(self.image_shape, self.latent_dim, map_size, topology, toroidal)

    def get_config(self):
        config = super().get_config()
        config.update(input_shape=list(self.image_shape), latent_dim=self.latent_dim,
                      filters=list(self.filters), kernel_size=self.kernel_size, batchnorm=self.batchnorm)
        return config


@keras.saving.register_keras_serializable(package="desom")
class Kerasom(SOMModel):
    """A plain SOM trained with the SOM loss by gradient descent (no autoencoder)."""

    def __init__(self, input_dim: int, map_size=(8, 8), topology: str = "rectangular",
                 toroidal: bool = False, **kwargs):
        kwargs.setdefault("name", "kerasom")
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self._finish_init((self.input_dim,), self.input_dim, map_size, topology, toroidal)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim)
        return config


def som_on_codes(z, map_size=(8, 8), epochs: float = 20, batch_size: int = 256, seed: int = 0,
                 verbose: int = 0, name: str = "som_on_codes") -> tuple[Kerasom, float]:
    """A Kerasom trained on fixed codes ``z``: the two-stage SOM baseline (AE + SOM).

    Trained on ``z`` divided by its overall standard deviation (the same
    geometry and best-matching units, at the scale Adam's steps suit),
    prototypes initialised by a short batch SOM, T from half the map's larger
    side (at least 1) to 0.1 over ``epochs`` epochs. Returns the SOM and that
    scale: ``som.predict(z / scale)`` gives each code's unit.
    """
    import keras

    z = np.asarray(z, np.float32).reshape(len(z), -1)
    scale = float(np.std(z)) or 1.0
    keras.utils.set_random_seed(seed)
    som = Kerasom(z.shape[1], map_size, name=name)
    som.init_prototypes(z / scale, method="som", seed=seed)
    bs = min(batch_size, len(z))
    iterations = max(1, int(epochs * (len(z) // bs)))
    som.fit(z / scale, iterations=iterations, batch_size=bs, Tmax=max(1.0, max(map_size) / 2.0), Tmin=0.1,
            eval_interval=iterations, eval_samples=min(2000, len(z)), seed=seed, verbose=verbose)
    return som, scale


def load_model(path) -> SOMModel:
    """Load a model saved with ``model.save(path)`` (a ``.keras`` file)."""
    return load_keras_model(path, SOMModel, "a map written by desom or rswnet --head som")
