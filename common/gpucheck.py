"""bin/gpu-check: does a machine (a GPU one) run the toolkit, and how fast? One command.

Each step runs in child processes (this process never imports TensorFlow,
so it holds no GPU memory), with one progress line per step:

1. **Devices**: what TensorFlow sees (:func:`common.runtime.describe_devices`),
   its version and build (``tf.sysconfig.get_build_info()``: CUDA and cuDNN),
   Keras, Python; on a machine with an NVIDIA GPU that TensorFlow cannot use,
   why (:func:`common.runtime.gpu_problem`). Without a GPU, ``--size auto``
   runs everything at CPU sizes, and the first line says so.
2. **Speed**: the cases of ``bin/desom-benchmark --speed`` and
   ``bin/dcn-benchmark --speed`` (:mod:`common.speed`: our loop against a
   bare Keras step of the same network on the same batch, the bare step also
   with the other XLA setting), run by those programs in one child process
   per precision, ``float32`` and ``mixed_float16`` (Keras' global policy
   set before the programs start: our loop then scales the loss, the bare
   step keeps plain Adam). On a CPU the mixed rows are ``not measured (CPU)``.
3. **DESOM on Fashion-MNIST** with the paper's protocol (``bin/desom
   --dataset fmnist``, its defaults: 8x8 map, 10,000 iterations, batch 256;
   seed 0): time, purity and NMI from its ``results.json``. At CPU sizes, 500
   iterations on 2,000 Fashion-MNIST images (``--size smallest``: 20 on
   digits, and of the programs only desom, under ``mirrored``).
4. **Programs**: ``bin/desom``, ``bin/dcn``, ``bin/ae``, ``bin/selflabel`` and
   ``bin/rswnet`` (224x224, ``--weights none``: nothing is downloaded) for a
   short fixed number of steps under ``--strategy default`` and ``mirrored``
   (at CPU sizes ``mirrored`` only for desom: one CPU device makes it the
   default strategy's twin), ``--jobs`` runs at once (GPU memory then taken
   as needed: ``TF_FORCE_GPU_ALLOW_GROWTH``), on data written under
   ``<save_dir>/data/`` (:func:`common.robustness.prepare`; Fashion-MNIST, or
   digits where it is not installed): an ``.npz`` of images (desom, ae,
   selflabel) and an image folder (dcn, rswnet). A run passes when it exits
   0, writes its expected files, and its ``model.keras``, loaded in a fresh
   process, gives at least :data:`SAME` of the samples the cluster of the
   run's own ``predictions.csv``:

   ========== ===================================================================
   desom      ``bin/desom predict --data <npz>``: ``bmu`` against ``unit``
   dcn        ``bin/dcn predict <images>``: ``cluster``, by image path
   ae         ``bin/ae predict --data <npz>``: ``cluster`` (the nearest k-means
              centre kept in the model) against the run's ``kmeans`` column
   selflabel  ``common.networks.load_model`` in ``python -c``: the most
              probable cluster of the same arrays against ``cluster``
              (``selflabel predict`` adds up the clusters sharing a class name)
   rswnet     ``bin/rswnet predict <images>``: ``cluster``, by image path
   ========== ===================================================================

Writes ``<save_dir>/gpu_check.csv`` (a row per device, speed case and precision,
DESOM run, and program and strategy, rewritten after each step) and
``<save_dir>/gpu_check.md`` (the tables for the README); each run's files and
stderr are under ``<save_dir>/runs/``, the speed logs under ``<save_dir>/speed/``.
Exits 1 when a check failed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import ArgumentParser, run
from common.errors import DataError, UsageError
from common.processes import jobs_at_once, run_measured
from common.results import atomic_path, write_csv

ROOT = Path(__file__).resolve().parents[1]
#: share of the samples whose cluster must be the same in a fresh process
SAME = 0.99
#: the programs ``--speed`` runs (their ``main`` as ``python -m``): bin/desom-benchmark, bin/dcn-benchmark
SPEED_MODULES = ("desom.benchmark", "dcn.dec.benchmark")
PRECISIONS = ("float32", "mixed_float16")
STRATEGIES = ("default", "mirrored")
PARTS = ("speed", "desom", "programs")
#: DESOM on Fashion-MNIST in Forest et al. (ESANN 2019), shown under a run of their protocol
PAPER = "Forest et al. (ESANN 2019): purity 0.752, NMI (geometric) 0.538."


# --------------------------------------------------------------------------- #
# Sizes
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Size:
    """How big each step runs.

    Program checks: ``samples`` images in the ``.npz`` file, ``folder`` =
    (training, test) images of the image folder, ``side`` pixels, from
    ``source`` (Fashion-MNIST, or digits where it is missing); ``flags`` of
    each program. Speed: the ``speed_cases`` named (empty: all), each timed
    ``speed_runs`` times for about ``speed_seconds``. DESOM: ``desom_iterations``
    on ``desom_data`` (``fmnist``: all of it, the paper's; ``array``: the
    program checks' ``.npz``; ``digits``). ``strategies``: the ``--strategy``
    values the programs run under; ``mirrored``: the programs run under
    ``--strategy mirrored`` (empty: all). ``timeout``: seconds a child
    process may run.
    """

    name: str
    what: str
    samples: int
    folder: tuple
    side: int
    flags: dict
    speed_cases: tuple = ()
    speed_seconds: float = 1.0
    speed_runs: int = 1
    desom_data: str = "fmnist"
    desom_iterations: int = 10000
    source: str = "fmnist"
    jobs: int = 4
    strategies: tuple = STRATEGIES
    mirrored: tuple = ()
    programs: tuple = ()
    timeout: float = 900


_SELFLABEL = ("--first_features", "random", "--manifold", "none", "--clusterer", "kmeans", "--n_init", "1",
              "--rounds", "1", "--epochs_per_round", "1", "--knn_epochs", "0", "--min_steps", "0")
SIZES = {
    "gpu": Size(
        "gpu", "GPU sizes", samples=10000, folder=(5000, 1000), side=28, flags={
            "desom": ("--iterations", "500", "--eval_interval", "250"),
            "dcn": ("--image_size", "64", "--pretrain_epochs", "1", "--max_iterations", "200",
                    "--update_interval", "100", "--centers", "kmeans", "--n_init", "2"),
            "ae": ("--epochs", "2", "--cluster", "kmeans", "--tsne_samples", "500"),
            "selflabel": _SELFLABEL,
            "rswnet": ("--input_size", "224", "--weights", "none", "--image_size", "28", "--subset", "2560",
                       "--test_subset", "1000", "--pretrain_epochs", "0", "--epochs", "1", "--batch_size",
                       "128", "--som_epochs", "1", "--tsne_samples", "300", "--internal_samples", "1000",
                       "--n_init", "2")}),
    "cpu": Size(
        "cpu", "CPU sizes", samples=2000, folder=(1000, 300), side=28, flags={
            "desom": ("--iterations", "200", "--eval_interval", "100"),
            "dcn": ("--image_size", "28", "--pretrain_epochs", "1", "--max_iterations", "60",
                    "--update_interval", "30", "--centers", "kmeans", "--n_init", "1"),
            "ae": ("--epochs", "1", "--cluster", "kmeans", "--tsne_samples", "200"),
            "selflabel": (*_SELFLABEL, "--batch_size", "128"),
            "rswnet": ("--input_size", "32", "--weights", "none", "--image_size", "28", "--subset", "500",
                       "--test_subset", "200", "--pretrain_epochs", "0", "--epochs", "1", "--batch_size",
                       "100", "--som_epochs", "1", "--tsne_samples", "100", "--internal_samples", "200",
                       "--n_init", "1")},
        speed_cases=("DESOM (dense, 784)", "Kerasom (784)", "DEC (dense, 784)", "DCEC (28x28)"),
        speed_seconds=0.5, desom_data="array", desom_iterations=500, jobs=2, mirrored=("desom",),
        timeout=600),
    "smallest": Size(
        "smallest", "the smallest sizes (a test)", samples=500, folder=(300, 100), side=16, flags={
            "desom": ("--iterations", "30", "--eval_interval", "15", "--batch_size", "64"),
            "dcn": ("--pretrain_epochs", "1", "--max_iterations", "20", "--centers", "kmeans",
                    "--n_init", "1"),
            "ae": ("--epochs", "1", "--cluster", "kmeans", "--tsne_samples", "50"),
            "selflabel": (*_SELFLABEL, "--batch_size", "64"),
            "rswnet": ("--input_size", "32", "--weights", "none", "--image_size", "16", "--subset", "100",
                       "--test_subset", "50", "--pretrain_epochs", "0", "--epochs", "1", "--batch_size", "50",
                       "--som_epochs", "1", "--tsne_samples", "50", "--internal_samples", "50",
                       "--n_init", "1")},
        speed_cases=("Kerasom (784)", "DEC (dense, 784)"), speed_seconds=0.2, desom_data="digits",
        desom_iterations=20, source="digits", jobs=2, timeout=300,
        # the suite's size: bin/desom under --strategy mirrored, its model predicted by bin/desom predict in
        # a fresh process (bin/desom under the default strategy is step 3's run); the other programs' runs,
        # outputs and fresh-process predictions are in their own tests (tests/test_ae.py, test_dcn.py,
        # test_selflabel.py, test_rswnet.py, test_predict.py)
        strategies=("mirrored",), mirrored=("desom",), programs=("desom",)),
}
#: the most samples and (training, test) folder images digits give where Fashion-MNIST is missing: of its
#: 1,797 images, 1,347 form the training part and 450 the test part (which also lends the reference images)
DIGITS_SAMPLES, DIGITS_FOLDER = 1797, (1000, 300)


# --------------------------------------------------------------------------- #
# Programs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Program:
    """One program of the check: ``bin/<name> --data <its data> <size flags>``.

    ``data``: ``array`` (the ``.npz`` file) or ``folder`` (the image folder).
    ``files``: what every run must write. ``column``: the column of the
    run's ``predictions.csv`` a fresh process must reproduce, the samples
    matched by ``key`` (``index`` or ``image``). ``fresh``: how (see the
    module docstring).
    """

    name: str
    data: str
    files: tuple
    column: str
    key: str
    fresh: str


PROGRAMS = (
    Program("desom", "array", ("model.keras", "log.csv", "results.json", "predictions.csv", "args.json",
                               "map.png", "umatrix.png", "training.png", "explorer.html"),
            "unit", "index", "bin/desom predict"),
    Program("dcn", "folder", ("model.keras", "pretrain_log.csv", "log.csv", "results.json", "predictions.csv",
                              "args.json", "class_mappings.json", "test_metrics.json"),
            "cluster", "image", "bin/dcn predict"),
    Program("ae", "array", ("model.keras", "log.csv", "results.json", "predictions.csv", "args.json",
                            "clustering.csv", "reconstructions.png", "generated_from_clusters.png",
                            "tsne.png", "pca.png"),
            "kmeans", "index", "bin/ae predict"),
    Program("selflabel", "array", ("model.keras", "history.csv", "results.json", "predictions.csv",
                                   "args.json", "training_progress.png"),
            "cluster", "index", "load_model: predict_proba"),
    Program("rswnet", "folder", ("model.keras", "log.csv", "results.json", "predictions.csv", "args.json",
                                 "comparison.csv", "pca.png", "tsne.png"),
            "cluster", "image", "bin/rswnet predict"),
)
#: most images named on a predict command line (test images first)
MAX_IMAGES = 2000


@dataclass
class CheckData:
    """The files the program checks train on, and the DESOM run's data flags."""

    array: Path
    folder: Path
    source: str
    description: str
    desom_flags: list = field(default_factory=list)
    desom_data: str = ""


def prepare_data(size: Size, out: Path, data_dir: str | None) -> CheckData:
    """Write the ``.npz`` and the image folder of the program checks under
    ``<out>/data/`` (once: kept for later checks of the same size), from
    Fashion-MNIST where it is installed, else from digits; and choose the
    DESOM run's data."""
    from common.data import load_data
    from common.robustness import DataSpec, prepare

    source, why = size.source, ""
    if source == "fmnist":
        try:
            load_data("fmnist", data_dir=data_dir, download=False)
        except DataError as e:
            source, why = "digits", str(e)
    samples, (n_train, n_test) = size.samples, size.folder
    if source == "digits":
        samples, n_train, n_test = (min(samples, DIGITS_SAMPLES), min(n_train, DIGITS_FOLDER[0]),
                                    min(n_test, DIGITS_FOLDER[1]))
    folder = out / "data"
    array = prepare(DataSpec(f"{source}-{samples}", "array", source, "", n=samples), folder)
    images = prepare(DataSpec(f"{source}-folder-{n_train}-{n_test}-{size.side}px", "folder", source, "",
                              n=n_train, n_test=n_test, size=(size.side,)), folder)
    data = CheckData(Path(array.path), Path(images.path), source, f"{samples} {source} images (.npz); a "
                     f"folder of {n_train} + {n_test} {size.side} px PNGs")
    if why:
        data.description += f" (Fashion-MNIST not found: {why})"
    if size.desom_data == "fmnist" and source == "fmnist":
        data.desom_flags = ["--dataset", "fmnist", *(["--data_dir", data_dir] if data_dir else [])]
        data.desom_data = "Fashion-MNIST (70,000)"
    elif size.desom_data == "fmnist":  # missing: not run (the row says why)
        data.desom_data = f"Fashion-MNIST not found: {why}"
    elif size.desom_data == "array" and source == "fmnist":
        data.desom_flags, data.desom_data = ["--data", str(data.array)], f"Fashion-MNIST ({samples:,})"
    else:
        data.desom_flags, data.desom_data = ["--dataset", "digits"], "digits (1,797)"
    return data


# --------------------------------------------------------------------------- #
# Child processes
# --------------------------------------------------------------------------- #
def child_env(threads: int | None = None, shared_gpu: bool = False) -> dict:
    """The environment of a child: no downloads, quiet TensorFlow; with
    ``threads``, its thread pools that size; with ``shared_gpu``, GPU memory
    taken as needed (several children share the GPU)."""
    env = {**os.environ, "DESOM_NO_DOWNLOAD": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads))
    if shared_gpu:
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def python_call(function: str, *args) -> list[str]:
    """``python -c`` calling ``common.gpucheck.<function>(*args)`` (strings)."""
    code = f"import sys; from common.gpucheck import {function}; sys.exit({function}(*sys.argv[1:]))"
    return [sys.executable, "-c", code, *map(str, args)]


