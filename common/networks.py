"""Autoencoder networks shared by the models (functional Keras models).

Each builder returns ``(encoder, decoder)``: the encoder maps inputs to latent
codes, the decoder maps codes back to the input space. Keeping them as two
models (rather than one autoencoder with extracted halves) lets a model save,
reuse and plot them without sharing layers between graphs.
"""

from __future__ import annotations

import math

import keras
from keras import layers


def mlp_autoencoder(input_dim: int, latent_dim: int = 10, hidden=(500, 500, 2000),
                    activation: str = "relu", batchnorm: bool = False, name: str = "ae"):
    """Symmetric dense autoencoder d-500-500-2000-latent-2000-500-500-d (DEC/DESOM).

    Hidden layers use ``activation``; the latent and output layers are linear.
    Weights are Glorot-uniform, biases zero (Keras defaults, as in DESOM).
    """
    x = keras.Input((input_dim,), name="input")
    h = x
    for i, units in enumerate(hidden):
        h = layers.Dense(units, activation=activation, name=f"encoder_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"encoder_bn_{i}")(h)
    z = layers.Dense(latent_dim, name="latent")(h)
    encoder = keras.Model(x, z, name=f"{name}_encoder")

    code = keras.Input((latent_dim,), name="code")
    h = code
    for i, units in reversed(list(enumerate(hidden))):
        h = layers.Dense(units, activation=activation, name=f"decoder_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"decoder_bn_{i}")(h)
    out = layers.Dense(input_dim, name="reconstruction")(h)
    decoder = keras.Model(code, out, name=f"{name}_decoder")
    return encoder, decoder


def conv_autoencoder(input_shape, latent_dim: int = 10, filters=(32, 64, 64), kernel_size: int = 3,
                     pool_size: int = 2, activation: str = "relu", batchnorm: bool = False,
                     name: str = "cae"):
    """Convolutional autoencoder of ConvDESOM (after DESOM's conv2d_autoencoder).

    Encoder: for each of ``filters``, a 'same' convolution then a 'same'
    max-pooling; flatten; a dense linear latent layer. Decoder: a dense layer
    back to the last feature map, then the mirror image (convolution then
    up-sampling per stage), a cropping to the input size, and a linear
    convolution to the input channels. Works for any image size (28x28 for
    MNIST, 16x16 for USPS, 8x8 for digits).
    """
    height, width, channels = (int(v) for v in input_shape)
    x = keras.Input((height, width, channels), name="input")
    h = x
    for i, f in enumerate(filters):
        h = layers.Conv2D(f, kernel_size, padding="same", activation=activation, name=f"encoder_conv_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"encoder_bn_{i}")(h)
        h = layers.MaxPooling2D(pool_size, padding="same", name=f"encoder_pool_{i}")(h)
    code_shape = tuple(int(v) for v in h.shape[1:])
    h = layers.Flatten(name="flatten")(h)
    z = layers.Dense(latent_dim, name="latent")(h)
    encoder = keras.Model(x, z, name=f"{name}_encoder")

    code = keras.Input((latent_dim,), name="code")
    h = layers.Dense(math.prod(code_shape), name="decoder_dense")(code)
    h = layers.Reshape(code_shape, name="decoder_reshape")(h)
    for i, f in reversed(list(enumerate(filters))):
        h = layers.Conv2D(f, kernel_size, padding="same", activation=activation, name=f"decoder_conv_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"decoder_bn_{i}")(h)
        h = layers.UpSampling2D(pool_size, name=f"decoder_upsample_{i}")(h)
    extra_h, extra_w = int(h.shape[1]) - height, int(h.shape[2]) - width
    if extra_h or extra_w:
        h = layers.Cropping2D(((extra_h // 2, extra_h - extra_h // 2),
                               (extra_w // 2, extra_w - extra_w // 2)), name="decoder_crop")(h)
    out = layers.Conv2D(channels, kernel_size, padding="same", name="reconstruction")(h)
    decoder = keras.Model(code, out, name=f"{name}_decoder")
    return encoder, decoder


def predict_in_batches(model, x, batch_size: int = 1024):
    """``model`` on ``x`` in batches of one fixed shape (the last one padded).

    Keras' ``predict`` traces its function again for every new input length;
    padding keeps one shape, so evaluating during training never retraces.
    """
    import numpy as np

    x = np.asarray(x, np.float32)
    n = len(x)
    size = min(batch_size, max(n, 1))
    outputs = []
    for start in range(0, n, size):
        batch = x[start:start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, np.zeros((size - len(batch), *x.shape[1:]), x.dtype)])
        out = model.predict_on_batch(batch)
        outputs.append(np.asarray(out)[: min(size, n - start)])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
