"""Every checkpoint an analysis compares must descend from one θ₀: task vectors of different bases do not add up."""

from __future__ import annotations

from collections.abc import Mapping

from r2m_lab.weights import Checkpoint


def check_same_base(base: Checkpoint, checkpoints: Mapping[str, Checkpoint]) -> None:
    """Refuse, naming each one and its θ₀ hash, the checkpoints whose ``base_hash`` is not θ₀'s (or is unrecorded)."""
    reference = base.base_hash
    if not reference:
        raise ValueError(f"θ₀ {base.path} records no base_hash: it is not an r2m_lab θ₀")
    foreign = {label: c.base_hash[:12] or "none" for label, c in checkpoints.items() if c.base_hash != reference}
    if foreign:
        where = ", ".join(f"{label} ({checkpoints[label].path}: θ₀ {h})" for label, h in sorted(foreign.items()))
        raise ValueError(
            f"the analysis compares checkpoints of one θ₀ ({base.path.name}, hash {reference[:12]}); these descend "
            f"from another: {where}. Analyse them against their own θ₀ (stage.base=...)."
        )
