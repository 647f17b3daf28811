"""Helpers shared by the command-line programs in ``bin/``.

* :class:`ArgumentParser` prints a bad flag as one line (no usage dump).
* :func:`run` turns a :class:`~common.errors.UsageError` into one line on
  stderr and exit code 2, a diverged training (NaN or infinite loss) into one
  line and exit code 3, and Ctrl-C or SIGTERM (what schedulers send) into
  exit code 130 or 143, instead of a traceback.
* :func:`add_run_arguments` adds the flags every training command shares;
  :func:`add_data_arguments` the data flags of the commands on data sets.

TensorFlow's start-up helpers live in :mod:`common.runtime`.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys

from common.errors import TrainingDiverged, UsageError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help, unless it is None or False (no news)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def steps_per_execution(text: str):
    """argparse type: ``auto`` or a positive integer."""
    return "auto" if text == "auto" else positive_int(text)


def add_data_arguments(p, required: bool, default: str | None = "digits", what: str = "a data set"):
    """``--dataset NAME`` or ``--data FILE`` (one of them; with neither, the
    command uses ``default``), ``--data_dir`` and ``--label_col``."""
    from common.data import KNOWN_DATASETS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--dataset", choices=KNOWN_DATASETS, help=what + (
        "" if required or default is None else f" (default: {default}, bundled with scikit-learn)"))
    src.add_argument("--data", metavar="FILE", help="your own data: .npz (arrays x, optional y) "
                     "or .csv (numeric columns; see --label_col)")
    p.add_argument("--data_dir", help="folder searched first for the data set's files")
    p.add_argument("--label_col", help="CSV: the column holding labels (used for evaluation only)")


def add_run_arguments(p, seed_help: str, progress: str = "progress bar"):
    """The flags every training command shares: --seed, --strategy,
    --mixed_precision, --jit (and its alias --no_jit), --steps_per_execution,
    --checkpoint_minutes, --resume and --verbose."""
    from common.runtime import JIT_MODES, STRATEGIES

    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: mirrored over all GPUs when there are several")
    p.add_argument("--mixed_precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--jit", choices=JIT_MODES, default="auto",
                   help="compile the training step with XLA; auto: yes, except convolutional models "
                   "on a CPU (where XLA makes them about twice as slow)")
    p.add_argument("--no_jit", dest="jit", action="store_const", const="off", help="the same as --jit off")
    p.add_argument("--steps_per_execution", type=steps_per_execution, default="auto", metavar="K",
                   help="training steps run per compiled call; auto: enough for calls of about 0.1 s "
                   "(results do not depend on it)")
    p.add_argument("--checkpoint_minutes", type=non_negative_float, default=10.0, metavar="MIN",
                   help="minutes between checkpoints (0: only at the end and when stopped); "
                   "Ctrl-C and errors save one too")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --save_dir from its last checkpoint, with its arguments")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help=f"0 quiet, 1 {progress}, 2 one line per log row")


def resume_args(args, keep=("verbose", "strategy", "save_dir", "jit", "steps_per_execution",
                            "checkpoint_minutes")):
    """For ``--resume``: the arguments saved in ``<save_dir>/args.json`` by the
    run to continue, except those named in ``keep`` (taken from ``args``)."""
    import json
    from pathlib import Path

    if not getattr(args, "save_dir", None):
        raise UsageError("--resume needs --save_dir, the folder of the run to continue")
    saved = Path(args.save_dir) / "args.json"
    if not saved.is_file():
        raise UsageError(f"nothing to resume in {args.save_dir} (no args.json); start a run there first")
    mine = {k: getattr(args, k) for k in keep}
    args.__dict__.update(json.loads(saved.read_text()))
    args.__dict__.update(mine, resume=True)
    return args


def dispatch(commands: dict, default: str):
    """A ``main(argv)`` running ``commands[argv[0]]`` on the remaining
    arguments when argv starts with a command name, else ``commands[default]``
    on all of them (``desom --dataset x`` trains, ``desom predict ...`` predicts)."""

    def main(argv=None):
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return commands[default](argv)

    return main


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops like on Ctrl-C
    (the training loop saves a checkpoint and says how to resume)."""


def _terminate(signum, frame):
    raise Terminated()


def run(main, argv=None, prog: str | None = None) -> int:
    """Call ``main(argv)``; report user errors in one line and exit non-zero.

    SIGTERM is handled like Ctrl-C while ``main`` runs.
    """
    prog = prog or os.path.basename(sys.argv[0]) or "desom"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
