"""The one training loop, shared by every model of every package.

A model contributes a :class:`Task` (its per-sample loss terms, per-iteration
scalars such as the SOM temperature, an optional periodic refresh such as
DEC's target distribution, and its evaluation); :func:`train` does the rest:

* iterations (DESOM counts iterations) or epochs (``epochs=``), over
  batches of a fixed-seed shuffle of the samples, reshuffled every epoch;
  each epoch's order depends only on (seed, epoch), so a resumed run sees
  exactly the batches the uninterrupted run would have seen;
* data in memory (held in a variable, batches gathered in the graph) or, for
  data larger than memory, a ``DiskArray`` (.npy files) read batch by batch on the host;
* one compiled step (XLA where it pays, see
  :func:`common.runtime.resolve_jit`), run under a ``tf.distribute`` strategy
  with the global batch split across replicas and per-sample losses averaged
  over the global batch; with several workers (``MultiWorkerMirroredStrategy``)
  they agree on K and on checkpoint moments, which each decides by its own
  clock, and only the chief keeps logs and checkpoints;
* several steps per call (Keras' ``steps_per_execution``): a second
  ``tf.function`` runs up to K steps in a loop over the data iterator, so the
  host neither builds tensors nor reads values between steps. Per-iteration
  scalars are computed in the graph from the iteration counter, loss sums
  accumulate in variables on the device, and a call stops at the next log
  row, refresh or the end, so K changes nothing but speed. ``auto`` picks K
  for calls of about 0.1 s, and with several workers long enough that their
  agreement between calls (a round of collectives) costs a tenth of a call;
* a guard against divergence: the first step whose loss terms are not all
  finite ends the call at once, and :class:`~common.errors.TrainingDiverged`
  names the iteration and the terms; nothing is saved after it, so the last
  checkpoint holds weights from before;
* a progress bar, a CSV log row every ``eval_interval`` iterations (and
  before the first and after the last), written atomically;
* ``tf.train.Checkpoint`` of model, optimizer, iteration and task state every
  ``checkpoint_minutes`` of wall-clock time, at the end, and when training
  stops on an error, Ctrl-C or SIGTERM; ``resume=True`` continues from the last one to
  the same final iteration count, keeping the log rows up to that point;
* timings split into compilation (tracing and the first call, its one step
  included), training steps, evaluation, refreshes, checkpoints, set-up and
  the rest (:class:`Timings`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.diskarray import DiskArray
from common.errors import TrainingDiverged, UsageError
from common.results import atomic_path
from common.runtime import (
    STRATEGIES,
    is_chief,
    make_strategy,
    quiet_tensorflow,
    resolve_jit,
    set_mixed_precision,
    worker_count,
)

__all__ = ["STRATEGIES", "CSVLog", "RunPlan", "StopTraining", "Task", "Timings", "TrainResult",
           "checkpoint_exists", "layer_seeds", "layers_of", "make_strategy", "plan", "planned_run",
           "proportional_batch_size", "reseed", "seed_states", "set_mixed_precision", "train"]

#: Wall-clock length aimed at for one call of the K-step function when K is ``auto``.
TARGET_CALL_SECONDS = 0.1
#: The largest K that ``auto`` picks.
MAX_STEPS_PER_EXECUTION = 1000
#: ... and the largest share of a call that ``auto`` leaves to the time spent between calls on the
#: workers' agreement (several workers: a round of collectives per call, ~5 ms on one host here).
CALL_OVERHEAD_SHARE = 0.1
#: Seconds between progress-bar refreshes (each one reads the loss sums from the device).
BAR_SECONDS = 0.5
#: The time a phase (with one line per log row, verbose 2) and the whole run (within a
#: :func:`planned_run`) have to go is printed once the phase's steps have taken this long
#: (the speed of its first steps, measured).
ESTIMATE_AFTER_SECONDS = 2.0


# --------------------------------------------------------------------------- #
# What a model brings to the loop
# --------------------------------------------------------------------------- #
class Task:
    """A model's part of training. Subclasses set ``model`` and ``loss_terms``.

    ``loss_terms(x, idx, scalars)`` runs inside the compiled step on one
    replica's batch ``x`` (with the samples' indices ``idx`` into the training
    array) and returns a dict of per-sample tensors; its ``"loss"`` entry is
    minimised, every entry is logged as its batch mean.
    """

    model = None

    def loss_terms(self, x, idx, scalars: dict) -> dict:
        raise NotImplementedError

    def variables(self) -> list:
        """Variables to train (default: the model's trainable variables)."""
        return list(self.model.trainable_variables)

    def step_layers(self) -> list:
        """Keras layers the step runs besides ``model`` (an augmentation
        pipeline, a projection head): XLA's ``auto`` looks at them too, and
        their random state starts from the phase's seed and is checkpointed."""
        return []

    def scalars(self, iteration) -> dict:
        """Per-iteration numbers passed to ``loss_terms`` (e.g. the temperature T).

        ``iteration`` is an int64 scalar tensor: this runs inside the compiled
        step, so compute with ``keras.ops`` / TensorFlow ops. The loop also
        calls it eagerly for the log rows.
        """
        return {}

    def refresh(self, iteration: int) -> dict | None:
        """Called every ``refresh_interval`` iterations before the step.

        May update task state (DEC's targets) and return values to log; raise
        :class:`StopTraining` to end training early (convergence).
        """
        return None

    def evaluate(self) -> dict:
        """Metrics for a log row (on data the task was given)."""
        return {}

    def trackables(self) -> dict:
        """Objects saved in checkpoints (default: the model). The random state
        of the Keras layers among them (dropout, sampled noise) is saved too."""
        return {"model": self.model}


def batch_sum(x):
    """``x`` summed over its first axis, over the whole global batch.

    Inside the step of a strategy with several replicas, ``loss_terms``
    sees one replica's share of the batch: the shares' sums are added up
    across the replicas (an all-reduce, with its gradient). Elsewhere, the
    plain sum. For batch statistics (DEC's per-batch target, DESOM's latent
    spread, an entropy of the batch's mean prediction) that must not change
    with the number of devices.
    """
    import tensorflow as tf
    from keras import ops

    total = ops.sum(x, axis=0)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, total)
    return total


