"""Self-labelling: a CNN classifier trained on its own, iteratively refined pseudo-labels.

No ground-truth label enters training or the choice of the model; labels,
where the data have them, are only scored against, after the fact.

1. **Initial pseudo-labels** (:func:`initial_features`): codes of an
   autoencoder (``ae``, DEC/DESOM size), of DESOM (``desom``), the
   randomly initialised CNN's own features (``random``, as in DeepCluster),
   or the CNN's convolutional features after contrastive pretraining
   (``contrastive``: SimCLR, Chen et al. 2020, as SCAN starts; the
   classifier then trains on from those weights);
   optionally reduced with UMAP (``manifold="umap"``: N2D, McConville et al.
   2020), then clustered by a Gaussian mixture or k-means. Each sample gets a
   label and a confidence (its posterior, or its k-means margin).
2. **Training** (:func:`refine`): the :class:`SelfLabelNet` classifier
   learns the pseudo-labels of the most confident share of each cluster
   (:func:`select_confident`; balanced by construction), with data
   augmentation and label smoothing, ``epochs_per_iteration`` epochs per
   iteration on the shared training loop.
   Then, with ``neighbours`` (:func:`nearest_neighbours` of the initial
   features), ``knn_epochs`` epochs of SCAN's clustering loss
   (:class:`NeighbourTask`, Van Gansbeke et al. 2020): every image and one
   of its nearest neighbours should get the same class, and the batch's mean
   prediction should stay spread over the classes. The neighbours carry
   what the first clustering lost (on Fashion-MNIST 81 % of the 20 nearest
   autoencoder codes share the image's class; the Gaussian mixture's labels
   of the same codes were 60-68 % right over three seeds).
3. **Relabelling** every ``recluster_interval`` iterations: the classifier's
   own predictions, made balanced with Sinkhorn-Knopp as in SeLa (Asano et
   al. 2020; :func:`balanced_labels`), or k-means on its L2-normalised
   features started from the previous clusters' centres (DeepCluster).
   New labels are aligned to the previous ones by the Hungarian method
   (:func:`align_labels`); the share that kept its label is the *aligned
   stability* (:func:`aligned_stability`). Training stops when it reaches
   ``convergence_threshold``.

The model kept at the end is the iteration with the highest aligned
stability (an unsupervised criterion; ties go to the later iteration).
``bin/selflabel`` then adds :func:`class_offsets` of its predictions on the
training images to its logits (:meth:`SelfLabelNet.shift_classes`), so that
it predicts the balanced partition step 3 would make of them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import keras
import numpy as np
from keras import ops

from common.clustering import kmeans_labels
from common.errors import UsageError
from common.networks import cnn_features, load_keras_model, mlp_classifier, predict_in_batches
from common.results import atomic_path
from common.runtime import from_chief, is_chief
from common.training import Task, batch_mean, layers_of, train

INITS = ("ae", "desom", "random", "contrastive")
MANIFOLDS = ("umap", "none")
SELECTIONS = ("probability", "neighbours")
RELABELS = ("predict", "cluster")
AUGMENTATIONS = ("translate", "flip", "rotate", "zoom", "noise", "crop", "contrast", "brightness")
#: The CNN after contrastive pretraining, in a run's folder (where the loop starts from; for --resume
#: and --first_labels).
INIT_MODEL = "init_model.keras"
#: The two views of contrastive pretraining (SimCLR's crops, flips and intensity jitter, for grey images).
CONTRASTIVE_AUGMENT = ("crop", "translate", "flip", "contrast", "brightness")
#: The loop's augmentation (--augment): the same kinds. On Fashion-MNIST, from the same first labels of 5
#: seeds, test accuracy 0.707 +- 0.008 against 0.674 +- 0.023 with shifts and flips alone, both before the
#: final class shift (README).
AUGMENT = ("translate", "flip", "crop", "contrast", "brightness")
#: Optimizer steps an iteration takes at least (its epochs are stretched to reach them). On the 1,347
#: training digits 2 epochs were 6 steps, after which the classifier predicted its labels at chance and
#: its relabelling replaced them (test accuracy 0.86 -> 0.51); with 200, 300 or 500 steps it ended at
#: 0.924 / 0.922 / 0.918. On Fashion-MNIST's 60,000 an iteration takes 234 steps or more already.
MIN_STEPS = 200
#: Share of the labels it trained on that the classifier must predict (after the neighbour phase) before
#: it relabels; below it, the iteration trains again, FIT_ROUNDS rounds at most. Not higher: on
#: Fashion-MNIST the classifier of iteration 0 predicts 69 % of its first labels, and where it departs
#: from them it is more often right than they are (test accuracy 0.695, the labels 0.628).
FIT_THRESHOLD = 0.5
FIT_ROUNDS = 3


@keras.saving.register_keras_serializable(package="dcn")
class SelfLabelNet(keras.Model):
    """CNN feature extractor + classifier head, for learning from pseudo-labels.

    ``predict(x)`` gives each sample's class probabilities.

    Args:
        input_shape: (height, width, channels) of the images.
        n_clusters: number of pseudo-classes.
        filters: convolution blocks of the feature extractor
            (:func:`common.networks.cnn_features`; 32-64-128).
        dense: its dense layers, the last one the L2-normalised feature size
            (512-256).
        head: hidden layers of the classifier on the features (128).
        cluster_names: optional name per cluster (set after training from a
            labelled split, for reports and ``predict``).

    Input shape: ``(batch, height, width, channels)``.
    Output shape: ``(batch, n_clusters)``.
    """

    def __init__(self, input_shape=(28, 28, 1), n_clusters: int = 10, filters=(32, 64, 128), dense=(512, 256),
                 head=(128,), cluster_names=None, **kwargs):
        kwargs.setdefault("name", "selflabel")
        super().__init__(**kwargs)
        self.sample_shape = tuple(int(v) for v in input_shape)
        if len(self.sample_shape) != 3:
            raise UsageError(f"SelfLabelNet needs images (height, width, channels), got {self.sample_shape}")
        if n_clusters < 2:
            raise UsageError(f"n_clusters must be at least 2, got {n_clusters}")
        self.n_clusters = int(n_clusters)
        self.filters, self.dense_units = tuple(int(f) for f in filters), tuple(int(d) for d in dense)
        self.head_units = tuple(int(h) for h in head)
        self.features = cnn_features(self.sample_shape, self.filters, self.dense_units)
        self.classifier = mlp_classifier(self.dense_units[-1], self.n_clusters, self.head_units)
        self.cluster_names = None if cluster_names is None else [str(c) for c in cluster_names]
        self.build((None, *self.sample_shape))

    def build(self, input_shape):  # every part is built in __init__
        self.built = True

    def logits(self, x, training=False):
        return self.classifier(self.features(x, training=training), training=training)

    def call(self, x, training=False):
        return ops.softmax(ops.cast(self.logits(x, training=training), "float32"), axis=-1)

    def predict_step(self, data):
        return self(data[0] if isinstance(data, (tuple, list)) else data)

    def functional_view(self) -> keras.Model:
        inputs = keras.Input(self.sample_shape, name="input")
        return keras.Model(inputs, self.classifier(self.features(inputs)), name=self.name)

    def predict_proba(self, x, batch_size: int = 1024) -> np.ndarray:
        """(samples, clusters) class probabilities."""
        return predict_in_batches(self, x, batch_size)

    def embed(self, x, batch_size: int = 1024) -> np.ndarray:
        """The L2-normalised features of ``x``."""
        return predict_in_batches(self.features, x, batch_size)

    def embed_conv(self, x, batch_size: int = 1024) -> np.ndarray:
        """The L2-normalised output of the convolutional blocks (before the
        dense layers) of ``x``: after contrastive pretraining, where nearest
        neighbours are likeliest to share a class."""
        f = self.features
        unit = keras.layers.UnitNormalization(name="l2_normalise_conv")(f.get_layer("flatten").output)
        return predict_in_batches(keras.Model(f.input, unit, name="conv_features"), x, batch_size)

    def shift_classes(self, offsets):
        """Add ``offsets`` (one per class) to the logits, in the last layer's
        bias: e.g. :func:`class_offsets`, a prior correction saved with the
        model."""
        bias = self.classifier.get_layer("logits").bias
        offsets = np.asarray(offsets, np.float32).reshape(-1)
        if offsets.shape != tuple(bias.shape):
            raise ValueError(f"need {bias.shape[0]} offsets, one per class, got {offsets.shape[0]}")
        bias.assign(np.asarray(bias, np.float32) + offsets)

    def get_config(self):
        config = super().get_config()
        config.update(input_shape=list(self.sample_shape), n_clusters=self.n_clusters,
                      filters=list(self.filters), dense=list(self.dense_units), head=list(self.head_units),
                      cluster_names=self.cluster_names)
        return config


def load_model(path) -> SelfLabelNet:
    """Load a model written by ``bin/selflabel`` (a ``.keras`` file)."""
    return load_keras_model(path, SelfLabelNet, "a self-labelling model")


# --------------------------------------------------------------------------- #
# Pseudo-labels
# --------------------------------------------------------------------------- #
def align_labels(new, previous, n_clusters: int) -> np.ndarray:
    """``new`` with its ids renamed to agree best with ``previous`` (Hungarian
    matching on the K x K contingency table; every id gets a partner)."""
    from scipy.optimize import linear_sum_assignment

    new, previous = np.asarray(new, np.int64), np.asarray(previous, np.int64)
    if new.shape != previous.shape:
        raise ValueError(f"labellings of different lengths: {new.shape} and {previous.shape}")
    k = int(n_clusters)
    table = np.bincount(new * k + previous, minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(-table)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping[new]


def aligned_stability(new, previous, n_clusters: int) -> float:
    """Share of samples whose label survives a relabelling, after aligning the
    new ids to the old ones (1.0 for a permuted copy of the same labelling)."""
    previous = np.asarray(previous)
    return float(np.mean(align_labels(new, previous, n_clusters) == previous)) if len(previous) else 1.0


def balanced_labels(probs, power: float = 10.0, iterations: int = 100) -> np.ndarray:
    """Labels of an equal-size partition close to the probabilities (SeLa).

    Sinkhorn-Knopp scales ``probs ** power`` until every column (cluster)
    sums to N/K and every row to 1; each sample takes the argmax of its row.
    A larger ``power`` stays closer to the plain argmax. This assumes
    clusters of about equal size (true of Fashion-MNIST and MNIST).
    """
    return _sinkhorn(probs, power, iterations)[0].argmax(axis=1)


def class_offsets(probs, power: float = 10.0, iterations: int = 100) -> np.ndarray:
    """Per-class shifts of the log-probabilities that make their argmax the
    :func:`balanced_labels` of ``probs`` (up to rounding).

    The Sinkhorn-Knopp scaling of a row does not change its argmax, so the
    balanced label of sample i is ``argmax_j(power * log p_ij + log c_j)``
    with ``c`` the product of the column scalings: ``log(c) / power`` added
    to a classifier's logits makes it predict that partition, on these
    samples and, as a fixed prior correction, on new ones.
    """
    log_c = _sinkhorn(probs, power, iterations)[1]
    return (log_c - log_c.mean()) / power


def _sinkhorn(probs, power: float, iterations: int):
    """(scaled matrix, log of the accumulated column scalings)."""
    p = np.asarray(probs, np.float64)
    n, k = p.shape
    logq = power * np.log(np.clip(p, 1e-30, None))
    q = np.exp(logq - logq.max(axis=1, keepdims=True))
    log_c = np.zeros(k)
    for _ in range(iterations):
        scale = (n / k) / np.maximum(q.sum(axis=0, keepdims=True), 1e-300)
        q *= scale
        log_c += np.log(scale[0])
        q /= q.sum(axis=1, keepdims=True)
    return q, log_c


def select_confident(labels, confidence, fraction: float, n_clusters: int) -> np.ndarray:
    """Mask of the ``fraction`` most confident members of each cluster (at
    least one per non-empty cluster), so every cluster keeps its share."""
    labels, confidence = np.asarray(labels), np.asarray(confidence)
    if not 0 < fraction <= 1:
        raise UsageError(f"the confident fraction must be in (0, 1], got {fraction}")
    keep = np.zeros(len(labels), bool)
    for k in range(n_clusters):
        members = np.flatnonzero(labels == k)
        if len(members):
            m = max(1, int(round(fraction * len(members))))
            keep[members[np.argsort(-confidence[members], kind="stable")[:m]]] = True
    return keep


def neighbour_agreement(labels, neighbours, confidence=None) -> np.ndarray:
    """Share of each sample's ``neighbours`` ((samples, k) indices) that carry
    its label; with ``confidence`` (values in [0, 1]), ties are broken by it
    (added at a weight below one neighbour's share, so the order of the
    shares is kept).

    A selection score for :func:`select_confident` that looks past the
    clustering's own posterior (SPICE's reliable labels, Niu et al. 2022):
    a label its neighbours in the initial features agree with is more often
    right.
    """
    labels = np.asarray(labels)
    neighbours = np.asarray(neighbours)
    share = np.mean(labels[neighbours] == labels[:, None], axis=1)
    if confidence is not None:
        share = share + np.clip(np.asarray(confidence, np.float64), 0.0, 1.0) / (2 * neighbours.shape[1])
    return share


def relabel(model: SelfLabelNet, x, previous, method: str = "predict", balance: bool = True, seed: int = 0,
            kmeans: str = "auto"):
    """New (labels, confidence) from the trained classifier, aligned to ``previous``.

    ``predict``: the classifier's predictions (balanced with Sinkhorn-Knopp
    when ``balance``), confidence = the probability of the chosen label;
    ``cluster``: k-means on the L2-normalised features started from the
    previous clusters' centres (backend ``kmeans``), confidence = the k-means
    margin.
    """
    k = model.n_clusters
    if method == "predict":
        p = model.predict_proba(x)
        labels = balanced_labels(p) if balance else p.argmax(axis=1)
        confidence = p[np.arange(len(p)), labels]
    elif method == "cluster":
        labels, confidence = kmeans_labels(model.embed(x), k, seed, init_labels=previous, backend=kmeans)
    else:
        raise UsageError(f"unknown relabelling '{method}'; choose {' or '.join(RELABELS)}")
    return align_labels(labels, previous, k), confidence


# --------------------------------------------------------------------------- #
# Initial features
# --------------------------------------------------------------------------- #
def initial_features(kind: str, x, model: SelfLabelNet | None = None, *, epochs: float = 50,
                     iterations: int = 10000, seed: int = 0, **loop) -> np.ndarray:
    """Features the first pseudo-labels come from.

    ``ae``: codes of a d-500-500-2000-10 autoencoder trained ``epochs`` epochs
    (phase ``init``, log ``init_log.csv``); ``desom``: codes of an 8x8 DESOM
    trained ``iterations`` iterations; ``random``: ``model``'s features at
    initialisation; ``contrastive``: ``model``'s convolutional features
    (:meth:`SelfLabelNet.embed_conv`) after ``epochs`` epochs of
    :class:`ContrastiveTask` (phase ``init``; the model keeps the trained
    weights). Other keyword arguments go to
    :func:`common.training.train`.
    """
    x = np.asarray(x, np.float32)
    if kind in ("random", "contrastive") and model is None:
        raise UsageError(f"--init {kind} needs the classifier")
    if kind == "random":
        return model.embed(x)
    if kind == "contrastive":
        with _scope(loop.get("strategy")):
            task = ContrastiveTask(model, augmenter(CONTRASTIVE_AUGMENT, seed))
            optimizer = keras.optimizers.Adam(0.001)
        train(task, x, epochs=epochs, seed=seed, optimizer=optimizer, phase="init", log_name="init_log.csv",
              **loop)
        # the convolutional output, not the dense features under the projection head: on Fashion-MNIST
        # after 15 epochs 83.5 % of an image's 20 nearest neighbours share its class there, 79.7 % in
        # the dense features (the untrained CNN's: 81.0 % and 79.8 %)
        return model.embed_conv(x)
    if kind == "ae":
        from dcn.autoencoders import Autoencoder

        with _scope(loop.get("strategy")):
            ae = Autoencoder(x.shape[1:], latent_dim=10, hidden=(500, 500, 2000), name="init_ae")
            optimizer = keras.optimizers.Adam(0.001)
        ae.fit(x, epochs=epochs, seed=seed, optimizer=optimizer, phase="init", log_name="init_log.csv",
               **loop)
        return ae.embed(x)
    if kind == "desom":
        from desom.models import DESOM

        flat = x.reshape(len(x), -1)
        with _scope(loop.get("strategy")):
            som = DESOM(flat.shape[1], map_size=(8, 8), name="init_desom")
            optimizer = keras.optimizers.Adam(0.001)
        som.init_prototypes(flat, method="random", seed=seed)
        som.fit(flat, iterations=iterations, seed=seed, optimizer=optimizer, phase="init",
                log_name="init_log.csv", **loop)
        return som.transform(flat)
    raise UsageError(f"unknown initialisation '{kind}'; choose {', '.join(INITS)}")


def _scope(strategy):
    """A fresh ``strategy.scope()`` (the current strategy's when None)."""
    import tensorflow as tf

    return (strategy or tf.distribute.get_strategy()).scope()


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
class PseudoLabelTask(Task):
    """Cross-entropy of the classifier against fixed pseudo-labels, with label smoothing."""

    def __init__(self, model: SelfLabelNet, labels, smoothing: float = 0.1):
        import tensorflow as tf

        self.model, self.smoothing = model, float(smoothing)
        self.labels = tf.Variable(np.asarray(labels, np.int32), trainable=False, name="pseudo_labels")

    def loss_terms(self, x, idx, scalars):
        k = self.model.n_clusters
        logits = ops.cast(self.model.logits(x, training=True), "float32")
        target = ops.one_hot(ops.take(self.labels, idx, axis=0), k)
        if self.smoothing:
            target = target * (1.0 - self.smoothing) + self.smoothing / k
        ce = -ops.sum(target * ops.log_softmax(logits, axis=-1), axis=-1)
        return {"loss": ce, "cross_entropy": ce}

    def trackables(self):
        return {"model": self.model, "labels": self.labels}


def nearest_neighbours(z, k: int = 20) -> np.ndarray:
    """(samples, k) indices of each sample's ``k`` nearest others in ``z``
    (Euclidean; at most samples - 1)."""
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, np.float32).reshape(len(z), -1)
    k = min(int(k), len(z) - 1)
    if k < 1:
        raise UsageError("nearest neighbours need at least 2 samples")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    return idx[:, 1:].astype(np.int32)


