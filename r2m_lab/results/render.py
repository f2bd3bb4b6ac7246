"""A built :class:`~r2m_lab.results.tables.Table` as Markdown, LaTeX and CSV, and the pairs as CSV rows.

Markdown and LaTeX hold both levels (frame, then video), one ``mean ± std`` per cell; CSV is long (one line per
table × level × row × column) and adds AP, EER, TPR@FPR, accuracy (means over seeds) and the marks.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from r2m_lab.evaluation.tables import latex_escape
from r2m_lab.results.tables import EXTRA_METRICS, LEVELS, Table

TIE = "≈"


def seeds_phrase(table: Table) -> str:
    seeds = table.runs.seeds
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def rule_text(confidence: float, replicates: int) -> str:
    """The best rule as a sentence, under every table."""
    pct = f"{100 * confidence:g} %"
    return (
        f"Bold: the best mean of its column, marked only when the {pct} paired bootstrap interval of its AUC "
        f"difference to the runner-up excludes zero ({replicates} replicates: test videos resampled within each set"
        f", and seeds when there are several). {TIE}: the best and the runner-up are a tie (the interval includes "
        "zero). Cells: mean ± std over seeds (ddof 1); a cell lacking a seed names it and holds no mean."
    )


def _title(table: Table, level: str) -> str:
    return f"{table.name}: {table.runs.benchmark}, {level}-level AUC, {seeds_phrase(table)}"


def _missing_lines(table: Table) -> list[str]:
    lines = []
    for seed in table.runs.missing_seeds:
        for job in table.runs.missing[seed]:
            lines.append(
                f"- missing seed {seed}: {job.reason}" + (f"; relaunch: `{job.command}`" if job.command else "")
            )
    return lines


def _marked(cell: Any) -> str:
    text = cell.text().replace("|", "\\|")
    return f"**{text}**" if cell.mark == "best" else f"{text} {TIE}" if cell.mark == "tie" else text


def _signed(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def summary_markdown(table: Table, confidence: float) -> list[str]:
    """The compact view first: each row's protocol (or group) means at both levels, then, per reference (``r2m``,
    ``average``), every merger's paired frame-level difference of those means with its interval."""
    means = [c for c in table.columns if c.kind in ("protocol", "group")]
    if not means:
        return []
    header = [f"{c.key} ({level})" for level in LEVELS for c in means]
    lines = [
        f"## {table.name}: mean AUC per {'protocol' if means[0].kind == 'protocol' else 'group'}, "
        f"{seeds_phrase(table)}",
        "",
        "| row | " + " | ".join(header) + " |",
    ]
    lines.append("|" + "|".join(["---"] + ["---:"] * len(header)) + "|")
    for row in table.rows:
        cells = [_marked(table.cells[level][(row, c.name)]) for level in LEVELS for c in means]
        lines.append("| " + " | ".join([row.replace("|", "\\|"), *cells]) + " |")
    lines.append("")
    pct = f"{100 * confidence:g} %"
    pairs = [p for p in table.pairs["frame"] if p["column"] in {c.name for c in means}]
    for reference in dict.fromkeys(p["reference"] for p in pairs):
        mine = {(p["row"], p["column"]): p for p in pairs if p["reference"] == reference}
        rows = list(dict.fromkeys(r for r, _ in mine))
        lines += [
            f"Frame-level AUC difference against `{reference}` (mean over seeds, {pct} paired bootstrap interval; "
            "`*`: the interval excludes zero):",
            "",
            "| row | " + " | ".join(c.key for c in means) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(means)) + "|",
        ]
        for row in rows:
            texts = []
            for c in means:
                p = mine.get((row, c.name))
                if p is None:
                    texts.append("")
                elif "lo" not in p:
                    texts.append(p.get("note", "n/a"))
                else:
                    star = " *" if p["excludes_zero"] else ""
                    texts.append(f"{_signed(p['mean_diff'])} [{_signed(p['lo'])}, {_signed(p['hi'])}]{star}")
            lines.append("| " + " | ".join([row.replace("|", "\\|"), *texts]) + " |")
        lines.append("")
    return lines