def batch_mean(x):
    """``x`` averaged over its first axis, over the whole global batch (:func:`batch_sum`)."""
    from keras import ops

    ones = ops.ones_like(ops.reshape(x, (ops.shape(x)[0], -1))[:, 0])
    return batch_sum(x) / batch_sum(ones)


def layers_of(fn) -> list:
    """The Keras layers of a batch function (a ``map_fn`` or a task's
    augmentation), where it has them: its ``pipeline`` (see
    :class:`common.networks.Augmentation`); plain functions have none."""
    pipeline = getattr(fn, "pipeline", None)
    return [] if pipeline is None else [pipeline]


def layer_seeds(n: int, *entropy) -> list[int]:
    """``n`` seeds for Keras layers (each below 2**31), drawn from the
    integers ``entropy`` (numpy's ``SeedSequence``)."""
    return [int(s) % 2**31 for s in np.random.SeedSequence([int(e) for e in entropy]).generate_state(n)]


def seed_states(layers) -> list:
    """The state variables of the Keras seed generators in ``layers`` (a
    layer's own checkpoint leaves them out), each once, in order."""
    return list({id(v): v for layer in layers for v in layer.variables
                 if v.name == "seed_generator_state"}.values())


def reseed(states, seed: int, phase: str = ""):
    """Start the seed generator ``states`` (:func:`seed_states`) afresh, each
    from its own seed drawn from (``seed``, ``phase``): phases of one run
    given the same seed (pretraining, then clustering) draw differently."""
    for v, s in zip(states, layer_seeds(len(states), seed, zlib.crc32(phase.encode()))):
        v.assign(np.array([s, 0]).astype(v.dtype))


class StopTraining(Exception):
    """Raised by :meth:`Task.refresh` to stop early; the message says why."""


@dataclass
class Timings:
    """Where the wall-clock time of one :func:`train` call went, in seconds.

    The fields add up to ``total``. ``compile``: the first call of each
    compiled function (tracing, XLA compilation and the ``compile_steps``
    steps they ran); ``steps``: every other training step (``timed_steps`` of
    them); ``evaluation``: log rows (``Task.evaluate`` and the CSV write);
    ``refresh``: ``Task.refresh``; ``checkpoint``: checkpoint writes;
    ``setup``: optimizer, checkpoint restore and input pipeline; ``other``:
    the loop's own bookkeeping and the progress bar.
    """

    setup: float = 0.0
    compile: float = 0.0
    steps: float = 0.0
    evaluation: float = 0.0
    refresh: float = 0.0
    checkpoint: float = 0.0
    other: float = 0.0
    total: float = 0.0
    compile_steps: int = 0
    timed_steps: int = 0

    @property
    def iterations_per_second(self) -> float | None:
        """Training steps per second, compilation excluded."""
        return self.timed_steps / self.steps if self.steps > 0 and self.timed_steps else None

    def to_dict(self) -> dict:
        out = {f"{k}_seconds" if isinstance(v, float) else k: round(v, 3) if isinstance(v, float) else v
               for k, v in asdict(self).items()}
        ips = self.iterations_per_second
        out["iterations_per_second"] = None if ips is None else round(ips, 2)
        return out


@dataclass
class TrainResult:
    iterations: int          # iteration count reached
    trained: int             # iterations run by this call (0 when resuming a finished run)
    seconds: float           # wall time of this call (see timings for where it went)
    stopped_early: str | None
    log_path: Path | None
    timings: Timings = field(default_factory=Timings)
    jit_compile: bool = False
    steps_per_execution: int = 1  # K of the last call (auto: the one it settled on)

    @property
    def iterations_per_second(self) -> float | None:
        return self.timings.iterations_per_second


# --------------------------------------------------------------------------- #
# Log
# --------------------------------------------------------------------------- #
class CSVLog:
    """A CSV log rewritten atomically on every row (logs are short)."""

    def __init__(self, path: Path | None, keep_until: int | None = None):
        self.path = path
        self.frame = pd.DataFrame()
        if path is not None and keep_until is not None and path.is_file():
            old = pd.read_csv(path)
            self.frame = old[old["iteration"] <= keep_until].reset_index(drop=True)

    def append(self, row: dict):
        self.frame = pd.concat([self.frame, pd.DataFrame([row])], ignore_index=True)
        if set(row) == set(self.frame.columns):  # keep the order of the fullest row
            self.frame = self.frame[list(row)]
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            self.frame.to_csv(tmp, index=False)
            os.replace(tmp, self.path)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
