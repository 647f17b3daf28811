"""TensorFlow start-up: quiet import, devices, strategies, precision, XLA.

Both the training loop (:mod:`common.training`) and the command-line helpers
(:mod:`common.cli`) need these; keeping them here lets neither import the
other.

* :func:`quiet_tensorflow` imports TensorFlow without its C++ start-up chatter.
* :func:`make_strategy` picks a ``tf.distribute`` strategy by name.
* :func:`set_mixed_precision` switches Keras' float16 policy on or off.
* :func:`describe_devices` says in a few words what a run computes on.
* :func:`resolve_jit` turns ``auto``/``on``/``off`` into a yes or no for XLA.
* :func:`run_pinned` runs child processes a few at a time, each on its own
  CPU cores with TensorFlow's thread pools sized to them; :func:`run_seeds`
  runs a benchmark's seeds that way.
* :func:`peak_rss_gb`, :func:`wait_measured` and :func:`run_measured`: a
  process's own peak resident memory, for the benchmarks' tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from common.errors import UsageError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
JIT_MODES = ("auto", "on", "off")


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
    the import itself still propagate (they are Python exceptions). With
    ``TF_CONFIG`` set (a multi-worker run may follow), no first op is run: it
    would fix the runtime's set-up before the strategy can configure it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _stderr_silenced():
        import tensorflow as tf

        if "TF_CONFIG" not in os.environ:
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
    """Use float16 compute with float32 variables (GPU); the loop scales losses."""
    import keras

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


def peak_rss_gb(pid="self") -> float:
    """Peak resident memory of process ``pid`` (default: this one) in GiB:
    its ``VmHWM`` in /proc; 0.0 when unreadable (the process has ended).

    Not ``ru_maxrss``: Linux carries a parent's peak into its child across
    fork and exec, so a small child of a large benchmark process would
    report at least the parent's size (both in its own ``getrusage`` and in
    the parent's ``wait4``). ``VmHWM`` starts again with each program.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):  # "VmHWM:   123456 kB"
            return int(line.split()[1]) / 1024**2
    return 0.0  # a process that is exiting has no memory map left


def wait_measured(child, interval: float = 0.05, timeout: float | None = None) -> float:
    """Wait for ``child`` (a ``subprocess.Popen``); return its peak resident
    memory in GiB (:func:`peak_rss_gb`, read every ``interval`` seconds: the
    high-water mark never falls, so only growth in the last interval before
    the child exits is missed). Its own children are not counted. After
    ``timeout`` seconds the child is sent SIGTERM (it saves a checkpoint and
    exits with 143), and SIGKILL 60 s later."""
    peak, start, signalled = 0.0, time.monotonic(), None
    while True:
        peak = max(peak, peak_rss_gb(child.pid))
        if child.poll() is not None:
            return peak
        now = time.monotonic()
        if timeout is not None and now - start > timeout and signalled is None:
            child.terminate()
            signalled = now
        elif signalled is not None and now - signalled > 60:
            child.kill()
        time.sleep(interval)


def last_line(log_path) -> str:
    """The last non-empty line of a child's log (its error, when it failed)."""
    path = Path(log_path)
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else "(no message)"


def jobs_at_once(jobs: int, commands: int) -> int:
    """How many of ``commands`` :func:`run_pinned` runs at once: ``jobs``, but
    no more than the commands nor the CPU cores this process may use."""
    return max(1, min(jobs, commands, len(os.sched_getaffinity(0))))


class ChildExit(NamedTuple):
    """How a child of :func:`run_pinned` or :func:`run_measured` ended: its
    exit code, wall time, peak resident memory (:func:`wait_measured`) and,
    from :func:`run_measured`, what it wrote on stderr."""

    code: int
    seconds: float
    peak_rss_gb: float
    stderr: str = ""

    def last_error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else "(no message)"


def run_measured(argv, stderr_path=None, timeout: float | None = None, **popen_args) -> ChildExit:
    """Run ``argv`` to its end (its stdout discarded), or ``timeout`` seconds
    (see :func:`wait_measured`); how it ended, with its peak resident memory.
    Its stderr goes to ``stderr_path`` if given (else a temporary file: never
    a pipe, which would stall a child that fills it) and comes back in
    :attr:`ChildExit.stderr`."""
    with open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, **popen_args)
        peak = wait_measured(child, timeout=timeout)
        seconds = time.perf_counter() - t0
        err.seek(0)
        return ChildExit(child.returncode, seconds, peak, err.read().decode(errors="replace"))


