"""The autoencoder family of ``bin/ae``: plain, semi-supervised, variational, conditional.

* :class:`Autoencoder`: dense d-128-32 (mirrored decoder, sigmoid output,
  mean squared error); ``hidden=(500, 500, 2000), latent_dim=10`` is the
  DESOM/DEC size.
* :class:`SemiSupervisedAutoencoder`: the same + a classifier on the code
  (32-64-classes); loss ``alpha`` x reconstruction + ``beta`` x
  cross-entropy, the cross-entropy counted only on the labelled samples
  (label -1: unlabelled).
* :class:`VAE`: encoder d-400-128 with dropout to the posterior mean and
  log-variance (8-d), decoder to logits; loss binary cross-entropy (summed
  over the values) + ``beta`` x KL(q(z|x) || N(0, I)). Its embedding is the
  posterior mean.
* :class:`CVAE`: the VAE with a one-hot label joined to the encoder's input
  and to the code.

Every model keeps one Gaussian per cluster of its training codes
(:meth:`CodeModel.fit_clusters`, set by ``bin/ae`` after k-means), saved in
its ``.keras`` file, so that :meth:`CodeModel.generate` draws images from a
cluster in a new process. Training goes through the shared loop
(:func:`common.training.train`): progress, CSV log, checkpoints, resume,
strategies.
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
    gaussian_encoder,
    load_keras_model,
    logit_decoder,
    mlp_autoencoder,
    mlp_classifier,
    mse_per_sample,
)
from common.training import Task, train

MODELS = ("ae", "semisupervised", "vae", "cvae")


class AutoencoderTask(Task):
    """A model of this family on the shared loop: its own loss terms, with the
    batch's labels looked up by sample index (-1: unlabelled).

    ``evaluate``: k-means (k = the model's clusters) on the codes of
    ``x_eval``, scored against ``y_eval`` (reporting only; training never sees
    those labels unless the model is (semi-)supervised).
    """

    def __init__(self, model: CodeModel, labels=None, x_eval=None, y_eval=None, y_eval_known=None,
                 seed: int = 0):
        self.model, self.seed = model, seed
        self.labels = None
        self.labeled_fraction = 1.0
        if labels is not None:
            labels = np.asarray(labels, np.int32)
            self.labeled_fraction = float(np.mean(labels >= 0))
            if self.labeled_fraction == 0:
                raise UsageError("no labelled sample to train the classifier on")
            self.labels = ops.convert_to_tensor(labels)
        self.x_eval, self.y_eval, self.y_eval_known = x_eval, y_eval, y_eval_known

    def loss_terms(self, x, idx, scalars):
        y = None if self.labels is None else ops.take(self.labels, idx, axis=0)
        return self.model.loss_terms(x, y, labeled_fraction=self.labeled_fraction)

    def evaluate(self):
        if self.x_eval is None or self.y_eval is None:
            return {}
        from sklearn.cluster import KMeans

        codes = self.model.embed(self.x_eval, self.y_eval_known)
        pred = KMeans(self.model.n_clusters, n_init=3, random_state=self.seed).fit_predict(codes)
        m = evaluate_clustering(pred, self.y_eval)
        out = {"kmeans_acc": m["acc"], "kmeans_nmi": m["nmi"]}
        if isinstance(self.model, SemiSupervisedAutoencoder):
            out["classifier_acc"] = float(np.mean(self.model.predict_classes(self.x_eval) == self.y_eval))
        return out


def _in_batches(fn, arrays, batch_size: int = 1024) -> np.ndarray:
    """``fn(*batch)`` (eager) over aligned arrays, concatenated."""
    n = len(arrays[0])
    out = [np.asarray(fn(*(a[s:s + batch_size] for a in arrays))) for s in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


class CodeModel(AutoencoderModel):
    """Shared behaviour: embedding, decoding, cluster Gaussians, generation, training.

    Subclasses build ``encoder`` / ``decoder`` in ``__init__`` and call
    :meth:`_finish_init`; they define ``loss_terms(x, y, labeled_fraction)``.
    """

    needs_labels = False     # training needs every sample's label (CVAE)
    uses_labels = False      # training uses some labels (semi-supervised, CVAE)
    n_classes = 0

    def _finish_init(self, input_shape, latent_dim, n_clusters):
        self.sample_shape = tuple(int(v) for v in input_shape)
        self.latent_dim, self.n_clusters = int(latent_dim), int(n_clusters)
        if self.latent_dim < 1 or self.n_clusters < 1:
            raise UsageError(f"latent_dim and n_clusters must be positive, got {latent_dim} and {n_clusters}")
        k, d = self.n_clusters, self.latent_dim
        self.cluster_means = self.add_weight(shape=(k, d), initializer="zeros", trainable=False,
                                             name="cluster_means")
        self.cluster_scales = self.add_weight(shape=(k, d, d), initializer="zeros", trainable=False,
                                              name="cluster_scales")
        self.cluster_weights = self.add_weight(shape=(k,), initializer="zeros", trainable=False,
                                               name="cluster_weights")
        self.built = True  # every part is built here

    # -------------------------------------------------------------- helpers
    def _condition(self, y):
        """The decoder's/encoder's extra input for labels ``y`` (None: unconditional)."""
        return None

    def _check_labels(self, y, n):
        if self.needs_labels and y is None:
            raise UsageError(f"a {type(self).__name__} encodes and decodes with each sample's label; "
                             f"give the labels")
        if y is not None:
            y = np.asarray(y).ravel()
            if len(y) != n:
                raise UsageError(f"got {len(y)} labels for {n} samples")
            if self.n_classes and (y.min() < 0 or y.max() >= self.n_classes):
                raise UsageError(f"labels must be 0..{self.n_classes - 1}, got {y.min()}..{y.max()}")
        return y

    def _encode(self, x, y=None, training=False):
        """(mean, log-variance) for variational models; (code, None) otherwise."""
        return self.encoder(x, training=training), None

    def _decode(self, z, y=None, training=False):
        """Images in [0, 1] from codes."""
        return self.decoder(z, training=training)

    # -------------------------------------------------------------- queries
    def embed(self, x, y=None, batch_size: int = 1024) -> np.ndarray:
        """The codes used for clustering: the code (AE) or the posterior mean (VAE)."""
        x = as_float32(x)  # a DiskArray stays on disk, read a batch at a time
        y = self._check_labels(y, len(x))
        if y is None:
            return _in_batches(lambda xb: self._encode(xb)[0], [x], batch_size)
        return _in_batches(lambda xb, yb: self._encode(xb, yb)[0], [x, y], batch_size)

    def transform(self, x, batch_size: int = 1024) -> np.ndarray:
        return self.embed(x, batch_size=batch_size)

    def decode(self, z, y=None, batch_size: int = 1024) -> np.ndarray:
        """Images in [0, 1], shaped like the inputs, from codes ``z`` (and labels, CVAE)."""
        z = np.asarray(z, np.float32).reshape(-1, self.latent_dim)
        y = self._check_labels(y, len(z))
        if y is None:
            return _in_batches(lambda zb: self._decode(zb), [z], batch_size)
        return _in_batches(lambda zb, yb: self._decode(zb, yb), [z, y], batch_size)

    def reconstruct(self, x, y=None) -> np.ndarray:
        """Decoded codes of ``x`` (the posterior mean for variational models)."""
        return self.decode(self.embed(x, y), y)

    # ------------------------------------------------------------- clusters
    @property
    def has_clusters(self) -> bool:
        return bool(np.sum(ops.convert_to_numpy(self.cluster_weights)) > 0)

    def fit_clusters(self, codes, assignments):
        """Keep a Gaussian (mean, Cholesky factor of the covariance) per cluster.

        A ridge of 1e-3 of the cluster's mean variance (plus 1e-6 of all the
        codes') keeps every covariance positive definite; a cluster of fewer
        than two members gets 1e-3 of the codes' mean variance alone. Cluster
        ids must be 0..n_clusters-1.
        """
        codes = np.asarray(codes, np.float64).reshape(len(codes), -1)
        assignments = np.asarray(assignments).ravel()
        k, d = self.n_clusters, self.latent_dim
        if codes.shape[1] != d or len(assignments) != len(codes):
            raise UsageError(f"need codes of {d} values and one cluster per code")
        if len(assignments) and (assignments.min() < 0 or assignments.max() >= k):
            raise UsageError(f"cluster ids must be 0..{k - 1}")
        overall = float(np.mean(np.var(codes, axis=0))) + 1e-12
        means, scales = np.zeros((k, d)), np.zeros((k, d, d))
        weights = np.bincount(assignments, minlength=k) / max(len(assignments), 1)
        for c in range(k):
            members = codes[assignments == c]
            means[c] = members.mean(axis=0) if len(members) else codes.mean(axis=0)
            if len(members) > 1:
                cov = np.cov(members, rowvar=False).reshape(d, d)
                ridge = 1e-3 * float(np.mean(np.diag(cov))) + 1e-6 * overall
            else:
                cov, ridge = np.zeros((d, d)), 1e-3 * overall
            scales[c] = np.linalg.cholesky(cov + ridge * np.eye(d))
        self.cluster_means.assign(means.astype(np.float32))
        self.cluster_scales.assign(scales.astype(np.float32))
        self.cluster_weights.assign(weights.astype(np.float32))

    def sample_codes(self, n: int, cluster: int | None = None, seed: int = 0) -> np.ndarray:
        """``n`` codes from cluster ``cluster``'s Gaussian, or (None) from the
        mixture of all clusters weighted by their sizes."""
        if not self.has_clusters:
            raise UsageError("this model has no clusters yet (bin/ae stores them after k-means on its codes)")
        rng = np.random.default_rng(seed)
        means, scales = (ops.convert_to_numpy(v) for v in (self.cluster_means, self.cluster_scales))
        if cluster is None:
            weights = ops.convert_to_numpy(self.cluster_weights).astype(np.float64)
            picks = rng.choice(self.n_clusters, size=n, p=weights / weights.sum())
        else:
            if not 0 <= cluster < self.n_clusters:
                raise UsageError(f"cluster {cluster} does not exist; this model has clusters "
                                 f"0..{self.n_clusters - 1}")
            picks = np.full(n, cluster)
        eps = rng.standard_normal((n, self.latent_dim))
        return (means[picks] + np.einsum("nij,nj->ni", scales[picks], eps)).astype(np.float32)

    def generate(self, n: int = 16, cluster: int | None = None, label: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """``n`` new images in [0, 1]: from cluster ``cluster``'s Gaussian, or
        with no cluster from the prior (VAE) or the mixture of clusters (AE);
        a CVAE draws codes from the prior and decodes them with ``label``."""
        if n < 1:
            raise UsageError(f"the number of images must be positive, got {n}")
        if label is not None:
            raise UsageError(f"a {type(self).__name__} is not conditioned on labels; use a cluster instead")
        return self.decode(self.sample_codes(n, cluster, seed))

    # ------------------------------------------------------------- training
    def fit(self, x, labels=None, *, epochs: float = 20, y_eval=None, eval_samples: int = 2000,
            seed: int = 0, **loop):
        """Train on ``x`` for ``epochs`` epochs.

        ``labels``: what training may use (-1 where unknown): a few for the
        semi-supervised model, all for the CVAE, ignored otherwise. ``y_eval``
        (optional, every sample's true label): each log row then scores
        k-means on the codes of ``eval_samples`` fixed samples (reporting
        only). Other keyword arguments go to :func:`common.training.train`.
        """
        x = as_float32(x)
        if labels is not None and len(labels) != len(x):
            raise UsageError(f"got {len(labels)} labels for {len(x)} samples")
        if self.needs_labels:
            labels = self._check_labels(labels, len(x))
        elif not self.uses_labels:
            labels = None
        elif labels is None:
            raise UsageError(f"a {type(self).__name__} needs labels for some samples (-1 for the others)")
        pick = np.sort(np.random.default_rng(seed).choice(len(x), size=min(eval_samples, len(x)),
                                                          replace=False))
        task = AutoencoderTask(
            self, labels, x_eval=x[pick] if y_eval is not None else None,
            y_eval=None if y_eval is None else np.asarray(y_eval)[pick],
            y_eval_known=None if not self.needs_labels else np.asarray(labels)[pick], seed=seed)
        return train(task, x, epochs=epochs, seed=seed, **loop)

    def get_config(self):
        config = super().get_config()
        config.update(input_shape=list(self.sample_shape), latent_dim=self.latent_dim,
                      n_clusters=self.n_clusters)
        return config


@keras.saving.register_keras_serializable(package="dcn")
class Autoencoder(CodeModel):
    """Dense autoencoder with a sigmoid output, trained on the mean squared error.

    Args:
        input_shape: shape of one sample (values in [0, 1]).
        latent_dim: size of the code (32; DESOM/DEC: 10).
        hidden: encoder layer sizes, mirrored by the decoder ((128,); DESOM/DEC:
            (500, 500, 2000)).
        n_clusters: number of cluster Gaussians kept for generation.
    """

    def __init__(self, input_shape=(784,), latent_dim: int = 32, hidden=(128,), n_clusters: int = 10,
                 **kwargs):
        kwargs.setdefault("name", "ae")
        super().__init__(**kwargs)
        self.hidden = tuple(int(h) for h in hidden)
        self.encoder, self.decoder = mlp_autoencoder(input_shape, latent_dim, self.hidden,
                                                     output_activation="sigmoid", name="ae")
        self._finish_init(input_shape, latent_dim, n_clusters)

    def call(self, x, training=False):
        z = self.encoder(x, training=training)
        return {"latent": z, "reconstruction": self.decoder(z, training=training)}

    def loss_terms(self, x, y=None, labeled_fraction: float = 1.0):
        rec = mse_per_sample(x, self(x, training=True)["reconstruction"])
        return {"loss": rec, "reconstruction": rec}

    def get_config(self):
        config = super().get_config()
        config.update(hidden=list(self.hidden))
        return config


@keras.saving.register_keras_serializable(package="dcn")
class SemiSupervisedAutoencoder(Autoencoder):
    """Autoencoder + classifier on the code, trained with a few labels.

    Loss per sample: ``alpha`` x reconstruction error + ``beta`` x
    cross-entropy x [labelled] / (labelled share of the training set): the
    batch mean of the second term is then the mean cross-entropy over the
    labelled samples in expectation, whatever the share.

    Args:
        n_classes: classes of the classifier.
        classifier: hidden layer sizes of the classifier ((64,): 32-64-10).
        alpha, beta: weights of the reconstruction and classification terms.
        Others as :class:`Autoencoder`.
    """

    uses_labels = True

    def __init__(self, input_shape=(784,), n_classes: int = 10, latent_dim: int = 32, hidden=(128,),
                 classifier=(64,), alpha: float = 1.0, beta: float = 1.0, n_clusters: int = 10, **kwargs):
        kwargs.setdefault("name", "semisupervised_ae")
        self.n_classes = int(n_classes)
        self.classifier_hidden = tuple(int(h) for h in classifier)
        self.alpha, self.beta = float(alpha), float(beta)
        super().__init__(input_shape, latent_dim, hidden, n_clusters, **kwargs)
        self.classifier = mlp_classifier(self.latent_dim, self.n_classes, self.classifier_hidden)

    def call(self, x, training=False):
        out = super().call(x, training=training)
        out["logits"] = self.classifier(out["latent"], training=training)
        return out

    def loss_terms(self, x, y=None, labeled_fraction: float = 1.0):
        out = self(x, training=True)
        rec = mse_per_sample(x, out["reconstruction"])
        labeled = ops.cast(y >= 0, "float32")
        ce = ops.sparse_categorical_crossentropy(ops.maximum(y, 0), out["logits"], from_logits=True)
        ce = labeled * ce / float(labeled_fraction)
        return {"loss": self.alpha * rec + self.beta * ce, "reconstruction": rec, "cross_entropy": ce}

    def predict_classes(self, x, batch_size: int = 1024) -> np.ndarray:
        """The classifier's class of each sample."""
        codes = self.embed(x, batch_size=batch_size)
        return _in_batches(lambda zb: ops.argmax(self.classifier(zb), axis=1), [codes], batch_size)

    def get_config(self):
        config = super().get_config()
        config.update(n_classes=self.n_classes, classifier=list(self.classifier_hidden), alpha=self.alpha,
                      beta=self.beta)
        return config


@keras.saving.register_keras_serializable(package="dcn")
class VAE(CodeModel):
    """Variational autoencoder with a Bernoulli decoder.

    Loss per sample: binary cross-entropy of the decoded logits summed over
    the values + ``beta`` x KL(N(mean, exp(log_var)) || N(0, I)), with one
    reparameterised sample of the code.

    Args:
        input_shape: shape of one sample (values in [0, 1]).
        latent_dim: size of the code (8).
        hidden: encoder layer sizes ((400, 128)); the decoder mirrors them.
        dropout: dropout after each encoder layer (0.2).
        beta: weight of the KL term (1: the VAE's evidence lower bound).
        n_clusters: number of cluster Gaussians kept for generation.
    """

    draws_random_numbers = True  # the reparameterised sample: XLA is slower for it on a CPU

    def __init__(self, input_shape=(784,), latent_dim: int = 8, hidden=(400, 128), dropout: float = 0.2,
                 beta: float = 1.0, n_clusters: int = 10, **kwargs):
        kwargs.setdefault("name", "vae")
        super().__init__(**kwargs)
        self.hidden, self.dropout, self.beta = tuple(int(h) for h in hidden), float(dropout), float(beta)
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        condition = self.n_classes
        self.encoder = gaussian_encoder(input_shape, latent_dim, self.hidden, self.dropout, condition)
        self.decoder = logit_decoder(input_shape, latent_dim, tuple(reversed(self.hidden)), condition)
        self.noise = keras.random.SeedGenerator(name="noise")
        self._finish_init(input_shape, latent_dim, n_clusters)

    def _inputs(self, a, y):
        c = self._condition(y)
        return a if c is None else [ops.convert_to_tensor(a, "float32"), c]

    def _encode(self, x, y=None, training=False):
        mean, log_var = self.encoder(self._inputs(x, y), training=training)
        return mean, log_var

    def _logits(self, z, y=None, training=False):
        return self.decoder(self._inputs(z, y), training=training)

    def _decode(self, z, y=None, training=False):
        return ops.sigmoid(self._logits(z, y, training))

    def call(self, x, training=False):
        mean, log_var = self._encode(x, training=training)
        return {"mean": mean, "log_var": log_var, "reconstruction": self._decode(mean)}

    def loss_terms(self, x, y=None, labeled_fraction: float = 1.0):
        mean, log_var = self._encode(x, y, training=True)
        z = mean + ops.exp(0.5 * log_var) * keras.random.normal(ops.shape(mean), seed=self.noise)
        logits = self._logits(z, y, training=True)
        x = ops.cast(x, "float32")
        bce = ops.binary_crossentropy(x, logits, from_logits=True)
        bce = ops.sum(ops.reshape(bce, (ops.shape(bce)[0], -1)), axis=1)
        kl = gaussian_kl(mean, log_var)
        return {"loss": bce + self.beta * kl, "bce": bce, "kl": kl}

    def generate(self, n: int = 16, cluster: int | None = None, label: int | None = None,
                 seed: int = 0) -> np.ndarray:
        if cluster is None and label is None:  # the prior
            eps = np.random.default_rng(seed).standard_normal((n, self.latent_dim)).astype(np.float32)
            return self.decode(eps)
        return super().generate(n, cluster, label, seed)

    def get_config(self):
        config = super().get_config()
        config.update(hidden=list(self.hidden), dropout=self.dropout, beta=self.beta)
        return config


@keras.saving.register_keras_serializable(package="dcn")
class CVAE(VAE):
    """Conditional VAE: the one-hot label joins the encoder's input and the code.

    Args:
        n_classes: number of labels. Others as :class:`VAE`.
    """

    needs_labels = uses_labels = True

    def __init__(self, input_shape=(784,), n_classes: int = 10, latent_dim: int = 8, hidden=(400, 128),
                 dropout: float = 0.2, beta: float = 1.0, n_clusters: int = 10, **kwargs):
        kwargs.setdefault("name", "cvae")
        self.n_classes = int(n_classes)
        if self.n_classes < 2:
            raise UsageError(f"a CVAE needs at least 2 classes, got {n_classes}")
        super().__init__(input_shape, latent_dim, hidden, dropout, beta, n_clusters, **kwargs)

    def _condition(self, y):
        if y is None:
            raise UsageError("a CVAE needs each sample's label")
        return ops.one_hot(ops.cast(y, "int32"), self.n_classes)

    def call(self, inputs, training=False):
        x, y = inputs
        mean, log_var = self._encode(x, y, training=training)
        return {"mean": mean, "log_var": log_var, "reconstruction": self._decode(mean, y)}

    def functional_view(self) -> keras.Model:
        x = keras.Input(self.sample_shape, name="input")
        y = keras.Input((), dtype="int32", name="label")
        return keras.Model([x, y], self.call([x, y]), name=self.name)

    def generate(self, n: int = 16, cluster: int | None = None, label: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """``n`` images of class ``label``: codes from the prior, decoded with the label."""
        if n < 1:
            raise UsageError(f"the number of images must be positive, got {n}")
        if label is None or not 0 <= label < self.n_classes:
            raise UsageError(f"a CVAE generates images of a class: give a label in 0..{self.n_classes - 1}")
        if cluster is not None:
            raise UsageError("a CVAE generates from a class label, not from a cluster")
        eps = np.random.default_rng(seed).standard_normal((n, self.latent_dim)).astype(np.float32)
        return self.decode(eps, np.full(n, label))

    def get_config(self):
        config = super().get_config()
        config.update(n_classes=self.n_classes)
        return config


def gaussian_kl(mean, log_var):
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) of each sample, summed over the code."""
    return -0.5 * ops.sum(1.0 + log_var - ops.square(mean) - ops.exp(log_var), axis=1)


def labeled_subset(y, fraction: float, seed: int = 0) -> np.ndarray:
    """Labels with all but a stratified ``fraction`` replaced by -1 (at least
    one labelled sample per class); the choice depends only on ``seed``."""
    y = np.asarray(y).ravel()
    if not 0 < fraction <= 1:
        raise UsageError(f"--labeled_fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    out = np.full(len(y), -1, np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        keep = rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False)
        out[keep] = y[keep]
    return out


def build(kind: str, input_shape, n_classes: int, *, latent_dim: int | None = None, hidden=None,
          beta: float = 1.0, alpha: float = 1.0, n_clusters: int = 10, dropout: float = 0.2) -> CodeModel:
    """A model of ``kind`` (one of :data:`MODELS`) with the issue's defaults
    where ``latent_dim`` / ``hidden`` are None."""
    if kind == "ae":
        return Autoencoder(input_shape, latent_dim or 32, hidden or (128,), n_clusters)
    if kind == "semisupervised":
        return SemiSupervisedAutoencoder(input_shape, n_classes, latent_dim or 32, hidden or (128,),
                                         alpha=alpha, beta=beta, n_clusters=n_clusters)
    if kind == "vae":
        return VAE(input_shape, latent_dim or 8, hidden or (400, 128), dropout, beta, n_clusters)
    if kind == "cvae":
        return CVAE(input_shape, n_classes, latent_dim or 8, hidden or (400, 128), dropout, beta, n_clusters)
    raise UsageError(f"unknown model '{kind}'; choose one of {', '.join(MODELS)}")


def load_model(path) -> CodeModel:
    """Load a model written by ``bin/ae`` (a ``.keras`` file)."""
    return load_keras_model(path, CodeModel, "an autoencoder of bin/ae")