class _Batches:
    """Batches of an in-memory array, drawn inside the compiled loop.

    Epoch e visits the samples in the order of a permutation seeded by
    (seed, e), in full batches (the last ``n % batch_size`` samples of each
    epoch's permutation are left out; they differ from epoch to epoch).
    ``shuffle=False`` takes consecutive rows instead, each epoch starting
    where the last stopped (wrapping around the data). The batch of
    iteration i is a function of (seed, i) alone, so a resumed run
    sees exactly the batches the uninterrupted run would have seen, whatever
    the number of steps per call. The permutation of the current epoch lives
    in a variable, redrawn in the graph when an epoch starts; the batch is
    gathered from the data (a variable too) in the graph (no ``tf.data``
    iterator between steps: measured, it cost Kerasom a tenth of its step).

    Data larger than memory: when ``x`` is a :class:`~common.diskarray.DiskArray`
    (a ``.npy`` file or a folder of shards), each batch's rows are read from
    disk on the host instead (``tf.numpy_function``): the same batches, with
    only the batch in memory.
    """

    def __init__(self, tf, x, batch_size: int, seed: int, map_fn=None, shuffle: bool = True):
        self.tf, self.batch_size, self.seed, self.map_fn, self.shuffle = tf, batch_size, seed, map_fn, shuffle
        self.n = len(x)
        self.steps_per_epoch = self.n // batch_size
        self.dtype = tf.as_dtype(x.dtype)
        self.shape = (batch_size, *x.shape[1:])
        if isinstance(x, DiskArray):
            self.host, self.x = x, None
        else:
            # A variable, so that the data stay where the strategy puts them (on the
            # GPU, once) rather than travel with every call.
            self.host, self.x = None, tf.Variable(x, trainable=False, name="data")
        self.order = tf.Variable(tf.zeros([self.n], tf.int64), trainable=False, name="order")
        self.epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False, name="order_epoch")

    def _read(self, idx):
        """Rows ``idx`` of the data on disk."""
        return self.host[idx]

    def permutation(self, epoch):
        tf = self.tf
        if not self.shuffle:  # consecutive rows, each epoch going on where the last one stopped
            start = epoch * self.steps_per_epoch * self.batch_size
            return (tf.range(self.n, dtype=tf.int64) + start) % self.n
        return tf.random.experimental.stateless_shuffle(
            tf.range(self.n, dtype=tf.int64), seed=tf.stack([tf.cast(self.seed, tf.int64), epoch]))

    def __call__(self, iteration):
        """(x, idx) of the batch of ``iteration`` (an int64 tensor), in the graph."""
        tf = self.tf
        epoch, pos = iteration // self.steps_per_epoch, iteration % self.steps_per_epoch
        if self.epoch != epoch:  # autograph: a tf.cond, taken once per epoch
            self.order.assign(self.permutation(epoch))
            self.epoch.assign(epoch)
        idx = tf.slice(self.order, [pos * self.batch_size], [self.batch_size])
        if self.host is None:
            xb = tf.gather(self.x, idx)
        else:
            xb = tf.numpy_function(self._read, [idx], self.dtype, stateful=False)
            xb.set_shape(self.shape)
        return (xb if self.map_fn is None else self.map_fn(xb)), idx


# --------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------- #
def check_steps_per_execution(value):
    """``"auto"`` or a positive integer (K, the steps run per compiled call)."""
    if value is None or value == "auto":
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or str(value).strip() not in (str(k), f"{k}.0"):
        raise UsageError(f"steps per execution must be 'auto' or a positive integer, got {value!r}")
    return k


def auto_steps_per_execution(per_step: float, per_call: float = 0.0) -> int:
    """``auto``'s K: calls of about ``TARGET_CALL_SECONDS``, and long enough
    that ``per_call`` seconds spent between them (the workers' agreement) is
    at most ``CALL_OVERHEAD_SHARE`` of a call; 1 to ``MAX_STEPS_PER_EXECUTION``."""
    seconds = max(TARGET_CALL_SECONDS, per_call * (1 - CALL_OVERHEAD_SHARE) / CALL_OVERHEAD_SHARE)
    return int(min(MAX_STEPS_PER_EXECUTION, max(1, seconds / max(per_step, 1e-9))))


def proportional_batch_size(n_samples: int, largest: int = 256, min_batches: int = 50,
                            smallest: int = 16) -> int:
    """``largest``, or on smaller data the largest power of two giving at least
    ``min_batches`` batches per epoch (never below ``smallest``).

    Counted in epochs, a small data set in batches of 256 gets few updates:
    4,000 images make 15 batches, and 5 epochs of autoencoder pretraining are
    75 updates (k-means accuracy 0.63-0.75 on four Fashion-MNIST classes at
    64 px); in batches of 64, the same 5 epochs in the same time give 0.91-0.92.
    """
    size = largest
    while size > smallest and n_samples // size < min_batches:
        size //= 2
    return max(1, min(size, n_samples))


def plan(n_samples: int, batch_size: int, *, iterations: int | None = None,
         epochs: float | None = None) -> tuple[int, int]:
    """(total iterations, iterations per epoch) of a run; one of ``iterations``
    or ``epochs`` (which may be fractional) sets its length."""
    if batch_size < 1:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if batch_size > n_samples:
        raise UsageError(f"batch size {batch_size} is larger than the {n_samples} training samples; "
                         f"use --batch_size {min(256, n_samples)} or less")
    steps_per_epoch = n_samples // batch_size
    if (iterations is None) == (epochs is None):
        raise ValueError("give exactly one of iterations or epochs")
    total = int(iterations) if iterations is not None else int(round(epochs * steps_per_epoch))
    if total < 1:
        raise UsageError(f"the number of iterations must be positive, got {total}")
    return total, steps_per_epoch


class RunPlan:
    """The optimizer steps a whole run expects, phase by phase, to estimate its
    time to go while one phase runs.

    ``phases`` is a list of ``(phase, steps)`` in the order the run trains
    them (as :func:`train` names them with ``phase=``; ``steps`` the most it
    takes, as phases that stop early or train on a subset take fewer). A phase
    still to come is costed at the speed measured in the last phase of its
    kind (:meth:`kind`), or else in the current one, so the estimate sharpens
    as each kind of phase starts. Time outside the steps
    (UMAP, k-means, evaluations, pictures) is not counted.

    Args:
        phases: list of ``(name, steps)``; phases with no steps are left out.
    """

    def __init__(self, phases):
        self.steps = {name: int(n) for name, n in phases if n and n > 0}
        self.started: set = set()
        self.per_step: dict = {}  # kind of phase -> the speed last measured, seconds a step

    @staticmethod
    def kind(phase: str) -> str:
        """Phases that differ only by numbers (``iteration_03_knn``) run the same step."""
        return re.sub(r"\d+", "#", phase)

    def describe(self) -> str:
        """One line: the phases and their steps (at most)."""
        if len(self.steps) <= 3:
            return " + ".join(f"{name} {n:,}" for name, n in self.steps.items()) + " optimizer steps at most"
        names = list(self.steps)
        return (f"{sum(self.steps.values()):,} optimizer steps at most in {len(names)} phases "
                f"({names[0]} {self.steps[names[0]]:,}, {names[1]} {self.steps[names[1]]:,}, ..., "
                f"{names[-1]} {self.steps[names[-1]]:,})")

    def start(self, phase: str):
        """``phase`` begins: it and the planned phases before it (which a
        resumed run may have skipped) no longer count as to come."""
        names = list(self.steps)
        self.started.update(names[:names.index(phase) + 1] if phase in self.steps else [phase])

    def seconds_to_go(self, phase: str, steps_left: int, per_step: float) -> float:
        """The run's seconds to go while ``phase`` has ``steps_left`` steps
        left at ``per_step`` seconds a step."""
        self.per_step[self.kind(phase)] = per_step
        return steps_left * per_step + sum(n * self.per_step.get(self.kind(name), per_step)
                                           for name, n in self.steps.items()
                                           if name not in self.started and name != phase)