def probe(path) -> int:
    """(child) What TensorFlow sees, as JSON in ``path``; its start-up
    messages go to stderr, where :func:`common.runtime.gpu_problem` reads them."""
    import platform

    import keras
    import tensorflow as tf

    from common.runtime import describe_devices, gpu_names

    tf.constant(0)  # the first op: the GPU start-up messages
    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    capability = []
    for gpu in gpus:
        try:
            capability.append(".".join(map(str, tf.config.experimental.get_device_details(gpu)
                                           ["compute_capability"])))
        except (KeyError, TypeError, ValueError, RuntimeError):
            pass
    info = {"device": describe_devices(), "gpus": gpu_names(), "compute_capability": sorted(set(capability)),
            "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
            "cuda_build": bool(tf.test.is_built_with_cuda()), "cuda": build.get("cuda_version"),
            "cudnn": build.get("cudnn_version"), "cpu_cores": len(os.sched_getaffinity(0))}
    Path(path).write_text(json.dumps(info, default=str))
    return 0


def speed_child(precision: str, out, runs, seconds, *cases) -> int:
    """(child) ``--speed`` of bin/desom-benchmark and bin/dcn-benchmark
    (:data:`SPEED_MODULES`) under Keras' ``precision`` policy, their cases
    named in ``cases`` (none: all) timed ``runs`` times for about ``seconds``
    each, one at a time: a case that fails is a row with its error, and the
    others still run. Rows go to ``<out>/speed_<module>.csv``; everything
    printed goes to stderr (the log)."""
    import runpy
    import traceback

    import common.speed as speed

    sys.stdout = sys.stderr
    if precision != "float32":
        import keras

        keras.mixed_precision.set_global_policy(precision)
    measure, seconds_each = speed.measure, float(seconds)
    state = {"failed": 0, "path": None}

    def chosen(all_cases, runs=1, seconds=None, out=None):
        """The benchmark's call of ``measure``: only ``cases``, ``seconds_each`` each, one at a time."""
        rows = []
        for case in [c for c in all_cases if not cases or c.name in cases]:
            try:
                rows += measure([case], runs=runs, seconds=seconds_each).to_dict("records")
            except Exception as e:  # a row that says why, and on to the next case
                traceback.print_exc()
                state["failed"] += 1
                message = str(e).splitlines()[0][:300] if str(e) else ""
                rows.append({"case": case.name, "error": f"{type(e).__name__}: {message}".rstrip(": ")})
            write_csv(pd.DataFrame(rows), state["path"])
        return pd.DataFrame(rows)

    speed.measure = chosen
    for module in SPEED_MODULES:
        state["path"] = Path(out) / f"speed_{module.split('.')[0]}.csv"
        sys.argv = [module, "--speed", "--speed_runs", str(runs), "--save_dir", str(out)]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            state["failed"] += bool(e.code)
    return 1 if state["failed"] else 0


