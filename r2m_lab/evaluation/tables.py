"""Result tables: model × test-set rows per protocol, rendered as Markdown, CSV or LaTeX.

A *row* is a plain dict, ``{"model": name, "<test set>": value, ..., "<protocol> mean": value, ...}``; column order
is the dict's key order (the union over rows, first row first). Missing values are NaN (or absent keys) and are
rendered as ``n/a``. File writers are atomic: a temp file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np

from r2m_lab.atomic import atomic_path, write_text_atomic

Best = Literal["max", "min"]
MISSING = "n/a"


def results_table(
    results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    protocols: Mapping[str, Sequence[str]],
    metric: str = "auc",
    level: str = "frame",
) -> list[dict[str, Any]]:
    """One row per model (in ``results`` order) with ``results[model][test_set][level][metric]`` per test set.

    Columns: ``"model"``, then for each protocol its test sets in the given order followed by ``"<protocol> mean"``.
    A test set a model was not evaluated on is NaN, and so is the mean of a protocol with any NaN entry: a mean over
    fewer sets would not be comparable between rows. A test set listed in two protocols appears once, under the
    first. An unknown ``level`` or ``metric`` raises ``KeyError`` rather than yielding a table of NaN.
    """
    rows: list[dict[str, Any]] = []
    for model, per_set in results.items():
        row: dict[str, Any] = {"model": model}
        for protocol, test_sets in protocols.items():
            values = []
            for test_set in test_sets:
                entry = per_set.get(test_set)
                if entry is None:
                    value = math.nan
                else:
                    if level not in entry:
                        raise KeyError(f"{model}/{test_set}: no level {level!r} (has {sorted(entry)})")
                    if metric not in entry[level]:
                        raise KeyError(f"{model}/{test_set}/{level}: no metric {metric!r} (has {sorted(entry[level])})")
                    value = float(entry[level][metric])
                row.setdefault(test_set, value)
                values.append(value)
            row[f"{protocol} mean"] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _is_number(value: Any) -> bool:
    return isinstance(value, (Real, np.number)) and not isinstance(value, (bool, np.bool_))


def _best_cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], best: Best) -> set[tuple[int, str]]:
    """(row index, column) of the best finite value of each numeric column; ties all win; needs >= 2 values."""
    if best not in ("max", "min"):
        raise ValueError(f"best must be 'max' or 'min', got {best!r}")
    cells: set[tuple[int, str]] = set()
    for col in columns:
        values = [row.get(col) for row in rows]
        present = [v for v in values if v is not None]
        if not present or not all(_is_number(v) for v in present):
            continue  # a text column (or a mixed one): nothing to compare
        finite = [(i, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(float(v))]
        if len(finite) < 2:
            continue
        target = (max if best == "max" else min)(v for _, v in finite)
        cells.update((i, col) for i, v in finite if v == target)
    return cells


def _format(value: Any, floatfmt: str) -> str:
    if value is None or (_is_number(value) and not math.isfinite(float(value))):
        return MISSING
    if _is_number(value) and not isinstance(value, (int, np.integer)):
        return format(float(value), floatfmt)
    return str(value)


def to_markdown(
    rows: Sequence[Mapping[str, Any]],
    floatfmt: str = ".3f",
    *,
    best: Best = "max",
    path: str | os.PathLike[str] | None = None,
) -> str:
    """A GitHub Markdown table; in each numeric column the best value is bold (``best="min"`` for EER-like metrics).

    Integers are printed as is, other numbers with ``floatfmt``. With ``path`` the table is also written there.
    """
    columns = _columns(rows)
    if not columns:
        raise ValueError("no rows to render")
    bold = _best_cells(rows, columns, best)

    def cell(i: int, col: str) -> str:
        text = _format(rows[i].get(col), floatfmt).replace("|", r"\|")
        return f"**{text}**" if (i, col) in bold else text

    numeric = {col for col in columns if any(_is_number(row.get(col)) for row in rows)}
    lines = [
        "| " + " | ".join(c.replace("|", r"\|") for c in columns) + " |",
        "|" + "|".join("---:" if c in numeric else ":---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(i, c) for c in columns) + " |" for i in range(len(rows))]
    text = "\n".join(lines) + "\n"
    if path is not None:
        write_text_atomic(path, text)
    return text


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (a cell or header of a ``tabular``)."""
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(
    rows: Sequence[Mapping[str, Any]],
    floatfmt: str = ".3f",
    *,
    best: Best = "max",
    path: str | os.PathLike[str] | None = None,
) -> str:
    """A plain ``tabular`` (``\\hline`` rules, no packages needed) with the best value per numeric column bold.

    Text is escaped for LaTeX. With ``path`` the table is also written there.
    """
    columns = _columns(rows)
    if not columns:
        raise ValueError("no rows to render")
    bold = _best_cells(rows, columns, best)
    numeric = {col for col in columns if any(_is_number(row.get(col)) for row in rows)}
    spec = "".join("r" if c in numeric else "l" for c in columns)

    def cell(i: int, col: str) -> str:
        text = latex_escape(_format(rows[i].get(col), floatfmt))
        return rf"\textbf{{{text}}}" if (i, col) in bold else text

    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\hline",
        " & ".join(latex_escape(c) for c in columns) + r" \\",
        r"\hline",
        *(" & ".join(cell(i, c) for c in columns) + r" \\" for i in range(len(rows))),
        r"\hline",
        r"\end{tabular}",
    ]
    text = "\n".join(lines) + "\n"
    if path is not None:
        write_text_atomic(path, text)
    return text


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as CSV (header = union of keys; floats at full precision, NaN as ``nan``) and return the path."""
    columns = _columns(rows)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def cosine_table(names: Sequence[str], matrix: Any, floatfmt: str = ".3f") -> str:
    """Markdown for a square task-vector cosine matrix (rows and columns both named by ``names``; no bolding)."""
    values = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if values.shape != (len(names), len(names)):
        raise ValueError(f"matrix of shape {values.shape} does not match {len(names)} names")
    lines = [
        "| | " + " | ".join(names) + " |",
        "|:---|" + "|".join("---:" for _ in names) + "|",
    ]
    lines += [
        f"| {name} | " + " | ".join(_format(float(v), floatfmt) for v in values[i]) + " |"
        for i, name in enumerate(names)
    ]
    return "\n".join(lines) + "\n"
