"""Hand-set merges: the grid a practitioner tries before searching, chosen on the search split.

The grid over a parameter-space stage's base and sources (every source at weight 1):

* task arithmetic (Ilharco et al., 2023) ``theta = theta_base + lambda * sum_i tau_i`` for each
  ``lambda`` in :data:`TA_LAMBDAS`;
* TIES (Yadav et al., 2023) with ``lambda = 1`` and every source's density ``d`` in
  :data:`TIES_DENSITIES` (trim each task vector to its top-``d`` magnitudes, elect signs, average
  the agreeing entries).

:func:`best_handset` scores every grid point on the search split (the items the optimizer sees),
takes the best, and scores it on the held-out split: the baseline a search has to beat. The grid
costs ``len(grid)`` evaluations of the search split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.recipe import MergeRecipe, SourceSpec

TA_LAMBDAS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
TIES_DENSITIES = (0.2, 0.4, 0.6, 0.8, 1.0)


def grid(base: str, sources: list[str], *, dtype: str | None = None, ta: tuple[float, ...] = TA_LAMBDAS,
         ties: tuple[float, ...] = TIES_DENSITIES) -> list[tuple[str, MergeRecipe]]:
    """``(label, recipe)`` of every grid point."""
    out = []
    for lam in ta:
        out.append((f"task arithmetic lambda={lam:g}",
                    MergeRecipe(method="task_arithmetic", base=base, params={"lambda": lam}, dtype=dtype,
                                sources=[SourceSpec(model=m, params={"weight": 1.0}) for m in sources])))
    for d in ties:
        out.append((f"TIES density={d:g}",
                    MergeRecipe(method="ties", base=base, params={"lambda": 1.0}, dtype=dtype,
                                sources=[SourceSpec(model=m, params={"weight": 1.0, "density": d}) for m in sources])))
    return out


@dataclass
class HandSet:
    label: str
    recipe: MergeRecipe
    search: dict[str, float]  # search-split scores of the chosen point
    held: Any  # its held-out EvalOutcome
    tried: list[tuple[str, float]]  # every grid point's search-split value of ``metric``


def best_handset(evaluator, base: str, sources: list[str], metric: str = "combined", *, dtype: str | None = None,
                 ta: tuple[float, ...] = TA_LAMBDAS, ties: tuple[float, ...] = TIES_DENSITIES) -> HandSet:
    """The grid point with the best search-split ``metric``, scored on held-out too."""
    tried = []
    best = None
    for label, recipe in grid(base, sources, dtype=dtype, ta=ta, ties=ties):
        out = evaluator.evaluate(recipe, split="search")
        tried.append((label, out.scores[metric]))
        if best is None or out.scores[metric] > best[2].scores[metric]:
            best = (label, recipe, out)
    label, recipe, out = best
    return HandSet(label, recipe, dict(out.scores), evaluator.evaluate(recipe, split="held-out"), tried)
