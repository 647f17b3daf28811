"""The networks of RSWNet: ResNet50's input preparation, the ResNet50
application encoder and the transposed-convolution decoder.

* :class:`ResNetInput`: images of any size in [0, 1], grey or RGB ->
  ``size`` x ``size`` RGB (bilinear resize, grey repeated to three channels)
  -> ResNet50's own preprocessing (``keras.applications.resnet50``: 0-255,
  BGR, ImageNet channel means subtracted).
* :func:`resnet_encoder`: :class:`ResNetInput` + ``keras.applications.ResNet50``
  without its top, global average pooling: a 2048-d latent code.
* :func:`resnet_decoder`: latent -> dense -> (H/4, W/4, 64) -> two stride-2
  transposed convolutions -> sigmoid image of the input's shape.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
from keras import layers, ops

from common.errors import UsageError
from common.networks import load_weights_strictly

#: Where Keras keeps (and looks for) the ImageNet weights of ResNet50 without its top.
IMAGENET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
LATENT_DIM = 2048


@keras.saving.register_keras_serializable(package="rswnet")
class ResNetInput(keras.layers.Layer):
    """Images in [0, 1] -> ResNet50's input.

    Args:
        size: height and width the images are resized to (bilinear); 32 at
            least (ResNet50's smallest input without its top), 224 as trained
            on ImageNet.

    Input shape: (batch, height, width, 1 or 3), values in [0, 1].
    Output shape: (batch, size, size, 3), preprocessed as
    ``keras.applications.resnet50.preprocess_input`` does for 0-255 RGB.
    """

    def __init__(self, size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)
        if self.size < 32:
            raise UsageError(f"ResNet50 needs inputs of at least 32x32 pixels, got --input_size {self.size}")

    def call(self, images):
        x = ops.image.resize(ops.cast(images, "float32"), (self.size, self.size), interpolation="bilinear")
        if x.shape[-1] == 1:
            x = ops.repeat(x, 3, axis=-1)
        return keras.applications.resnet50.preprocess_input(255.0 * x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size)
        return config


def imagenet_weights() -> Path:
    """The local file of ResNet50's ImageNet weights, fetched by Keras when
    allowed; one clear error line otherwise."""
    from common.data import downloads_allowed, keras_cache_dir

    cached = keras_cache_dir().parent / "models" / IMAGENET_FILE  # $KERAS_HOME/models
    if cached.is_file():
        return cached
    advice = (f"use --weights none (random initialisation) or --weights PATH to a local {IMAGENET_FILE} "
              f"(Keras keeps it in {cached.parent} after one run with network)")
    if not downloads_allowed():
        raise UsageError(f"the ImageNet weights of ResNet50 are not in {cached.parent} and downloads are off "
                         f"(DESOM_NO_DOWNLOAD=1); {advice}")
    from keras.src.applications.resnet import BASE_WEIGHTS_PATH, WEIGHTS_HASHES

    try:
        return Path(keras.utils.get_file(IMAGENET_FILE, BASE_WEIGHTS_PATH + IMAGENET_FILE,
                                         cache_subdir="models", file_hash=WEIGHTS_HASHES["resnet50"][1]))
    except Exception as e:  # Keras raises a bare Exception for URL failures
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"could not download the ImageNet weights of ResNet50 ({reason}); "
                         f"{advice}") from None


def resnet_encoder(image_shape, input_size: int = 224, weights: str | None = None,
                   freeze_until: str | None = None, bn_momentum: float | None = None,
                   name: str = "resnet_encoder") -> keras.Model:
    """:class:`ResNetInput` + ResNet50 (no top, average pooling): images -> 2048-d.

    ``weights``: ``None`` or ``"none"`` (random), ``"imagenet"`` (see
    :func:`imagenet_weights`) or the path of a weights file. ``freeze_until``: the name of a ResNet50
    layer; it and every layer before it stop training. ``bn_momentum``: the
    momentum of ResNet50's batch-normalisation statistics (Keras: 0.99).
    Short runs from random weights want less: after 45 steps at 0.99 the
    moving statistics still hold 0.99^45 = 64 % of their initial values,
    and k-means and the targets see the latents through them.
    """
    if weights is not None and str(weights).lower() == "none":
        weights = None
    if weights == "imagenet":
        weights = str(imagenet_weights())
    elif weights is not None and not Path(weights).is_file():
        raise UsageError(f"weights file {weights} not found; use --weights imagenet, none or a local file")
    inputs = keras.Input(tuple(int(v) for v in image_shape), name="images")
    x = ResNetInput(input_size, name="resnet_input")(inputs)
    resnet = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg",
                                         input_shape=(input_size, input_size, 3))
    if weights is not None:
        load_weights_strictly(resnet, weights, "does not hold weights of ResNet50 without its top")
    if bn_momentum is not None:
        for layer in resnet.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    if freeze_until:
        names = [layer.name for layer in resnet.layers]
        if freeze_until not in names:
            raise UsageError(f"ResNet50 has no layer '{freeze_until}'; e.g. conv3_block4_out, "
                             f"conv4_block6_out (the ends of its stages)")
        for layer in resnet.layers[: names.index(freeze_until) + 1]:
            layer.trainable = False
    return keras.Model(inputs, resnet(x), name=name)


def resnet_decoder(image_shape, latent_dim: int = LATENT_DIM, filters=(64, 32),
                   name: str = "resnet_decoder") -> keras.Model:
    """Latent -> image of ``image_shape`` (H, W, C) in [0, 1].

    A dense layer to a (ceil(H/4), ceil(W/4), filters[0]) map, stride-2
    transposed convolutions (3x3, ReLU) through ``filters``, a 3x3 sigmoid
    convolution to C channels, cropped to H x W.
    """
    height, width, channels = (int(v) for v in image_shape)
    steps = len(filters)
    start = (math.ceil(height / 2**steps), math.ceil(width / 2**steps), int(filters[0]))
    code = keras.Input((latent_dim,), name="code")
    h = layers.Dense(math.prod(start), activation="relu", name="decoder_dense")(code)
    h = layers.Reshape(start, name="decoder_reshape")(h)
    for i, f in enumerate(filters):
        h = layers.Conv2DTranspose(int(f), 3, strides=2, padding="same", activation="relu",
                                   name=f"decoder_deconv_{i}")(h)
    h = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="reconstruction")(h)
    extra_h, extra_w = int(h.shape[1]) - height, int(h.shape[2]) - width
    if extra_h or extra_w:
        h = layers.Cropping2D(((extra_h // 2, extra_h - extra_h // 2),
                               (extra_w // 2, extra_w - extra_w // 2)), name="decoder_crop")(h)
    return keras.Model(code, h, name=name)
