"""Speed of the shared loop against a bare Keras step of the same network.

For each case (a model, its training task and data of the right shape), in
one process and alternating:

* **ours**: :func:`common.training.train` for ``n`` iterations; milliseconds
  per training step, compilation and the log rows excluded
  (``Timings.steps / Timings.timed_steps``);
* **bare**: the same loss of the same network in one ``tf.function`` (with
  the same XLA choice) holding the gradient tape and the optimizer update,
  called once per step from a Python loop on one fixed batch, the smallest
  loop a Keras user would write; read once at the end. It draws no batches,
  so it is a floor that our loop (which gathers each batch) must approach;
* the bare step once more with the other XLA setting, for the rule of
  :func:`common.runtime.resolve_jit`.

Each is repeated ``runs`` times; the table gives the medians and the ratio
ours / bare (below 1: our loop is faster than a call per step). The data
are random: speed does not depend on the values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.results import write_csv
from common.runtime import describe_devices, quiet_tensorflow, resolve_jit


@dataclass
class SpeedCase:
    """One row of the speed table: ``make()`` returns a fresh ``(task, x)``."""

    name: str
    make: Callable
    batch_size: int = 256


def _bare_ms(task, x, batch_size: int, jit: bool, steps: int) -> float:
    import keras

    tf = quiet_tensorflow()
    variables = task.variables()
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    idx = tf.constant(np.arange(batch_size, dtype=np.int64))
    xb = tf.constant(np.asarray(x[:batch_size]))

    @tf.function(jit_compile=jit)
    def step(xb, idx, iteration):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(task.loss_terms(xb, idx, task.scalars(iteration))["loss"])
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    step(xb, idx, tf.constant(0, tf.int64)).numpy()  # trace and compile
    t = time.perf_counter()
    for i in range(steps):
        loss = step(xb, idx, tf.constant(i, tf.int64))
    loss.numpy()
    return 1000 * (time.perf_counter() - t) / steps


def _ours(task, x, batch_size: int, steps: int):
    from common.training import train

    result = train(task, x, iterations=steps, batch_size=batch_size, eval_interval=steps, verbose=0)
    t = result.timings
    return 1000 * t.steps / t.timed_steps, result.steps_per_execution


def measure(cases: list[SpeedCase], runs: int = 3, seconds: float = 3.0, out=None) -> pd.DataFrame:
    """Time every case (``runs`` alternating repeats of about ``seconds`` each);
    print the table and write it to ``out`` (CSV) when given."""
    quiet_tensorflow()
    device = describe_devices()
    rows = []
    print(f"speed on {device}: ms per training step, median of {runs} runs")
    for case in cases:
        task, x = case.make()
        jit = resolve_jit("auto", task.model)
        probe = _bare_ms(task, x, case.batch_size, jit, 3)
        steps = int(np.clip(seconds * 1000 / max(probe, 1e-3), 20, 5000))
        bare, other, ours, ks = [], [], [], []
        for _ in range(runs):
            task, x = case.make()
            bare.append(_bare_ms(task, x, case.batch_size, jit, steps))
            task, x = case.make()
            other.append(_bare_ms(task, x, case.batch_size, not jit, max(steps // 2, 10)))
            task, x = case.make()
            ms, k = _ours(task, x, case.batch_size, steps)
            ours.append(ms)
            ks.append(k)
        on, off = (bare, other) if jit else (other, bare)
        row = {"case": case.name, "xla": "on" if jit else "off", "batch": case.batch_size, "steps": steps,
               "ours_ms": float(np.median(ours)), "bare_ms": float(np.median(bare)),
               "steps_per_call": int(np.median(ks)), "bare_xla_on_ms": float(np.median(on)),
               "bare_xla_off_ms": float(np.median(off)), "device": device}
        row["ratio"] = row["ours_ms"] / row["bare_ms"]
        row["xla_speedup"] = row["bare_xla_off_ms"] / row["bare_xla_on_ms"]
        rows.append(row)
        print(f"  {case.name:<26} XLA {row['xla']:<3} ours {row['ours_ms']:8.2f}  bare {row['bare_ms']:8.2f}"
              f"  ratio {row['ratio']:.2f}  K {row['steps_per_call']:<4}  bare with XLA on/off "
              f"{row['bare_xla_on_ms']:.2f}/{row['bare_xla_off_ms']:.2f}", flush=True)
        if out is not None:
            write_csv(pd.DataFrame(rows), out)
    return pd.DataFrame(rows)


def random_data(shape, n: int = 4096, seed: int = 0) -> np.ndarray:
    """``n`` random samples of ``shape`` in [0, 1] (float32)."""
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
