"""One table out of the benchmark steps of ``bench/gpu_suite.sh``.

Each benchmark, given ``--summary_json FILE``, appends its figures there as
rows (:func:`save_rows`): what was measured, its value, and the baseline it is
compared with, measured in the same run. The suite lists beforehand the rows
it expects of every step (``expected.tsv``: step, row key, description); this script prints
every expected row, with its figure or with why it has none (the step failed,
timed out, or was skipped: the step's status file and log say which), so a
broken step shows as a row, never as a missing table.

    python bench/suite_table.py WORK_DIR            # WORK_DIR as gpu_suite.sh leaves it
    python bench/suite_table.py --junit pytest.xml --key gpu_tests   # a pytest run as a row (JSON line)
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def save_rows(path: str | Path | None, rows: list[dict]) -> None:
    """Append figures to the JSON-lines file ``path`` (nothing when ``path`` is None).

    A row: ``key`` (stable, from the benchmark's arguments, e.g. ``bf16:sdpa:compile``:
    the suite names the rows it expects by it), ``name`` (what was measured), ``value``, ``unit``, optionally
    ``baseline`` (name) and ``baseline_value`` (same unit, same run), and
    ``note`` (agreement figures, sizes, compile time, ...).
    """
    if path is None:
        return
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


def table(work: Path) -> str:
    """The markdown table of every expected row of the suite in ``work``."""
    header = (work / "header.txt").read_text().strip() if (work / "header.txt").is_file() else ""
    lines = [header, "", "| step | figure | value | baseline (same run) | ratio | note |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in (work / "expected.tsv").read_text().splitlines():
        step, key, description = entry.split("\t", 2)
        status_file = work / f"{step}.status"
        status = status_file.read_text().strip() if status_file.is_file() else "not run"
        rows = []
        rows_file = work / f"{step}.jsonl"
        if rows_file.is_file():
            rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        found = [row for row in rows if row.get("key") == key and row.get("value") is not None]
        if not found:
            lines.append(f"| {step} | {description} | - | - | - | no figure: step {status} (log: {step}.log) |")
            continue
        row = found[-1]
        name = row.get("name", description)
        value, unit = row.get("value"), row.get("unit", "")
        base = row.get("baseline_value")
        baseline = f"{row['baseline']}: {format_value(base, unit)}" if row.get("baseline") else "-"
        ratio = f"**{value / base:.2f}x**" if value is not None and base else "-"
        lines.append(f"| {step} | {name} | {format_value(value, unit)} | {baseline} | {ratio} | {row.get('note', '')} |")
    return "\n".join(lines)


def junit_row(path: Path, key: str) -> dict:
    """A pytest ``--junitxml`` report as one row: passed tests, with failures and skips in the note."""
    if not path.is_file():
        return dict(key=key, name="pytest -m gpu", value=None, unit="passed", note="no report (pytest did not finish)")
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = total - failed - errors - skipped
    note = f"{failed} failed, {errors} errors, {skipped} skipped" + (" (no GPU visible?)" if passed == 0 and skipped else "")
    return dict(key=key, name="pytest -m gpu", value=passed, unit="passed", note=note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", help="the suite's work folder: print its table")
    parser.add_argument("--junit", default=None, help="print this pytest report as one JSON row instead")
    parser.add_argument("--key", default="gpu_tests", help="the row key of --junit")
    args = parser.parse_args(argv)
    if args.junit:
        print(json.dumps(junit_row(Path(args.junit), args.key)))
    elif args.work:
        print(table(Path(args.work)))
    else:
        parser.error("give WORK_DIR or --junit FILE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
