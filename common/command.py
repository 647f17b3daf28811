"""The run skeleton of every training command (``bin/desom``, ``bin/dcn``, ...).

A command subclasses :class:`TrainingCommand` and fills in what is its own:
its flags, their checks, its data, its model, its training phases, its
results and pictures. :meth:`TrainingCommand.main` does the rest, in this
order, the same for every command:

1. parse the flags (the command's own and :func:`common.cli.add_run_arguments`);
   ``--resume`` takes the run's saved ``args.json``, applies the flags of
   ``resume_may_change`` given with it (and rewrites ``args.json``) and
   refuses any other flag that would change the run;
2. :meth:`~TrainingCommand.check` the arguments, then
   :meth:`~TrainingCommand.load` the data (before TensorFlow is set up, so bad
   input fails fast) and check the batch size against it;
3. create ``--save_dir`` (refused when it holds an earlier run, unless
   ``--resume`` or ``--overwrite``) and write ``args.json``;
4. seed (with ``--deterministic``, TensorFlow's op determinism), precision
   policy, ``tf.distribute`` strategy; one start-up line naming the data,
   the model and the device;
5. :meth:`~TrainingCommand.build` the model inside the strategy's scope and
   draw its architecture;
6. one plan line (the optimizer steps of each phase,
   :meth:`~TrainingCommand.planned_steps`), then
   :meth:`~TrainingCommand.train` (phases record their
   :class:`~common.training.TrainResult` with :meth:`Run.record`;
   :meth:`Run.pretrain` and :meth:`Run.loop_options` do the common parts);
7. save ``model.keras`` atomically; write ``results.json``: the command's
   :meth:`~TrainingCommand.results` plus timings of every phase and stage,
   arguments and environment; and ``predictions.csv``, the cluster of every
   sample the run scored (:meth:`~TrainingCommand.predictions`);
8. :meth:`~TrainingCommand.pictures`, then a summary line.

``results.json`` also records the command line (``command``).
"""

from __future__ import annotations

import copy
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import ArgumentParser, add_run_arguments, flag_text, given_arguments, resume_args
from common.errors import UsageError
from common.results import write_json


def prediction_frame(part: str, clusters, *, labels=None, names=None, images=None, map_size=None,
                     groups=None, **columns) -> pd.DataFrame:
    """The rows of ``predictions.csv`` for one part of the data.

    Columns: ``part`` (``train`` or ``test``), ``index`` (the sample's row in
    that part, as the program loaded it), ``image`` (a file's path, for image
    folders), ``cluster``; for a map (``map_size``), ``unit`` (the
    best-matching unit, which is the cluster), ``row`` and ``col``, and
    ``group`` when ``groups`` (one per unit) are given (the
    k-means group of the unit's prototype, as ``acc_kmeans`` scores it); any
    other ``columns`` (e.g. one per clustering method); ``label`` when known
    (``names``: the label values to write instead of their indices).
    """
    clusters = np.asarray(clusters).ravel()
    out = pd.DataFrame({"part": part, "index": np.arange(len(clusters))})
    if images is not None:
        out["image"] = [str(i) for i in images]
    out["cluster"] = clusters
    if map_size is not None:
        out["unit"] = clusters
        out["row"], out["col"] = clusters // map_size[1], clusters % map_size[1]
    if groups is not None:
        out["group"] = np.asarray(groups)[clusters]
    for name, values in columns.items():
        out[name] = values
    if labels is not None:
        labels = np.asarray(labels).ravel()
        out["label"] = labels if names is None else np.asarray(names, dtype=object)[labels]
    return out


#: the --help groups of every training program, in order
HELP_GROUPS = {"data": "data", "model": "model", "training": "training",
               "output": "evaluation and output", "run-time": "run-time (the same in every program)"}
