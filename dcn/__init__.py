"""Deep clustering network: a Student-t clustering layer on an autoencoder's
embedding (DEC, IDEC, DCEC), image-folder pipelines and naming clusters from
reference images.

Importing this package registers the layers and models with Keras, so
``keras.saving.load_model("model.keras")`` works in a fresh process.
"""

from common.runtime import quiet_tensorflow

quiet_tensorflow()  # before Keras imports TensorFlow: no C++ start-up chatter

from dcn.layers import ClusteringLayer, kl_divergence, target_distribution  # noqa: E402
from dcn.models import DCN, ClusteringModel, load_model  # noqa: E402

__all__ = ["DCN", "ClusteringLayer", "ClusteringModel", "kl_divergence", "load_model", "target_distribution"]
