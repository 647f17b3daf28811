"""The one training loop, shared by every model of every package.

A model contributes a :class:`Task` (its per-sample loss terms, per-iteration
scalars such as the SOM temperature, an optional periodic refresh such as
DEC's target distribution, and its evaluation); :func:`train` does the rest:

* iterations (DESOM counts iterations) or epochs (``epochs=``), over
  ``tf.data`` batches of a fixed-seed shuffle of the samples, reshuffled every
  epoch; each epoch's order depends only on (seed, epoch), so a resumed run
  sees exactly the batches the uninterrupted run would have seen;
* one ``tf.function`` step (XLA with ``jit_compile``), run under a
  ``tf.distribute`` strategy with the global batch split across replicas and
  per-sample losses averaged over the global batch;
* a progress bar, a CSV log row every ``eval_interval`` iterations (and
  before the first and after the last), written atomically;
* ``tf.train.Checkpoint`` of model, optimizer, iteration and task state every
  ``checkpoint_interval`` iterations, at the end, and when training stops on
  an error or Ctrl-C; ``resume=True`` continues from the last one to the same
  final iteration count, keeping the log rows up to that point.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UsageError
from common.runtime import STRATEGIES, make_strategy, quiet_tensorflow, set_mixed_precision  # noqa: F401


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

    def scalars(self, iteration: int) -> dict:
        """Per-iteration numbers passed to the step (e.g. the temperature T)."""
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
        """Objects saved in checkpoints (default: the model)."""
        return {"model": self.model}


class StopTraining(Exception):
    """Raised by :meth:`Task.refresh` to stop early; the message says why."""


@dataclass
class TrainResult:
    iterations: int          # iteration count reached
    trained: int             # iterations run by this call (0 when resuming a finished run)
    seconds: float           # wall time of this call's training steps
    stopped_early: str | None
    log_path: Path | None


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
def _batches(tf, x, batch_size: int, seed: int, start: int, map_fn=None):
    """Endless (x, idx) batches: epoch e is a permutation seeded by (seed, e).

    The last ``n % batch_size`` samples of each epoch's permutation are left
    out (every batch is full; they differ from epoch to epoch).
    """
    n = len(x)
    steps = n // batch_size
    first_epoch, skip = divmod(start, steps)
    x_t = tf.convert_to_tensor(x)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), e]))
        batches = tf.reshape(order[: steps * batch_size], (steps, batch_size))
        return tf.data.Dataset.from_tensor_slices(batches)

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(skip)
    ds = ds.map(lambda idx: (tf.gather(x_t, idx), idx), num_parallel_calls=tf.data.AUTOTUNE)
    if map_fn is not None:
        ds = ds.map(lambda xb, idx: (map_fn(xb), idx), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #
def train(task: Task, x, *, iterations: int | None = None, epochs: int | None = None,
          batch_size: int = 256, optimizer=None, strategy=None, save_dir=None, phase: str = "train",
          log_name: str = "log.csv", eval_interval: int | None = None,
          checkpoint_interval: int | None = None, refresh_interval: int | None = None,
          resume: bool = False, seed: int = 0, jit_compile: bool = True, verbose: int = 1,
          map_fn=None) -> TrainResult:
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
        checkpoint_interval: iterations between checkpoints (default: only at
            the end and on failure).
        refresh_interval: iterations between calls of ``task.refresh``.
        resume: restore the last checkpoint of this phase, if any.
        jit_compile: compile the step with XLA (single-replica strategies).
        verbose: 0 silent, 1 progress bar, 2 one line per log row.
        map_fn: optional function applied to each batch in the input pipeline
            (data augmentation).
    """
    import keras

    tf = quiet_tensorflow()
    x = np.asarray(x) if not hasattr(x, "shape") else x
    n = len(x)
    if batch_size < 1:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if batch_size > n:
        raise UsageError(f"batch size {batch_size} is larger than the {n} training samples; "
                         f"use --batch_size {min(256, n)} or less")
    steps_per_epoch = n // batch_size
    if (iterations is None) == (epochs is None):
        raise ValueError("give exactly one of iterations or epochs")
    total = int(iterations if iterations is not None else epochs * steps_per_epoch)
    if total < 1:
        raise UsageError(f"the number of iterations must be positive, got {total}")
    eval_interval = int(eval_interval or steps_per_epoch)
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UsageError(f"batch size {batch_size} does not split evenly over {replicas} replicas")

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
        iteration = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")
        elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed")
        finished = tf.Variable(False, trainable=False, name="finished")  # stopped early
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    # --- checkpoints and log -------------------------------------------------
    save_dir = Path(save_dir) if save_dir is not None else None
    manager = None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = save_dir / "checkpoints" / phase
        if not resume and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt = tf.train.Checkpoint(optimizer=optimizer, iteration=iteration, elapsed=elapsed,
                                   finished=finished, **task.trackables())
        manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=2)
        if resume and manager.latest_checkpoint:
            ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(iteration.numpy())
    log_path = save_dir / log_name if save_dir is not None else None
    log = CSVLog(log_path, keep_until=start if start > 0 else None)
    if start > 0 and verbose:
        print(f"Resuming {phase} at iteration {start}/{total}")

    # --- the step --------------------------------------------------------------
    def mean(per_sample):
        # Sum over this replica's samples / the global batch: summed over the
        # replicas, the mean of the global batch. (tf.nn.compute_average_loss
        # computes the same, with an Assert that XLA complains about.)
        return tf.reduce_sum(tf.cast(per_sample, tf.float32)) / batch_size

    def replica_step(xb, idx, scalars):
        with tf.GradientTape() as tape:
            terms = task.loss_terms(xb, idx, scalars)
            loss = mean(terms["loss"])
            if task.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(task.model.losses))
            target = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(target, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return {k: mean(v) for k, v in terms.items()}

    def step(batch, scalars):
        xb, idx = batch
        out = strategy.run(replica_step, args=(xb, idx, scalars))
        iteration.assign_add(1)  # in the same compiled step as the update it counts
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    step = tf.function(step, jit_compile=bool(jit_compile) and replicas == 1, reduce_retracing=True)

    # --- run -------------------------------------------------------------------
    def row(it, sums, count):
        values = {"iteration": it}
        if epochs is not None:
            values["epoch"] = round(it / steps_per_epoch, 3)
        values.update(task.scalars(min(it, total - 1)))
        values.update({k: v / count for k, v in sums.items()} if count else {})
        values.update(task.evaluate())
        values["time"] = round(float(elapsed.numpy()), 2)
        log.append(values)
        if verbose == 2:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in values.items()))

    result = TrainResult(iterations=start, trained=0, seconds=0.0, stopped_early=None, log_path=log_path)
    if start >= total or bool(finished.numpy()):
        return result
    data = iter(strategy.experimental_distribute_dataset(_batches(tf, x, batch_size, seed, start, map_fn)))
    if start == 0 or (start % eval_interval == 0 and start not in set(log.frame.get("iteration", []))):
        row(start, {}, 0)  # the map before training (or where an interruption left no row)
    bar = keras.utils.Progbar(total, verbose=1 if verbose == 1 else 0, unit_name="it")
    bar.update(start)
    sums, count, it = {}, 0, start
    t0 = time.perf_counter()
    last = t0
    try:
        while it < total:
            if refresh_interval and it % refresh_interval == 0:
                refreshed = task.refresh(it)
                if refreshed and verbose == 2:
                    print(f"refresh at {it}: " + ", ".join(f"{k}={v:.4g}" for k, v in refreshed.items()))
            scalars = {k: tf.constant(v, tf.float32) for k, v in task.scalars(it).items()}
            out = step(next(data), scalars)
            it += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            now = time.perf_counter()
            elapsed.assign_add(now - last)
            last = now
            if it % 10 == 0 or it == total:
                bar.update(it, [(k, float(v)) for k, v in out.items()])
            if it % eval_interval == 0 or it == total:
                row(it, sums, count)
                sums, count = {}, 0
            if manager is not None and checkpoint_interval and it % checkpoint_interval == 0:
                manager.save(checkpoint_number=it)
    except StopTraining as stop:
        result.stopped_early = str(stop)
        finished.assign(True)
        if count:
            row(it, sums, count)
        if verbose:
            print(f"\nStopped at iteration {it}: {stop}")
    except BaseException:
        # Ctrl-C or an error: keep what was trained so far, then re-raise.
        if manager is not None and it > start:
            manager.save(checkpoint_number=it)
            if verbose:
                print(f"\nSaved a checkpoint at iteration {it} in {manager.directory}; "
                      "continue with --resume")
        raise
    result.seconds = time.perf_counter() - t0
    result.iterations, result.trained = it, it - start
    if manager is not None:
        manager.save(checkpoint_number=it)
    return result


def checkpoint_exists(save_dir, phase: str = "train") -> bool:
    """Whether ``save_dir`` holds a checkpoint of ``phase``."""
    tf = quiet_tensorflow()
    return tf.train.latest_checkpoint(str(Path(save_dir) / "checkpoints" / phase)) is not None