#: the group of each flag (by dest); a flag not named here is the model's
HELP_GROUP_OF = {
    **dict.fromkeys(("data", "dataset", "data_dir", "label_col", "scaling", "validation", "image_size",
                     "color", "subset", "test_subset"), "data"),
    **dict.fromkeys(("iterations", "epochs", "batch_size", "lr", "optimizer", "pretrain_epochs",
                     "pretrain_optimizer", "pretrain_lr", "max_epochs", "max_iterations", "update_interval",
                     "T_update_interval", "tol", "som_iterations", "decay", "Tmax", "Tmin", "schedule",
                     "rounds", "epochs_per_round", "min_steps", "fit_threshold", "init_epochs",
                     "init_iterations", "knn_epochs", "fraction_rounds", "label_smoothing", "augment",
                     "augmentations", "recluster_interval", "convergence_threshold", "confident_fraction",
                     "select", "relabel", "balance", "first_labels", "ae_weights", "labeled_fraction",
                     "freeze_until", "bn_momentum"), "training"),
    **dict.fromkeys(("save_dir", "no_explorer", "tsne_samples", "internal_samples", "eval_interval",
                     "eval_samples"), "output"),
    **dict.fromkeys(("seed", "strategy", "mixed_precision", "jit", "steps_per_execution",
                     "checkpoint_minutes", "resume", "overwrite", "deterministic", "verbose"), "run-time"),
}


def group_help(parser: ArgumentParser, group_of: dict):
    """Show ``parser``'s flags in --help under :data:`HELP_GROUPS` (data,
    model, training, output, run-time), each by ``group_of`` (default: model)."""
    groups = {name: parser.add_argument_group(title) for name, title in HELP_GROUPS.items()}
    options = parser._optionals._group_actions  # argparse keeps no public way to move a flag
    for action in list(options):
        if action.dest != "help":
            options.remove(action)
            groups[group_of.get(action.dest, "model")]._group_actions.append(action)


@dataclass
class RunData:
    """What a command trains on. ``extra`` holds anything else it needs later."""

    x: np.ndarray
    y: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    name: str = "data"          # short name, for folders and titles
    description: str = ""       # for the start-up line, e.g. "fmnist: 70000 samples of shape (784,)"
    extra: dict = field(default_factory=dict)


