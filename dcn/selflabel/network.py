"""The self-labelling classifier and the tasks it trains on.

* :class:`SelfLabelNet`: a CNN feature extractor and a classifier head
  (``bin/selflabel``'s model);
* :class:`PseudoLabelTask`: smoothed cross-entropy on pseudo-labels;
* :class:`NeighbourTask`: SCAN's loss, an image and one of its nearest
  neighbours should get the same class, with an entropy term that keeps the
  classes in use;
* :class:`ContrastiveTask`: SimCLR's NT-Xent on two augmented views
  (contrastive pretraining of the features);
* :func:`augmenter`: the augmentation layers the loop applies to each batch.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from common.errors import UsageError
from common.networks import cnn_features, load_keras_model, mlp_classifier, predict_in_batches
from common.training import Task, batch_mean, layers_of

AUGMENTATIONS = ("translate", "flip", "rotate", "zoom", "noise", "crop", "contrast", "brightness")
#: The two views of contrastive pretraining (SimCLR's crops, flips and intensity jitter, for grey images).
CONTRASTIVE_AUGMENT = ("crop", "translate", "flip", "contrast", "brightness")
#: The loop's augmentation (--augment): the same kinds. On Fashion-MNIST, from the same first labels of 5
#: seeds, test accuracy 0.707 +- 0.008 against 0.674 +- 0.023 with shifts and flips alone, both before the
#: final class shift (README).
AUGMENT = ("translate", "flip", "crop", "contrast", "brightness")


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
