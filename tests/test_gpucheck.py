"""bin/gpu-check: the comparison of a run's clusters with a fresh process's, the tables, the whole check."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from common.gpucheck import PROGRAMS, SIZES, agreement, markdown

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "gpu-check"
PROGRAM = {q.name: q for q in PROGRAMS}


def test_fresh_predictions_are_matched_to_the_runs_samples_by_index_or_by_image():
    written = pd.DataFrame({"part": ["train"] * 4, "index": range(4), "unit": [3, 1, 2, 0],
                            "kmeans": [0, 1, 1, 0]})
    # bin/desom predict: a row per sample, in order, its unit as bmu
    assert agreement(written, pd.DataFrame({"bmu": [3, 1, 2, 0]}), PROGRAM["desom"]) == (4, 4)
    assert agreement(written, pd.DataFrame({"index": range(4), "cluster": [0, 1, 0, 0]}),
                     PROGRAM["ae"]) == (3, 4)
    # an image folder: by path, whatever the order; test images that a run held out are matched too
    written = pd.DataFrame({"part": ["train", "train", "test"], "index": [0, 1, 0],
                            "image": ["train/a.png", "train/b.png", "test/x/c.png"], "cluster": [2, 0, 1]})
    fresh = pd.DataFrame({"image": ["test/x/c.png", "train/a.png"], "cluster": [1, 2]})
    assert agreement(written, fresh, PROGRAM["dcn"]) == (2, 2)


def test_the_markdown_has_a_table_per_step_and_says_why_a_row_has_no_numbers():
    frame = pd.DataFrame([
        {"check": "device", "name": "CPU (2 cores)", "status": "ok"},
        {"check": "speed", "name": "Kerasom (784)", "variant": "float32", "status": "ok", "xla": "on",
         "ours_ms": 1.0, "bare_ms": 1.25, "ratio": 0.8, "steps_per_call": 50, "bare_xla_on_ms": 1.25,
         "bare_xla_off_ms": 1.9},
        {"check": "speed", "name": "Kerasom (784)", "variant": "mixed_float16",
         "status": "not measured (CPU)"},
        {"check": "desom", "name": "desom", "variant": "digits (1,797)", "status": "ok", "iterations": 150,
         "steps_seconds": 7.8, "seconds": 19.4, "iterations_per_second": 19.2, "purity": 0.6, "nmi": 0.55,
         "nmi_geometric": 0.56},
        {"check": "program", "name": "dcn", "variant": "default", "status": "ok", "replicas": 1, "xla": "off",
         "seconds": 26.0, "files": "8/8", "same": 400, "samples": 400, "compared": "bin/dcn predict"},
        {"check": "program", "name": "ae", "variant": "mirrored", "status": "failed", "seconds": 3.0,
         "reason": "bin/ae: exit 1: boom"},
    ])
    text = markdown(frame, "header")
    assert text.startswith("header\n")
    assert "| Kerasom (784) | float32 | on | 1.00 | 1.25 | 0.80 | 50 | 1.25 / 1.90 |" in text
    assert "| Kerasom (784) | mixed_float16 | not measured (CPU) |" in text
    assert "| digits (1,797) | 150 | 7.8 | 19 | 19 | 0.6000 | 0.5500 | 0.5600 |" in text
    assert "| dcn | default | ok | 1 | off | 26 | 8/8 | 400 / 400 (bin/dcn predict) |" in text
    assert "| ae | mirrored | failed: bin/ae: exit 1: boom |" in text


@pytest.mark.slow
def test_the_smallest_check_runs_every_step_and_every_program_passes(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run([str(BIN), "--size", "smallest", "--save_dir", str(out)], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    frame = pd.read_csv(out / "gpu_check.csv")
    device = frame[frame["check"] == "device"].iloc[0]
    gpu = device["variant"] == "gpu"
    assert lines[0].startswith(f"gpu-check: {'GPU' if gpu else 'CPU'} mode")
    assert device["tensorflow"] and device["keras"]
    speed = frame[frame["check"] == "speed"].set_index(["name", "variant"])
    for case in SIZES["smallest"].speed_cases:
        assert speed.loc[(case, "float32"), "status"] == "ok"
        assert speed.loc[(case, "float32"), "ours_ms"] > 0 and speed.loc[(case, "float32"), "bare_ms"] > 0
        assert speed.loc[(case, "mixed_float16"), "status"] == ("ok" if gpu else "not measured (CPU)")
    desom = frame[frame["check"] == "desom"].iloc[0]
    assert desom["status"] == "ok" and 0 < desom["purity"] <= 1 and 0 < desom["nmi"] <= 1
    checks = frame[frame["check"] == "program"]
    assert list(zip(checks["name"], checks["variant"])) == [("desom", "mirrored")]  # the smallest size's
    assert (checks["status"] == "ok").all(), checks[["name", "variant", "reason"]].to_string()
    assert (checks["same"] == checks["samples"]).all() and (checks["samples"] > 0).all()
    assert (checks["replicas"] == 1).all()
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("`bin/gpu-check --size smallest`")
    for name, strategy in zip(checks["name"], checks["variant"]):
        assert f"| {name} | {strategy} | ok |" in table
    assert table.strip() in res.stdout  # printed as written
    assert (out / "runs" / "desom_mirrored" / "run" / "model.keras").is_file()


def test_a_selection_that_leaves_no_program_run_is_refused(tmp_path):
    from common.errors import UsageError
    from common.gpucheck import programs

    # --programs dcn (not a program of this size); ae under mirrored (only desom's at this size); desom under
    # default (only mirrored at this size)
    for chosen, strategies in (([], ["default"]), ([PROGRAM["ae"]], ["mirrored"]),
                               ([PROGRAM["desom"]], ["default"])):
        with pytest.raises(UsageError, match="no program run is left at --size smallest"):
            programs(chosen, strategies, SIZES["smallest"], None, tmp_path, 1, False)
