"""TensorFlow start-up: quiet import, strategies, precision.

Both the training loop (:mod:`common.training`) and the command-line helpers
(:mod:`common.cli`) need these; keeping them here lets neither import the
other.

* :func:`quiet_tensorflow` imports TensorFlow without its C++ start-up chatter.
* :func:`make_strategy` picks a ``tf.distribute`` strategy by name.
* :func:`set_mixed_precision` switches Keras' float16 policy on or off.
"""

from __future__ import annotations

import contextlib
import os
import sys

from common.errors import UsageError

STRATEGIES = ("auto", "default", "mirrored")


@contextlib.contextmanager
def _stderr_silenced():
    """Silence file descriptor 2 (C++ logging bypasses sys.stderr)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def quiet_tensorflow():
    """Import TensorFlow once, hiding its C++ start-up messages.

    Keeps the user's own ``TF_CPP_MIN_LOG_LEVEL`` when set. Errors raised by
    the import itself still propagate (they are Python exceptions).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _stderr_silenced():
        import tensorflow as tf

        tf.constant(0)  # the first op triggers the remaining one-time messages
    # Each model's predict function counts as a retrace of Keras' one shared
    # function, so a process that builds several models gets told off for it.
    tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
    return tf


def make_strategy(name: str = "auto"):
    """A ``tf.distribute`` strategy by name.

    ``auto``: mirrored over all GPUs when there are several, else the default
    strategy. ``default``: no distribution. ``mirrored``: mirrored over all
    GPUs, or over all logical CPU devices when there is no GPU.
    """
    tf = quiet_tensorflow()
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def set_mixed_precision(enabled: bool):
    """Use float16 compute with float32 variables (GPU); the loop scales losses."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16" if enabled else "float32")
