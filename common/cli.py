"""Helpers shared by the command-line programs in ``bin/``.

* :class:`ArgumentParser` prints a bad flag as one line (no usage dump), and
  checks numeric flags: ``add_argument("--lr", type=float, bounds="(0, inf)")``
  rejects ``--lr 0`` with ``argument --lr: must be in (0, inf), got 0``; a
  float flag is always finite (no ``nan``/``inf``).
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
import contextlib
import json
import math
import os
import re
import signal
import sys

from common.errors import TrainingDiverged, UsageError


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default in --help, one way: ``(default: VALUE)`` with
    the value as typed on a command line (``8 8`` for a list); not for None
    or False (a default that depends on other flags is written the same way
    in the flag's own help)."""

    def _get_help_string(self, action):
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or not action.option_strings
                or action.help is None or "(default:" in action.help):
            return action.help
        return f"{action.help} (default: {flag_text(default).replace('%', '%%')})"


class Number:
    """argparse type: an ``int`` or a finite ``float`` within ``bounds``.

    ``bounds`` is an interval as written in mathematics: ``"[0, 1]"``,
    ``"(0, inf)"``, ``"[1, 65536]"``; ``None`` allows any value (floats must
    still be finite).
    """

    def __init__(self, kind: type = float, bounds: str | None = None):
        self.kind, self.bounds = kind, bounds
        self.__name__ = kind.__name__  # argparse names the type in some messages
        if bounds is not None:
            text = bounds.replace(" ", "")
            if text[0] not in "[(" or text[-1] not in "])" or text.count(",") != 1:
                raise ValueError(f"bounds must look like '[0, 1]' or '(0, inf)', got {bounds!r}")
            low, high = text[1:-1].split(",")
            self.low, self.high = float(low), float(high)
            self.open_low, self.open_high = text[0] == "(", text[-1] == ")"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'") from None
        where = f" in {self.bounds}" if self.bounds else ""
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number{where}, got {text}")
        if self.bounds is not None:
            below = value <= self.low if self.open_low else value < self.low
            above = value >= self.high if self.open_high else value > self.high
            if below or above:
                raise argparse.ArgumentTypeError(f"must be in {self.bounds}, got {text}")
        return value


#: :meth:`ArgumentParser.add_argument_from` keeps the program's default
PROGRAMS_DEFAULT = object()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help, one-line errors and checked numbers."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.renamed: dict = {}  # old flag -> (new flags, note)

    def rename(self, old: str, *new: str, note: str = ""):
        """``old`` is no longer a flag of this program: giving it is a one-line
        error naming ``new`` (and ``note``, e.g. which new flag for which
        model); a run saved under the old name resumes with the new one."""
        self.renamed[old] = (new, note)

    def renamed_dests(self) -> dict:
        """``{old dest: (new dests)}``, to read an ``args.json`` written before a rename."""
        return {old.lstrip("-"): tuple(n.lstrip("-") for n in new) for old, (new, _) in self.renamed.items()}

    def renamed_message(self, old: str) -> str | None:
        """The one line for an old flag name (None for a current one)."""
        if old not in self.renamed:
            return None
        new, note = self.renamed[old]
        return f"{old} is now {' or '.join(new)}{f' ({note})' if note else ''}"

    def parse_known_args(self, args=None, namespace=None):
        for token in sys.argv[1:] if args is None else args:
            message = self.renamed_message(self._old_name(str(token).split("=", 1)[0]))
            if message:
                self.error(message)
        return super().parse_known_args(args, namespace)

    def _old_name(self, name: str) -> str:
        """``name``, or the old flag it abbreviates when no current flag
        starts with it (argparse takes unambiguous abbreviations)."""
        if name in self.renamed or not name.startswith("--") or name == "--" or not self.allow_abbrev:
            return name
        if any(flag.startswith(name) for flag in self._option_string_actions):
            return name
        old = [flag for flag in self.renamed if flag.startswith(name)]
        return old[0] if len(old) == 1 else name

    def add_argument(self, *args, bounds: str | None = None, **kwargs):
        """``argparse``'s, plus ``bounds`` (see :class:`Number`) for ``type=int``
        or ``type=float``; every ``float`` flag must be finite."""
        return super().add_argument(*args, **_checked_number(kwargs, bounds))

    def add_argument_from(self, program: argparse.ArgumentParser, flag: str, default=PROGRAMS_DEFAULT,
                          default_text: str | None = None):
        """``flag`` as the ``program``'s parser declares it (type and bounds,
        choices, nargs, metavar, help, default), so that a benchmark never
        declares a flag of its program again. ``default`` (a benchmark's
        protocol) replaces the program's default and the "(default: ...)" of
        its help; ``default_text`` describes a default this parser resolves
        itself (the value stays None)."""
        source = next((a for a in program._actions if flag in a.option_strings), None)
        if source is None or type(source) is not argparse._StoreAction:
            raise ValueError(f"{program.prog} declares no flag {flag} that takes a value")
        text = source.help or ""
        if default is not PROGRAMS_DEFAULT or default_text:
            text = help_without_default(text) + (f" (default: {default_text})" if default_text else "")
        if default is PROGRAMS_DEFAULT:
            default = None if default_text else source.default
        return super().add_argument(flag, type=source.type, nargs=source.nargs, choices=source.choices,
                                    default=default, metavar=source.metavar, help=text)

    def add_argument_group(self, *args, **kwargs):
        return _with_bounds(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return _with_bounds(super().add_mutually_exclusive_group(**kwargs))

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def help_without_default(text: str) -> str:
    """A flag's help without its "(default: ...)" (one level of parentheses inside)."""
    return re.sub(r"\s*\(default:[^()]*(\([^()]*\)[^()]*)*\)", "", text)


def _checked_number(kwargs: dict, bounds: str | None) -> dict:
    kind = kwargs.get("type")
    if kind in (int, float):
        kwargs["type"] = Number(kind, bounds)
    elif bounds is not None:
        raise ValueError("bounds need type=int or type=float")
    return kwargs


def _with_bounds(group):
    """A group whose ``add_argument`` takes ``bounds`` as the parser's does."""
    add = group.add_argument

    def add_argument(*args, bounds: str | None = None, **kwargs):
        return add(*args, **_checked_number(kwargs, bounds))

    group.add_argument = add_argument
    return group


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


def add_data_arguments(p, required: bool, default: str | None = "digits", what: str = "a data set",
                       scaling: bool = False):
    """``--dataset NAME`` or ``--data FILE`` (one of them; with neither, the
    command uses ``default``), ``--data_dir``, ``--label_col`` and, with
    ``scaling``, ``--scaling`` (:func:`add_scaling_argument`)."""
    from common.data import KNOWN_DATASETS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--dataset", choices=KNOWN_DATASETS, help=what + (
        "" if required or default is None else f" (default: {default}, bundled with scikit-learn)"))
    src.add_argument("--data", metavar="FILE", help="your own data: .npz (arrays x, optional y), "
                     ".csv (numeric columns; see --label_col) or float32 .npy features (read from disk "
                     "batch by batch: data larger than memory)")
    p.add_argument("--data_dir", help="folder searched first for the data set's files")
    p.add_argument("--label_col", help="CSV: the column holding labels (used for evaluation only)")
    if scaling:
        add_scaling_argument(p)


