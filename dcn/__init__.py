"""Deep clustering networks: three systems that learn an embedding of the
data and cluster it, each in a subpackage with its program:

* :mod:`dcn.dec`: DEC, IDEC and DCEC (``bin/dcn``), a Student-t clustering
  layer on an autoencoder's embedding trained towards its own sharpened
  target, on arrays, tables and image folders; naming clusters from
  reference images;
* :mod:`dcn.autoencoders`: the autoencoder family (``bin/ae``: AE,
  semi-supervised AE, VAE, CVAE) and two-stage clustering of its codes
  (UMAP + Gaussian mixture, k-means, DBSCAN, a SOM); generation;
* :mod:`dcn.selflabel`: self-labelling (``bin/selflabel``), a CNN classifier
  trained on its own, iteratively refined pseudo-labels.

Importing this package registers every layer and model of the three with
Keras, so ``keras.saving.load_model("model.keras")`` works in a fresh
process. The DEC names are re-exported here (``from dcn import DCN``).
"""

from common.runtime import quiet_tensorflow

quiet_tensorflow()  # before Keras imports TensorFlow: no C++ start-up chatter

from dcn import autoencoders, selflabel  # noqa: E402,F401  (registers their models)
from dcn.dec import DCN, ClusteringLayer, ClusteringModel, kl_divergence, load_model, target_distribution  # noqa: E402

__all__ = ["DCN", "ClusteringLayer", "ClusteringModel", "autoencoders", "kl_divergence", "load_model",
           "selflabel", "target_distribution"]
