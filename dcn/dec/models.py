"""DEC, IDEC and DCEC: a clustering layer on an autoencoder's embedding.

One model, :class:`DCN`, covers the three: a dense autoencoder (DEC/IDEC on
vectors) or a convolutional one (DCEC on images), a
:class:`~dcn.dec.layers.ClusteringLayer` on the embedding, and training in
three phases through the shared loop:

1. autoencoder pretraining (:meth:`DCN.pretrain`);
2. k-means (or N2D's UMAP + Gaussian mixture) on the embeddings for the
   initial centres (:meth:`DCN.init_centers`);
3. clustering (:meth:`DCN.fit`): minimise KL(P || Q) + ``recon_weight`` x
   reconstruction error, with the target P recomputed over the whole
   training set every ``update_interval`` iterations, stopping when fewer
   than ``tol`` of the labels change between two refreshes.

``recon_weight=0`` is DEC; a positive weight keeps the decoder training (IDEC
on vectors, DCEC on images). IDEC and DCEC write L = L_r + gamma L_c with
gamma = 0.1; under Adam, which is invariant to the scale of the loss, that is
L_c + 10 L_r, hence the default ``recon_weight=10``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from common.data import as_float32
from common.errors import UsageError
from common.metrics import evaluate_clustering
from common.networks import (
    AutoencoderModel,
    dcec_autoencoder,
    load_keras_model,
    mlp_autoencoder,
    mse_per_sample,
    predict_in_batches,
)
from common.training import StopTraining, Task, plan, train
from dcn.dec.layers import ClusteringLayer, batch_target_distribution, kl_divergence, target_distribution

ARCHITECTURES = ("conv", "mlp")
#: initialisations of the cluster centres (``init_centers``)
CENTERS = ("umap_gmm", "kmeans")  # the first is bin/dcn's default
#: DEC, IDEC and DCEC refresh the target every 140 iterations (MNIST: 70,000 samples, batches of 256) ...
UPDATE_INTERVAL = 140
#: ... and stop after 20,000 iterations at most, about 73 epochs of those 70,000 samples.
MAX_EPOCHS = 73
#: Pretraining of the convolutional autoencoder (images), in optimizer steps: on 8,000 images of 64 px
#: (batches of 128) 1,240 steps took 163 s here and k-means + DEC then reached 0.925 test accuracy on
#: four Fashion-MNIST classes; 50 epochs would have taken 6-7 minutes. Vectors keep DEC's epochs.
PRETRAIN_STEPS = 1500
PRETRAIN_EPOCHS = 50


def pretrain_epochs(n_samples: int, batch_size: int, images: bool) -> float:
    """The default length of pretraining: ``PRETRAIN_EPOCHS`` epochs for
    vectors; for images, the epochs of ``PRETRAIN_STEPS`` optimizer steps
    (at least one)."""
    if not images:
        return float(PRETRAIN_EPOCHS)
    steps_per_epoch = max(1, n_samples // batch_size)
    return max(1.0, PRETRAIN_STEPS / steps_per_epoch)


def clustering_schedule(n_samples: int, batch_size: int = 256, update_interval: int | None = None,
                        max_iterations: int | None = None, max_epochs: float | None = None):
    """(update_interval, max_iterations) of the clustering phase, proportioned to the data.

    Defaults: a target refresh every ``min(140, one epoch)`` iterations, and a
    budget of ``MAX_EPOCHS`` epochs; ``max_iterations`` overrides ``max_epochs``.
    """
    if max_iterations is None:
        epochs = MAX_EPOCHS if max_epochs is None else max_epochs
        if not epochs > 0:
            raise UsageError(f"max_epochs must be positive, got {max_epochs}")
        max_iterations, steps_per_epoch = plan(n_samples, batch_size, epochs=epochs)
    else:
        max_iterations, steps_per_epoch = plan(n_samples, batch_size, iterations=max_iterations)
    if update_interval is None:
        update_interval = min(UPDATE_INTERVAL, steps_per_epoch)
    if update_interval < 1:
        raise UsageError(f"update_interval must be positive, got {update_interval}")
    return int(update_interval), int(max_iterations)


TARGETS = ("refresh", "batch")


class ClusteringTask(Task):
    """KL(P || Q) (+ reconstruction) with DEC's periodic target refresh.

    ``target="refresh"``: P is computed over all samples by :meth:`refresh`
    (DEC); ``initial_targets`` (samples x clusters), if given, are the first
    P instead (the clustering the centres came from, until the first
    refresh). ``target="batch"``: P comes from each mini-batch's own Q,
    inside the step, with no gradient through it (RSWNet's notebook).
    """

    def __init__(self, model: ClusteringModel, x, *, recon_weight: float, tol: float, y=None,
                 eval_samples: int = 10000, seed: int = 0, target: str = "refresh", initial_targets=None):
        import tensorflow as tf

        if target not in TARGETS:
            raise UsageError(f"unknown target '{target}'; choose {' or '.join(TARGETS)}")
        self.model, self.x, self.target = model, x, target
        self.initial_targets = None if initial_targets is None else np.asarray(initial_targets, np.float32)
        self.recon_weight, self.tol = float(recon_weight), float(tol)
        n = len(x)
        self.targets = tf.Variable(tf.zeros((n, model.n_clusters)), trainable=False, name="targets")
        self.labels = tf.Variable(tf.fill([n], tf.constant(-1, tf.int64)), trainable=False, name="labels")
        self.label_change = None
        pick = np.sort(np.random.default_rng(seed).choice(n, size=min(eval_samples, n), replace=False))
        self.x_eval = x[pick]
        self.y_eval = None if y is None else np.asarray(y)[pick]

    def refresh(self, iteration):
        previous = self.labels.numpy()
        if previous[0] < 0 and self.initial_targets is not None:  # the first target is given
            self.targets.assign(self.initial_targets)
            self.labels.assign(self.initial_targets.argmax(axis=1))
            return None
        q = self.model.soft_assign(self.x)
        labels = q.argmax(axis=1)
        self.targets.assign(target_distribution(q))
        self.labels.assign(labels)
        if previous[0] < 0:  # first refresh: nothing to compare with
            return None
        self.label_change = float(np.mean(labels != previous))
        if self.label_change < self.tol:
            raise StopTraining(f"{self.label_change:.3%} of the labels changed (tol {self.tol:.3%})")
        return {"label_change": self.label_change}

    def variables(self):
        if self.recon_weight:
            return list(self.model.trainable_variables)
        # DEC: the decoder takes no part in the clustering phase
        return list(self.model.encoder.trainable_variables) + list(self.model.clustering.trainable_variables)

    def _target(self, idx, q):
        if self.target == "batch":
            return batch_target_distribution(ops.stop_gradient(q))
        return ops.take(self.targets, idx, axis=0)

    def loss_terms(self, x, idx, scalars):
        if not self.recon_weight:
            q = self.model.clustering(self.model.encoder(x, training=True))
            kl = kl_divergence(self._target(idx, q), q)
            return {"loss": kl, "kl": kl}
        out = self.model(x, training=True)
        kl = kl_divergence(self._target(idx, out["q"]), out["q"])
        rec = mse_per_sample(x, out["reconstruction"])
        return {"loss": kl + self.recon_weight * rec, "kl": kl, "reconstruction": rec}

    def evaluate(self):
        row = {} if self.label_change is None else {"label_change": self.label_change}
        if self.y_eval is not None:
            m = evaluate_clustering(self.model.cluster(self.x_eval), self.y_eval)
            row.update({k: m[k] for k in ("acc", "nmi", "ari")})
        return row

    def trackables(self):
        return {"model": self.model, "targets": self.targets, "labels": self.labels}


class ClusteringModel(AutoencoderModel):
    """Shared behaviour of the clustering networks: an autoencoder (built by the
    subclass) and a Student's t :class:`~dcn.dec.layers.ClusteringLayer` on its
    embedding.

    Subclasses build ``self.encoder`` and ``self.decoder`` in ``__init__``,
    then call :meth:`_finish_init`; their ``get_config`` adds what their
    networks need.
    """

    def _finish_init(self, input_shape, n_clusters: int, embedding_dim: int, alpha: float = 1.0,
                     cluster_names=None):
        self.sample_shape = tuple(int(v) for v in input_shape)
        self.embedding_dim = int(embedding_dim)
        self.clustering = ClusteringLayer(n_clusters, alpha, name="clustering")
        self.clustering.build((None, self.embedding_dim))
        self.cluster_names = None if cluster_names is None else [
            None if c is None else str(c) for c in cluster_names]
        self.build((None, *self.sample_shape))

    @property
    def n_clusters(self) -> int:
        return self.clustering.n_clusters

    @property
    def centers(self) -> np.ndarray:
        return ops.convert_to_numpy(self.clustering.centers)

    def call(self, x, training=False):
        z = self.encoder(x, training=training)
        return {"reconstruction": self.decoder(z, training=training), "embedding": z,
                "q": self.clustering(z)}

    def predict_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        return self.clustering(self.encoder(x, training=False))

    def soft_assign(self, x, batch_size: int = 1024) -> np.ndarray:
        """Q: (samples, clusters) soft assignments."""
        return predict_in_batches(self, x, batch_size)

    def cluster(self, x, batch_size: int = 1024) -> np.ndarray:
        """Hard cluster of each sample (the most probable under Q)."""
        return self.soft_assign(x, batch_size).argmax(axis=1)

    def assign_embeddings(self, z, chunk: int = 1024) -> np.ndarray:
        """Q of embeddings ``z`` (computed in chunks: the layer broadcasts over
        samples x clusters x dimensions)."""
        z = np.asarray(z, np.float32)
        if not len(z):
            return np.zeros((0, self.n_clusters), np.float32)
        return np.concatenate([ops.convert_to_numpy(self.clustering(z[s:s + chunk]))
                               for s in range(0, len(z), chunk)])

    def init_centers(self, x, n_init: int = 20, seed: int = 0, method: str = "kmeans") -> np.ndarray:
        """Initial centres from a clustering of the embeddings; returns its labels.

        ``kmeans``: k-means with ``n_init`` restarts (DEC); ``umap_gmm``: UMAP of
        the embeddings to k dimensions and a Gaussian mixture (N2D,
        :func:`common.clustering.umap_gmm`, ``n_init`` starts), each centre the
        mean embedding of its cluster (a random sample's for an empty one).
        """
        from sklearn.cluster import KMeans

        if method not in CENTERS:
            raise UsageError(f"unknown initialisation of the centres '{method}'; choose "
                             f"{' or '.join(CENTERS)}")
        z = self.transform(x)
        if len(z) < self.n_clusters:
            raise UsageError(f"{len(z)} samples cannot make {self.n_clusters} clusters")
        if method == "kmeans":
            km = KMeans(n_clusters=self.n_clusters, n_init=n_init, random_state=seed).fit(z)
            self.clustering.centers.assign(km.cluster_centers_.astype(np.float32))
            return km.labels_
        from common.clustering import umap_gmm

        labels, _ = umap_gmm(z, self.n_clusters, seed, starts=n_init)
        rng = np.random.default_rng(seed)
        centers = np.stack([z[labels == k].mean(axis=0) if np.any(labels == k) else z[rng.integers(len(z))]
                            for k in range(self.n_clusters)])
        self.clustering.centers.assign(centers.astype(np.float32))
        return labels

    def evaluate_clusters(self, x, y=None, *, sample_size: int = 10000, seed: int = 0) -> dict:
        """Accuracy, NMI, ARI (with labels) and internal indices of the embedding."""
        z = self.transform(x)
        pred = self.assign_embeddings(z).argmax(axis=1)
        return evaluate_clustering(pred, y, features=z, sample_size=sample_size, seed=seed)

    def fit(self, x, y=None, *, max_iterations: int | None = None, max_epochs: float | None = None,
            update_interval: int | None = None, tol: float = 0.001, recon_weight: float = 10.0,
            eval_interval: int | None = None, eval_samples: int = 10000, seed: int = 0,
            target: str = "refresh", initial_targets=None, **loop):
        """The clustering phase (after :meth:`pretrain` and :meth:`init_centers`).

        The target P is refreshed every ``update_interval`` iterations (default
        ``min(140, one epoch)``); training stops when fewer than ``tol`` of the
        labels change between refreshes, or after ``max_iterations`` (default:
        ``max_epochs``, itself 73 by default; see :func:`clustering_schedule`).
        Log rows (every ``eval_interval`` iterations, default
        ``update_interval``) hold the loss terms, the share of labels that
        changed at the last refresh, and accuracy/NMI/ARI on ``eval_samples``
        fixed samples when labels ``y`` are given. ``target="batch"`` instead
        computes P from each mini-batch's own Q (RSWNet's published variant; no
        refresh and no ``tol`` stop). ``initial_targets``: the first P, until
        the first refresh (e.g. the one-hot labels :meth:`init_centers` returned,
        so that the network first learns the clustering the centres came from).
        Other keyword arguments go to
        :func:`common.training.train`. Returns its
        :class:`common.training.TrainResult`.
        """
        if recon_weight < 0 or tol < 0:
            raise UsageError("recon_weight and tol must be 0 or more")
        if target not in TARGETS:
            raise UsageError(f"unknown target '{target}'; choose {' or '.join(TARGETS)}")
        x = as_float32(x)
        update_interval, max_iterations = clustering_schedule(
            len(x), loop.get("batch_size", 256), update_interval, max_iterations, max_epochs)
        with (loop.get("strategy") or _default_strategy()).scope():
            task = ClusteringTask(self, x, recon_weight=recon_weight, tol=tol, y=y,
                                  eval_samples=eval_samples, seed=seed, target=target,
                                  initial_targets=initial_targets)
        refresh = update_interval if target == "refresh" else None
        return train(task, x, iterations=max_iterations, eval_interval=eval_interval or update_interval,
                     refresh_interval=refresh, seed=seed, **loop)

    def get_config(self):
        config = super().get_config()
        config.update(input_shape=list(self.sample_shape), n_clusters=self.n_clusters,
                      alpha=self.clustering.alpha, cluster_names=self.cluster_names)
        return config


@keras.saving.register_keras_serializable(package="dcn")
class DCN(ClusteringModel):
    """Deep clustering network: autoencoder + Student's t clustering layer.

    Args:
        input_shape: (features,) for vectors or (height, width, channels) for
            images.
        n_clusters: number of clusters.
        embedding_dim: size of the embedding (10 in DEC/IDEC/DCEC).
        architecture: ``conv`` (DCEC: stride-2 convolutions ``filters``) or
            ``mlp`` (DEC: dense ``hidden`` layers); default: conv for images.
        alpha: degrees of freedom of the Student's t kernel.
        cluster_names: optional name per cluster (set by naming; saved with
            the model so predictions can name classes in a new process).
        init: weight initialisation of the dense autoencoder: Keras'
            ``glorot_uniform`` or ``dec`` (DEC-keras' VarianceScaling).
    """

    def __init__(self, input_shape, n_clusters: int, embedding_dim: int = 10, architecture: str | None = None,
                 hidden=(500, 500, 2000), filters=(32, 64, 128), alpha: float = 1.0,
                 cluster_names=None, init: str = "glorot_uniform", **kwargs):
        kwargs.setdefault("name", "dcn")
        super().__init__(**kwargs)
        shape = tuple(int(v) for v in input_shape)
        architecture = architecture or ("conv" if len(shape) == 3 else "mlp")
        if architecture not in ARCHITECTURES:
            raise UsageError(f"unknown architecture '{architecture}'; choose conv or mlp")
        if architecture == "conv" and len(shape) != 3:
            raise UsageError(f"the convolutional autoencoder needs images, got samples of shape {shape}")
        self.architecture, self.init = architecture, init
        self.hidden, self.filters = tuple(int(h) for h in hidden), tuple(int(f) for f in filters)
        if architecture == "conv":
            self.encoder, self.decoder = dcec_autoencoder(shape, embedding_dim, self.filters)
        else:
            self.encoder, self.decoder = mlp_autoencoder(shape, embedding_dim, self.hidden, init=init)
        self._finish_init(shape, n_clusters, embedding_dim, alpha, cluster_names)

    def get_config(self):
        config = super().get_config()
        config.update(embedding_dim=self.embedding_dim, architecture=self.architecture,
                      hidden=list(self.hidden), filters=list(self.filters), init=self.init)
        return config


def _default_strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


def load_model(path) -> DCN:
    """Load a model saved with ``model.save(path)`` (a ``.keras`` file)."""
    return load_keras_model(path, DCN, "a DCN model")