class NeighbourTask(Task):
    """SCAN's clustering loss on the classifier.

    Per image i of the batch, a neighbour j is drawn from ``neighbours[i]``
    (a fresh draw every step, fixed by ``seed`` and the step); the loss is
    ``-log <p_i, p_j>`` (agreement of their class probabilities) minus
    ``entropy_weight`` x the entropy of the batch's mean prediction (the
    same value on every sample; it keeps all classes in use). The
    neighbour's image gets ``augment`` as the batch does; both go through the
    network together (one batch-normalisation batch).

    Args:
        model: the :class:`SelfLabelNet`.
        x: every training image (the batch indices refer to it).
        neighbours: (samples, k) indices into ``x``.
    """

    def __init__(self, model: SelfLabelNet, x, neighbours, entropy_weight: float = 5.0, augment=None,
                 seed: int = 0):
        import tensorflow as tf

        neighbours = np.asarray(neighbours, np.int32)
        if neighbours.ndim != 2 or len(neighbours) != len(x):
            raise ValueError(f"need (samples, k) neighbours for {len(x)} samples, got {neighbours.shape}")
        self.model, self.entropy_weight, self.augment, self.seed = model, float(entropy_weight), augment, seed
        self.images = tf.Variable(np.asarray(x, np.float32), trainable=False, name="neighbour_images")
        self.neighbours = tf.Variable(neighbours, trainable=False, name="neighbours")

    def scalars(self, iteration):
        return {"iteration": iteration}

    def step_layers(self):
        return layers_of(self.augment)

    def loss_terms(self, x, idx, scalars):
        import tensorflow as tf

        idx = tf.cast(idx, tf.int32)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(scalars["iteration"], tf.int64)])
        column = tf.random.stateless_uniform(tf.shape(idx), seed, 0, tf.shape(self.neighbours)[1], tf.int32)
        xn = tf.gather(self.images, tf.gather_nd(self.neighbours, tf.stack([idx, column], axis=1)))
        if self.augment is not None:
            xn = self.augment(xn)
        logits = ops.cast(self.model.logits(ops.concatenate([x, xn], axis=0), training=True), "float32")
        p, pn = ops.split(ops.softmax(logits, axis=-1), 2, axis=0)
        agreement = -ops.log(ops.clip(ops.sum(p * pn, axis=-1), 1e-7, 1.0))
        mean = batch_mean(p)  # the global batch's, on several devices too
        entropy = -ops.sum(mean * ops.log(ops.clip(mean, 1e-7, 1.0)))
        entropy = entropy * ops.ones_like(agreement)
        return {"loss": agreement - self.entropy_weight * entropy, "agreement": agreement, "entropy": entropy}


