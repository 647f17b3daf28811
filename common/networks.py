"""Autoencoder networks shared by the models (functional Keras models).

Each builder returns ``(encoder, decoder)``: the encoder maps inputs to latent
codes, the decoder maps codes back to the input space. Keeping them as two
models (rather than one autoencoder with extracted halves) lets a model save,
reuse and plot them without sharing layers between graphs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from common.data import as_float32
from common.errors import UsageError
from common.runtime import is_chief
from common.training import Task, layer_seeds, train


def kernel_initializer(name: str):
    """``glorot_uniform`` (Keras' default, DESOM) or ``dec``: DEC's uniform
    initialisation in [-sqrt(1/fan_in), sqrt(1/fan_in)]."""
    if name == "dec":
        return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")
    if name == "glorot_uniform":
        return name
    raise UsageError(f"unknown initialisation '{name}'; choose glorot_uniform or dec")


def mlp_autoencoder(input_dim, latent_dim: int = 10, hidden=(500, 500, 2000),
                    activation: str = "relu", batchnorm: bool = False, name: str = "ae",
                    init: str = "glorot_uniform", output_activation: str | None = None):
    """Symmetric dense autoencoder d-500-500-2000-latent-2000-500-500-d (DEC/DESOM).

    Hidden layers use ``activation``; the latent layer is linear, the output
    layer too unless ``output_activation`` (e.g. ``"sigmoid"`` for data in [0, 1]).
    Weights follow ``init`` (see :func:`kernel_initializer`), biases are zero.
    ``input_dim`` may be a shape such as (28, 28, 1): the encoder then
    flattens its input and the decoder reshapes its output back.
    """
    shape = tuple(int(v) for v in np.atleast_1d(input_dim))
    dim = math.prod(shape)
    x = keras.Input(shape, name="input")
    h = layers.Flatten(name="flatten")(x) if len(shape) > 1 else x
    def dense(units, **kw):
        return layers.Dense(units, kernel_initializer=kernel_initializer(init), **kw)

    for i, units in enumerate(hidden):
        h = dense(units, activation=activation, name=f"encoder_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"encoder_bn_{i}")(h)
    z = dense(latent_dim, name="latent")(h)
    encoder = keras.Model(x, z, name=f"{name}_encoder")

    code = keras.Input((latent_dim,), name="code")
    h = code
    for i, units in reversed(list(enumerate(hidden))):
        h = dense(units, activation=activation, name=f"decoder_{i}")(h)
        if batchnorm:
            h = layers.BatchNormalization(name=f"decoder_bn_{i}")(h)
    out = dense(dim, activation=output_activation, name="reconstruction")(h)
    if len(shape) > 1:
        out = layers.Reshape(shape, name="reshape")(out)
    decoder = keras.Model(code, out, name=f"{name}_decoder")
    return encoder, decoder


def gaussian_encoder(input_shape, latent_dim: int = 8, hidden=(400, 128), dropout: float = 0.2,
                     condition_dim: int = 0, name: str = "vae_encoder") -> keras.Model:
    """Encoder of a (conditional) VAE: inputs -> (posterior mean, log-variance).

    Dense ReLU layers ``hidden``, each followed by dropout, then two linear
    heads of ``latent_dim``. With ``condition_dim`` > 0 the model takes
    ``[x, c]`` and joins the condition (a one-hot label) to the flattened
    input.
    """
    shape = tuple(int(v) for v in input_shape)
    x = keras.Input(shape, name="input")
    h = layers.Flatten(name="flatten")(x) if len(shape) > 1 else x
    inputs = [x]
    if condition_dim:
        c = keras.Input((int(condition_dim),), name="condition")
        inputs.append(c)
        h = layers.Concatenate(name="join_condition")([h, c])
    for i, units in enumerate(hidden):
        h = layers.Dense(int(units), activation="relu", name=f"encoder_{i}")(h)
        if dropout:
            h = layers.Dropout(float(dropout), name=f"encoder_dropout_{i}")(h)
    mean = layers.Dense(latent_dim, name="mean")(h)
    log_var = layers.Dense(latent_dim, name="log_var")(h)
    return keras.Model(inputs if condition_dim else x, [mean, log_var], name=name)


def logit_decoder(output_shape, latent_dim: int = 8, hidden=(128, 400), condition_dim: int = 0,
                  name: str = "vae_decoder") -> keras.Model:
    """Decoder of a (conditional) VAE: code (joined to a condition) -> logits
    of every input value, in the input's shape (Bernoulli likelihood)."""
    shape = tuple(int(v) for v in output_shape)
    code = keras.Input((int(latent_dim),), name="code")
    h, inputs = code, [code]
    if condition_dim:
        c = keras.Input((int(condition_dim),), name="condition")
        inputs.append(c)
        h = layers.Concatenate(name="join_condition")([h, c])
    for i, units in enumerate(hidden):
        h = layers.Dense(int(units), activation="relu", name=f"decoder_{i}")(h)
    out = layers.Dense(math.prod(shape), name="logits")(h)
    if len(shape) > 1:
        out = layers.Reshape(shape, name="reshape")(out)
    return keras.Model(inputs if condition_dim else code, out, name=name)


def mlp_classifier(input_dim: int, n_classes: int, hidden=(64,), name: str = "classifier") -> keras.Model:
    """Dense ReLU layers ``hidden`` then linear logits of ``n_classes`` (e.g. 32-64-10)."""
    code = keras.Input((int(input_dim),), name="code")
    h = code
    for i, units in enumerate(hidden):
        h = layers.Dense(int(units), activation="relu", name=f"classifier_{i}")(h)
    return keras.Model(code, layers.Dense(int(n_classes), name="logits")(h), name=name)


def cnn_features(input_shape, filters=(32, 64, 128), dense=(512, 256), name: str = "features") -> keras.Model:
    """Convolutional feature extractor with L2-normalised output.

    One block per entry of ``filters``: a 3x3 'same' convolution, batch
    normalisation, ReLU and 2x2 max-pooling (28x28 -> 14 -> 7 -> 3, so
    1152 values for 128 filters); then dense layers ``dense`` (ReLU, the last
    one linear) and a division by the L2 norm: features on the unit sphere,
    where Euclidean k-means compares directions.
    """
    x = keras.Input(tuple(int(v) for v in input_shape), name="input")
    h = x
    for i, f in enumerate(filters):
        h = layers.Conv2D(int(f), 3, padding="same", use_bias=False, name=f"conv_{i}")(h)
        h = layers.BatchNormalization(momentum=0.9, name=f"bn_{i}")(h)
        h = layers.Activation("relu", name=f"relu_{i}")(h)
        if min(h.shape[1], h.shape[2]) >= 2:  # small images (8x8 digits) stop pooling at 1x1
            h = layers.MaxPooling2D(2, name=f"pool_{i}")(h)
    h = layers.Flatten(name="flatten")(h)
    for i, units in enumerate(dense):
        last = i == len(dense) - 1
        h = layers.Dense(int(units), activation=None if last else "relu", name=f"dense_{i}")(h)
    h = layers.UnitNormalization(name="l2_normalise")(h)
    return keras.Model(x, h, name=name)


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


def dcec_autoencoder(input_shape, embedding_dim: int = 10, filters=(32, 64, 128), kernel_sizes=(5, 5, 3),
                     activation: str = "relu", name: str = "dcec"):
    """Convolutional autoencoder of DCEC (Guo et al., 2017), for any image size.

    Encoder: stride-2 'same' convolutions (32 5x5, 64 5x5, 128 3x3 by
    default), flatten, a dense linear embedding. Decoder: a dense layer back
    to the last feature map, stride-2 transposed convolutions in mirror order
    (the last one linear, to the input channels), and a cropping to the input
    size when the strides overshoot it (e.g. 28 -> 4 -> 32 -> 28).
    """
    height, width, channels = (int(v) for v in input_shape)
    x = keras.Input((height, width, channels), name="input")
    h = x
    for i, (f, k) in enumerate(zip(filters, kernel_sizes)):
        h = layers.Conv2D(f, k, strides=2, padding="same", activation=activation, name=f"encoder_conv_{i}")(h)
    code_shape = tuple(int(v) for v in h.shape[1:])
    h = layers.Flatten(name="flatten")(h)
    z = layers.Dense(embedding_dim, name="embedding")(h)
    encoder = keras.Model(x, z, name=f"{name}_encoder")

    code = keras.Input((embedding_dim,), name="code")
    h = layers.Dense(math.prod(code_shape), activation=activation, name="decoder_dense")(code)
    h = layers.Reshape(code_shape, name="decoder_reshape")(h)
    stages = list(zip(filters, kernel_sizes))
    for i in reversed(range(len(stages))):
        out_filters = stages[i - 1][0] if i > 0 else channels
        h = layers.Conv2DTranspose(out_filters, stages[i][1], strides=2, padding="same",
                                   activation=activation if i > 0 else None,
                                   name=f"decoder_deconv_{i}" if i > 0 else "reconstruction")(h)
    extra_h, extra_w = int(h.shape[1]) - height, int(h.shape[2]) - width
    if extra_h or extra_w:
        h = layers.Cropping2D(((extra_h // 2, extra_h - extra_h // 2),
                               (extra_w // 2, extra_w - extra_w // 2)), name="decoder_crop")(h)
    decoder = keras.Model(code, h, name=f"{name}_decoder")
    return encoder, decoder


class Augmentation:
    """A batch function of Keras preprocessing layers, clipped to [0, 1].

    ``makers`` are callables ``seed -> layer``; each layer gets its own seed,
    drawn from ``seed`` (layers given one seed draw the same random numbers
    at every call: a flip would always come with the same rotation and
    brightness). The layers run in training mode (new transformations at
    every call); ``pipeline`` is their ``keras.Sequential``. The training
    loop starts their random state again at each phase, from its seed and
    the phase's name (:func:`common.training.reseed`), and checkpoints it.
    """

    def __init__(self, makers, seed: int = 0, name: str = "augment"):
        seeds = layer_seeds(len(makers), seed)
        self.pipeline = keras.Sequential([make(s) for make, s in zip(makers, seeds)], name=name)

    def __call__(self, batch):
        return ops.clip(self.pipeline(batch, training=True), 0.0, 1.0)


def predict_in_batches(model, x, batch_size: int = 1024):
    """``model`` on ``x`` in batches of one fixed shape (the last one padded).

    Keras' ``predict`` traces its function again for every new input length;
    padding keeps one shape, so evaluating during training never retraces.
    A :class:`~common.diskarray.DiskArray` is read one batch at a time.
    """
    x = as_float32(x)
    n = len(x)
    if n == 0:  # no rows: the output's shape still comes from the model
        return np.asarray(model.predict_on_batch(np.zeros((1, *x.shape[1:]), np.float32)))[:0]
    size = min(batch_size, n)
    outputs = []
    for start in range(0, n, size):
        batch = np.asarray(x[start:start + size], np.float32)
        if len(batch) < size:
            batch = np.concatenate([batch, np.zeros((size - len(batch), *x.shape[1:]), x.dtype)])
        out = model.predict_on_batch(batch)
        outputs.append(np.asarray(out)[: min(size, n - start)])
    return np.concatenate(outputs)


def mse_per_sample(x, reconstruction):
    """Mean squared reconstruction error of each sample (over all its values)."""
    err = ops.square(ops.cast(x, "float32") - ops.cast(reconstruction, "float32"))
    return ops.mean(ops.reshape(err, (ops.shape(err)[0], -1)), axis=1)


class ReconstructionTask(Task):
    """Autoencoder pretraining for the shared loop: reconstruction error alone."""

    def __init__(self, encoder, decoder):
        self.model = keras.Sequential([encoder, decoder], name="autoencoder")

    def loss_terms(self, x, idx, scalars):
        return {"loss": mse_per_sample(x, self.model(x, training=True))}


class AutoencoderModel(keras.Model):
    """Base of the models built on an autoencoder (DESOM, DCN, ...).

    Subclasses create ``self.encoder`` and ``self.decoder`` (functional models;
    None for a model without autoencoder) and set ``self.sample_shape`` in
    ``__init__``, where every layer gets built.
    """

    encoder = None
    decoder = None
    sample_shape: tuple = ()

    def build(self, input_shape):  # every part is built in __init__
        self.built = True

    def functional_view(self) -> keras.Model:
        """The same layers as a functional model (for plot_model and summaries)."""
        inputs = keras.Input(self.sample_shape, name="input")
        return keras.Model(inputs, self.call(inputs), name=self.name)

    def transform(self, x, batch_size: int = 1024) -> np.ndarray:
        """Latent codes of ``x`` (the inputs themselves, flattened, without
        encoder; a :class:`~common.diskarray.DiskArray` then stays on disk)."""
        if self.encoder is None:
            x = as_float32(x)
            return x.reshape(len(x), -1)
        return predict_in_batches(self.encoder, x, batch_size)

    def pretrain(self, x, epochs: float, save_dir=None, **loop):
        """Pretrain the autoencoder on reconstruction alone (``epochs`` epochs).

        Writes ``pretrain_log.csv`` and ``ae.weights.h5`` to ``save_dir``.
        Other keyword arguments go to :func:`common.training.train`.
        """
        if self.decoder is None:
            raise UsageError(f"a {type(self).__name__} has no autoencoder to pretrain")
        result = train(ReconstructionTask(self.encoder, self.decoder), x, epochs=epochs, save_dir=save_dir,
                       phase="pretrain", log_name="pretrain_log.csv", **loop)
        if save_dir is not None and is_chief(loop.get("strategy")):  # one writer in a multi-worker run
            self.save_autoencoder_weights(Path(save_dir) / "ae.weights.h5")
        return result

    def _autoencoder(self):
        return keras.Sequential([self.encoder, self.decoder], name="autoencoder")

    def save_autoencoder_weights(self, path):
        from common.results import atomic_path

        with atomic_path(path) as tmp:  # keeps the .weights.h5 ending Keras asks for
            self._autoencoder().save_weights(str(tmp))

    def load_autoencoder_weights(self, path):
        """Load weights written by :meth:`save_autoencoder_weights` (or pretraining)."""
        path = Path(path)
        if self.decoder is None:
            raise UsageError(f"a {type(self).__name__} has no autoencoder weights to load")
        if not path.is_file():
            raise UsageError(f"autoencoder weights {path} not found")
        load_weights_strictly(self._autoencoder(), path, "does not fit this autoencoder")


def load_weights_strictly(model, path, mismatch: str = "does not fit this model"):
    """``model.load_weights(path)``, all or nothing: Keras skips parts that do
    not match with a warning; here any skipped part or error is one
    :class:`UsageError` line, ``"{path} {mismatch}: {reason}"``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
            problem = next((str(w.message) for w in caught if "Skipping" in str(w.message)), None)
        except (ValueError, OSError, KeyError) as e:
            problem = str(e).strip() or type(e).__name__
    if problem:
        raise UsageError(f"{path} {mismatch}: {problem.splitlines()[0]}")


def save_keras_model(model, path) -> Path:
    """``model.save`` to a temporary name, then rename: no half-written model file."""
    from common.results import atomic_path

    with atomic_path(path) as tmp:
        model.save(str(tmp))
    return Path(path)


#: The packages whose layers and models a ``.keras`` file of the toolkit may hold, by the
#: ``package>`` of their registered names (``desom>DESOM``).
MODEL_PACKAGES = ("desom", "dcn", "rswnet")


def _import_registering_packages(path: Path):
    """Import the packages that registered the classes a ``.keras`` file
    names (read from its ``config.json``), so that it loads without its
    caller importing them: a package never imports a higher one for this."""
    import importlib
    import re
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json").decode()
    except (KeyError, OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return  # keras.saving.load_model says what is wrong with it
    for package in sorted(set(re.findall(r'"registered_name":\s*"(\w+)>', config)) & set(MODEL_PACKAGES)):
        importlib.import_module(package)


def load_model(path):
    """Load any model the toolkit saved (a ``.keras`` file of ``bin/desom``,
    ``bin/dcn``, ``bin/ae``, ``bin/selflabel`` or ``bin/rswnet``) in any
    process: the package that registered its classes is imported first.
    Errors are one line (:class:`~common.errors.UsageError`)."""
    return load_keras_model(path)


def load_keras_model(path, expected: type | tuple | None = None, what: str = "a model"):
    """``keras.saving.load_model`` with one-line errors and, given
    ``expected``, a type check (``what`` names the type in the error)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file {path} not found")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a .keras model (a zip archive written by Keras 3); give the "
                         f"model.keras of a run")
    _import_registering_packages(path)
    try:
        model = keras.saving.load_model(str(path))
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a readable .keras model: {str(e).splitlines()[0]}") from None
    if expected is not None and not isinstance(model, expected):
        raise UsageError(f"{path} holds a {type(model).__name__}, not {what}")
    return model
