"""Child processes for the benchmarks: measured, pinned to cores, one per seed.

* :func:`run_pinned` runs child processes a few at a time, each on its own
  CPU cores with TensorFlow's thread pools sized to them; :func:`run_seeds`
  runs a benchmark's seeds that way and reads back the seeds that finished.
* :func:`peak_rss_gb`, :func:`wait_measured` and :func:`run_measured`: a
  process's own peak resident memory, for the benchmarks' tables.

Nothing here imports TensorFlow.
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
             "CPU cores (<save_dir>/seed<N>/); a seed that finished earlier with the same flags is read "
             "back, not run again")


def run_seeds(module: str, flags: list, seeds, out, jobs: int, first_only=(), inputs=None, settings=None):
    """``python -m module *flags --runs 1 --seed N --save_dir <out>/seed<N>`` for
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
                    "--save_dir", str(out / f"seed{seed}")] for i, seed in enumerate(seeds)}

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
