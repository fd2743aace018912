"""bench/gpu_suite.sh cannot rot: its CPU dry run (tiny models, a handful of images) prints every row with a figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from suite_table import junit_row, save_rows, table  # noqa: E402

STEPS = {
    "pytest": ["gpu_tests"],
    "stage1": ["fp32:reference", "fp32:sdpa", "bf16:reference", "bf16:sdpa", "bf16:sdpa:compile"],
    "stage2": ["fast:bf16:8", "fast:fp32:8"],
    "stage3": ["fp32", "default", "compile"],
    "e2e": ["data", "stage1", "stage2", "stage3", "total"],
    "sam2": ["fp32:sdpa", "bf16:sdpa"],
}


def test_table_shows_every_expected_row_with_its_figure_or_why_not(tmp_path):
    (tmp_path / "header.txt").write_text("GPU suite: device X")
    (tmp_path / "expected.tsv").write_text("a\tk1\tfirst\na\tk2\tsecond\nb\tk3\tthird\n")
    save_rows(tmp_path / "a.jsonl", [dict(key="k1", name="fast thing", value=30.0, unit="img/s", baseline="ref", baseline_value=10.0)])
    (tmp_path / "a.status").write_text("ok in 3 s")
    (tmp_path / "b.status").write_text("timed out at 60 s")
    lines = table(tmp_path).splitlines()
    assert lines[0] == "GPU suite: device X"
    assert "| a | fast thing | 30 img/s | ref: 10 img/s | **3.00x** |" in lines[4]
    assert "| a | second | - |" in lines[5] and "step ok in 3 s" in lines[5]
    assert "| b | third | - |" in lines[6] and "timed out at 60 s" in lines[6]


def test_junit_row_counts_passed_tests(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
    row = junit_row(report, "gpu_tests")
    assert row["value"] == 3 and row["note"].startswith("1 failed, 0 errors, 1 skipped")
    assert junit_row(tmp_path / "missing.xml", "gpu_tests")["value"] is None


@pytest.mark.slow
def test_dry_run_prints_the_table_with_every_row(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry_run", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    printed = out[out.rindex("GPU suite (DRY RUN") :]  # the table, after the steps' own output
    assert "| step | figure |" in printed, out[-3000:]
    assert (tmp_path / "out" / "table.md").read_text().strip() in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    assert len(rows) == sum(map(len, STEPS.values())), "\n".join(rows)
    missing = [row for row in rows if "no figure" in row]
    assert not missing, "\n".join(missing) + "\n" + out[-4000:]
    assert (tmp_path / "out" / "logs.tar.gz").stat().st_size > 0
    work = next(tmp_path.glob("gpu_suite.*"))
    keys = {step: [json.loads(line)["key"] for line in (work / f"{step}.jsonl").read_text().splitlines()] for step in STEPS}
    for step, expected in STEPS.items():
        assert set(expected) <= set(keys[step]), (step, keys[step])


@pytest.mark.slow
def test_a_spent_budget_skips_steps_but_the_table_still_lists_every_row(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry_run", "--budget", "1", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table_rows = [line for line in (tmp_path / "out" / "table.md").read_text().splitlines()
                  if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    assert len(table_rows) == sum(map(len, STEPS.values()))
    assert all("no figure: step skipped (suite budget of 1 s spent)" in row for row in table_rows), "\n".join(table_rows)


def test_the_suite_is_executable_as_typed_in_a_shell():
    """``bench/gpu_suite.sh --dry_run`` typed in a shell: the file carries its run bit (committed with mode 755)."""
    script = REPO / "bench" / "gpu_suite.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash")
    assert os.access(script, os.X_OK)