_RUN_PLAN: RunPlan | None = None


@contextlib.contextmanager
def planned_run(phases):
    """Within the block, every :func:`train` call counts against the
    :class:`RunPlan` of ``phases`` and prints the whole run's time to go
    with its own (see :class:`RunPlan`). Yields the plan."""
    global _RUN_PLAN
    previous, _RUN_PLAN = _RUN_PLAN, RunPlan(phases)
    try:
        yield _RUN_PLAN
    finally:
        _RUN_PLAN = previous


# --------------------------------------------------------------------------- #
# The loop: train() and its four parts (set-up, step, progress, checkpoints)
# --------------------------------------------------------------------------- #
def train(task: Task, x, *, iterations: int | None = None, epochs: float | None = None,
          batch_size: int = 256, optimizer=None, strategy=None, save_dir=None, phase: str = "train",
          log_name: str = "log.csv", eval_interval: int | None = None,
          refresh_interval: int | None = None, checkpoint_minutes: float | None = 10.0,
          resume: bool = False, seed: int = 0, jit_compile="auto", steps_per_execution="auto",
          verbose: int = 1, map_fn=None, shuffle: bool = True) -> TrainResult:
    """Train ``task`` on the samples of ``x`` (numpy array, first axis = samples).

    Args:
        iterations / epochs: length of training (give one); an epoch is
            ``len(x) // batch_size`` iterations.
        batch_size: the global batch, split across the strategy's replicas.
        optimizer: a Keras optimizer, created inside ``strategy.scope()``
            (default: Adam with Keras defaults, created here).
        strategy: a ``tf.distribute`` strategy (default: the current one).
            The model's variables must have been created in its scope.
        save_dir: where ``log_name`` and ``checkpoints/<phase>`` go (None:
            keep nothing on disk).
        eval_interval: iterations between log rows (default: one epoch).
        refresh_interval: iterations between calls of ``task.refresh``.
        checkpoint_minutes: wall-clock minutes between checkpoints (None or
            0: only at the end and when training stops on an error or Ctrl-C).
        resume: restore the last checkpoint of this phase, if any.
        jit_compile: ``"auto"``, ``"on"``/True or ``"off"``/False: compile the
            step with XLA (see :func:`common.runtime.resolve_jit`).
        steps_per_execution: K, the steps run per compiled call, or ``"auto"``
            (calls of about 0.1 s). Results do not depend on it.
        verbose: 0 silent, 1 progress bar, 2 one line per log row.
        map_fn: optional function applied to each batch in the graph, before
            the step (data augmentation); it keeps the batch's shape and dtype.
            The random state of its Keras layers (:func:`layers_of`) and of
            ``task.step_layers()`` starts from (``seed``, ``phase``) and is
            checkpointed; that of the layers in ``task.trackables()`` (dropout,
            a VAE's sample) is checkpointed and goes on across phases.
        shuffle: draw each epoch's batches in a new seeded order (default);
            False: consecutive rows in data order, wrapping around at the
            end (DEC-keras' clustering phase, without its partial batch).

    The work is done by :class:`_Run` in four parts a reader can take one at a
    time: set-up (:meth:`_Run.__init__`), the compiled step (:class:`_Step`),
    progress and the log (:class:`_Progress`) and checkpoints
    (:class:`_Checkpoints`); :meth:`_Run.run` is the loop that ties them.
    """
    return _Run(task, x, iterations=iterations, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                strategy=strategy, save_dir=save_dir, phase=phase, log_name=log_name,
                eval_interval=eval_interval, refresh_interval=refresh_interval,
                checkpoint_minutes=checkpoint_minutes, resume=resume, seed=seed, jit_compile=jit_compile,
                steps_per_execution=steps_per_execution, verbose=verbose, map_fn=map_fn,
                shuffle=shuffle).run()


