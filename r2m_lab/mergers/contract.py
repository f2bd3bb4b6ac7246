"""The contract every merger module meets, written as code: the `Merger` protocol and the `Knobs` base.

A merger module holds one frozen dataclass that is both its knobs and the merge they configure:

    @dataclass(frozen=True)
    class TaskArithmetic(Knobs):
        lam: float                                      # typed, and no default: conf/merger/<name>.yaml holds it

        def check(self, n_tasks: int | None = None) -> None:
            if not is_finite_number(self.lam):
                raise ValueError(f"lam must be a finite number, got {self.lam!r}")

        def __call__(self, theta0, specialists, heads) -> MergeResult:
            ...

Its defaults live once, with their comments, in ``conf/merger/<name>.yaml`` (``_target_`` names the class); the
class declares the knobs' names and types once, and ``check`` holds every refusal once. Constructing the dataclass
runs ``check()``, so an instance with bad knobs never exists; the stages call ``check(n_tasks=N)`` again with the
benchmark's number of specialists before any checkpoint is read (R²M's k ≤ N). `r2m_lab.mergers.configs` finds the
YAML files, loads their defaults and builds the instance (`build_merger`, `load_merger`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from r2m_lab.mergers.task_vectors import MergeResult, is_finite_number

StateDict = Mapping[str, Tensor]


@runtime_checkable
class Merger(Protocol):
    """A configured merger: knobs fixed at construction, checked, then called on θ₀, the specialists and heads."""

    def check(self, n_tasks: int | None = None) -> None:
        """Raise ValueError naming the knob if a value is out of range; ``n_tasks`` (N) when the caller knows it."""

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """Merge N specialists fine-tuned from θ₀ (streamed key by key); heads: {family: {"weight", "bias"}}."""


class Knobs:
    """Base of every merger dataclass: construction checks the knobs; ``hyperparameters()`` lists them as a dict.

    Subclasses are ``@dataclass(frozen=True)`` with typed fields and no defaults, and override ``check``.
    """

    def __post_init__(self) -> None:
        self.check()

    def check(self, n_tasks: int | None = None) -> None:
        """No knobs, nothing to refuse (a merger with knobs overrides this)."""

    def hyperparameters(self) -> dict[str, Any]:
        """The knobs as a plain dict, field order (what a merge card records)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class ScaledKnobs(Knobs):
    """Base of the mergers whose one knob is a scale λ on the merged task vector (any finite number)."""

    lam: float

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse a λ that is not a finite number."""
        if not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