def fresh_predictions(model, data, out) -> int:
    """(child) A bin/selflabel model's most probable cluster of each sample
    of ``data`` (read as the program reads it), loaded with
    :func:`common.networks.load_model` in this new process."""
    from common.data import load_data
    from common.networks import load_model
    from common.runtime import quiet_tensorflow

    quiet_tensorflow()
    loaded = load_model(model)
    (x, _), _ = load_data(data, flatten=False)
    pred = loaded.predict_proba(x).argmax(axis=1)
    write_csv(pd.DataFrame({"index": np.arange(len(pred)), "cluster": pred}), out)
    return 0


def _failure(ended, timeout: float, what: str) -> str:
    """Why a child failed, in one line."""
    if ended.seconds > timeout:
        return f"{what} stopped after {timeout:g} s"
    how = f"exit {ended.code}" if ended.code > 0 else f"killed by signal {-ended.code}"
    return f"{what}: {how}: {ended.last_error_line()}"


# --------------------------------------------------------------------------- #
# The steps
# --------------------------------------------------------------------------- #
def devices(out: Path) -> dict:
    """Step 1: :func:`probe` in a child (with every start-up message), and why
    an NVIDIA GPU goes unused (:func:`common.runtime.gpu_problem`)."""
    from common.runtime import gpu_problem

    path = out / "devices.json"
    path.unlink(missing_ok=True)
    env = {**child_env(), "TF_CPP_MIN_LOG_LEVEL": "0"}
    ended = run_measured(python_call("probe", path), stderr_path=out / "devices_stderr.txt", timeout=300,
                         env=env, cwd=ROOT)
    if ended.code or not path.is_file():
        why = _failure(ended, 300, "python -c 'import tensorflow'")
        raise UsageError(f"TensorFlow does not start here ({why}; whole log: {out / 'devices_stderr.txt'})")
    info = json.loads(path.read_text())
    info["problem"] = gpu_problem(ended.stderr, info["cuda_build"], len(info["gpus"]))
    return info


