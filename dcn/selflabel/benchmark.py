"""bin/selflabel-benchmark: bin/selflabel on Fashion-MNIST over several seeds, one table.

One ``bin/selflabel`` process per configuration and seed, trained on the
60,000 training images and scored on the 10,000 test images:

* ``n2d``: the defaults (autoencoder codes, UMAP, Gaussian mixture, then
  balanced self-labelling with the neighbour phase);
* ``deepcluster``: the original project's loop (k-means of the untrained
  CNN's features, relabelled by k-means on its features, no neighbour
  phase).

Writes ``runs.csv`` and ``summary.csv`` (mean ± std of test accuracy, NMI,
purity, ARI, lowest per-class F1, final aligned stability, rounds, wall
time, and the accuracy of the first and last pseudo-labels on the training
images) and prints the summary beside the targets. Flags this program does not
know go to ``bin/selflabel`` unchanged (e.g. ``--rounds 3``).

Runs go ``--jobs`` at once, each pinned to its own share of the cores (its
output in ``<save_dir>/<run>.log``). A run that finished with the same command
(``<run>/finished.json``) is read back, not run again; one of the same
command stopped half-way (``<run>/started.json``) goes on from its last
checkpoint (``bin/selflabel --resume``), its wall time then that of the
resuming process only (``resumed`` in runs.csv); a folder holding a run of
another command is refused, and so is one whose run used a default that has
changed since (its ``args.json`` against the command read with today's
defaults). A finished run whose model an earlier version of ``bin/selflabel``
chose and scored (``scoring`` in its ``results.json``) is resumed, which
trains nothing: today's code chooses and scores it again (its wall time
stays the run's; ``rescored`` in runs.csv).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from common.cli import SEED_BOUNDS, ArgumentParser, changed_settings, flag_text, parsed_settings, run
from common.errors import UsageError
from common.processes import FINISHED, jobs_at_once, last_line, read_record, run_pinned
from common.results import write_csv, write_json, write_summary
from dcn.selflabel.cli import SelfLabelCommand

CONFIGS = {
    "n2d": [],
    "deepcluster": ["--first_features", "random", "--manifold", "none", "--clusterer", "kmeans",
                    "--relabel", "cluster", "--knn_epochs", "0"],
}
STARTED = "started.json"  # {"command": ...} of a run, written when it starts (finished.json when it ends)
COLUMNS = ("accuracy", "nmi", "purity", "ari", "min_f1", "stability", "rounds", "run_seconds",
           "first_label_acc", "first_label_nmi", "last_label_acc")


def parser():
    p = ArgumentParser(prog="selflabel-benchmark", description=__doc__.split("\n\n")[0] + " Flags not listed "
                       "here are passed on to bin/selflabel.")
    p.add_argument_from(SelfLabelCommand().parser(), "--dataset", default="fmnist")  # bin/selflabel's flag
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["n2d"],
                   help="configurations to run")
    p.add_argument("--runs", type=int, default=3, bounds="[1, inf)",
                   help="seeds seed..seed+runs-1 per configuration")
    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help="first seed")
    p.add_argument("--save_dir", default="bench/selflabel",
                   help="output folder for the runs and the tables")
    p.rename("--out", "--save_dir")
    p.add_argument("--jobs", type=int, default=1, bounds="[1, inf)",
                   help="runs at once (at most one per core), each on its own share of the CPU cores")
    p.add_argument("--first_labels_from", metavar="BENCH_DIR",
                   help="start each run from the first labels of the same configuration and seed in an "
                   "earlier benchmark's folder (bin/selflabel --first_labels BENCH_DIR/<dataset>_<config>_"
                   "seed<N>): loop settings compared without repeating the autoencoder phase")
    return p


def _command(args, passed, config, seed) -> tuple[str, list[str]]:
    """The run's folder name and its bin/selflabel arguments."""
    from dcn.selflabel.refine import first_labels_file

    name = f"{args.dataset}_{config}_seed{seed}"
    cmd = ["--dataset", args.dataset, *CONFIGS[config], "--seed", str(seed),
           "--save_dir", str(Path(args.save_dir) / name), "--verbose", "0", *passed]
    if args.first_labels_from:
        first = Path(args.first_labels_from) / name
        if not first_labels_file(first).is_file():
            raise UsageError(f"--first_labels_from: no first labels in {first}; name the --save_dir folder "
                             "of a benchmark run with the same configurations and seeds")
        cmd += ["--first_labels", str(first)]
    return name, cmd


def _check_settings(save_dir: Path, cmd):
    """Refuse the run in ``save_dir`` if a setting in its ``args.json`` differs
    from what ``cmd`` gives with today's defaults (a default changed since it
    ran): the same command line, another run."""
    from dcn.selflabel.cli import SelfLabelCommand

    path = save_dir / "args.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    command = SelfLabelCommand()
    changed = changed_settings(saved, parsed_settings(command.parser(), cmd, complete=command.check))
    if changed:
        k, then, now = changed[0]
        raise UsageError(f"{save_dir} was run with --{k} {flag_text(then)}, the default when it ran; "
                         f"the same command now means --{k} {flag_text(now)}: give another --save_dir, or "
                         "remove that folder")


def _scoring(save_dir: Path) -> int:
    """The version of bin/selflabel's scoring that wrote ``save_dir``'s results (1 before it was recorded)."""
    try:
        return int(json.loads((save_dir / "results.json").read_text()).get("scoring", 1))
    except (OSError, ValueError, TypeError):
        return 1