def run_pinned(commands, jobs: int, on_exit=None):
    """Run ``commands``, each ``(argv, log_path)``, ``jobs`` at once; yields
    a :class:`ChildExit` for each, in the order given.

    The CPU cores this process may use are dealt out round-robin into
    ``jobs`` shares. A child runs on one share, its TensorFlow and OpenMP
    thread pools sized to it, its output (stdout and stderr) appended to its
    log after a line naming the command, and hands the share on when it
    ends: the children never compete for a core. ``on_exit(i, ended)``, if
    given, is called as soon as command ``i`` ends (in a worker thread), so
    that a caller can record a finished child even when one listed before it
    fails. Once a child fails (or the caller stops reading), no new child
    starts (None is yielded for it); those running end on their own. A
    failure is reported on stderr when it happens, with its log's last line.
    """
    commands = list(commands)
    cores = sorted(os.sched_getaffinity(0))
    jobs = jobs_at_once(jobs, len(commands))
    shares: queue.Queue = queue.Queue()
    for i in range(jobs):
        shares.put(cores[i::jobs])

    stopped = threading.Event()

    def one(i, command):
        argv, log_path = command
        share = shares.get()
        if stopped.is_set():
            shares.put(share)
            return None
        threads = str(len(share))
        env = {**os.environ, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads,
               "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, argv))}\n")
                log.flush()
                t0 = time.perf_counter()
                child = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                # pinned from outside (preexec_fn is unsafe in a threaded parent): the child's interpreter
                # is still starting, single-threaded, and the threads it makes later inherit the pinning
                with contextlib.suppress(ProcessLookupError):  # a child that already ended
                    os.sched_setaffinity(child.pid, share)
                peak = wait_measured(child)
                ended = ChildExit(child.returncode, time.perf_counter() - t0, peak)
                if ended.code:  # said at once: the caller may still be waiting for a child listed before
                    stopped.set()
                    how = f"exit {ended.code}" if ended.code > 0 else f"killed by signal {-ended.code}"
                    print(f"{log_path}: {how} after {ended.seconds:.0f} s ({last_line(log_path)}); "
                          f"no new run starts, those running finish", file=sys.stderr, flush=True)
        finally:
            shares.put(share)
        if on_exit is not None:
            on_exit(i, ended)
        return ended

    pool = ThreadPoolExecutor(jobs)
    try:
        futures = [pool.submit(one, i, command) for i, command in enumerate(commands)]
        for future in futures:
            yield future.result()
    finally:  # a caller that stops early (a failed seed, Ctrl-C) starts no more; running ones end
        stopped.set()
        pool.shutdown(wait=True, cancel_futures=True)


FINISHED = "finished.json"


def read_record(path, command) -> dict | None:
    """The JSON record at ``path`` (e.g. a run's ``finished.json``) if it was
    written for ``command`` (its ``"command"`` entry), else None."""
    try:
        record = json.loads(Path(path).read_text())
        return record if record["command"] == command else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


JOBS_HELP = ("seeds trained at once (at most one per core), each in its own process on its own share of the "
             "CPU cores (<out>/seed<N>/); a seed that finished earlier with the same flags is read back, "
             "not run again")


def run_seeds(module: str, flags: list, seeds, out, jobs: int, first_only=(), inputs=None, settings=None):
    """``python -m module *flags --runs 1 --seed N --out <out>/seed<N>`` for
    each seed, ``jobs`` at once (:func:`run_pinned`; each log in
    ``<out>/seed<N>/log.txt``); yields each seed's ``runs.csv`` rows (a list
    of dicts) in seed order. ``first_only`` flags go to the first seed alone.
    A failed seed raises UsageError with its last log line.

    A seed that finished earlier with the same command (recorded in its
    folder's ``finished.json``) is not run again: its rows are read back, so
    a benchmark of several hours that was stopped, or is extended to more
    seeds, runs only the seeds it lacks. ``inputs(seed)``, if given, names
    files the seed reads (e.g. pretrained weights): one newer than its
    record runs the seed again. ``settings(flags)``, if given, is every
    setting the module's flags mean (defaults included, e.g.
    :func:`common.cli.parsed_settings`), kept in the record: a seed that ran
    when a default was another runs again, though its flags are the same."""
    import pandas as pd

    seeds, out = list(seeds), Path(out)
    argvs = {seed: ["-m", module, *flags, *(first_only if i == 0 else ()), "--runs", "1", "--seed", str(seed),
                    "--out", str(out / f"seed{seed}")] for i, seed in enumerate(seeds)}

    def finished(seed) -> bool:
        folder = out / f"seed{seed}"
        record = read_record(folder / FINISHED, argvs[seed])
        if not (folder / "runs.csv").is_file() or record is None:
            return False
        if settings is not None and "settings" in record:  # records older than the settings have none
            from common.cli import changed_settings, flag_text

            changed = changed_settings(record["settings"], settings(argvs[seed][2:]))
            if changed:
                name, then, now = changed[0]
                print(f"seed {seed} ran with --{name} {flag_text(then)}, today's default {flag_text(now)}: "
                      "runs again", flush=True)
                return False
        done = (folder / FINISHED).stat().st_mtime
        return all(Path(p).stat().st_mtime <= done for p in (inputs(seed) if inputs else ()))

    todo = [seed for seed in seeds if not finished(seed)]
    if len(todo) < len(seeds):
        done = ", ".join(str(seed) for seed in seeds if seed not in todo)
        print(f"seeds {done} finished earlier with the same flags: read back from {out}/seed<N>/", flush=True)
    if todo:
        print(f"running seed{'s' * (len(todo) > 1)} {', '.join(map(str, todo))} "
              f"({jobs_at_once(jobs, len(todo))} at a time); logs in {out}/seed<N>/log.txt", flush=True)
    for seed in todo:  # a seed that stops half-way must not pass for finished
        (out / f"seed{seed}" / FINISHED).unlink(missing_ok=True)

    def record(i, ended):  # at once: a seed that fails before it in the list must not lose it
        if ended.code == 0:
            seed = todo[i]
            record = {"command": argvs[seed]}
            if settings is not None:
                record["settings"] = settings(argvs[seed][2:])
            from common.results import write_json

            write_json(out / f"seed{seed}" / FINISHED, record)

    exits = run_pinned([([sys.executable, *argvs[s]], out / f"seed{s}" / "log.txt") for s in todo], jobs,
                       on_exit=record)
    for seed in seeds:
        folder = out / f"seed{seed}"
        if seed in todo:
            ended = next(exits)  # waits for this seed's process
            if ended is None or ended.code != 0:  # None: not started, after another seed failed
                log = folder / "log.txt"
                raise UsageError(f"seed {seed} failed: {last_line(log)} (whole log: {log})")
        yield pd.read_csv(folder / "runs.csv").to_dict("records")
