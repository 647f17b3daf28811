"""The run skeleton shared by the training commands, through a minimal new command."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from common.command import RunData, TrainingCommand
from common.data import load_data
from common.errors import UsageError
from tests.helpers import assert_one_line_error


class TinySom(TrainingCommand):
    """What a new command writes: its flags, data, model, phases, results."""

    prog = "tiny"
    outputs = ("model.keras", "log.csv", "results.json", "extra.txt")

    def add_arguments(self, p):
        p.add_argument("--iterations", type=int, default=30)
        p.add_argument("--batch_size", type=int, default=64)
        p.add_argument("--save_dir")

    def check(self, args):
        if args.iterations < 1:
            raise UsageError(f"--iterations must be positive, got {args.iterations}")

    def load(self, args):
        (x, y), _ = load_data("digits")
        return RunData(x, y, name="digits", description=f"digits: {len(x)} samples")

    def build(self, run):
        from desom import Kerasom

        return Kerasom(64, (2, 3))

    def train(self, run):
        run.model.init_prototypes(run.data.x, seed=run.args.seed)
        run.record("train", run.model.fit(run.data.x, run.data.y, iterations=run.args.iterations,
                                          eval_interval=10, **run.loop_options()))

    def results(self, run):
        return {"purity": run.model.evaluate_map(run.data.x, run.data.y, internal=False)["purity"]}

    def predictions(self, run):
        from common.command import prediction_frame

        units = run.model.predict(run.data.x, verbose=0)
        return prediction_frame("train", units, labels=run.data.y, map_size=run.model.map_size,
                                groups=[0, 0, 0, 1, 1, 1])

    def pictures(self, run, results):
        (run.save_dir / "extra.txt").write_text(f"purity {results['purity']:.3f}")

    def summary(self, run, results):
        return f"purity {results['purity']:.3f}"


def test_a_new_command_gets_every_shared_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert TinySom().main(["--save_dir", str(out), "--steps_per_execution", "4", "--verbose", "1"]) == 0
    printed = capsys.readouterr().out
    from common.runtime import describe_devices

    device = describe_devices()  # "CPU (2 cores)" here, the GPUs where there are some
    assert f"digits: 1797 samples; Kerasom; {device}" in printed  # data, model and device on one line
    assert "train: 30 iterations = 1.1 epochs of 28 batches of 64; XLA on, steps per call 4" in printed
    assert "outputs in" in printed and "extra.txt" in printed and "purity" in printed
    for name in ("args.json", "model.keras", "log.csv", "results.json", "extra.txt"):
        assert (out / name).is_file(), name
    assert (out / "architecture.png").is_file() or (out / "architecture.txt").is_file()
    results = json.loads((out / "results.json").read_text())
    timings = results["timings"]
    assert timings["train"]["timed_steps"] + timings["train"]["compile_steps"] == 30
    assert set(timings["stages"]) == {"load_seconds", "build_seconds", "train_seconds", "save_seconds",
                                      "results_seconds", "predictions_seconds", "pictures_seconds"}
    written = pd.read_csv(out / "predictions.csv")  # the command's predictions, written by the skeleton
    assert written.columns.tolist() == ["part", "index", "cluster", "unit", "row", "col", "group", "label"]
    assert len(written) == 1797 and (written["part"] == "train").all()
    np.testing.assert_array_equal(written["unit"], written["row"] * 3 + written["col"])
    np.testing.assert_array_equal(written["group"], (written["unit"] >= 3).astype(int))
    assert timings["total_seconds"] >= timings["stages"]["train_seconds"] >= timings["train"]["total_seconds"]
    assert results["iterations_per_second"] == timings["train"]["iterations_per_second"]
    env = results["environment"]
    assert env["device"] == device and env["jit"] == {"train": True}
    assert env["steps_per_execution"] == {"train": 4}
    assert results["args"]["iterations"] == 30 and 0 < results["purity"] <= 1

    # --resume takes the saved arguments (the finished run has nothing left to train)
    assert TinySom().main(["--resume", "--save_dir", str(out), "--verbose", "0"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["args"]["iterations"] == 30 and again["args"]["resume"] is True


class TinyData(TinySom):
    def load(self, args):
        (x, y), _ = load_data("digits")
        return RunData(x[:40], y[:40], name="digits", description="40 digits")


def test_a_default_batch_larger_than_the_data_becomes_the_whole_data_a_given_one_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert TinyData().main(["--save_dir", str(out), "--iterations", "3", "--verbose", "0"]) == 0
    assert json.loads((out / "results.json").read_text())["args"]["batch_size"] == 40  # not the default 64
    from common.cli import run

    assert_one_line_error(lambda a: run(TinyData().main, a, prog="tiny"),
                          ["--save_dir", str(out), "--batch_size", "64"],
                          "--batch_size 64 is larger than the 40 training samples", capsys)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    from common.cli import run

    out = tmp_path / "run"
    argv = ["--save_dir", str(out), "--iterations", "3", "--verbose", "0"]
    assert TinyData().main(argv) == 0
    first = (out / "results.json").read_text()
    assert_one_line_error(lambda a: run(TinyData().main, a, prog="tiny"), argv,
                          f"{out} holds a finished run; give --resume to continue it, --overwrite to replace "
                          "it, or another --save_dir", capsys)
    assert (out / "results.json").read_text() == first  # nothing touched
    (out / "results.json").unlink()  # as a run stopped before its end leaves it
    assert_one_line_error(lambda a: run(TinyData().main, a, prog="tiny"), argv, "holds an unfinished run",
                          capsys)
    assert_one_line_error(lambda a: run(TinyData().main, a, prog="tiny"), [*argv, "--resume", "--overwrite"],
                          "give one", capsys)
    assert TinyData().main([*argv, "--overwrite"]) == 0
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "--iterations must be positive, got 0"),
    (["--batch_size", "5000"], "--batch_size 5000 is larger than the 1797 training samples"),
    (["--steps_per_execution", "-3"], "must be a positive integer, got -3"),
    (["--resume", "--save_dir", "nowhere"], "nothing to resume in nowhere"),
])
def test_a_new_command_reports_bad_input_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from common.cli import run

    monkeypatch.chdir(tmp_path)
    assert_one_line_error(lambda a: run(TinySom().main, a, prog="tiny"), argv, message, capsys)


def test_command_line_writes_parsed_arguments_back_as_flags():
    from common.cli import command_line
    from desom.benchmark import parser

    argv = ["--datasets", "digits", "usps", "--map_size", "3", "4", "--gamma", "0.01", "--mixed_precision",
            "--jobs", "2", "--Tmin", "0.7"]
    args = parser().parse_args(argv)
    flags = command_line(parser(), args, skip=("jobs",))
    assert "--jobs" not in flags and "--iterations" not in flags  # skipped, and at its default
    assert vars(parser().parse_args(flags)) == {**vars(args), "jobs": 1}


@pytest.mark.slow
def test_a_childs_peak_memory_is_its_own_not_its_parents(tmp_path):
    """Linux carries a parent's ru_maxrss into its children: a 60 MB child of
    a process holding 1.5 GB must still be measured at about 60 MB."""
    import sys

    import numpy as np

    from common.processes import peak_rss_gb, run_measured, run_pinned

    held = np.ones(1536 * 2**20 // 8)  # touched, so resident
    assert peak_rss_gb() > 1.5
    grow = "import time; x = b'x' * (60 * 2**20); time.sleep(0.3)"
    ended = run_measured([sys.executable, "-c", grow])
    assert ended.code == 0 and 0.05 < ended.peak_rss_gb < 0.5
    ended, = run_pinned([([sys.executable, "-c", grow], tmp_path / "log.txt")], jobs=1)
    assert ended.code == 0 and 0.05 < ended.peak_rss_gb < 0.5
    failed = run_measured([sys.executable, "-c", "import sys; print('out'); sys.exit('bad input')"],
                          stderr_path=tmp_path / "err.txt")
    assert failed.code == 1 and failed.last_error_line() == "bad input"
    assert (tmp_path / "err.txt").read_text().strip() == "bad input"
    del held


def test_run_pinned_gives_each_child_its_own_cores_and_stops_early(tmp_path):
    import os
    import sys

    from common.processes import last_line, run_pinned

    show = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['TF_NUM_INTRAOP_THREADS'])"
    commands = [([sys.executable, "-c", show], tmp_path / f"{i}.log") for i in range(3)]
    commands.append(([sys.executable, "-c", "import sys; sys.exit('bad input')"], tmp_path / "3.log"))
    seen = {}
    ended = list(run_pinned(commands, jobs=2, on_exit=seen.__setitem__))
    assert [e.code for e in ended] == [0, 0, 0, 1] and seen == dict(enumerate(ended))
    assert all(e.seconds > 0 and e.peak_rss_gb > 0 for e in ended)
    assert (tmp_path / "0.log").read_text().startswith("=== ")  # a line naming the command, then its output
    assert last_line(tmp_path / "3.log") == "bad input"
    cores = sorted(os.sched_getaffinity(0))
    jobs = min(2, len(cores))
    shares = [str(cores[i::jobs]) for i in range(jobs)]
    for i in range(3):
        pinned, threads = last_line(tmp_path / f"{i}.log").rsplit(" ", 1)
        assert pinned in shares and threads == str(len(cores) // jobs)
    # after a failure no new child starts
    marker = tmp_path / "ran"
    late = ([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], tmp_path / "late.log")
    ended = list(run_pinned([commands[3], late], jobs=1))
    assert ended[0].code == 1 and ended[1] is None and not marker.exists()


def test_run_pinned_reports_a_failure_while_a_run_listed_before_it_still_runs(tmp_path, capsys):
    import sys

    from common.processes import run_pinned

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    slow = ([sys.executable, "-c", "import time; time.sleep(3)"], tmp_path / "slow.log")
    bad = ([sys.executable, "-c", "import sys; sys.exit('no such file')"], tmp_path / "bad.log")
    exits = run_pinned([slow, bad], jobs=2)
    assert next(exits).code == 0  # the slow one, listed first, has ended: the failure was said meanwhile
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.log'}: exit 1" in err and "(no such file)" in err
    assert next(exits).code == 1


FAKE_BENCHMARK = """
import argparse, pathlib, sys
p = argparse.ArgumentParser()
for flag in ("--value", "--seed", "--runs", "--save_dir", "--fail_seed"):
    p.add_argument(flag)