def versions(info: dict) -> str:
    """TensorFlow, its CUDA and cuDNN, Keras, Python, in one line."""
    build = (f"CUDA {info['cuda'] or '?'}, cuDNN {info['cudnn'] or '?'}" if info["cuda_build"]
             else "a CPU build: no CUDA, no cuDNN")
    capability = f"; compute capability {', '.join(info['compute_capability'])}" if info.get(
        "compute_capability") else ""
    return (f"TensorFlow {info['tensorflow']} ({build}), Keras {info['keras']}, Python {info['python']}"
            f"{capability}")


def speed(size: Size, out: Path, gpu: bool) -> list[dict]:
    """Step 2: the speed cases in float32 and, on a GPU, mixed_float16."""
    rows = []
    for precision in PRECISIONS:
        folder = out / "speed" / precision
        if precision != "float32" and not gpu:
            names = size.speed_cases or ("every case",)
            rows += [{"check": "speed", "name": name, "variant": precision, "status": "not measured (CPU)",
                      "reason": "mixed precision is a GPU option: a CPU emulates float16"} for name in names]
            print(f"speed, {precision}: not measured (CPU)", flush=True)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        what = f"{len(size.speed_cases)} cases" if size.speed_cases else "every case"
        print(f"speed, {precision}: {what} of bin/desom-benchmark --speed and bin/dcn-benchmark --speed, "
              f"{size.speed_runs} run{'s' * (size.speed_runs > 1)} of about {size.speed_seconds:g} s each",
              flush=True)
        argv = python_call("speed_child", precision, folder, size.speed_runs, size.speed_seconds,
                           *size.speed_cases)
        ended = run_measured(argv, stderr_path=folder / "log.txt", timeout=size.timeout, env=child_env(),
                             cwd=ROOT)
        why = _failure(ended, size.timeout, "the speed run") + f" (log: {folder / 'log.txt'})"
        for module in SPEED_MODULES:
            path = folder / f"speed_{module.split('.')[0]}.csv"
            frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["case"])
            for r in frame.to_dict("records"):
                error = r.pop("error", None)
                row = {"check": "speed", "name": r.pop("case"), "variant": precision, **r}
                if isinstance(error, str):
                    row.update(status="failed", reason=error)
                    print(f"  {row['name']}: failed: {error}", flush=True)
                else:
                    row["status"] = "ok"
                    print(f"  {row['name']:<26} XLA {row['xla']:<3} ours {row['ours_ms']:8.2f} ms  bare "
                          f"{row['bare_ms']:8.2f} ms  ratio {row['ratio']:.2f}  K {row['steps_per_call']:<4} "
                          f"bare with XLA on/off {row['bare_xla_on_ms']:.2f}/{row['bare_xla_off_ms']:.2f} ms",
                          flush=True)
                rows.append(row)
            if not path.is_file() and ended.code:  # the program stopped before its first case
                program = f"bin/{module.split('.')[0]}-benchmark --speed"
                rows.append({"check": "speed", "name": program, "variant": precision, "status": "failed",
                             "reason": why})
                print(f"  {program}: failed: {why}", flush=True)
    return rows