def add_scaling_argument(p):
    """``--scaling``: per-feature scaling of the user's files, saved beside the
    model (``preprocessing.json``, written by the run skeleton from
    ``RunData.extra["scaler"]``) and applied again by ``predict``."""
    from common.data import SCALINGS

    p.add_argument("--scaling", choices=SCALINGS, default="none",
                   help="per-feature scaling of --data files: minmax to [0, 1] or standard (statistics of "
                   "the training data, saved beside the model as preprocessing.json and applied by predict)")


#: ``bounds`` of every seed flag: what ``keras.utils.set_random_seed`` (numpy's
#: legacy seeding) accepts, 0 to 2**32 - 1.
SEED_BOUNDS = "[0, 4294967295]"


def add_run_arguments(p, seed_help: str, progress: str = "progress bar"):
    """The flags every training command shares: --seed, --strategy,
    --mixed_precision, --jit (and its alias --no_jit), --steps_per_execution,
    --checkpoint_minutes, --resume, --overwrite, --deterministic and --verbose."""
    from common.runtime import JIT_MODES, STRATEGIES

    p.add_argument("--seed", type=int, default=0, bounds=SEED_BOUNDS, help=seed_help)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: mirrored over all GPUs when there are several")
    p.add_argument("--mixed_precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--jit", choices=JIT_MODES, default="auto",
                   help="compile the training step with XLA; auto: yes, except models with convolutions "
                   "or random draws (dropout, noise) on a CPU, where XLA makes them 2-4 times slower")
    p.add_argument("--no_jit", dest="jit", action="store_const", const="off", help="the same as --jit off")
    p.add_argument("--steps_per_execution", type=steps_per_execution, default="auto", metavar="K",
                   help="training steps run per compiled call; auto: enough for calls of about 0.1 s "
                   "(results do not depend on it)")
    p.add_argument("--checkpoint_minutes", type=non_negative_float, default=10.0, metavar="MIN",
                   help="minutes between checkpoints (0: only at the end and when stopped); "
                   "Ctrl-C and errors save one too")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --save_dir from its last checkpoint, with its arguments")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --save_dir that holds an earlier run (its files are replaced); "
                   "without it, or --resume, such a folder is refused")
    p.add_argument("--deterministic", action="store_true",
                   help="TensorFlow's op determinism: with the same --seed, two runs on the same machine "
                   "give identical results (slower; no XLA)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help=f"0 quiet, 1 {progress}, 2 one line per log row")


#: Flags that change how a run computes or what it draws, not what it computes: a resumed run takes them
#: from its command line.
RUNTIME_FLAGS = ("verbose", "strategy", "save_dir", "jit", "steps_per_execution", "checkpoint_minutes",
                 "resume", "overwrite", "no_explorer")


def given_arguments(parser: argparse.ArgumentParser, argv) -> dict:
    """The flags present on the command line ``argv`` (defaults left out),
    as ``{dest: value}``; ``parser`` must be a fresh one (its defaults are
    changed)."""
    for action in parser._actions:  # set_defaults would pass the marker through the flags' types
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resume_args(args, given: dict, may_change=(), keep=RUNTIME_FLAGS, renamed=None,
                upgrade=None) -> tuple[object, dict]:
    """For ``--resume``: the arguments saved in ``<save_dir>/args.json`` by the
    run to continue, and the changes applied to them.

    ``given`` holds the flags of this command line (:func:`given_arguments`).
    Those named in ``keep`` are taken from ``args``; those in ``may_change``
    (e.g. more iterations) replace the saved value; any other flag that differs
    from the saved run is refused with a :class:`UsageError`, never ignored.
    ``renamed`` (:meth:`ArgumentParser.renamed_dests`) reads the saved
    arguments of a run written before a flag was renamed; ``upgrade(saved)``
    may rewrite them in place (a flag whose meaning narrowed) before they are
    compared.
    Returns ``(args, {flag: (saved value, new value)})``.
    """
    import json
    from pathlib import Path

    if not getattr(args, "save_dir", None):
        raise UsageError("--resume needs --save_dir, the folder of the run to continue")
    path = Path(args.save_dir) / "args.json"
    if not path.is_file():
        raise UsageError(f"nothing to resume in {args.save_dir} (no args.json); start a run there first")
    saved = json.loads(path.read_text())
    for old, new in (renamed or {}).items():
        if old in saved:
            value = saved.pop(old)
            saved.update({n: value for n in new if n not in saved})
    if upgrade is not None:
        upgrade(saved)
    changed = {k: (saved.get(k), v) for k, v in given.items() if k not in keep and saved.get(k) != v}
    refused = [k for k in changed if k not in may_change]
    if refused:
        k = refused[0]
        allowed = f"; only {', '.join('--' + m for m in may_change)} may change" if may_change else ""
        raise UsageError(f"--resume continues the run in {args.save_dir} with its saved arguments, and "
                         f"--{k} {flag_text(changed[k][1])} differs from its {flag_text(changed[k][0])}"
                         f"{allowed}: drop --{k}, or start a new run in another --save_dir")
    mine = {k: getattr(args, k) for k in keep if hasattr(args, k)}
    args.__dict__.update(saved)
    args.__dict__.update(mine, resume=True)
    args.__dict__.update({k: new for k, (_, new) in changed.items()})
    return args, changed


def command_line(parser: argparse.ArgumentParser, args, skip=()) -> list[str]:
    """``args`` written back as the optional flags of ``parser``, for a child
    process of the same program: flags at their default and those whose
    ``dest`` is in ``skip`` are left out."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parsed_settings(parser: argparse.ArgumentParser, argv, complete=None) -> dict:
    """Every setting ``argv`` means to ``parser``, defaults included, as JSON
    values (for telling whether a run made earlier with the same flags ran
    with other defaults). ``complete(args)``, if given, is the command's own
    completion of its flags (e.g. ``check``, writing ``--confident_fraction
    0.7`` as ``0.7 0.7`` the way the run saved it); a UsageError of it is
    left to the run itself."""
    args = parser.parse_args(argv)
    if complete is not None:
        with contextlib.suppress(UsageError):
            complete(args)
    return json.loads(json.dumps(vars(args), default=str))


def changed_settings(before: dict, now: dict, ignore=RUNTIME_FLAGS) -> list[tuple[str, object, object]]:
    """``(name, then, now)`` of each setting of ``now`` that ``before`` (both
    :func:`parsed_settings`) holds with another value; settings in
    ``ignore`` (how a run runs, not what it computes) and those left to run
    time (None now) are not compared."""
    return [(k, before[k], v) for k, v in now.items()
            if k not in ignore and v is not None and k in before and before[k] != v]


def flag_text(value) -> str:
    """A flag's value as typed: ``8 8`` for a list."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


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


def _lost_peer(error: Exception) -> bool:
    """A collective of a multi-worker run failed because a peer died or left."""
    return (bool(os.environ.get("TF_CONFIG")) and type(error).__module__.startswith("tensorflow")
            and type(error).__name__ in ("UnavailableError", "AbortedError", "CancelledError"))


def run(main, argv=None, prog: str | None = None) -> int:
    """Call ``main(argv)``; report user errors in one line and exit non-zero.

    SIGTERM is handled like Ctrl-C while ``main`` runs. A multi-worker run
    whose peer died ends with one line and exit code 4 (after the training
    loop's checkpoint).
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
    except Exception as e:
        if not _lost_peer(e):
            raise
        import re

        peer = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", str(e))
        who = f"{peer[1]} {peer[2]}" if peer else "another worker"
        print(f"{prog}: error: {who} of this multi-worker run stopped answering ({type(e).__name__}); the "
              "last checkpoint is kept: start every worker again with --resume", file=sys.stderr)
        sys.exit(4)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
