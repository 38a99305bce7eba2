"""Search dimensions: one named, bounded variable of a search space, with its Optuna distribution and
its encoding on the unit interval (what pycma CMA-ES searches over).

A float dimension maps ``[low, high]`` linearly onto ``[0, 1]``; an int dimension rounds; a
categorical dimension of ``k`` choices splits ``[0, 1]`` into ``k`` equal bins (choice ``j`` is
encoded as the centre of bin ``j``). Decoding clips to the unit interval first, so any real vector
decodes to a valid point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna

DimKind = Literal["float", "int", "categorical"]


@dataclass(frozen=True)
class Dim:
    name: str
    kind: DimKind = "float"
    low: float = 0.0
    high: float = 1.0
    choices: tuple[Any, ...] = field(default=())
    default: Any = None  # the untuned value (used to seed the search and as CMA-ES x0)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high))

    def clip(self, value: Any) -> Any:
        """``value`` made valid for this dimension (nearest bound, nearest integer, known choice)."""
        if self.kind == "categorical":
            return value if value in self.choices else self.choices[0]
        v = min(max(float(value), self.low), self.high)
        return int(round(v)) if self.kind == "int" else v

    def to_unit(self, value: Any) -> float:
        if self.kind == "categorical":
            return (self.choices.index(value) + 0.5) / len(self.choices)
        if self.high == self.low:
            return 0.5
        return (float(value) - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0) if math.isfinite(u) else 0.5
        if self.kind == "categorical":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        v = self.low + u * (self.high - self.low)
        return int(round(v)) if self.kind == "int" else v

    def default_value(self) -> Any:
        if self.default is None:
            if self.kind == "categorical":
                return self.choices[0]
            return self.clip((self.low + self.high) / 2)
        return self.clip(self.default)


def distributions(dims: list[Dim]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {d.name: d.distribution() for d in dims}


def encode(dims: list[Dim], params: dict[str, Any]) -> list[float]:
    """Unit-cube vector of ``params`` (missing names take the dimension's default)."""
    return [d.to_unit(params.get(d.name, d.default_value())) for d in dims]


def decode(dims: list[Dim], x: list[float]) -> dict[str, Any]:
    """Parameter dict of a unit-cube vector (clipped into the cube first)."""
    if len(x) != len(dims):
        raise ValueError(f"vector of length {len(x)} for {len(dims)} dimensions")
    return {d.name: d.from_unit(u) for d, u in zip(dims, x)}