@dataclass
class Run:
    """One training run in progress: what every hook of a command receives."""

    args: object
    data: RunData
    save_dir: Path
    strategy: object = None
    model: object = None
    optimizers: dict = field(default_factory=dict)  # set by build() where a command needs several
    phases: dict = field(default_factory=dict)   # phase name -> TrainResult
    stages: dict = field(default_factory=dict)   # stage name -> seconds (load, build, ...)
    chief: bool = True  # False on the other workers of a multi-worker run: they write no files
    kept: dict = field(default_factory=dict)  # what one hook computed for a later one (results -> pictures)
    results: dict = field(default_factory=dict)  # results.json, once written

    def loop_options(self, **overrides) -> dict:
        """Keyword arguments of :func:`common.training.train` from the shared flags."""
        a = self.args
        options = dict(batch_size=a.batch_size, save_dir=self.save_dir, resume=a.resume, seed=a.seed,
                       verbose=a.verbose, strategy=self.strategy, jit_compile=a.jit,
                       steps_per_execution=a.steps_per_execution, checkpoint_minutes=a.checkpoint_minutes)
        options.update(overrides)
        return options

    def epoch_steps(self, epochs: float, n_samples: int | None = None) -> int:
        """Optimizer steps of ``epochs`` epochs over ``n_samples`` (default: the
        training samples) in batches of ``--batch_size``, as the loop counts them."""
        n = len(self.data.x) if n_samples is None else n_samples
        return int(round(epochs * max(1, n // self.args.batch_size)))

    def pretrain_plan(self) -> list:
        """The ``pretrain`` phase of :meth:`pretrain` for :meth:`TrainingCommand.planned_steps`."""
        a = self.args
        if getattr(a, "ae_weights", None) or not getattr(a, "pretrain_epochs", 0):
            return []
        return [("pretrain", self.epoch_steps(a.pretrain_epochs))]

    def record(self, phase: str, result):
        """Keep a phase's :class:`~common.training.TrainResult` for results.json."""
        self.phases[phase] = result
        return result

    def pretrain(self, model, optimizer, **overrides):
        """``--ae_weights`` if given, else ``--pretrain_epochs`` of autoencoder
        pretraining (the ``pretrain`` phase); nothing when both are unset."""
        a = self.args
        if getattr(a, "ae_weights", None):
            model.load_autoencoder_weights(a.ae_weights)
        elif getattr(a, "pretrain_epochs", 0):
            self.record("pretrain", model.pretrain(self.data.x, a.pretrain_epochs, optimizer=optimizer,
                                                   **self.loop_options(**overrides)))


class TrainingCommand:
    """Base of the training commands; see the module docstring for the order of the hooks."""

    prog = "command"
    description = ""
    seed_help = "seed of weights, data order and sampling"
    progress = "progress bar"
    outputs = ("model.keras", "log.csv", "results.json")
    expand_architecture = True  # draw nested models layer by layer in architecture.png
    #: Flags that ``--resume`` may change (e.g. ``("iterations",)``); any other
    #: flag differing from the saved run is refused with one line.
    resume_may_change: tuple = ()

    # ------------------------------------------------------------------ hooks
    def upgrade_saved_args(self, saved: dict):
        """``--resume``: rewrite the arguments an older version saved (a dict,
        in place) into what this version's flags mean."""

    def resumed_with_changes(self, args, changed: dict):
        """Called when ``--resume`` changes flags of ``resume_may_change``
        (``{flag: (saved, new)}``); may adjust other arguments so that the
        change is well defined (e.g. keep a schedule as it was)."""

    def add_arguments(self, parser):
        """The command's own flags (the shared run flags are added after them)."""

    def check(self, args):
        """Validate the arguments; raise :class:`~common.errors.UsageError`."""

    def load(self, args) -> RunData:
        raise NotImplementedError

    def default_save_dir(self, args, data: RunData) -> str:
        return f"results/{data.name}"

    def describe(self, run: Run) -> str:
        """The model part of the start-up line."""
        return type(run.model).__name__

    def build(self, run: Run):
        """Return the model (called inside ``strategy.scope()``)."""
        raise NotImplementedError

    def train(self, run: Run):
        """Run the training phases, recording each with :meth:`Run.record`."""
        raise NotImplementedError

    def planned_steps(self, run: Run) -> list:
        """``[(phase, steps), ...]``: the optimizer steps each training phase
        takes at most, in order (see :class:`common.training.RunPlan`); the
        plan line and the whole run's time to go come from it."""
        return []

    def results(self, run: Run) -> dict:
        """Metrics and facts of the run for results.json (the skeleton adds
        timings, arguments and environment)."""
        return {}

    def predictions(self, run: Run) -> pd.DataFrame | None:
        """The run's cluster of every sample it trained on or scored, written as
        ``predictions.csv`` (see :func:`prediction_frame` for the columns)."""
        return None

    def pictures(self, run: Run, results: dict):
        """Figures written after results.json."""

    def summary(self, run: Run, results: dict) -> str:
        """The closing line printed after training."""
        return ""

    #: flags (dests) this program shows in another --help group than :data:`HELP_GROUP_OF` says
    help_groups: dict = {}

    # ------------------------------------------------------------- skeleton
    def parser(self) -> ArgumentParser:
        p = ArgumentParser(prog=self.prog, description=self.description)
        self.add_arguments(p)
        add_run_arguments(p, self.seed_help, progress=self.progress)
        group_help(p, {**HELP_GROUP_OF, **self.help_groups})
        return p

    def fit(self, x=None, y=None, **flags) -> Run:
        """Train from Python: the program's flags as keyword arguments, the
        same checks, phases and files as on the command line.

        ``x`` (samples on the first axis; images as (N, H, W, C)) and its
        labels ``y`` (optional, for the reports only) are written to
        ``<save_dir>/data.npz`` and trained on as ``--data`` (so that
        ``resume=True`` finds them again); or give ``data=`` (a file or an
        image folder) or ``dataset=`` (a named data set). Values are written
        as on the command line: ``map_size=(8, 8)``, ``augment=True`` for a
        switch. Returns the :class:`Run`: ``run.model`` (trained),
        ``run.results`` (as ``results.json``), ``run.save_dir``.
        """
        import argparse

        parser = self.parser()
        actions = {a.dest: a for a in parser._actions}
        if x is not None:
            if "data" in flags or "dataset" in flags:
                raise UsageError("give the samples as x, or data= / dataset=, not both")
            save_dir = Path(flags.get("save_dir") or f"results/{self.prog}_arrays")
            if (save_dir / "args.json").is_file() and not (flags.get("resume") or flags.get("overwrite")):
                raise UsageError(f"{save_dir} holds an earlier run; give resume=True to continue it, "
                                 "overwrite=True to replace it, or another save_dir")
            save_dir.mkdir(parents=True, exist_ok=True)
            arrays = {"x": np.asarray(x)} | ({} if y is None else {"y": np.asarray(y)})
            np.savez(save_dir / "data.npz", **arrays)
            flags.update(data=str(save_dir / "data.npz"), save_dir=str(save_dir))
        argv = []
        for name, value in flags.items():
            action = actions.get(name)
            if action is None or not action.option_strings:
                moved = parser.renamed_message(f"--{name}")
                raise UsageError(f"{moved or f'{self.prog} has no flag --{name}'}; see {self.prog} --help")
            flag = action.option_strings[0]
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                argv += [flag] if bool(value) == isinstance(action, argparse._StoreTrueAction) else []
            elif value is None:
                continue
            elif isinstance(value, (list, tuple)):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]

        def refuse(message):  # argparse's errors as the exception, not an exit
            raise UsageError(f"{message} (see {self.prog} --help)")

        parser.error = refuse
        parser.parse_args(argv)
        return self.execute(argv)

    def main(self, argv=None) -> int:
        """The command line: train, write everything, return 0."""
        self.execute(argv)
        return 0

    def execute(self, argv=None) -> Run:
        """Run the skeleton on ``argv`` (the module docstring's steps) and return the :class:`Run`."""
        t0 = time.perf_counter()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = self.parser().parse_args(argv)
        changed = {}
        if args.resume:
            given = given_arguments(self.parser(), argv)
            typed = copy.deepcopy(args)  # the flags as check() completes them (--image_size 64 is 64 64)
            try:
                self.check(typed)
                given = {k: getattr(typed, k) for k in given}
            except UsageError:
                pass
            args, changed = resume_args(args, given, self.resume_may_change,
                                        renamed=self.parser().renamed_dests(),
                                        upgrade=self.upgrade_saved_args)
            if changed:
                self.resumed_with_changes(args, changed)
        if args.resume and args.overwrite:
            raise UsageError("--resume continues the run in --save_dir and --overwrite replaces it; give one")
        self.check(args)
        if getattr(args, "scaling", "none") != "none" and not args.data:
            raise UsageError(f"--scaling applies to --data files; the named data sets come scaled (drop "
                             f"--scaling {args.scaling})")
        if args.verbose == 1 and not sys.stdout.isatty():
            args.verbose = 2  # a progress bar in a log file is noise
        data = self.load(args)
        if args.batch_size > len(data.x) and "batch_size" not in given_arguments(self.parser(), argv):
            args.batch_size = len(data.x)  # the default batch is larger than the data: one batch is all of it
        if args.batch_size > len(data.x):
            raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(data.x)} training "
                             f"samples; use --batch_size {min(256, len(data.x))} or less")
        save_dir = Path(args.save_dir or self.default_save_dir(args, data))
        if (save_dir / "args.json").is_file() and not (args.resume or args.overwrite):
            state = "a finished run" if (save_dir / "results.json").is_file() else "an unfinished run"
            raise UsageError(f"{save_dir} holds {state}; give --resume to continue it, --overwrite to "
                             f"replace it, or another --save_dir")
        save_dir.mkdir(parents=True, exist_ok=True)
        args.save_dir = str(save_dir)
        run = Run(args=args, data=data, save_dir=save_dir)
        run.stages["load"] = time.perf_counter() - t0

        t = time.perf_counter()
        from common.runtime import (
            describe_devices,
            is_chief,
            make_strategy,
            quiet_tensorflow,
            set_mixed_precision,
            worker_count,
        )

        # A multi-worker strategy configures TensorFlow's runtime: it comes before any op.
        run.strategy = make_strategy(args.strategy) if args.strategy == "multiworker" else None
        tf = quiet_tensorflow()
        import keras

        from common import plots

        keras.utils.set_random_seed(args.seed)
        if getattr(args, "deterministic", False):
            tf.config.experimental.enable_op_determinism()
        set_mixed_precision(args.mixed_precision)
        run.strategy = run.strategy or make_strategy(args.strategy)
        chief = run.chief = is_chief(run.strategy)  # only the chief writes files (others: checkpoints)
        if chief and (not args.resume or changed):
            write_json(save_dir / "args.json", vars(args))
        scaler = data.extra.get("scaler")
        if chief and scaler is not None and scaler.method != "none":  # predict scales new samples alike
            write_json(save_dir / "preprocessing.json", scaler.to_dict())
        elif chief:  # an earlier run's scaling (--overwrite) must not be applied to this model's samples
            (save_dir / "preprocessing.json").unlink(missing_ok=True)
        if changed and args.verbose and chief:
            print("resuming with " + ", ".join(f"--{k} {flag_text(new)} (was {flag_text(old)})"
                                               for k, (old, new) in changed.items()), flush=True)
        with run.strategy.scope():
            run.model = self.build(run)
        device = describe_devices(run.strategy)
        if args.verbose:
            print(f"{data.description}; {self.describe(run)}; {device}", flush=True)
        if hasattr(run.model, "functional_view") and chief:
            plots.architecture(run.model.functional_view(), save_dir / "architecture.png",
                               expand_nested=self.expand_architecture)
        run.stages["build"] = time.perf_counter() - t

        t = time.perf_counter()
        from common.training import ESTIMATE_AFTER_SECONDS, planned_run

        with planned_run(self.planned_steps(run)) as plan:
            if args.verbose and plan.steps:
                print(f"plan: {plan.describe()}; the time to go is printed after "
                      f"{ESTIMATE_AFTER_SECONDS:g} s of steps", flush=True)
            self.train(run)
        run.stages["train"] = time.perf_counter() - t
        if not chief:
            return run
        from common.networks import save_keras_model

        t = time.perf_counter()
        save_keras_model(run.model, save_dir / "model.keras")
        if worker_count(run.strategy) > 1:
            # The other workers have stopped; a model built under the multi-worker strategy
            # would wait for them in every prediction. The saved one predicts on its own.
            run.model = keras.saving.load_model(save_dir / "model.keras")
        run.stages["save"] = time.perf_counter() - t
        t = time.perf_counter()
        results = self.results(run)
        run.stages["results"] = time.perf_counter() - t
        results["timings"] = {name: r.timings.to_dict() for name, r in run.phases.items()}
        last = list(results["timings"].values())[-1] if run.phases else {}
        results["iterations_per_second"] = last.get("iterations_per_second")  # the last phase's
        results["command"] = shlex.join([f"bin/{self.prog}", *argv])  # as typed (--resume: the resuming one)
        results["args"] = vars(args)
        results["environment"] = {
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "device": device, "replicas": run.strategy.num_replicas_in_sync,
            "jit": {name: r.jit_compile for name, r in run.phases.items()},
            "steps_per_execution": {name: r.steps_per_execution for name, r in run.phases.items()}}

        def write_results():
            results["timings"]["stages"] = {f"{k}_seconds": round(v, 3) for k, v in run.stages.items()}
            results["timings"]["total_seconds"] = round(time.perf_counter() - t0, 3)
            write_json(save_dir / "results.json", results)

        write_results()  # before the pictures: nothing lost if drawing fails
        t = time.perf_counter()
        frame = self.predictions(run)
        if frame is not None:
            from common.results import write_csv

            write_csv(frame, save_dir / "predictions.csv")
            run.stages["predictions"] = time.perf_counter() - t
        t = time.perf_counter()
        self.pictures(run, results)
        run.stages["pictures"] = time.perf_counter() - t
        write_results()
        if args.verbose:
            line = self.summary(run, results)
            if line:
                print(line)
            written = [f for f in self.outputs if (save_dir / f).exists()]
            print(f"outputs in {save_dir}/: {' '.join(written)}")
        run.results = results
        return run
