"""What each row of a run's table is: the ``rows`` entry of ``metrics.json`` that the table builder reads.

Every stage that evaluates several models (pipeline, scaling, expansion, heads) writes, beside ``models`` (the
scores), one ``rows[label]`` per row with the same keys, so the builder (``r2m_lab.results``) never guesses a row's
meaning from its label:

- ``kind``: ``specialist`` | ``reference`` (joint, ensemble) | ``merger``;
- ``merger`` and ``variant``: the merger's name and, for a row of ``stage.variants``, the variant's label;
- ``hparams`` and ``selection`` (``chosen`` and ``at_grid_edge`` of the validation selection, or null);
- ``families``: the family keys the row's model was built from;
- ``merge_seconds`` and ``peak_memory_bytes`` of the merge (null when not measured);
- ``groups``: {group: [test sets]} the builder averages for this row (scaling, expansion), absent otherwise;
- stage-specific keys, documented where they are written: scaling ``n`` and ``row`` (the merger or variant label
  the row repeats per subset); expansion ``step``, ``added``, ``row``, ``cost_seconds`` and ``cost_parts`` (the new
  specialists' ``train_seconds`` and the merge/selection seconds), joint rows ``data``; heads ``head`` and
  ``base_row``.

``theta0_entry`` is the run's ``theta0`` entry: the θ₀ every row descends from, so runs from different θ₀ are never
pooled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from r2m_lab.weights import Checkpoint


def theta0_entry(base: Checkpoint) -> dict[str, str]:
    """``{"path", "hash"}`` of the θ₀ checkpoint."""
    return {"path": str(base.path), "hash": base.base_hash}


def _row(kind: str, families: Sequence[str], **info: Any) -> dict[str, Any]:
    row = {
        "kind": kind,
        "merger": None,
        "variant": None,
        "hparams": None,
        "selection": None,
        "families": list(families),
        "merge_seconds": None,
        "peak_memory_bytes": None,
    }
    row.update(info)
    return row


def specialist_row(family: str) -> dict[str, Any]:
    """A specialist's row: built from its own family only."""
    return _row("specialist", [family])


def reference_row(families: Sequence[str]) -> dict[str, Any]:
    """The joint model's or the output ensemble's row: built from every family of the run."""
    return _row("reference", families)


def merger_row(
    card: Mapping[str, Any], families: Sequence[str], variant: str | None = None, **info: Any
) -> dict[str, Any]:
    """A merged model's row from its merge card (``stages/merge.py``)."""
    selection = card.get("selection")
    return _row(
        "merger",
        families,
        merger=card.get("merger"),
        variant=variant,
        hparams=card.get("hparams"),
        selection=None if not selection else {k: selection.get(k) for k in ("chosen", "at_grid_edge")},
        merge_seconds=card.get("merge_seconds"),
        peak_memory_bytes=card.get("peak_memory_bytes"),
        **info,
    )
