"""The toy study's mask-source comparison (issue 30): do the part-whole masks matter?

``toy_study.py --compare_ledgers=A.json,B.json,...`` reads the ledgers of studies that differ only in
their stage-1 masks (``--masks``: ``part_whole`` = the oracle masks, ``boxes``, ``full_image``) or
stage-2 flags (``--embed_flags``, e.g. ``--crop``) and writes one report: per budget, a table by
mask source x teacher (test and validation accuracy, test ``distill_r2``, islands ARI against the
ground-truth parts / object / all objects), the paired differences by seed of the part-whole masks
minus each other source per teacher (and of a variant of them, stage-2 or ``NAME=PATH``-labelled, minus
the other mask sources), and a figure of accuracy by mask source (one colour per teacher, a point per
seed). Only the ``sam_distill`` arms' rows are read: the other methods use no masks.

Rows written before issue 30 name neither their masks nor their teacher: they are the part-whole
masks', and the teacher follows from the method. A module without flags, like ``seed_stats.py``.
"""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import numpy as np
from seed_stats import format_mean_std

from partwhole.common.errors import InputError
from partwhole.common.safe_files import atomic_write_bytes

PART_WHOLE = "part_whole"
TEACHER_OF_METHOD = {"sam_distill": "pretrained", "sam_distill_random": "random"}  # the sam_distill arms' stage-2 teachers
TEACHER_COLOURS = {"pretrained": "#1f77b4", "random": "#ff7f0e"}  # toy_study's colours of the two arms
GT_LEVELS = ("parts", "object", "all objects")  # what islands_cli's ground_truth scores of levels 0, 1, 2 compare with


def row_masks(row: dict) -> str:
    return row.get("masks", PART_WHOLE)


def row_teacher(row: dict) -> str | None:
    return row.get("teacher") or TEACHER_OF_METHOD.get(row["method"])


def source_label(masks: str, embed_flags: list[str]) -> str:
    """A ledger's mask source as the report names it: the masks, and the stage-2 flags when there are any."""
    return f"{masks} ({' '.join(embed_flags)})" if embed_flags else masks


def read_ledgers(paths: list[str], recipe: tuple[str, ...], defaults: dict[str, str]) -> list[dict]:
    """The sam_distill rows of every ledger, each with its ``source`` (:func:`source_label`) and ``teacher``.

    Ledgers must agree on every ``recipe`` flag both record (``defaults`` fill the ones older ledgers lack)
    but the mask source and the stage-2 flags, and differ in those. A ``NAME=PATH`` entry labels its ledger's
    source ``<source> [NAME]``: a study of the same source that differs in procedure only (e.g. pretrained
    straight to its budget instead of resumed at the shorter ones), compared with the unlabelled one.

    Raises:
        InputError: a ledger that cannot be read, recipes that differ, or two ledgers of one source.
    """
    rows, first, sources = [], None, {}
    for entry in paths:
        name, _, path = entry.partition("=") if "=" in entry and not Path(entry).exists() else ("", "", entry)
        try:
            data = json.loads(Path(path).read_text())
            runs, recorded = data["runs"], {**defaults, **data.get("flags", {})}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"--compare_ledgers: {path} is not a study results file ({err})") from None
        recorded_masks = {row_masks(r) for r in runs if r["method"] in TEACHER_OF_METHOD} or {PART_WHOLE}
        source = source_label(recorded_masks.pop(), ast.literal_eval(recorded.get("embed_flags", "[]")))
        source = f"{source} [{name}]" if name else source
        if source in sources:
            raise InputError(f"--compare_ledgers: {sources[source]} and {path} both hold {source} rows; give one ledger per source "
                             f"(or label one: NAME=PATH)")
        sources[source] = path
        first = first or (path, recorded)
        differ = [k for k in recipe if k not in ("masks", "embed_flags") and k in recorded and k in first[1] and recorded[k] != first[1][k]]
        if differ:
            k = differ[0]
            raise InputError(f"--compare_ledgers: {first[0]} and {path} differ in --{k} ({first[1][k]} vs {recorded[k]}); "
                             f"only the masks may differ")
        rows += [{**r, "source": source, "teacher": row_teacher(r)} for r in runs if r["method"] in TEACHER_OF_METHOD]
    return rows


def islands_ari(rows: list[dict]) -> str:
    """Islands ARI against the ground truth per level, mean ± std over the rows that have it ("n/a" if none)."""
    scores = [r["islands"]["ground_truth"] for r in rows if "ground_truth" in r.get("islands", {})]
    if not scores:
        return "n/a"
    return " / ".join(format_mean_std([s[str(level)]["ari"] for s in scores], 1, 2) for level in range(len(GT_LEVELS)))