def desom_run(size: Size, data: CheckData, out: Path) -> dict:
    """Step 3: DESOM with the paper's protocol; time, purity, NMI."""
    row = {"check": "desom", "name": "desom", "variant": data.desom_data, "iterations": size.desom_iterations}
    if not data.desom_flags:
        print(f"desom: not run ({data.desom_data})", flush=True)
        return {**row, "status": "not run", "reason": data.desom_data}
    save_dir = out / "runs" / "desom_paper"
    argv = [str(ROOT / "bin" / "desom"), *data.desom_flags, "--iterations", str(size.desom_iterations),
            "--seed", "0", "--no_explorer", "--save_dir", str(save_dir / "run"), "--overwrite",
            "--verbose", "0"]
    command = shlex.join(["bin/desom", *argv[1:]])
    print(f"desom: {command}", flush=True)
    shutil.rmtree(save_dir, ignore_errors=True)
    save_dir.mkdir(parents=True)
    ended = run_measured(argv, stderr_path=save_dir / "stderr.txt", timeout=size.timeout * 2, env=child_env(),
                         cwd=ROOT)
    row.update(command=command, seconds=round(ended.seconds, 1), peak_rss_gb=round(ended.peak_rss_gb, 2))
    if ended.code:
        row.update(status="failed", reason=_failure(ended, size.timeout * 2, "bin/desom"))
        print(f"  failed: {row['reason']}", flush=True)
        return row
    try:
        results = json.loads((save_dir / "run" / "results.json").read_text())
        train, timings = results["train"], results["timings"]
        row.update(status="ok", samples=train["n_samples"], purity=train["purity"], nmi=train["nmi"],
                   nmi_geometric=train["nmi_geometric"], acc_kmeans=train.get("acc_kmeans"),
                   steps_seconds=timings["train"]["steps_seconds"], run_seconds=timings["total_seconds"],
                   iterations_per_second=results["iterations_per_second"],
                   device=results["environment"]["device"])
    except (OSError, ValueError, KeyError) as e:
        row.update(status="failed", reason=f"reading results.json: {type(e).__name__}: {e}")
        print(f"  failed: {row['reason']}", flush=True)
        return row
    print(f"  purity {row['purity']:.4f}, NMI {row['nmi']:.4f} (geometric {row['nmi_geometric']:.4f}); "
          f"{row['steps_seconds']:.0f} s of training steps ({row['iterations_per_second']:.0f} "
          f"iterations/s), {row['seconds']:.0f} s in all", flush=True)
    return row


