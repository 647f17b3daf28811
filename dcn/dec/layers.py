"""The clustering-layer mathematics of DEC / IDEC / DCEC, in one place.

* :class:`ClusteringLayer`: cluster centres mu_j as weights; the soft
  assignment of embedding z_i to cluster j is Student's t kernel
  q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha + 1) / 2), normalised over j.
* :func:`target_distribution`: DEC's sharpened target
  p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), with f_j = sum_i q_ij the
  soft cluster frequency (which keeps large clusters from taking over);
  :func:`batch_target_distribution`, the same over one mini-batch, in the graph.
* :func:`kl_divergence`: the clustering loss KL(P || Q) of each sample.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

_EPS = 1e-12


@keras.saving.register_keras_serializable(package="dcn")
class ClusteringLayer(keras.layers.Layer):
    """Soft assignment of embeddings to ``n_clusters`` learnable centres.

    Args:
        n_clusters: number of clusters.
        alpha: degrees of freedom of the Student's t kernel (1 in DEC).
        centers: optional initial centres, shape (n_clusters, dim); otherwise
            Glorot-uniform (k-means on the embeddings sets them in practice).

    Input (batch, dim) -> output q (batch, n_clusters), rows summing to 1.
    Computes in float32 even under a mixed-precision policy.
    """

    def __init__(self, n_clusters: int, alpha: float = 1.0, centers=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be positive, got {n_clusters}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.n_clusters, self.alpha = int(n_clusters), float(alpha)
        self._initial = None if centers is None else np.asarray(centers, np.float32)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.centers = self.add_weight(shape=(self.n_clusters, dim), initializer="glorot_uniform",
                                       name="centers")
        if self._initial is not None:
            if self._initial.shape != (self.n_clusters, dim):
                raise ValueError(f"initial centres of shape {self._initial.shape}, "
                                 f"expected {(self.n_clusters, dim)}")
            self.centers.assign(self._initial)
            self._initial = None

    def call(self, inputs):
        z = ops.cast(inputs, "float32")
        sq = ops.sum(ops.square(z[:, None, :] - self.centers[None, :, :]), axis=-1)
        q = ops.power(1.0 + sq / self.alpha, -(self.alpha + 1.0) / 2.0)
        return q / ops.sum(q, axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_clusters)

    def get_config(self):
        config = super().get_config()
        config.update(n_clusters=self.n_clusters, alpha=self.alpha)
        return config


def target_distribution(q):
    """DEC's target P from soft assignments Q (numpy, over the whole data set)."""
    q = np.asarray(q, np.float64)
    weight = q**2 / q.sum(axis=0)
    return (weight / weight.sum(axis=1, keepdims=True)).astype(np.float32)


def batch_target_distribution(q):
    """:func:`target_distribution` of one batch's Q (Keras ops, float32); the
    cluster frequencies are the whole global batch's, however many devices
    share it (:func:`common.training.batch_sum`)."""
    from common.training import batch_sum

    q = ops.cast(q, "float32")
    weight = ops.square(q) / ops.expand_dims(batch_sum(q), 0)
    return weight / ops.sum(weight, axis=1, keepdims=True)


def kl_divergence(p, q):
    """Per-sample KL(P || Q) = sum_j p_ij log(p_ij / q_ij) (Keras ops)."""
    p = ops.clip(ops.cast(p, "float32"), _EPS, 1.0)
    q = ops.clip(ops.cast(q, "float32"), _EPS, 1.0)
    return ops.sum(p * ops.log(p / q), axis=-1)
