"""TensorFlow start-up: quiet import, devices, strategies, precision, XLA.

Both the training loop (:mod:`common.training`) and the command-line helpers
(:mod:`common.cli`) need these; keeping them here lets neither import the
other.

* :func:`quiet_tensorflow` imports TensorFlow without its C++ start-up chatter.
* :func:`make_strategy` picks a ``tf.distribute`` strategy by name.
* :func:`set_mixed_precision` switches Keras' float16 policy on or off.
* :func:`describe_devices` says in a few words what a run computes on.
* :func:`resolve_jit` turns ``auto``/``on``/``off`` into a yes or no for XLA.

Child processes of the benchmarks (measured, pinned to cores) are in
:mod:`common.processes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from common.errors import UsageError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
JIT_MODES = ("auto", "on", "off")


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to a temporary file (C++ logging bypasses
    sys.stderr); yields a list that holds what was written there afterwards."""
    import tempfile

    kept: list = []
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield kept
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with tempfile.TemporaryFile("w+", errors="replace") as caught:
            os.dup2(caught.fileno(), fd)
            try:
                yield kept
            finally:
                os.dup2(saved, fd)
                caught.seek(0)
                kept.append(caught.read(200_000))
    finally:
        os.close(saved)


#: Signs that a machine has an NVIDIA GPU, whatever TensorFlow makes of it.
NVIDIA_SIGNS = ("/proc/driver/nvidia/version", "/dev/nvidia0")


def gpu_problem(startup_messages: str, built_with_cuda: bool, gpus_seen: int,
                has_nvidia: bool | None = None) -> str | None:
    """Why TensorFlow uses no GPU on a machine that has one (None when it
    uses one, or the machine has none): the first start-up message about a
    CUDA library it could not load, or the CPU-only build."""
    if has_nvidia is None:
        has_nvidia = any(os.path.exists(p) for p in NVIDIA_SIGNS)
    if gpus_seen or not has_nvidia:
        return None
    if not built_with_cuda:
        return ("this TensorFlow is built without CUDA (tensorflow-cpu); install the GPU flavour: "
                "make ... TF=gpu, or pip install -e '.[gpu]'")
    for line in startup_messages.splitlines():
        if any(sign in line for sign in ("Could not load dynamic library", "Cannot dlopen", "cuInit",
                                         "Could not find cuda drivers", "libcuda", "libcudnn")):
            return line.strip()[-300:]
    return "TensorFlow found no usable GPU (run with TF_CPP_MIN_LOG_LEVEL=0 to see its start-up messages)"


def quiet_tensorflow():
    """Import TensorFlow once, hiding its C++ start-up messages; on a machine
    with an NVIDIA GPU that TensorFlow cannot use, one warning line says why
    (:func:`gpu_problem`).

    Keeps the user's own ``TF_CPP_MIN_LOG_LEVEL`` when set. Errors raised by
    the import itself still propagate (they are Python exceptions). With
    ``TF_CONFIG`` set (a multi-worker run may follow), no first op is run: it
    would fix the runtime's set-up before the strategy can configure it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _stderr_silenced() as messages:
        import tensorflow as tf

        if "TF_CONFIG" not in os.environ:
            tf.constant(0)  # the first op triggers the remaining one-time messages
    # (not before a multi-worker strategy has configured the runtime: TF_CONFIG)
    problem = None if "TF_CONFIG" in os.environ else gpu_problem(
        "".join(messages), tf.test.is_built_with_cuda(), len(tf.config.list_physical_devices("GPU")))
    if problem:  # the one start-up message a user needs
        print(f"warning: this machine has an NVIDIA GPU but TensorFlow cannot use it: {problem}",
              file=sys.stderr, flush=True)
    # Each model's predict function counts as a retrace of Keras' one shared
    # function, so a process that builds several models gets told off for it.
    tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
    return tf


def make_strategy(name: str = "auto"):
    """A ``tf.distribute`` strategy by name.

    ``auto``: mirrored over all GPUs when there are several, else the default
    strategy. ``default``: no distribution. ``mirrored``: mirrored over all
    GPUs, or over all logical CPU devices when there is no GPU.
    ``multiworker``: ``MultiWorkerMirroredStrategy`` over the machines named
    by the ``TF_CONFIG`` variable; it must be made before TensorFlow runs
    its first op.

    A mirrored strategy is made once per process and given again: a second
    one numbers its collective operations (the all-reduce of a batch
    statistic, :func:`common.training.batch_sum`) from where the first one
    started, and TensorFlow aborts the step on the clash.
    """
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    if name == "multiworker":
        return _multiworker()
    tf = quiet_tensorflow()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = tuple(d.name for d in gpus) or tuple(d.name for d in tf.config.list_logical_devices("CPU"))
    if devices not in _MIRRORED:  # one per process: a second one's collectives reuse the first one's keys
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[devices]


_MIRRORED: dict = {}


def _multiworker():
    raw = os.environ.get("TF_CONFIG")
    try:
        config = json.loads(raw) if raw else None
        workers = config["cluster"]["worker"] + config["cluster"].get("chief", [])
        config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError):
        raise UsageError("--strategy multiworker needs TF_CONFIG, e.g. "
                         "'{\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                         "\"task\": {\"type\": \"worker\", \"index\": 0}}' (index: this machine's place "
                         "in the list)") from None
    tf = quiet_tensorflow()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        raise UsageError(f"--strategy multiworker: {e}; nothing may run on TensorFlow before the strategy "
                         f"is made") from None
    strategy.workers = len(workers)
    return strategy


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files: always, except on the
    workers of a multi-worker run other than the chief (worker 0)."""
    if strategy is None or worker_count(strategy) < 2:
        return True
    resolver = strategy.cluster_resolver
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def from_chief(strategy, array):
    """The chief's ``array`` on every worker of a multi-worker run (``array``
    itself otherwise): for results of host computations (clusterings, pseudo-
    labels) that every worker must share exactly, or their steps would differ."""
    if worker_count(strategy) < 2:
        return array
    import numpy as np
    import tensorflow as tf

    value, chief = np.asarray(array), is_chief(strategy)
    flags = strategy.gather(strategy.run(lambda: tf.constant([int(chief)], tf.int64)), axis=0).numpy()
    every = strategy.gather(strategy.run(lambda: tf.constant(value[None])), axis=0).numpy()
    return every[int(np.argmax(flags))]


