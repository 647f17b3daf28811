"""RSWNet: a ResNet50 application encoder and a decoder, with a clustering or a SOM head.

* :class:`RSWNet`: the published model, DEC's Student-t clustering layer
  on the 2048-d latent (a :class:`dcn.dec.models.ClusteringModel`: k-means
  initialisation, KL(P || Q) + reconstruction, target refreshes or
  per-batch targets).
* :class:`RSWNetSOM`: the SOM layer of DESOM on the same latent (a
  :class:`desom.models.SOMModel`: DESOM's loss and temperature schedule,
  with a ResNet50 encoder).

Both save to one ``.keras`` file that loads in a new process after
``import rswnet`` (the ResNet50 is rebuilt without weights, then the file's
weights are loaded). ``weights`` (ImageNet, none or a file) only matters
when a model is first built.
"""

from __future__ import annotations

import keras

from common.errors import UsageError
from common.networks import load_keras_model
from dcn.dec.models import ClusteringModel
from desom.models import SOMModel
from rswnet.networks import LATENT_DIM, resnet_decoder, resnet_encoder

HEADS = ("clustering", "som")


def _networks(model, input_shape, input_size, weights, freeze_until, bn_momentum):
    model.input_size = int(input_size)
    model.freeze_until = freeze_until or None
    model.bn_momentum = None if bn_momentum is None else float(bn_momentum)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3:
        raise UsageError(f"RSWNet needs images (height, width, channels), got samples of shape {shape}")
    model.encoder = resnet_encoder(shape, model.input_size, weights, model.freeze_until, model.bn_momentum)
    model.decoder = resnet_decoder(shape)
    return shape


@keras.saving.register_keras_serializable(package="rswnet")
class RSWNet(ClusteringModel):
    """ResNet50 encoder + decoder + Student-t clustering head.

    Args:
        input_shape: (height, width, channels) of the images (1 or 3
            channels, values in [0, 1]); the decoder reconstructs this shape.
        n_clusters: number of clusters.
        input_size: side the images are resized to for ResNet50 (224 as
            published; 32 at least).
        weights: ``None``, ``"imagenet"`` or a weights file for ResNet50 (only
            used when the model is built, not saved in its configuration).
        freeze_until: a ResNet50 layer name: it and the layers before it do
            not train.
        bn_momentum: momentum of ResNet50's batch-normalisation statistics
            (None: Keras' 0.99; see :func:`rswnet.networks.resnet_encoder`).
        alpha, cluster_names: as :class:`dcn.dec.models.DCN`.
    """

    def __init__(self, input_shape=(28, 28, 1), n_clusters: int = 10, input_size: int = 224, weights=None,
                 freeze_until: str | None = None, bn_momentum: float | None = None, alpha: float = 1.0,
                 cluster_names=None, **kwargs):
        kwargs.setdefault("name", "rswnet")
        super().__init__(**kwargs)
        shape = _networks(self, input_shape, input_size, weights, freeze_until, bn_momentum)
        self._finish_init(shape, n_clusters, LATENT_DIM, alpha, cluster_names)

    def get_config(self):
        config = super().get_config()
        config.update(input_size=self.input_size, freeze_until=self.freeze_until,
                      bn_momentum=self.bn_momentum)
        return config


@keras.saving.register_keras_serializable(package="rswnet")
class RSWNetSOM(SOMModel):
    """ResNet50 encoder + decoder + self-organizing map head (DESOM with a ResNet50).

    Args:
        input_shape, input_size, weights, freeze_until, bn_momentum: as :class:`RSWNet`.
        map_size, topology, toroidal: the map (see :class:`desom.layers.SOMLayer`).
    """

    def __init__(self, input_shape=(28, 28, 1), map_size=(8, 8), input_size: int = 224, weights=None,
                 freeze_until: str | None = None, bn_momentum: float | None = None,
                 topology: str = "rectangular", toroidal: bool = False, **kwargs):
        kwargs.setdefault("name", "rswnet_som")
        super().__init__(**kwargs)
        shape = _networks(self, input_shape, input_size, weights, freeze_until, bn_momentum)
        self._finish_init(shape, LATENT_DIM, map_size, topology, toroidal)

    def get_config(self):
        config = super().get_config()
        config.update(input_shape=list(self.sample_shape), input_size=self.input_size,
                      freeze_until=self.freeze_until, bn_momentum=self.bn_momentum)
        return config


def load_model(path) -> RSWNet | RSWNetSOM:
    """Load a model written by ``bin/rswnet`` (a ``.keras`` file)."""
    return load_keras_model(path, (RSWNet, RSWNetSOM), "an RSWNet model")
