"""Objectives: what a search maximizes or minimizes, and the candidate costs it can use.

An objective is either a suite **metric** (a score the evaluator reports, e.g. one task or
``combined``; maximized by default) or a **cost** of the candidate (``params``: parameter count,
``layers``: decoder layer count; minimized by default), computed from checkpoint headers without
building the model, or its inference cost relative to one source (``passes``: forward passes per
generated token, ``read``: parameters read per token; :mod:`evomerge.fusion.cost`), from the cost
record of its evaluation (1 and the size ratio for a merge, measured for a fused candidate). With
several objectives the result is a Pareto front; with ``weight`` set on every objective they are
combined into one maximized scalar ``sum(w * v * (+1 max / -1 min))``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from evomerge.recipe import DataFlowRecipe, MergeRecipe, Recipe, StackRecipe, stack_to_dataflow

COSTS = ("params", "layers", "passes", "read")
INFERENCE_COSTS = ("passes", "read")  # from the evaluation's cost record


@dataclass(frozen=True)
class Objective:
    name: str  # the metric name, or "cost:params" / "cost:layers"
    kind: str  # "metric" | "cost"
    key: str  # metric name or cost name
    direction: str  # "maximize" | "minimize"
    weight: float | None = None

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "maximize" else -1.0


def is_scalarized(objectives: list[Objective]) -> bool:
    return bool(objectives) and all(o.weight is not None for o in objectives)


def study_directions(objectives: list[Objective]) -> list[str]:
    """Directions of the Optuna study: one maximized scalar when weighted, else one per objective."""
    return ["maximize"] if is_scalarized(objectives) else [o.direction for o in objectives]


def study_metric_names(objectives: list[Objective]) -> list[str] | None:
    """Names of the Optuna study's values: one per objective, None when they are scalarized into one."""
    names = [o.name for o in objectives]
    return names if len(study_directions(list(objectives))) == len(names) else None


def scalarize(objectives: list[Objective], values: dict[str, float]) -> float:
    return sum(o.weight * o.sign * values[o.name] for o in objectives)


def study_values(objectives: list[Objective], values: dict[str, float]) -> list[float]:
    if is_scalarized(objectives):
        return [scalarize(objectives, values)]
    return [values[o.name] for o in objectives]


def utility(objectives: list[Objective], values: dict[str, float]) -> float:
    """One 'higher is better' number: the weighted scalar, or the first objective signed."""
    if is_scalarized(objectives):
        return scalarize(objectives, values)
    return objectives[0].sign * values[objectives[0].name]


# ---------------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class ModelSize:
    ref: str
    model_type: str
    num_layers: int
    layer_params: tuple[int, ...]  # parameters of each decoder layer
    other_params: int  # embeddings, final norm, head (a tied head counted once)

    @property
    def total(self) -> int:
        return self.other_params + sum(self.layer_params)


@functools.lru_cache(maxsize=64)
def model_size(ref: str, ck=None) -> ModelSize:
    """Parameter counts of a checkpoint, from its safetensors headers (no weights read); ``ck``: the
    checkpoint of ``ref`` when already open."""
    from evomerge.checkpoint import Checkpoint

    if ck is None:
        ck = Checkpoint.open(ref)
    layers, other, embedding = ck.parameter_counts()
    return ModelSize(str(ref), ck.model_type, ck.num_layers, layers, other + embedding)


def candidate_costs(recipe: Recipe) -> dict[str, float]:
    """``{"params": ..., "layers": ...}`` of the model ``recipe`` builds (a fused candidate: of every
    model it runs)."""
    if getattr(recipe, "kind", None) == "fusion":
        sizes = [model_size(ref) for ref in recipe.local_refs()]
        return {"params": float(sum(s.total for s in sizes)), "layers": float(sum(s.num_layers for s in sizes))}
    if isinstance(recipe, StackRecipe):
        recipe = stack_to_dataflow(recipe)
    if isinstance(recipe, DataFlowRecipe):
        embed = model_size(recipe.embed)
        head = model_size(recipe.head or recipe.embed)
        # embeddings from one model, final norm + head from the other: split 'other' evenly is wrong
        # for untied heads of different sizes, but sources of one architecture have equal sizes.
        params = max(embed.other_params, head.other_params)
        params += sum(model_size(s.model).layer_params[s.layer] for s in recipe.path)
        return {"params": float(params), "layers": float(len(recipe.path))}
    assert isinstance(recipe, MergeRecipe)
    ref = model_size(recipe.base or recipe.sources[0].model)
    if recipe.sources[0].layers:
        a, b = recipe.sources[0].layers
        return {"params": float(ref.other_params + sum(ref.layer_params[a:b])), "layers": float(b - a)}
    return {"params": float(ref.total), "layers": float(ref.num_layers)}


def objective_values(objectives: list[Objective], scores: dict[str, float], recipe: Recipe,
                     cost: dict[str, float] | None = None) -> dict[str, float]:
    """Value of every objective for a candidate with evaluator ``scores`` and the evaluation's
    ``cost`` record; KeyError names a missing metric."""
    costs: dict[str, Any] | None = None
    out = {}
    for o in objectives:
        if o.kind == "cost" and o.key in INFERENCE_COSTS:
            from evomerge.fusion.study import candidate_cost

            record = candidate_cost(recipe, cost)
            if o.key not in record:
                raise KeyError(f"the evaluation reported no cost '{o.key}' (got: {', '.join(sorted(record)) or 'none'})")
            out[o.name] = float(record[o.key])
        elif o.kind == "cost":
            costs = costs or candidate_costs(recipe)
            out[o.name] = costs[o.key]
        else:
            if o.key not in scores:
                raise KeyError(f"the evaluator reported no score '{o.key}' (got: {', '.join(sorted(scores))})")
            out[o.name] = float(scores[o.key])
    return out


def stored_trial_values(objectives: list[Objective], outcome, trial) -> dict[str, float]:
    """Objective values of a re-score (validation, held-out) of a stored trial: its evaluator
    ``outcome`` (scores and the measured cost) and the recipe stored with it."""
    import yaml

    from evomerge.fusion.study import parse_candidate

    return objective_values(objectives, outcome.scores, parse_candidate(yaml.safe_load(trial.user_attrs["recipe"])),
                            outcome.cost)