def paired(rows: list[dict], key: str, source: str, other: str, teacher: str, budget: int) -> str | None:
    """Accuracy points (``key``) of ``source`` minus ``other`` for one teacher and budget, paired by seed; None without a pair."""
    accuracy = {(r["source"], r["seed"]): r[key] for r in rows if r["teacher"] == teacher and r["budget"] == budget}
    diffs = [100 * (accuracy[source, seed] - accuracy[other, seed]) for s, seed in sorted(accuracy) if s == source
             and (other, seed) in accuracy]
    if not diffs:
        return None
    std = np.std(diffs, ddof=1) if len(diffs) > 1 else 0.0
    return (f"- {teacher} teacher, {budget} epochs: {source} minus {other} {np.mean(diffs):+.1f} ± {std:.1f} "
            f"(seeds: {', '.join(f'{d:+.1f}' for d in diffs)})")


def comparison_report(rows: list[dict], budgets: list[int], ledgers: list[str], figure: Path) -> str:
    """The markdown report of :func:`read_ledgers`'s rows at ``budgets``; draws ``figure``."""
    sources = list(dict.fromkeys(r["source"] for r in rows))
    sources.sort(key=lambda s: s != PART_WHOLE)  # the part-whole masks first, the others in ledger order
    teachers = [t for t in TEACHER_OF_METHOD.values() if any(r["teacher"] == t for r in rows)]
    budgets = [b for b in budgets if any(r["budget"] == b for r in rows)]
    lines = [f"Toy study: do the part-whole masks matter? The sam_distill arms with each stage-1 mask source ({', '.join(sources)}), "
             f"from the ledgers {', '.join(ledgers)}; same recipe otherwise. Mean ± std over seeds; islands ARI of the "
             f"pretrained columns against the ground truth ({' / '.join(GT_LEVELS)}, levels 0 / 1 / 2) where the ledger has "
             "islands (each study's longest budget)."]
    for budget in budgets:
        lines += ["", f"At {budget} pretraining epochs:", "",
                  "| masks | teacher | seeds | test accuracy % | validation accuracy % | test distill_r2 | islands ARI vs GT (L0 / L1 / L2) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for source in sources:
            for teacher in teachers:
                cell = [r for r in rows if r["source"] == source and r["teacher"] == teacher and r["budget"] == budget]
                if cell:
                    lines.append(f"| {source} | {teacher} | {len(cell)} | {format_mean_std([r['test_accuracy'] for r in cell])} | "
                                 f"{format_mean_std([r['val_accuracy'] for r in cell])} | "
                                 f"{format_mean_std([r.get('distill_r2') for r in cell], 1, 3)} | {islands_ari(cell)} |")
    # the part-whole masks minus every other source; a labelled or stage-2 variant of them minus the other mask sources
    pairs = [(PART_WHOLE, other) for other in sources if other != PART_WHOLE]
    pairs += [(variant, other) for variant in sources if variant.startswith(PART_WHOLE) and variant != PART_WHOLE
              for other in sources if not other.startswith(PART_WHOLE)]
    for key, name in (("test_accuracy", "test"), ("val_accuracy", "validation")):
        differences = [line for budget in budgets for teacher in teachers for source, other in pairs
                       if (line := paired(rows, key, source, other, teacher, budget))]
        if differences:
            lines += ["", f"Paired differences (same seed, same split), {name} accuracy points:", "", *differences]
    draw_by_source(rows, sources, teachers, budgets, figure)
    return "\n".join(lines) + "\n"


def draw_by_source(rows: list[dict], sources: list[str], teachers: list[str], budgets: list[int], path: Path) -> None:
    """Test accuracy by mask source, a panel per budget, one colour per teacher, a point per seed and a bar at the mean."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * max(len(budgets), 1) + 1, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(budgets), 1), sharey=True))
    for ax, budget in zip(axes, budgets):
        for offset, teacher in zip(np.linspace(-0.15, 0.15, len(teachers)), teachers):
            for i, source in enumerate(sources):
                values = [100 * r["test_accuracy"] for r in rows if (r["source"], r["teacher"], r["budget"]) == (source, teacher, budget)]
                if values:
                    ax.plot([i + offset] * len(values), values, "o", color=TEACHER_COLOURS[teacher], alpha=0.6,
                            label=f"{teacher} teacher (a point per seed)" if i == 0 else None)
                    ax.hlines(np.mean(values), i + offset - 0.1, i + offset + 0.1, color=TEACHER_COLOURS[teacher])
        ax.set_xticks(range(len(sources)), sources, fontsize=7)
        ax.set_xlim(-0.5, len(sources) - 0.5)
        ax.set_title(f"{budget} pretraining epochs", fontsize=9)
        ax.axhline(10, color="red", linewidth=0.5)
    axes[0].set_ylabel("test accuracy % (frozen backbone)")
    axes[0].legend(fontsize=6.5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