class _Run:
    """One :func:`train` call. ``__init__`` is the set-up: the arguments
    checked, the strategy, XLA choice, optimizer and counters, the random
    states, the checkpoints (restored when resuming) and the log;
    :meth:`run` is the loop."""

    def __init__(self, task, x, *, iterations, epochs, batch_size, optimizer, strategy, save_dir, phase,
                 log_name, eval_interval, refresh_interval, checkpoint_minutes, resume, seed, jit_compile,
                 steps_per_execution, verbose, map_fn, shuffle):
        import keras

        self.t_start = time.perf_counter()
        self.timings = Timings()
        self.tf = tf = quiet_tensorflow()
        self.task, self.phase, self.seed, self.verbose = task, phase, seed, verbose
        self.map_fn, self.shuffle, self.batch_size, self.resume = map_fn, shuffle, batch_size, resume
        self.refresh_interval, self.epochs_logged = refresh_interval, epochs is not None
        self.x = np.asarray(x) if not hasattr(x, "shape") else x
        self.total, self.steps_per_epoch = plan(len(self.x), batch_size, iterations=iterations, epochs=epochs)
        self.eval_interval = int(eval_interval or self.steps_per_epoch)
        if self.eval_interval < 1 or (refresh_interval is not None and refresh_interval < 1):
            raise UsageError("eval_interval and refresh_interval must be positive")
        if checkpoint_minutes is not None and not checkpoint_minutes >= 0:
            raise UsageError(f"checkpoint_minutes must be 0 or more, got {checkpoint_minutes}")
        self.checkpoint_seconds = 60.0 * checkpoint_minutes if checkpoint_minutes else None
        self.fixed_k = check_steps_per_execution(steps_per_execution)
        self.strategy = strategy = strategy or tf.distribute.get_strategy()
        replicas = strategy.num_replicas_in_sync
        self.multi, chief = worker_count(strategy) > 1, is_chief(strategy)
        self._gather = None  # (several workers) the compiled gather of agree_on
        if batch_size % replicas:
            raise UsageError(f"batch size {batch_size} does not split evenly over {replicas} replicas")
        self.jit = resolve_jit(jit_compile, task.model, replicas, task.step_layers())

        variables = task.variables()
        if replicas > 1:
            stray = [v.path for v in variables
                     if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))]
            if stray:
                raise ValueError(f"create the model inside strategy.scope(); {stray[0]} was not")
        with strategy.scope():
            if optimizer is None:
                optimizer = keras.optimizers.Adam()
            if keras.mixed_precision.global_policy().name == "mixed_float16" and not isinstance(
                    optimizer, keras.optimizers.LossScaleOptimizer):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(variables)
            self.iteration = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")
            self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed")  # step seconds
            self.finished = tf.Variable(False, trainable=False, name="finished")  # stopped early
        self.step = _Step(tf, task, strategy, optimizer, variables, self.iteration, batch_size, self.jit)

        # Keras leaves seed generators out of a layer's checkpoint; both kinds below are
        # checkpointed. The augmentation's start from (seed, phase): the draws of a
        # phase, like its batches, depend neither on interruptions nor on what the
        # same layers drew in earlier phases. The models' own (dropout, a VAE's
        # sampled code) are not reseeded: they go on across phases, as before.
        augmentation = [*layers_of(map_fn), *task.step_layers()]
        random_state = seed_states(augmentation)
        reseed(random_state, seed, phase)
        models = [o for o in task.trackables().values() if isinstance(o, keras.layers.Layer)]
        # the models' own, each once
        model_random_state = seed_states([*augmentation, *models])[len(random_state):]

        self.checkpoints = None
        if save_dir is not None:
            save_dir = Path(save_dir)
            parts = dict(optimizer=optimizer, iteration=self.iteration, elapsed=self.elapsed,
                         finished=self.finished, **task.trackables())
            random_states = {name: v for name, v in (("random_state", random_state),
                                                     ("model_random_state", model_random_state)) if v}
            self.checkpoints = _Checkpoints(tf, save_dir, phase, strategy, resume, parts, random_states,
                                            self.timings)
        self.start = int(self.iteration.numpy())
        log_path = save_dir / log_name if save_dir is not None and chief else None
        self.log = CSVLog(log_path, keep_until=self.start if self.start > 0 else None)
        self.result = TrainResult(iterations=self.start, trained=0, seconds=0.0, stopped_early=None,
                                  log_path=log_path, timings=self.timings, jit_compile=self.jit)

    def agree_on(self, k: int, checkpoint: int) -> tuple[int, bool]:
        """The same K (the smallest of the workers') and the same checkpoint
        decision (any worker's) on every worker, in one gather: each worker's
        own clock decides them, and all must run the same collective steps."""
        strategy, tf = self.strategy, self.tf
        if self._gather is None:  # one graph: eagerly, each op was a collective round
            self._gather = tf.function(lambda v: strategy.gather(strategy.run(tf.identity, (v,)), axis=0))
        every = self._gather(tf.constant([[k, checkpoint]], tf.int64)).numpy()
        return int(every[:, 0].min()), bool(every[:, 1].max())

    def finish(self, it: int) -> TrainResult:
        result, timings = self.result, self.timings
        result.iterations, result.trained = it, it - self.start
        timings.total = time.perf_counter() - self.t_start
        parts = ("setup", "compile", "steps", "evaluation", "refresh", "checkpoint")
        timings.other = max(0.0, timings.total - sum(getattr(timings, k) for k in parts))
        result.seconds = timings.total
        return result

    def boundary(self, i: int) -> int:
        """The next iteration after ``i`` where a call must stop (a log row, a
        refresh or the end)."""
        nxt = min(self.total, (i // self.eval_interval + 1) * self.eval_interval)
        if self.refresh_interval:
            nxt = min(nxt, (i // self.refresh_interval + 1) * self.refresh_interval)
        return nxt

    def run(self) -> TrainResult:
        tf, timings, total, start, step = self.tf, self.timings, self.total, self.start, self.step
        if start >= total or bool(self.finished.numpy()):
            return self.finish(start)
        with self.strategy.scope():
            batches = _Batches(tf, self.x, self.batch_size, self.seed, self.map_fn, self.shuffle)
        timings.setup = time.perf_counter() - self.t_start
        t = time.perf_counter()
        step.trace(batches)
        timings.compile = time.perf_counter() - t
        if self.verbose:
            left = total - start
            where = f"iterations {start + 1}-{total} of {total} (resumed)" if start else f"{total} iterations"
            per_epoch = self.steps_per_epoch
            print(f"{self.phase}: {where} = {left / per_epoch:.1f} epochs of {per_epoch} "
                  f"batches of {self.batch_size}; XLA {'on' if self.jit else 'off'}, steps per call "
                  f"{'auto' if self.fixed_k == 'auto' else self.fixed_k}", flush=True)
        if _RUN_PLAN is not None:
            _RUN_PLAN.start(self.phase)

        progress = _Progress(self, start)
        kept = self.checkpoints.kept_sums(start) if self.resume and self.checkpoints else None
        if kept is not None:  # the loss sums of the steps since the last row, saved with the checkpoint
            progress.row_it = kept["row_iteration"]
            step.set_sums(kept["sums"])
        if start == 0 or (start % self.eval_interval == 0
                          and start not in set(self.log.frame.get("iteration", []))):
            progress.first_row(start)  # the map before training (or the row an interruption left unwritten)

        it = start                         # the iteration reached
        k_auto, per_step, per_call = 1, None, None
        last_checkpoint = time.perf_counter()
        try:
            while it < total:
                if self.refresh_interval and it % self.refresh_interval == 0:
                    self.refresh(it)
                t = time.perf_counter()
                compiling = not step.compiled  # the first call traces and compiles: one step only
                k = 1 if compiling else min(k_auto if self.fixed_k == "auto" else self.fixed_k,
                                            self.boundary(it) - it)
                it, bad = step(k)
                if bad:
                    raise TrainingDiverged(_divergence_message(
                        self.phase, it, step.bad_terms, self.checkpoints and self.checkpoints.manager))
                dt = time.perf_counter() - t
                if compiling:
                    timings.compile += dt
                    timings.compile_steps += k
                else:
                    timings.steps += dt
                    timings.timed_steps += k
                    self.elapsed.assign_add(dt)
                    per_step = dt / k if per_step is None else 0.7 * per_step + 0.3 * dt / k
                    k_auto = auto_steps_per_execution(per_step, per_call or 0.0)
                    progress.time_to_go(it, per_step)
                now = time.perf_counter()
                progress.after_call(it, now, is_row=it % self.eval_interval == 0 or it == total)
                timed = self.checkpoints is not None and bool(self.checkpoint_seconds)
                checkpoint = timed and now - last_checkpoint >= self.checkpoint_seconds
                if self.multi and (self.fixed_k == "auto" or timed):
                    # the workers agree on the next K and on checkpointing now, in one round of
                    # collectives a call, whose time auto's K keeps a small share of a call
                    t = time.perf_counter()
                    k_auto, checkpoint = self.agree_on(k_auto, int(checkpoint))
                    dt = time.perf_counter() - t
                    if not compiling:  # (the first round also sets up the collective)
                        per_call = dt if per_call is None else 0.7 * per_call + 0.3 * dt
                if checkpoint:
                    self.checkpoints.save(it, progress.row_it, step.read_sums())
                    last_checkpoint = time.perf_counter()
        except StopTraining as stop:
            self.result.stopped_early = str(stop)
            self.finished.assign(True)
            progress.last_row(it)
            if self.verbose:
                print(f"\nStopped at iteration {it}: {stop}", flush=True)
        except TrainingDiverged:
            raise  # the weights are spoiled: keep the last checkpoint as it is
        except BaseException:
            # Ctrl-C, SIGTERM or an error: keep what was trained so far, then re-raise.
            it = int(self.iteration.numpy())
            if self.checkpoints is not None and it > start:
                self.checkpoints.save(it, progress.row_it, step.read_sums())
                if self.verbose:
                    print(f"\nSaved a checkpoint at iteration {it} in {self.checkpoints.manager.directory}; "
                          "continue with --resume", flush=True)
            raise
        self.result.steps_per_execution = self.fixed_k if self.fixed_k != "auto" else k_auto
        if self.checkpoints is not None:
            self.checkpoints.save(it, progress.row_it, step.read_sums())
        return self.finish(it)

    def refresh(self, it: int):
        t = time.perf_counter()
        refreshed = self.task.refresh(it)
        self.timings.refresh += time.perf_counter() - t
        if refreshed and self.verbose == 2:
            print(f"refresh at {it}: " + ", ".join(f"{k}={v:.4g}" for k, v in refreshed.items()), flush=True)


class _Step:
    """The compiled training step, and the function that runs K of them per
    call, summing the loss terms on the device and stopping at the first step
    whose terms are not all finite."""

    def __init__(self, tf, task, strategy, optimizer, variables, iteration, batch_size: int, jit: bool):
        self.tf, self.task, self.strategy, self.optimizer = tf, task, strategy, optimizer
        self.variables, self.iteration, self.batch_size = variables, iteration, batch_size
        self.replicas = strategy.num_replicas_in_sync
        import keras

        self.scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.sums: dict = {}        # loss term -> float64 variable on the device
        self.bad_terms: dict = {}   # loss term -> its value at the first non-finite step
        self.batches = None
        self.compiled = False       # the K-step function has run once (traced and compiled)
        self.one_step = tf.function(self._one_step, jit_compile=jit, reduce_retracing=True)
        self.k_steps = tf.function(self._k_steps)

    def _mean(self, per_sample):
        # Sum over this replica's samples / the global batch: summed over the
        # replicas, the mean of the global batch. (tf.nn.compute_average_loss
        # computes the same, with an Assert that XLA complains about.)
        tf = self.tf
        return tf.reduce_sum(tf.cast(per_sample, tf.float32)) / self.batch_size

    def _replica_step(self, xb, idx, scalars):
        tf, task, optimizer = self.tf, self.task, self.optimizer
        if self.replicas > 1:  # this replica's share of the global batch
            per_replica = self.batch_size // self.replicas
            first = tf.distribute.get_replica_context().replica_id_in_sync_group * per_replica
            xb, idx = xb[first:first + per_replica], idx[first:first + per_replica]
        with tf.GradientTape() as tape:
            terms = task.loss_terms(xb, idx, scalars)
            loss = self._mean(terms["loss"])
            if task.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(task.model.losses))
            target = optimizer.scale_loss(loss) if self.scaled else loss
        grads = tape.gradient(target, self.variables)
        optimizer.apply_gradients(zip(grads, self.variables))
        return {k: self._mean(v) for k, v in terms.items()}

    def _one_step(self, xb, idx):
        tf, strategy = self.tf, self.strategy
        scalars = self.task.scalars(self.iteration.read_value())
        out = strategy.run(self._replica_step, args=(xb, idx, scalars))
        self.iteration.assign_add(1)  # in the same compiled step as the update it counts
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    def _k_steps(self, k):
        tf = self.tf
        bad = tf.constant(False)
        for _ in tf.range(k):
            out = self.one_step(*self.batches(self.iteration.read_value()))
            bad = tf.logical_not(tf.reduce_all(tf.stack([tf.math.is_finite(v) for v in out.values()])))
            if bad:  # stop at once: this step's update has already spoiled the weights
                for name, value in out.items():
                    self.bad_terms[name].assign(value)
                break
            for name, total_ in self.sums.items():
                total_.assign_add(tf.cast(out[name], tf.float64))
        return self.iteration.read_value(), bad

    def trace(self, batches):
        """Trace (not run) the step on ``batches`` to name the loss terms, and
        create their sums."""
        tf = self.tf
        self.batches = batches
        spec = tf.TensorSpec(batches.shape, batches.dtype)
        terms = self.one_step.get_concrete_function(
            spec, tf.TensorSpec((self.batch_size,), tf.int64)).structured_outputs
        with self.strategy.scope():
            for name in terms:
                self.sums[name] = tf.Variable(0.0, dtype=tf.float64, trainable=False, name=f"sum_{name}")
                self.bad_terms[name] = tf.Variable(0.0, dtype=tf.float32, trainable=False, name=f"bad_{name}")

    def __call__(self, k: int) -> tuple[int, bool]:
        """Run ``k`` steps: (the iteration reached, whether a step diverged)."""
        reached, bad = self.k_steps(self.tf.constant(k, self.tf.int64))
        self.compiled = True
        return int(reached), bool(bad)

    def read_sums(self) -> dict:
        return {k: float(v.numpy()) for k, v in self.sums.items()}

    def set_sums(self, values: dict):
        for name, value in values.items():
            if name in self.sums:
                self.sums[name].assign(value)

    def reset_sums(self):
        for v in self.sums.values():
            v.assign(0.0)


class _Progress:
    """What the user and the log see: the CSV log rows (the means of the
    loss terms since the last row, the task's scalars and evaluation), the
    progress bar (read from the device sums every ``BAR_SECONDS``) and the
    line with the time to go."""

    def __init__(self, run: _Run, start: int):
        import keras

        self.run, self.step = run, run.step
        self.row_it = start                # iteration of the last log row
        self.bar = keras.utils.Progbar(run.total, verbose=1 if run.verbose == 1 else 0, unit_name="it")
        self.bar.update(start)
        self.host_sums: dict = {}          # sums read at the last bar update
        self.bar_it, self.bar_time = start, time.perf_counter()
        self.estimated = False             # the time to go was printed

    def row(self, it: int, means: dict):
        run, tf = self.run, self.run.tf
        t = time.perf_counter()
        values = {"iteration": it}
        if run.epochs_logged:
            values["epoch"] = round(it / run.steps_per_epoch, 3)
        scalars = run.task.scalars(tf.constant(min(it, run.total - 1), tf.int64))
        values.update({k: float(f"{float(v):.7g}") for k, v in scalars.items()})  # float32's digits
        values.update(means)
        values.update(run.task.evaluate())
        values["time"] = round(float(run.elapsed.numpy()), 2)
        run.log.append(values)
        if run.verbose == 2:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in values.items()), flush=True)
        run.timings.evaluation += time.perf_counter() - t

    def _means(self, it: int, sums: dict) -> dict:
        return {k: v / (it - self.row_it) for k, v in sums.items()} if it > self.row_it else {}

    def first_row(self, start: int):
        """The row before training (or the one an interruption left unwritten)."""
        self.row(start, self._means(start, self.step.read_sums()))
        self.step.reset_sums()
        self.row_it = start

    def last_row(self, it: int):
        """The row of an early stop between two rows."""
        if it > self.row_it:
            self.row(it, self._means(it, self.step.read_sums()))

    def after_call(self, it: int, now: float, is_row: bool):
        """After each call: the bar (every ``BAR_SECONDS``) and the log row."""
        if is_row or now - self.bar_time >= BAR_SECONDS:
            current = self.step.read_sums()
            if self.run.verbose == 1 and it > self.bar_it:
                steps = it - self.bar_it
                self.bar.update(it, [(name, (current[name] - self.host_sums.get(name, 0.0)) / steps)
                                     for name in current])
            self.host_sums, self.bar_it, self.bar_time = current, it, now
        if is_row:
            self.row(it, self._means(it, self.host_sums))
            self.step.reset_sums()
            self.host_sums, self.row_it = {}, it

    def time_to_go(self, it: int, per_step: float):
        """Once the phase's steps have run ``ESTIMATE_AFTER_SECONDS``, print its
        (and the planned run's) time to go, once."""
        run = self.run
        if run.verbose and not self.estimated and run.timings.steps >= ESTIMATE_AFTER_SECONDS:
            self.estimated = True
            line = _time_to_go_line(run.phase, run.total - it, per_step, run.verbose)
            if line:
                print(line, flush=True)


class _Checkpoints:
    """The checkpoints of one phase in ``save_dir/checkpoints/<phase>``:
    cleared at a fresh start, restored when resuming, saved with the loss
    sums since the last log row (so that the row after a resume averages
    the whole interval's steps).

    TensorFlow's multi-worker convention: every worker saves (the variables
    are synchronised), the chief into the run's folder, the others into a
    folder of their own that is deleted after each save; every worker
    restores the chief's checkpoints (a shared folder)."""

    def __init__(self, tf, save_dir: Path, phase: str, strategy, resume: bool, parts: dict,
                 random_states: dict, timings: Timings):
        self.timings, self.chief = timings, is_chief(strategy)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.directory = save_dir / "checkpoints" / phase
        if not resume and self.directory.exists() and self.chief:
            shutil.rmtree(self.directory)
        ckpt = tf.train.Checkpoint(**parts, **random_states)
        if resume:
            found = (_checkpoint_manager(tf, ckpt, self.directory)
                     if self.chief or self.directory.is_dir() else None)
            if found is not None and found.checkpoints:
                _restore(tf, ckpt, found, parts, random_states)
        own = self.directory
        if not self.chief:
            own = save_dir / "checkpoints" / f".{phase}_worker{strategy.cluster_resolver.task_id}"
        self.manager = _checkpoint_manager(tf, ckpt, own)

    def save(self, it: int, row_it: int, sums: dict):
        t = time.perf_counter()
        self.manager.save(checkpoint_number=it)
        if self.chief:
            from common.results import write_json

            write_json(Path(self.manager.directory) / LOSS_SUMS,
                       {"iteration": it, "row_iteration": row_it, "sums": sums})
        else:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        self.timings.checkpoint += time.perf_counter() - t

    def kept_sums(self, start: int) -> dict | None:
        """The loss sums saved with the checkpoint the run resumed from."""
        return _read_loss_sums(self.directory, start)


def _time_to_go_line(phase: str, steps_left: int, per_step: float, verbose: int) -> str:
    """The line that says how long the phase and, within a :func:`planned_run`
    with other phases, the whole run have to go ('' when the progress bar
    already says all of it)."""
    line = f"{phase}: about {steps_left * per_step:.0f} s to go at {1000 * per_step:.1f} ms a step"
    plan = _RUN_PLAN
    if plan is not None and any(name != phase and name not in plan.started for name in plan.steps):
        whole = plan.seconds_to_go(phase, steps_left, per_step)
        line += f"; the whole run about {whole:.0f} s of training steps to go"
    elif verbose == 1:
        return ""  # the bar's ETA is the phase's, and no phase comes after it
    return ("\n" if verbose == 1 else "") + line  # (below the bar)


def _checkpoint_manager(tf, ckpt, directory: Path):
    """A manager keeping the last two checkpoints in ``directory``. If the
    ``checkpoint`` index file is lost or damaged (TensorFlow then ignores it
    and would start again from scratch), a new one is written naming the
    checkpoint files found."""
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2)
    found = sorted(directory.glob("ckpt-*.index"), key=lambda f: int(f.stem.split("-")[1]))
    if found and not manager.checkpoints:
        print(f"warning: the checkpoint index {directory / 'checkpoint'} is missing or cannot be read; "
              f"using the checkpoint files found there", file=sys.stderr)
        # TensorFlow's text format of the index, oldest first; the manager only
        # counts checkpoints with a time stamp as its own.
        text = "".join([f'model_checkpoint_path: "{found[-1].stem}"\n']
                       + [f'all_model_checkpoint_paths: "{f.stem}"\n' for f in found]
                       + [f"all_model_checkpoint_timestamps: {f.stat().st_mtime}\n" for f in found])
        with atomic_path(directory / "checkpoint") as tmp:
            tmp.write_text(text)
        manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2)
    return manager