def predict_command(program: Program, run_dir: Path, data: CheckData, out_csv: Path):
    """The fresh process of a program check: (argv, its working folder)."""
    model = run_dir / "model.keras"
    if program.name in ("desom", "ae"):
        return ([str(ROOT / "bin" / program.name), "predict", "--model", str(model), "--data",
                 str(data.array), "--out", str(out_csv)], ROOT)
    if program.key == "image":  # the images the run named, test images first, by their path in the folder
        written = pd.read_csv(run_dir / "predictions.csv")
        images = written.sort_values("part", key=lambda p: p != "test", kind="stable")["image"]
        images = images.head(MAX_IMAGES)
        return ([str(ROOT / "bin" / program.name), "predict", "--model", str(model), "--out", str(out_csv),
                 *images], data.folder)
    return python_call("fresh_predictions", model, data.array, out_csv), ROOT


def agreement(written: pd.DataFrame, predicted: pd.DataFrame, program: Program) -> tuple[int, int]:
    """(samples the fresh process gave the run's cluster, samples compared):
    the run's ``program.column`` against the fresh ``cluster`` (``bmu`` from
    bin/desom predict, whose rows are the samples in order)."""
    if program.key == "index":
        written = written[written["part"] == "train"]
        predicted = predicted.rename(columns={"bmu": "cluster"})
        if "index" not in predicted:
            predicted = predicted.assign(index=np.arange(len(predicted)))
    run = written.set_index(program.key)[program.column]
    fresh = predicted.set_index(program.key if program.key in predicted else "image")["cluster"]
    common = run.index.intersection(fresh.index)
    if len(common) < len(fresh):
        raise UsageError(f"the fresh predictions name {len(fresh) - len(common)} samples the run's "
                         "predictions.csv does not have")
    same = run.loc[common].to_numpy() == fresh.loc[common].to_numpy()
    return int(same.sum()), len(common)


def program_check(program: Program, strategy: str, size: Size, data: CheckData, out: Path, env: dict) -> dict:
    """Step 4, one cell: train, check the files, predict in a fresh process, compare."""
    cell = out / "runs" / f"{program.name}_{strategy}"
    shutil.rmtree(cell, ignore_errors=True)
    cell.mkdir(parents=True)
    run_dir = cell / "run"
    flags = list(size.flags[program.name])
    source = data.array if program.data == "array" else data.folder
    argv = [str(ROOT / "bin" / program.name), "--data", str(source), *flags, "--strategy", strategy,
            "--seed", "0", "--save_dir", str(run_dir), "--overwrite", "--verbose", "0"]
    row = {"check": "program", "name": program.name, "variant": strategy,
           "command": shlex.join([f"bin/{program.name}", *argv[1:]]), "compared": program.fresh}
    ended = run_measured(argv, stderr_path=cell / "stderr.txt", timeout=size.timeout, env=env, cwd=ROOT)
    row.update(seconds=round(ended.seconds, 1), peak_rss_gb=round(ended.peak_rss_gb, 2))
    if ended.code:
        return {**row, "status": "failed", "reason": _failure(ended, size.timeout, f"bin/{program.name}")}
    missing = [f for f in program.files if not (run_dir / f).exists()]
    row["files"] = f"{len(program.files) - len(missing)}/{len(program.files)}"
    written = run_dir / "results.json"
    environment = json.loads(written.read_text()).get("environment", {}) if written.is_file() else {}
    row.update(replicas=environment.get("replicas"), device=environment.get("device"),
               xla=" ".join(sorted({"on" if v else "off" for v in environment.get("jit", {}).values()})))
    if missing:
        return {**row, "status": "failed", "reason": f"not written: {', '.join(missing)}"}
    predicted_csv = cell / "fresh_predictions.csv"
    argv, where = predict_command(program, run_dir, data, predicted_csv)
    ended = run_measured(argv, stderr_path=cell / "fresh_stderr.txt", timeout=size.timeout, env=env,
                         cwd=where)
    row["fresh_seconds"] = round(ended.seconds, 1)
    if ended.code or not predicted_csv.is_file():
        return {**row, "status": "failed", "reason": _failure(ended, size.timeout, program.fresh)}
    try:
        same, compared = agreement(pd.read_csv(run_dir / "predictions.csv"), pd.read_csv(predicted_csv),
                                   program)
    except (KeyError, UsageError) as e:
        return {**row, "status": "failed", "reason": f"comparing with predictions.csv: {e}"}
    row.update(same=same, samples=compared)
    if not compared or same < SAME * compared:
        return {**row, "status": "failed",
                "reason": f"{program.fresh} gave the run's cluster to only {same} of {compared} samples"}
    return {**row, "status": "ok"}