a = p.parse_args()
with open(pathlib.Path(__file__).parent / "calls.txt", "a") as calls:
    calls.write(a.seed + "\\n")
if a.seed == a.fail_seed:
    sys.exit("seed " + a.seed + " went wrong")
out = pathlib.Path(a.save_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "runs.csv").write_text("seed,value\\n" + a.seed + "," + a.value + "\\n")
"""


def test_run_seeds_reads_back_seeds_finished_with_the_same_flags(tmp_path, monkeypatch, capsys):
    from common.processes import run_seeds

    (tmp_path / "fakebench.py").write_text(FAKE_BENCHMARK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    calls = tmp_path / "calls.txt"
    out = tmp_path / "out"

    def seeds_run(flags, seeds, jobs=2):
        before = calls.read_text().split() if calls.exists() else []
        rows = [row for rows in run_seeds("fakebench", flags, seeds, out, jobs) for row in rows]
        return rows, sorted(map(int, calls.read_text().split()[len(before):]))

    assert seeds_run(["--value", "3"], [0, 1]) == ([{"seed": 0, "value": 3}, {"seed": 1, "value": 3}], [0, 1])
    # one more seed: only it runs
    rows, ran = seeds_run(["--value", "3"], [0, 1, 2])
    assert ran == [2] and [r["value"] for r in rows] == [3, 3, 3]
    # a finished seed whose runs.csv went missing runs again
    (out / "seed1" / "runs.csv").unlink()
    assert seeds_run(["--value", "3"], [0, 1, 2])[1] == [1]
    # other flags: run again
    rows, ran = seeds_run(["--value", "4"], [0, 1])
    assert ran == [0, 1] and [r["value"] for r in rows] == [4, 4]
    # a seed that fails is not taken for finished next time (its earlier runs.csv is still there)
    flags = ["--value", "5", "--fail_seed", "1"]
    with pytest.raises(UsageError, match="seed 1 failed: seed 1 went wrong"):
        seeds_run(flags, [0, 1], jobs=1)
    assert not (out / "seed1" / "finished.json").exists() and (out / "seed0" / "finished.json").exists()
    with pytest.raises(UsageError, match="seed 1 failed"):
        seeds_run(flags, [0, 1], jobs=1)
    started = calls.read_text().split()
    assert started[-1] == "1" and started.count("0") == 3  # seed 0 read back the second time
    # on one core (taskset) two jobs run one at a time, and the message says so
    one_core = set(sorted(os.sched_getaffinity(0))[:1])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: one_core)
    capsys.readouterr()
    assert seeds_run(["--value", "6"], [0, 1], jobs=2)[1] == [0, 1]
    assert "running seeds 0, 1 (1 at a time)" in capsys.readouterr().out


def test_run_seeds_runs_again_a_seed_that_ran_under_another_default(tmp_path, monkeypatch, capsys):
    # The same flags under another default of the benchmark are another run: a
    # make bench after a default changed must not read back the old numbers.
    import argparse
    from functools import partial

    from common.cli import parsed_settings
    from common.processes import run_seeds

    (tmp_path / "fakebench.py").write_text(FAKE_BENCHMARK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    calls, out = tmp_path / "calls.txt", tmp_path / "out"

    def ran(depth):  # the benchmark's parser as it would be with --depth's default at depth
        p = argparse.ArgumentParser()
        for flag in ("--value", "--seed", "--runs", "--save_dir", "--fail_seed"):
            p.add_argument(flag)
        p.add_argument("--depth", type=int, default=depth)
        calls.unlink(missing_ok=True)
        list(run_seeds("fakebench", ["--value", "3"], [0, 1], out, 1, settings=partial(parsed_settings, p)))
        return sorted(map(int, calls.read_text().split())) if calls.exists() else []

    assert ran(2) == [0, 1]
    assert ran(2) == []  # the same defaults: read back
    capsys.readouterr()
    assert ran(3) == [0, 1]
    assert "seed 0 ran with --depth 2, today's default 3: runs again" in capsys.readouterr().out
    record = json.loads((out / "seed1" / "finished.json").read_text())
    assert record["settings"]["depth"] == 3 and record["settings"]["value"] == "3"
    del record["settings"]  # a record from before settings were kept: taken as it is
    (out / "seed1" / "finished.json").write_text(json.dumps(record))
    assert ran(4) == [0]


#: The flags that more than one of the five programs declares, each with the one meaning it has in all of
#: them (reviewed). A flag newly shared by two programs fails the test below until it is listed here, so
#: that a name never gets a second meaning unnoticed.
SHARED_FLAGS = {
    "--Tmax": "initial neighbourhood radius", "--Tmin": "final neighbourhood radius",
    "--schedule": "temperature schedule", "--gamma": "weight of the SOM loss", "--map_size": "map rows, cols",
    "--som_init": "prototype initialisation", "--som_loss": "SOM loss", "--no_explorer": "no explorer.html",
    "--ae_weights": "pretrained autoencoder weights", "--pretrain_epochs": "autoencoder pretraining epochs",
    "--batch_size": "global batch size", "--lr": "learning rate", "--epochs": "epochs of the main phase",
    "--eval_interval": "iterations between log rows", "--latent_dim": "size of the code",
    "--recon_weight": "weight of the reconstruction error", "--tol": "label-change stopping share",
    "--update_interval": "iterations between target refreshes (DEC)",
    "--alpha": "Student-t degrees of freedom",
    "--n_init": "restarts of a clustering", "--n_clusters": "number of clusters", "--model": "model kind",
    "--color": "colour mode of images", "--image_size": "side images are resized to",
    "--som_map_size": "the compared SOM's map", "--som_epochs": "epochs of the compared SOM",
    "--tsne_samples": "samples drawn in tsne.png",
    "--data": "your data", "--dataset": "a named data set", "--data_dir": "where named sets are looked for",
    "--label_col": "CSV label column", "--scaling": "scaling of --data files",
    "--save_dir": "output folder", "--seed": "seed",
    **{f: "run-time flag (common.cli.add_run_arguments)" for f in (
        "--strategy", "--mixed_precision", "--jit", "--no_jit", "--steps_per_execution",
        "--checkpoint_minutes", "--resume", "--overwrite", "--deterministic", "--verbose")},
}
#: renamed flags: (program, old, the one-line error's start)
RENAMED = [("ae", "--alpha", "--alpha is now --recon_weight"),
           ("ae", "--beta", "--beta is now --kl_weight or --class_weight"),
           ("dcn", "--init", "--init is now --weight_init"),
           ("dcn", "--embedding_dim", "--embedding_dim is now --latent_dim"),
           ("desom", "--update_interval", "--update_interval is now --T_update_interval"),
           ("selflabel", "--init", "--init is now --first_features"),
           ("selflabel", "--cluster_starts", "--cluster_starts is now --n_init"),
           ("selflabel", "--augment", "--augment is now --augmentations"),
           ("selflabel", "--iterations", "--iterations is now --rounds (bin/desom's --iterations are"),
           ("selflabel", "--epochs_per_iteration", "--epochs_per_iteration is now --epochs_per_round"),
           ("selflabel", "--fraction_iterations", "--fraction_iterations is now --fraction_rounds"),
           ("dcn", "--embedding", "--embedding_dim is now --latent_dim"),  # argparse's abbreviations too
           ("selflabel", "--cluster_s", "--cluster_starts is now --n_init")]


def _five_parsers():
    from dcn.autoencoders.cli import AeCommand
    from dcn.dec.cli import DcnCommand
    from dcn.selflabel.cli import SelfLabelCommand
    from desom.cli import DesomCommand
    from rswnet.cli import RswnetCommand

    commands = (DesomCommand, DcnCommand, AeCommand, SelfLabelCommand, RswnetCommand)
    return {c.prog: c().parser() for c in commands}


def test_a_flag_name_means_one_thing_across_the_five_programs():
    flags: dict = {}
    for prog, parser in _five_parsers().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    flags.setdefault(flag, set()).add(prog)
    shared = {flag for flag, progs in flags.items() if len(progs) > 1}
    unreviewed = sorted(shared - set(SHARED_FLAGS))
    assert not unreviewed, f"flags shared by several programs, not in SHARED_FLAGS: {unreviewed}"
    assert flags["--iterations"] == {"desom"}  # optimizer steps (selflabel: --rounds)
    assert flags["--alpha"] == {"dcn"} and flags["--augment"] == {"dcn"}  # the Student-t's; dcn's switch
    assert flags["--update_interval"] == {"dcn", "rswnet"}  # DEC's refresh (desom: --T_update_interval)
    for gone in ("--init", "--embedding_dim", "--cluster_starts", "--beta", "--epochs_per_iteration"):
        assert gone not in flags


@pytest.mark.parametrize("prog, old, message", RENAMED)
def test_an_old_flag_name_gets_one_line_naming_the_new_one(prog, old, message, capsys, tmp_path, monkeypatch):
    from importlib import import_module

    monkeypatch.chdir(tmp_path)
    module = {"desom": "desom.cli", "dcn": "dcn.dec.cli", "ae": "dcn.autoencoders.cli",
              "selflabel": "dcn.selflabel.cli"}[prog]
    assert_one_line_error(import_module(module).main, [old, "1"], message, capsys)
    parser = _five_parsers()[prog]
    assert parser.renamed_message(parser._old_name(old)).startswith(message)


BENCHMARKS = ["desom.benchmark", "dcn.dec.benchmark", "dcn.dec.deckeras_reference",
              "dcn.autoencoders.benchmark", "dcn.selflabel.benchmark", "rswnet.benchmark",
              "common.robustness", "common.gpucheck"]


@pytest.mark.parametrize("module", BENCHMARKS)
def test_every_benchmark_writes_to_save_dir_as_the_programs_do(module, capsys, tmp_path, monkeypatch):
    from importlib import import_module

    monkeypatch.chdir(tmp_path)
    main = import_module(module).main
    assert_one_line_error(main, ["--out", "bench/x"], "--out is now --save_dir", capsys)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--save_dir" in capsys.readouterr().out


#: a benchmark's own flags that its program also has: the seeds, the output, the run-time flags, and
#: dcn-benchmark's --dataset (its vector data sets by name only, where bin/dcn also takes files)
BENCHMARK_OWN = {"--help", "--seed", "--save_dir", "--data_dir", "--verbose", "--strategy",
                 "--mixed_precision", ("dcn", "--dataset")}


def _declared(action) -> tuple:
    """What a flag's declaration says, its default and the help's "(default: ...)" aside."""
    from common.cli import help_without_default

    kind = (action.type.kind, action.type.bounds) if hasattr(action.type, "bounds") else action.type
    help_text = help_without_default(action.help or "")
    return kind, action.nargs, tuple(action.choices or ()), action.metavar, help_text


@pytest.mark.parametrize("prog, module", [
    ("desom", "desom.benchmark"), ("dcn", "dcn.dec.benchmark"), ("ae", "dcn.autoencoders.benchmark"),
    ("selflabel", "dcn.selflabel.benchmark"), ("rswnet", "rswnet.benchmark")])
def test_a_benchmark_declares_none_of_its_programs_flags_again(prog, module):
    from importlib import import_module

    program = {f: a for a in _five_parsers()[prog]._actions for f in a.option_strings}
    benchmark = import_module(module).parser()
    shared = [(f, a) for a in benchmark._actions for f in a.option_strings
              if f in program and f not in BENCHMARK_OWN and (prog, f) not in BENCHMARK_OWN]
    assert shared or prog == "ae"  # (ae-benchmark runs bin/ae with its defaults)
    for flag, action in shared:
        assert _declared(action) == _declared(program[flag]), flag


def test_add_argument_from_keeps_the_programs_declaration_with_the_benchmarks_default(capsys):
    from common.cli import ArgumentParser

    program = ArgumentParser(prog="prog")
    program.add_argument("--batch_size", type=int, bounds="[1, inf)",
                         help="global batch size (default: 256, or (on small data) fewer)")
    program.add_argument("--tol", type=float, default=0.001, bounds="[0, 1]", help="stop below this")
    program.add_argument("--fast", action="store_true")
    bench = ArgumentParser(prog="bench")
    bench.add_argument_from(program, "--batch_size", default=128)
    bench.add_argument_from(program, "--tol")
    assert vars(bench.parse_args([])) == {"batch_size": 128, "tol": 0.001}
    assert bench.parse_args(["--batch_size", "7"]).batch_size == 7
    helps = {a.dest: bench.formatter_class("bench")._get_help_string(a) for a in bench._actions}
    assert helps["batch_size"] == "global batch size (default: 128)"
    assert helps["tol"] == "stop below this (default: 0.001)"
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch_size", "0"])  # the program's bounds
    assert "argument --batch_size: must be in [1, inf), got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="declares no flag --fast that takes a value"):
        bench.add_argument_from(program, "--fast")


def test_a_run_saved_under_an_old_flag_name_resumes_under_the_new_one(tmp_path):
    from types import SimpleNamespace

    from common.cli import resume_args

    (tmp_path / "args.json").write_text(json.dumps({"embedding_dim": 4, "save_dir": str(tmp_path)}))
    args = SimpleNamespace(save_dir=str(tmp_path), latent_dim=10, verbose=1)
    args, changed = resume_args(args, {}, renamed=_five_parsers()["dcn"].renamed_dests())
    assert args.latent_dim == 4 and not hasattr(args, "embedding_dim") and changed == {}


def test_help_shows_the_flags_in_groups_and_defaults_one_way():
    from common.command import HELP_GROUPS

    for prog, parser in _five_parsers().items():
        text = parser.format_help()
        titles = [t for t in HELP_GROUPS.values() if f"\n{t}:\n" in text]
        assert titles[0] == "data" and titles[-1] == HELP_GROUPS["run-time"], prog
        positions = [text.index(f"\n{t}:\n") for t in titles]
        assert positions == sorted(positions), prog  # data, model, training, output, run-time
        assert "--seed" in text.split(f"\n{HELP_GROUPS['run-time']}:\n")[1], prog
        assert "(default: [" not in text and "(default: (" not in text, prog  # lists as typed: 8 8
    text = _five_parsers()["desom"].format_help()
    assert "number of rows and columns of the map (default: 8 8)" in " ".join(text.split())