def worker_count(strategy) -> int:
    """How many processes train together (1 unless multi-worker)."""
    return getattr(strategy, "workers", 1)


def set_mixed_precision(enabled: bool):
    """Use float16 compute with float32 variables (GPU); the loop scales losses.

    On a machine without a GPU the policy is set all the same (the path can
    be tested there), with one warning line on stderr: CPUs emulate float16,
    so it is slower than float32, not faster.
    """
    import keras

    if enabled and not gpu_names():
        print("warning: --mixed_precision is a GPU option; this machine has no GPU, so float16 is emulated "
              "and slower than float32 (running with it anyway)", file=sys.stderr, flush=True)
    keras.mixed_precision.set_global_policy("mixed_float16" if enabled else "float32")


def gpu_names() -> list[str]:
    """Names of the visible GPUs (empty on a CPU-only machine)."""
    tf = quiet_tensorflow()
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name") or gpu.name)
        except (ValueError, RuntimeError):
            names.append(gpu.name)
    return names


def describe_devices(strategy=None) -> str:
    """What a run computes on, e.g. ``CPU (2 cores)`` or ``2 GPUs: NVIDIA H100 x2``."""
    gpus = gpu_names()
    if not gpus:
        where = f"CPU ({os.cpu_count()} cores)"
    else:
        kinds = sorted(set(gpus))
        where = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: " + ", ".join(
            f"{k} x{gpus.count(k)}" if gpus.count(k) > 1 else k for k in kinds)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        where += f", {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__})"
    return where


def has_convolutions(model) -> bool:
    """Whether ``model`` (any Keras layer) contains a convolution layer."""
    import keras

    layers = keras.layers
    kinds = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.Conv1DTranspose, layers.Conv2DTranspose,
             layers.Conv3DTranspose, layers.SeparableConv1D, layers.SeparableConv2D,
             layers.DepthwiseConv1D, layers.DepthwiseConv2D)
    return any(isinstance(layer, kinds) for layer in model._flatten_layers(include_self=True))


def draws_random_numbers(model) -> bool:
    """Whether ``model``'s training step draws random numbers: a dropout or
    noise layer, or a model that says so (``draws_random_numbers = True``,
    e.g. a VAE's reparameterised sample)."""
    import keras

    layers = keras.layers
    kinds = (layers.Dropout, layers.GaussianNoise, layers.GaussianDropout, layers.AlphaDropout)
    return any(getattr(layer, "draws_random_numbers", False) or isinstance(layer, kinds)
               for layer in model._flatten_layers(include_self=True))


def resolve_jit(jit, model=None, replicas: int = 1, extra=()) -> bool:
    """Whether to compile the training step with XLA.

    ``jit`` is ``"on"``/``True``, ``"off"``/``False`` or ``"auto"``. ``auto``
    compiles unless the step would run on a CPU and ``model`` has a
    convolution layer or draws random numbers: measured on a 2-core CPU, XLA
    makes dense steps faster, convolutional ones about twice as slow (README,
    "Speed") and the VAE of bin/ae (dropout + a Gaussian sample) 4.4 times
    slower (18.8 against 83.6 iterations per second). Like Keras'
    own ``auto``, it also leaves out models with a layer that does not support
    XLA (in ``model`` or in the ``extra`` layers the step also runs, such as
    an augmentation pipeline: Keras' shifts, zooms and rotations have no XLA
    kernel on GPUs), and runs with TensorFlow's op determinism on. Steps run
    under a strategy of several replicas are never compiled.
    """
    if isinstance(jit, bool):
        jit = "on" if jit else "off"
    if jit not in JIT_MODES:
        raise UsageError(f"unknown XLA mode '{jit}'; choose one of {', '.join(JIT_MODES)}")
    if replicas > 1 or jit == "off":
        return False
    if jit == "on" or model is None:
        return True
    quiet_tensorflow()
    from tensorflow.python.framework.config import is_op_determinism_enabled  # as Keras' own check

    if is_op_determinism_enabled():
        return False
    every = [layer for m in (model, *extra) for layer in m._flatten_layers(include_self=True)]
    if not all(getattr(layer, "supports_jit", True) for layer in every):
        return False
    return bool(gpu_names()) or not (has_convolutions(model) or draws_random_numbers(model))