def nt_xent(z1, z2, temperature: float):
    """SimCLR's NT-Xent loss of each pair (row i of ``z1`` and of ``z2``: two
    views of one image), Keras ops.

    The 2B views are L2-normalised; view a's logits are its cosine
    similarities to the 2B - 1 other views divided by ``temperature``, and
    its loss the cross-entropy of picking its partner among them. Returns the
    (B,) mean of the two views' losses.
    """
    z = ops.cast(ops.concatenate([z1, z2], axis=0), "float32")
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    n = ops.shape(z1)[0]
    sim = ops.matmul(z, ops.transpose(z)) / temperature
    sim = sim - 1e9 * ops.eye(2 * n)  # a view is not its own candidate
    partner = ops.concatenate([ops.arange(n) + n, ops.arange(n)], axis=0)
    log_p = ops.log_softmax(sim, axis=1)
    loss = -ops.take_along_axis(log_p, ops.expand_dims(partner, 1), axis=1)[:, 0]
    return 0.5 * (loss[:n] + loss[n:])


class ContrastiveTask(Task):
    """Contrastive pretraining of the classifier's feature extractor (SimCLR).

    Every image of the batch is augmented twice (``augment``, e.g.
    :data:`CONTRASTIVE_AUGMENT`); both views go through ``model.features``
    (one batch-normalisation batch) and a projection head, dense
    ``features``-``features``-``projection`` (ReLU between), used only here;
    the loss is :func:`nt_xent` of the two projections. Under a distribution
    strategy the negatives are the other views of the replica's own batch.

    Args:
        model: the :class:`SelfLabelNet` (its ``features`` are trained; the
            classifier head is not).
        augment: a batch function (:func:`augmenter`).
        temperature: of :func:`nt_xent` (SimCLR's range is 0.1-0.5).
        projection: output size of the projection head.
    """

    def __init__(self, model: SelfLabelNet, augment, temperature: float = 0.2, projection: int = 128):
        if augment is None:
            raise UsageError("contrastive pretraining needs augmentations (two views of each image)")
        if not temperature > 0:
            raise UsageError(f"the contrastive temperature must be positive, got {temperature}")
        self.model, self.augment, self.temperature = model, augment, float(temperature)
        width = model.dense_units[-1]
        self.head = keras.Sequential([keras.layers.Dense(width, activation="relu", name="projection_0"),
                                      keras.layers.Dense(int(projection), name="projection_1")],
                                     name="projection")
        self.head.build((None, width))

    def variables(self):
        return list(self.model.features.trainable_variables) + list(self.head.trainable_variables)

    def step_layers(self):
        return [self.head, *layers_of(self.augment)]

    def loss_terms(self, x, idx, scalars):
        views = ops.concatenate([self.augment(x), self.augment(x)], axis=0)
        z1, z2 = ops.split(self.head(self.model.features(views, training=True)), 2, axis=0)
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "nt_xent": loss}

    def trackables(self):
        return {"model": self.model, "head": self.head}