def _main(argv=None):
    from dcn.selflabel.cli import SCORING, TARGETS

    args, passed = parser().parse_known_args(argv)
    out = Path(args.save_dir)
    if args.first_labels_from and Path(args.first_labels_from).resolve() == out.resolve():
        raise UsageError("--first_labels_from names the --save_dir folder itself; give the earlier "
                         "benchmark's folder, and a new --save_dir")
    out.mkdir(parents=True, exist_ok=True)
    program = str(Path(__file__).resolve().parents[2] / "bin" / "selflabel")
    cores = f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPU cores"
    seeds = f"{args.runs} seed{'s' * (args.runs != 1)}"
    print(f"{cores}; bin/selflabel on {args.dataset}, {seeds} {' '.join(passed)}".rstrip())
    runs, rescored = {}, {}
    for config in args.configs:
        for r in range(args.runs):
            name, cmd = _command(args, passed, config, args.seed + r)
            record = (out / name / "test_metrics.json").is_file() and read_record(out / name / FINISHED, cmd)
            if record or read_record(out / name / STARTED, cmd):
                _check_settings(out / name, cmd)
            if record and _scoring(out / name) != SCORING:
                rescored[config, args.seed + r] = record
                record = None
            runs[config, args.seed + r] = name, cmd, record or None
    done = [name for name, _, record in runs.values() if record]
    if done:
        print(f"finished earlier with the same command, read back: {', '.join(done)}")
    if rescored:
        print("finished earlier, scored again by today's bin/selflabel (nothing trained): "
              + ", ".join(runs[key][0] for key in rescored))
    todo, commands, resumed = [], [], {}
    for key, (name, cmd, record) in runs.items():
        if record is not None:
            continue
        save_dir = out / name
        # a run of this command stopped half-way goes on from its last checkpoint; a folder of anything
        # else is left alone (bin/selflabel --resume would take the flags not given from its args.json)
        resumed[key] = (save_dir / "args.json").is_file()
        if resumed[key] and read_record(save_dir / STARTED, cmd) is None:
            raise UsageError(f"{save_dir} holds a run of another command (or one started before the "
                             "benchmark recorded its commands); give another --save_dir, or remove that "
                             "folder")
        if key not in rescored:  # a rescored run keeps its record until it is replaced
            (save_dir / FINISHED).unlink(missing_ok=True)
        save_dir.mkdir(parents=True, exist_ok=True)
        write_json(save_dir / STARTED, {"command": cmd})
        todo.append(key)
        commands.append(([program, *cmd, *(["--resume"] if resumed[key] else [])], out / f"{name}.log"))
    jobs = jobs_at_once(args.jobs, len(todo))
    if todo:
        names = ", ".join(runs[key][0] for key in todo)
        print(f"running {names} ({jobs} at a time); logs in {out}/<run>.log", flush=True)

    def record_finished(i, ended):  # at once, even if a run listed before this one fails
        key = todo[i]
        name, cmd, _ = runs[key]
        if ended.code == 0 and key in rescored:  # the run's own time and memory, not the rescoring's
            write_json(out / name / FINISHED, {**rescored[key], "rescored": True})
        elif ended.code == 0:
            write_json(out / name / FINISHED, {"command": cmd, "run_seconds": round(ended.seconds, 1),
                                               "peak_rss_gb": round(ended.peak_rss_gb, 2), "jobs": jobs,
                                               "resumed": resumed[key]})

    exits = run_pinned(commands, args.jobs, on_exit=record_finished)  # in the order of runs
    rows = []
    for (config, seed), (name, _, record) in runs.items():
        save_dir, log = out / name, out / f"{name}.log"
        if record is None:
            ended = next(exits)  # waits for this run
            if ended is None or ended.code:
                raise UsageError(f"bin/selflabel failed ({config}, seed {seed}): {last_line(log)} "
                                 f"(whole log: {log})")
            record = json.loads((save_dir / FINISHED).read_text())
        metrics = json.loads((save_dir / "test_metrics.json").read_text())
        results = json.loads((save_dir / "results.json").read_text())
        history = pd.read_csv(save_dir / "history.csv")  # the pseudo-labels' scores on the training images
        first, last = history.iloc[0], history.iloc[-1]
        rows.append({"config": config, "seed": seed, **{k: metrics.get(k) for k in COLUMNS[:6]},
                     "rounds": results["rounds_run"],
                     **{k: record.get(k) for k in ("run_seconds", "peak_rss_gb", "jobs", "resumed")},
                     "rescored": bool(record.get("rescored")),
                     "first_label_acc": first.get("label_acc"), "first_label_nmi": first.get("label_nmi"),
                     "last_label_acc": last.get("label_acc")})
        write_csv(pd.DataFrame(rows), out / "runs.csv")
        print(f"{config} seed {seed}: test accuracy {metrics['accuracy']:.4f}, NMI {metrics['nmi']:.4f}, "
              f"purity {metrics['purity']:.4f}, lowest F1 {metrics['min_f1']:.4f}; "
              f"{record.get('run_seconds')} s", flush=True)
    write_summary(rows, out / "summary.csv", ["config"], COLUMNS)
    print("targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()))
    print(f"\nwritten: {out}/runs.csv, {out}/summary.csv")
    return 0


def main(argv=None):
    run(_main, argv, prog="selflabel-benchmark")


if __name__ == "__main__":
    sys.exit(main())