def programs(chosen, strategies, size: Size, data: CheckData, out: Path, jobs: int, gpu: bool) -> list[dict]:
    """Step 4: every (program, strategy), ``jobs`` at once, the longest first;
    rows in the order of ``chosen`` and ``strategies``."""
    cells = [(p, s) for p in chosen for s in strategies if s in size.strategies
             and (s != "mirrored" or not size.mirrored or p.name in size.mirrored)]
    if not cells:
        raise UsageError(f"no program run is left at --size {size.name} (its programs: "
                         f"{', '.join(size.programs) or 'all'}, under --strategy "
                         f"{' or '.join(size.strategies)}; mirrored only for "
                         f"{', '.join(size.mirrored) or 'all'}): give other --programs or --strategies")
    jobs = jobs_at_once(jobs, len(cells))
    threads = None if jobs == 1 else max(1, len(os.sched_getaffinity(0)) // jobs)
    env = child_env(threads, shared_gpu=gpu and jobs > 1)
    print(f"programs: {len(cells)} runs ({', '.join(f'{p.name}/{s}' for p, s in cells)}), {jobs} at a time",
          flush=True)
    lock = threading.Lock()
    cost = {"rswnet": 0, "selflabel": 1, "ae": 2, "dcn": 3, "desom": 4}

    def one(cell):
        program, strategy = cell
        try:
            row = program_check(program, strategy, size, data, out, env)
        except (OSError, ValueError, KeyError) as e:  # a run's files unreadable: its row says so
            row = {"check": "program", "name": program.name, "variant": strategy, "seconds": float("nan"),
                   "status": "failed", "reason": f"{type(e).__name__}: {e}"}
        shown = (f"{row['same']} of {row['samples']} samples the same in a fresh process ({program.fresh})"
                 if row["status"] == "ok" else row["reason"])
        with lock:
            print(f"  {program.name} / {strategy}: {row['status']} ({row['seconds']:.0f} s; {shown})",
                  flush=True)
        return row

    with ThreadPoolExecutor(jobs) as pool:
        longest_first = sorted(cells, key=lambda c: cost.get(c[0].name, 9))
        futures = {cell: pool.submit(one, cell) for cell in longest_first}
        return [futures[cell].result() for cell in cells]


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #
def _number(value, fmt: str = "{:.2f}") -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else fmt.format(value)


def markdown(frame: pd.DataFrame, header: str) -> str:
    """The check as markdown: the header line, then a table each for speed,
    DESOM and the programs (the rows a step did not make are left out)."""
    rows = frame.replace({np.nan: None}).to_dict("records")
    lines = [header]
    speed_rows = [r for r in rows if r["check"] == "speed"]
    if speed_rows:
        lines += ["", "| model | precision | XLA (auto) | our loop (ms) | bare step (ms) | ratio | K (auto) "
                  "| bare step, XLA on / off (ms) |", "|---|---|---|---|---|---|---|---|"]
        for r in speed_rows:
            if r["status"] != "ok":
                why = r["status"] if r["status"] != "failed" else f"failed: {r['reason']}"
                lines.append(f"| {r['name']} | {r['variant']} | {why} | | | | | |")
                continue
            lines.append(f"| {r['name']} | {r['variant']} | {r['xla']} | {_number(r['ours_ms'])} | "
                         f"{_number(r['bare_ms'])} | {_number(r['ratio'])} | "
                         f"{_number(r['steps_per_call'], '{:.0f}')} | {_number(r['bare_xla_on_ms'])} / "
                         f"{_number(r['bare_xla_off_ms'])} |")
        lines.append("\nMilliseconds per training step, random data; ratio: our loop / the bare step; "
                     "K: steps per compiled call.")
    desom = [r for r in rows if r["check"] == "desom"]
    if desom:
        lines += ["", "| DESOM (paper's protocol, seed 0) | iterations | training steps (s) | whole run (s) "
                  "| iterations/s | purity | NMI | NMI (geometric) |", "|---|---|---|---|---|---|---|---|"]
        for r in desom:
            if r["status"] != "ok":
                lines.append(f"| {r['variant']} | {_number(r['iterations'], '{:,.0f}')} | {r['status']}: "
                             f"{r.get('reason') or ''} "
                             "| | | | | |")
                continue
            lines.append(f"| {r['variant']} | {_number(r['iterations'], '{:,.0f}')} | "
                         f"{_number(r['steps_seconds'], '{:.1f}')} "
                         f"| {_number(r['seconds'], '{:.0f}')} | "
                         f"{_number(r['iterations_per_second'], '{:.0f}')} | "
                         f"{_number(r['purity'], '{:.4f}')} | {_number(r['nmi'], '{:.4f}')} | "
                         f"{_number(r['nmi_geometric'], '{:.4f}')} |")
        if any(r["status"] == "ok" and r["iterations"] == 10000 and "70,000" in r["variant"] for r in desom):
            lines.append("\n" + PAPER)
    checks = [r for r in rows if r["check"] == "program"]
    if checks:
        lines += ["", "| program | strategy | result | replicas | XLA | run (s) | files | the same in a "
                  "fresh process |", "|---|---|---|---|---|---|---|---|"]
        for r in checks:
            result = "ok" if r["status"] == "ok" else f"failed: {r['reason']}"
            same = (f"{r['same']:.0f} / {r['samples']:.0f} ({r['compared']})" if r.get("samples") is not None
                    else "")
            lines.append(f"| {r['name']} | {r['variant']} | {result} | "
                         f"{_number(r.get('replicas'), '{:.0f}')} | {r.get('xla') or ''} | "
                         f"{_number(r['seconds'], '{:.0f}')} | {r.get('files') or ''} | {same} |")
        lines.append(f"\nThe last column: samples to which the saved model.keras, loaded in a new process, "
                     f"gives the cluster of the run's own predictions.csv (at least {SAME:.0%} to pass).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def parser():
    p = ArgumentParser(prog="gpu-check", description=(
        "Check a machine (a GPU one) in one run: its devices and versions; every model's step in our loop "
        "against a bare Keras step, XLA on and off, float32 and mixed precision; DESOM on Fashion-MNIST with "
        "the paper's protocol; and each program under --strategy default and mirrored, its files and its "
        "saved model's predictions in a fresh process. Writes <save_dir>/gpu_check.csv and gpu_check.md; "
        "exits 1 when a check failed."))
    p.add_argument("--save_dir", default="bench/gpu-check",
                   help="output folder for gpu_check.csv, gpu_check.md, the data and every run")
    p.rename("--out", "--save_dir")
    p.add_argument("--size", choices=("auto", *SIZES), default="auto",
                   help="auto: gpu where TensorFlow sees a GPU (under 8 minutes on one), else cpu (a few "
                   "minutes on 2 cores); smallest: digits, the fewest steps (a test)")
    names = [q.name for q in PROGRAMS]
    p.add_argument("--programs", nargs="+", choices=names, default=names, metavar="NAME",
                   help=f"the programs checked: {', '.join(names)}")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                   help="the --strategy of each program's runs (at CPU sizes mirrored for desom only)")
    p.add_argument("--skip", nargs="+", choices=PARTS, help="steps left out")
    p.add_argument("--jobs", type=int, bounds="[1, inf)",
                   help="program runs at once (at most one per core); default: 4 at GPU sizes, else 2")
    p.add_argument("--data_dir", help="folder searched first for Fashion-MNIST (nothing is downloaded)")
    return p


def _main(argv=None):
    args = parser().parse_args(argv)
    skip = set(args.skip or ())
    t0 = time.perf_counter()
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = devices(out)
    gpu = bool(info["gpus"])
    size = SIZES["gpu" if gpu else "cpu"] if args.size == "auto" else SIZES[args.size]
    if gpu:
        mode = f"GPU mode on {info['device']}"
    elif info["problem"]:
        mode = f"CPU mode (this machine has an NVIDIA GPU but TensorFlow cannot use it: {info['problem']})"
    else:
        mode = "CPU mode (no GPU visible to TensorFlow)"
    print(f"gpu-check: {mode}; {size.what} (--size {size.name}); writing {out}/", flush=True)
    print(f"devices: {info['device']}; {versions(info)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if size.name == "gpu" and not gpu:
        print("warning: --size gpu on a machine without a GPU takes hours", file=sys.stderr, flush=True)
    rows = [{"check": "device", "name": info["device"], "variant": "gpu" if gpu else "cpu", "status": "ok",
             "reason": info["problem"] or "", "compute_capability": " ".join(info["compute_capability"]),
             **{k: info[k] for k in ("tensorflow", "keras", "python", "cuda", "cudnn")}}]

    def step(name, made):
        """Keep a step's rows, rewrite the CSV, say how long it took."""
        t = time.perf_counter()
        found = made()
        rows.extend(found if isinstance(found, list) else [found])
        write_csv(pd.DataFrame(rows), out / "gpu_check.csv")
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)

    write_csv(pd.DataFrame(rows), out / "gpu_check.csv")
    if "speed" not in skip:
        step("speed", lambda: speed(size, out, gpu))
    data = None
    if not {"desom", "programs"} <= skip:
        t = time.perf_counter()
        data = prepare_data(size, out, args.data_dir)
        print(f"data: {data.description}, in {out}/data/ ({time.perf_counter() - t:.0f} s)", flush=True)
    if "desom" not in skip:
        step("desom", lambda: desom_run(size, data, out))
    if "programs" not in skip:
        chosen = [q for q in PROGRAMS if q.name in args.programs and (not size.programs
                                                                     or q.name in size.programs)]
        strategies = [s for s in STRATEGIES if s in args.strategies]
        step("programs", lambda: programs(chosen, strategies, size, data, out, args.jobs or size.jobs, gpu))
    seconds = time.perf_counter() - t0
    frame = pd.DataFrame(rows)
    header = (f"`bin/gpu-check --size {size.name}`, {'GPU' if gpu else 'CPU'} mode, "
              f"{time.strftime('%Y-%m-%d')}: {info['device']}; {versions(info)}; {seconds:.0f} s in all.")
    table = markdown(frame, header)
    with atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(table + "\n")
    failed = frame[frame["status"] == "failed"]
    print("\n" + table)
    print(f"\nwritten: {out}/gpu_check.csv, {out}/gpu_check.md ({seconds:.0f} s in all"
          f"{f'; {len(failed)} checks failed' if len(failed) else ''})")
    return 1 if len(failed) else 0


def main(argv=None):
    run(_main, argv, prog="gpu-check")


if __name__ == "__main__":
    sys.exit(main())
