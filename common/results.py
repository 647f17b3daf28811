"""Result files and tables: atomic writers, mean ± std summaries, text tables."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name to write ``path`` under; renamed to ``path`` when the
    block ends without error, removed when it fails. A reader never sees a
    half-written file, and a file written before survives a failed rewrite.

    The temporary name keeps the suffixes (``ae.partial.weights.h5``), so
    writers that choose a format by the suffix (numpy, Keras, matplotlib)
    still do.
    """
    path = Path(path)
    first, dot, rest = path.name.partition(".")
    tmp = path.with_name(f"{first}.partial{dot}{rest}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(frame: pd.DataFrame, path) -> Path:
    """Write a CSV atomically (a temporary file, then a rename)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_json(path, obj) -> Path:
    """Write JSON atomically; numpy scalars become Python numbers."""
    text = json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def summarize(runs: pd.DataFrame, by: list[str], columns) -> pd.DataFrame:
    """Mean and (population) standard deviation of ``columns`` per group, with run counts."""
    cols = [c for c in columns if c in runs]
    grouped = runs.groupby(by, sort=False)[cols]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    summary.insert(0, "runs", grouped.size())
    return summary.reset_index()


def text_table(summary: pd.DataFrame, by: list[str], columns, coarse=("seconds", "per_second")) -> str:
    """A fixed-width table of ``mean ± std`` cells (1 decimal for timings, else 3)."""
    shown = [c for c in columns if f"{c}_mean" in summary and summary[f"{c}_mean"].notna().any()]
    lines = [[*by, "runs", *shown]]
    for _, r in summary.iterrows():
        cells = [str(r[b]) for b in by] + [str(r["runs"])]
        for c in shown:
            m, s = r[f"{c}_mean"], r[f"{c}_std"]
            digits = 1 if any(w in c for w in coarse) or c == "iterations" else 3
            cells.append("-" if pd.isna(m) else f"{m:.{digits}f} ± {s:.{digits}f}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)


def write_summary(rows: list[dict], path, by: list[str], columns) -> pd.DataFrame:
    """Summarize benchmark ``rows`` per group, write the summary CSV and print its table."""
    summary = summarize(pd.DataFrame(rows), by, columns)
    write_csv(summary, path)
    print()
    print(text_table(summary, by, columns))
    return summary
