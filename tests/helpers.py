"""Helpers shared by the tests."""

import pytest


def interrupt_on_call(monkeypatch, cls, method: str, n: int):
    """Make ``cls.method`` raise KeyboardInterrupt (Ctrl-C) on its n-th call.

    Returns a function that puts the original method back.
    """
    original = getattr(cls, method)
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)
    return lambda: monkeypatch.setattr(cls, method, original)


def run_in_process(main, capsys, *args):
    """A program's ``main`` in this process, as its command line would run it:
    (exit code, what it printed)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(list(map(str, args)))
    return stop.value.code, capsys.readouterr()


def run_ok(main, capsys, *args):
    """:func:`run_in_process`, asserting exit code 0; what it printed."""
    code, printed = run_in_process(main, capsys, *args)
    assert code == 0, printed.err[-3000:]
    return printed


def assert_one_line_error(main, argv, message: str, capsys):
    """``main(argv)`` exits with code 2 and one stderr line containing ``message``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def resumed_args(monkeypatch, command_class, first, resume):
    """The arguments a ``TrainingCommand`` resumes with: ``first`` (which
    holds ``--save_dir``) parsed and checked, saved in that folder's
    args.json as a run saves them, then ``main(resume)`` stopped where it
    would load the data (nothing is trained)."""
    from pathlib import Path

    from common.results import write_json

    command = command_class()
    args = command.parser().parse_args(first)
    command.check(args)
    write_json(Path(args.save_dir) / "args.json", vars(args))
    seen = {}

    class Loaded(Exception):
        pass

    def load(self, args):
        seen["args"] = args
        raise Loaded

    monkeypatch.setattr(command_class, "load", load)
    with pytest.raises(Loaded):
        command_class().main(resume)
    return seen["args"]


def explorer_page(path) -> dict:
    """The data embedded in an explorer.html page (see desom.explorer)."""
    import json
    import re
    from pathlib import Path

    html = Path(path).read_text(encoding="utf-8")
    found = re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', html, re.S)
    assert found, f"{path} holds no explorer data"
    return json.loads(found.group(1))


def unpack(spec):
    """A typed array of an explorer page as numpy."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(spec["data"]), np.dtype(spec["dtype"]).newbyteorder("<"))