def augmenter(kinds, seed: int = 0):
    """A batch function for the loop's ``map_fn`` (a
    :class:`common.networks.Augmentation`, each layer with its own seed):
    shifts of 10 %, horizontal flips, rotations of 5 %, zooms of 10 %,
    Gaussian noise; ``crop``: zooms in by up to 60 % (a centred crop resized
    back); ``contrast``: contrast scaled by 0.5-1.5; ``brightness``: +-0.3
    added; clipped to [0, 1]. None when ``kinds`` is empty."""
    from common.networks import Augmentation

    layers = keras.layers
    make = {
        "translate": lambda s: layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=s),
        "flip": lambda s: layers.RandomFlip("horizontal", seed=s),
        "rotate": lambda s: layers.RandomRotation(0.05, fill_mode="constant", seed=s),
        "zoom": lambda s: layers.RandomZoom(0.1, fill_mode="constant", seed=s),
        "noise": lambda s: layers.GaussianNoise(0.02, seed=s),
        "crop": lambda s: layers.RandomZoom((-0.6, 0.0), fill_mode="constant", seed=s),
        # a factor (lower, upper) draws the contrast factor in [1 - lower, 1 + upper]
        "contrast": lambda s: layers.RandomContrast((0.5, 0.5), value_range=(0.0, 1.0), seed=s),
        "brightness": lambda s: layers.RandomBrightness(0.3, value_range=(0.0, 1.0), seed=s),
    }
    unknown = [k for k in kinds if k not in make]
    if unknown:
        raise UsageError(f"unknown augmentation {unknown[0]}; choose from {', '.join(AUGMENTATIONS)}")
    if not kinds:
        return None
    return Augmentation([make[k] for k in kinds], seed)