def to_markdown(table: Table, confidence: float, replicates: int) -> str:
    theta0 = table.runs.theta0 or {}
    lines = [f"# {table.name}", ""]
    overrides = " ".join(table.runs.table_overrides) or "(none)"
    lines.append(f"θ₀ `{theta0.get('path')}` (hash {theta0.get('hash')}); overrides: {overrides}")
    lines.append("")
    lines += summary_markdown(table, confidence)
    for level in LEVELS:
        header = ["row", *(c.name for c in table.columns)]
        lines += [f"## {_title(table, level)}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|")
        for row in table.rows:
            cells = [_marked(table.cells[level][(row, column.name)]) for column in table.columns]
            lines.append("| " + " | ".join([row.replace("|", "\\|"), *cells]) + " |")
        lines += ["", rule_text(confidence, replicates), ""]
    lines += _missing_lines(table)
    return "\n".join(lines).rstrip() + "\n"


def to_latex(table: Table, confidence: float, replicates: int) -> str:
    """One ``tabular`` per level (plain ``\\hline`` rules, no packages), the rule as a comment above each."""
    out = []
    for level in LEVELS:
        out += [f"% {_title(table, level)}", f"% {rule_text(confidence, replicates)}"]
        out += [rf"\begin{{tabular}}{{l{'r' * len(table.columns)}}}", r"\hline"]
        out.append(" & ".join(["row", *(latex_escape(c.name) for c in table.columns)]) + r" \\")
        out.append(r"\hline")
        for row in table.rows:
            cells = []
            for column in table.columns:
                cell = table.cells[level][(row, column.name)]
                text = latex_escape(cell.text()).replace("±", r"$\pm$")
                if cell.mark == "best":
                    text = rf"\textbf{{{text}}}"
                elif cell.mark == "tie":
                    text = rf"{text}$^{{\approx}}$"
                cells.append(text)
            out.append(" & ".join([latex_escape(row), *cells]) + r" \\")
        out += [r"\hline", r"\end{tabular}", ""]
    return "\n".join(out)


def _number(value: float) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def to_csv(table: Table) -> str:
    """Long CSV: table, level, row, kind, column, auc_mean, auc_std, n_seeds, seeds, missing, mark, text, metrics."""
    buf = io.StringIO()
    fields = [
        "table",
        "level",
        "row",
        "kind",
        "column",
        "auc_mean",
        "auc_std",
        "n_seeds",
        "seeds",
        "missing",
        "mark",
        "text",
    ]
    fields += [f"{m}_mean" for m in EXTRA_METRICS]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for level in LEVELS:
        for row in table.rows:
            for column in table.columns:
                cell = table.cells[level][(row, column.name)]
                if not cell.applicable:
                    continue
                record = {
                    "table": table.name,
                    "level": level,
                    "row": row,
                    "kind": table.info[row].get("kind"),
                    "column": column.name,
                    "auc_mean": _number(cell.mean),
                    "auc_std": _number(cell.std),
                    "n_seeds": len(cell.values) if cell.complete else 0,
                    "seeds": " ".join(map(str, table.runs.seeds)),
                    "missing": " ".join(map(str, cell.missing)),
                    "mark": cell.mark,
                    "text": cell.text(),
                }
                record.update({f"{m}_mean": _number(cell.extra.get(m, math.nan)) for m in EXTRA_METRICS})
                writer.writerow(record)
    return buf.getvalue()


PAIR_FIELDS = (
    "table",
    "row",
    "reference",
    "column",
    "sets",
    "mean_diff",
    "lo",
    "hi",
    "excludes_zero",
    "n_undefined",
    "note",
)


def pairs_csv(tables: Sequence[Table], level: str) -> str:
    """``pairs_<level>.csv``: every merger − reference difference of every table with its interval."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PAIR_FIELDS, restval="")
    writer.writeheader()
    for table in tables:
        for pair in table.pairs[level]:
            writer.writerow({**pair, "table": table.name, "sets": " ".join(pair["sets"])})
    return buf.getvalue()
