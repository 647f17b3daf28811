"""Helpers shared by the tests."""


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