def iteration_stretch(n_trained: int, batch_size: int, epochs: float, min_steps: int) -> float:
    """How many times ``epochs`` an iteration trains so that it takes at
    least ``min_steps`` optimizer steps (1.0 when it already does)."""
    steps_per_epoch = max(1, n_trained // max(1, batch_size))
    return max(1.0, min_steps / (epochs * steps_per_epoch)) if min_steps else 1.0


def fraction_at(i: int, iterations: int, start: float, end: float) -> float:
    """The confident share of iteration ``i``: linear from ``start`` at
    iteration 0 to ``end`` at iteration ``iterations - 1``, then ``end``."""
    return start if iterations <= 1 else start + (end - start) * min(i, iterations - 1) / (iterations - 1)


def label_scores(labels, y) -> dict:
    """Accuracy, NMI, purity, ARI of a labelling against true labels (reporting)."""
    from common.metrics import evaluate_clustering

    m = evaluate_clustering(labels, y)
    return {k: m[k] for k in ("acc", "nmi", "purity", "ari")}


def refine(model: SelfLabelNet, x, labels, confidence, *, iterations: int = 10,
           epochs_per_iteration: float = 2, recluster_interval: int = 1, relabelling: str = "predict",
           kmeans: str = "auto",
           balance: bool = True, confident_fraction=(0.5, 1.0), fraction_iterations: int | None = None,
           smoothing: float = 0.1, threshold: float = 0.95, lr: float = 0.001, augment=None, neighbours=None,
           knn_epochs: float = 0,
           entropy_weight: float = 5.0, select: str = "probability", min_steps: int = MIN_STEPS,
           fit_threshold: float = FIT_THRESHOLD, save_dir=None, resume: bool = False,
           seed: int = 0, y=None, x_test=None, y_test=None, on_rows=None, **loop) -> list[dict]:
    """Iterations of training on pseudo-labels and relabelling (module docstring).

    Iteration i trains on labels L_i (its confident share) for
    ``epochs_per_iteration`` epochs with a fresh Adam (``lr``), then, given
    ``neighbours`` ((samples, k) indices into ``x``), ``knn_epochs`` epochs
    of :class:`NeighbourTask` on every image (phase ``iteration_<i>_knn``),
    saves ``iteration_<i>.keras`` and, on relabelling iterations (every
    ``recluster_interval``-th and the last, so that every model can be
    chosen by its stability), computes L_{i+1} (:func:`relabel` with
    ``relabelling``, ``balance`` and the k-means backend ``kmeans``) and its
    aligned stability against L_i. The confident share of each cluster rises linearly from
    ``confident_fraction[0]`` to ``[1]`` over ``fraction_iterations``
    iterations (default: all of them), then stays; it is chosen by the
    labels' confidence (``select="probability"``) or by
    :func:`neighbour_agreement` over ``neighbours`` (``"neighbours"``, ties
    by the confidence). With ``save_dir`` every
    iteration's labels are kept in ``pseudo_labels/`` and ``resume`` skips
    finished iterations (the one in progress resumes from its checkpoint).
    ``y`` / ``y_test`` (optional) are scored in each row, for reporting only.
    ``on_rows(rows)`` is called with every row so far after each iteration
    (to write history.csv). Returns the rows.
    """
    k = model.n_clusters
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection '{select}'; choose {' or '.join(SELECTIONS)}")
    if select == "neighbours" and neighbours is None:
        raise UsageError("selecting the confident share by neighbours needs the neighbours")
    x = np.asarray(x, np.float32)
    strategy = loop.get("strategy")
    save = None if save_dir is None else Path(save_dir)
    write = save is not None and is_chief(strategy)  # the other workers of a multi-worker run write nothing
    if write:
        (save / "pseudo_labels").mkdir(parents=True, exist_ok=True)
        (save / "logs").mkdir(exist_ok=True)
    rows, start = [], 0

    def shared(new_labels, new_confidence):
        # every worker trains on the chief's labels: equal sizes keep their steps in step
        return (from_chief(strategy, np.asarray(new_labels, np.int64)),
                from_chief(strategy, np.asarray(new_confidence, np.float64)))

    labels, confidence = shared(labels, confidence)
    if resume and save is not None:
        rows, start, labels, confidence = _resume_state(model, save, labels, confidence)
        if rows and rows[-1].get("stopped"):
            return rows
        if start and not (save / "pseudo_labels" / f"iteration_{start:02d}.npz").is_file():
            # written by an earlier version, which saved a non-relabelling iteration's labels only when the
            # next one began: do what the run would have done
            with np.load(save / "pseudo_labels" / f"iteration_{start - 1:02d}.npz") as f:
                previous, previous_confidence = f["labels"], f["confidence"]
            if start % recluster_interval and start != iterations:  # iteration start-1 kept its labels
                labels, confidence = shared(previous, previous_confidence)
            else:
                labels, confidence = shared(*relabel(model, x, previous, relabelling, balance, seed, kmeans))
                rows[-1]["stability"] = aligned_stability(labels, previous, k)
                if rows[-1]["stability"] >= threshold:
                    rows[-1]["stopped"] = f"aligned stability {rows[-1]['stability']:.4f} >= {threshold}"
                if write:
                    _save_labels(save / "pseudo_labels" / f"iteration_{start:02d}.npz", labels, confidence)
                if on_rows is not None:
                    on_rows(rows)
                if rows[-1].get("stopped"):
                    return rows
    knn = None
    if neighbours is not None and knn_epochs > 0:
        with _scope(loop.get("strategy")):
            knn = NeighbourTask(model, x, neighbours, entropy_weight, augment)
    for i in range(start, iterations):
        if write:
            _save_labels(save / "pseudo_labels" / f"iteration_{i:02d}.npz", labels, confidence)
        fraction = fraction_at(i, fraction_iterations or iterations, *confident_fraction)
        score = confidence if select == "probability" else neighbour_agreement(labels, neighbours, confidence)
        keep = select_confident(labels, score, fraction, k)
        phase = f"iteration_{i:02d}"
        stretch = iteration_stretch(int(keep.sum()), loop.get("batch_size", 256), epochs_per_iteration,
                                    min_steps)
        row = {"iteration": i, "confident_fraction": round(fraction, 4), "trained_on": int(keep.sum()),
               "epochs": round(epochs_per_iteration * stretch, 3), "seconds": 0.0}
        for attempt in range(FIT_ROUNDS):  # until the classifier fits the labels it trains on
            name = phase if attempt == 0 else f"{phase}_more{attempt}"
            with _scope(loop.get("strategy")):
                task = PseudoLabelTask(model, labels[keep], smoothing)
                optimizer = keras.optimizers.Adam(lr)
            result = train(task, x[keep], epochs=epochs_per_iteration * stretch, optimizer=optimizer,
                           save_dir=save, phase=name, log_name=f"logs/{name}.csv", resume=resume,
                           seed=seed + 1000 * i + 100 * attempt, map_fn=augment, **loop)
            row.update(loss=_last_value(result), seconds=round(row["seconds"] + result.seconds, 2))
            if knn is not None:
                with _scope(loop.get("strategy")):
                    optimizer = keras.optimizers.Adam(lr)
                knn.seed = seed + 1000 * i + 100 * attempt + 1
                knn_result = train(knn, x, epochs=knn_epochs * stretch, optimizer=optimizer, save_dir=save,
                                   phase=f"{name}_knn", log_name=f"logs/{name}_knn.csv", resume=resume,
                                   seed=knn.seed, map_fn=augment, **loop)
                row.update(knn_loss=_last_value(knn_result), agreement=_last_value(knn_result, "agreement"),
                           seconds=round(row["seconds"] + knn_result.seconds, 2))
            fitted = model.predict_proba(x[keep]).argmax(axis=1) == labels[keep]
            fit = float(from_chief(strategy, np.array([fitted.mean()]))[0])
            row.update(rounds=attempt + 1, fit=round(fit, 4))
            if fit >= fit_threshold:
                break
        if y is not None:
            row.update({f"label_{n}": v for n, v in label_scores(labels, y).items()})
            row["label_acc_trained_on"] = label_scores(labels[keep], np.asarray(y)[keep])["acc"]
        if x_test is not None and y_test is not None:
            pred = model.predict_proba(x_test).argmax(axis=1)
            row.update({f"test_{n}": v for n, v in label_scores(pred, y_test).items()})
        relabelled = (i + 1) % recluster_interval == 0 or i + 1 == iterations
        unfit = row["fit"] < fit_threshold
        if unfit:  # its predictions would replace labels it has not learned: no relabelling from it
            relabelled = False
            row["stopped"] = (f"the classifier fits only {row['fit']:.1%} of the labels it trains on after "
                              f"{row['rounds']} rounds of {row['epochs']:g} epochs (--fit_threshold "
                              f"{fit_threshold:g})")
        if relabelled:
            new, new_conf = shared(*relabel(model, x, labels, relabelling, balance, seed, kmeans))
            row["stability"] = aligned_stability(new, labels, k)
            labels, confidence = new, new_conf
        if relabelled and row["stability"] >= threshold:
            row["stopped"] = f"aligned stability {row['stability']:.4f} >= {threshold}"
        if write:  # the next labels first (the same ones when not relabelled): a finished model implies them
            from common.networks import save_keras_model

            _save_labels(save / "pseudo_labels" / f"iteration_{i + 1:02d}.npz", labels, confidence)
            save_keras_model(model, save / f"iteration_{i:02d}.keras")
            for done in (save / "checkpoints").glob(f"{phase}*"):
                shutil.rmtree(done, ignore_errors=True)
        rows.append(row)
        if on_rows is not None:
            on_rows(rows)
        if row.get("stopped"):
            break
    return rows


def _save_labels(path, labels, confidence):
    with atomic_path(path) as tmp:
        np.savez(tmp, labels=labels, confidence=confidence)


def best_iteration(rows: list[dict]) -> int:
    """The iteration with the highest aligned stability (later on ties; the
    last one when none was measured)."""
    scored = [(r["stability"], r["iteration"]) for r in rows if r.get("stability") is not None
              and not math.isnan(r["stability"])]
    return max(scored)[1] if scored else rows[-1]["iteration"]


def _last_value(result, column: str = "loss") -> float | None:
    """The last logged value of ``column`` in a training call's log."""
    import pandas as pd

    if result.log_path is None or not Path(result.log_path).is_file():
        return None
    log = pd.read_csv(result.log_path)
    values = log[column].dropna() if column in log else log.iloc[:0, 0]
    return None if values.empty else round(float(values.iloc[-1]), 5)


def _resume_state(model, save: Path, labels, confidence):
    """Rows of history.csv, the first unfinished iteration, its labels; the
    model gets the weights of the last finished iteration."""
    import pandas as pd

    history = save / "history.csv"
    rows = pd.read_csv(history).to_dict(orient="records") if history.is_file() else []
    rows = [{key: v for key, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in rows]
    # keep only iterations whose model was written
    rows = [r for r in rows if (save / f"iteration_{int(r['iteration']):02d}.keras").is_file()]
    start = len(rows)
    if start:
        model.set_weights(load_model(save / f"iteration_{start - 1:02d}.keras").get_weights())
    saved = save / "pseudo_labels" / f"iteration_{start:02d}.npz"
    if saved.is_file():
        with np.load(saved) as f:
            labels, confidence = f["labels"], f["confidence"]
    return rows, start, labels, confidence