LOSS_SUMS = "loss_sums.json"


def _read_loss_sums(ckpt_dir: Path, start: int) -> dict | None:
    """The loss sums saved with the checkpoint the run resumed from (None when
    the checkpoint restored is another, or they were not saved)."""
    import json

    try:
        kept = json.loads((ckpt_dir / LOSS_SUMS).read_text())
        if kept["iteration"] == start and kept["row_iteration"] <= start:
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


_RANDOM_STATES = {  # what each random-state part of a checkpoint is, and how a resume goes on without it
    "random_state": ("the augmentation's random state", "its draws start again from the phase's seed"),
    "model_random_state": ("the model's random state (dropout, sampled codes)",
                           "its draws go on from the model's state in this process"),
}


def _restore(tf, ckpt, manager, parts: dict, random_states: dict):
    """Restore the newest checkpoint that can be read; warn about each one
    that cannot (e.g. cut short by a full disk) and fall back to the one before.
    A part of ``random_states`` that a checkpoint lacks (written before it was
    saved) or holds for another number of generators (a layer added or removed)
    is left out, with a warning; the other ``parts`` are restored."""
    paths = list(manager.checkpoints)
    for k, path in enumerate(reversed(paths)):
        try:
            names = [name.split("/") for name, _ in tf.train.list_variables(path)]
            saved = {part: len({n[1] for n in names if n[0] == part and len(n) > 1})  # generators saved
                     for part in random_states}
            left_out = [part for part, states in random_states.items() if saved[part] != len(states)]
            target = ckpt if not left_out else tf.train.Checkpoint(
                **parts, **{part: v for part, v in random_states.items() if part not in left_out})
            target.restore(path).assert_existing_objects_matched()
            for part in left_out:
                what, then = _RANDOM_STATES[part]
                n, has = saved[part], len(random_states[part])
                why = (f"was written before {what} was saved" if not n else
                       f"holds {what} for {n} generator{'s' * (n > 1)}, the model has {has}")
                print(f"warning: checkpoint {path} {why}; {then}", file=sys.stderr)
            return path
        except Exception as e:  # TensorFlow raises OpError, IndexError, ValueError, ... here
            older = paths[-k - 2] if k + 1 < len(paths) else None
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            then = f"resuming from the one before, {Path(older).name}" if older else "and there is no other"
            print(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: {reason}); {then}",
                  file=sys.stderr)
    raise UsageError(f"no checkpoint in {manager.directory} can be read; start the run again without "
                     f"--resume (or in another --save_dir)")


def _divergence_message(phase: str, it: int, terms: dict, manager) -> str:
    values = {name: float(v.numpy()) for name, v in terms.items()}
    broken = [name for name, v in values.items() if not np.isfinite(v)]
    what = ", ".join(f"{name} = {values[name]}" for name in broken)
    kept = (f"the checkpoint of iteration {manager.latest_checkpoint.rsplit('-', 1)[-1]} is kept"
            if manager is not None and manager.latest_checkpoint else "no checkpoint had been written yet")
    return (f"{phase}: training diverged at iteration {it} ({what}); stopped without saving, "
            f"{kept}. Lower the learning rate (--lr) or the loss weights and start again")


def checkpoint_exists(save_dir, phase: str = "train") -> bool:
    """Whether ``save_dir`` holds a checkpoint of ``phase``."""
    tf = quiet_tensorflow()
    return tf.train.latest_checkpoint(str(Path(save_dir) / "checkpoints" / phase)) is not None
