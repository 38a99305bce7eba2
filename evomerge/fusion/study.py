"""Fusion candidates in a study: baselines from the search space, scoring under the study's evaluator,
their stored form, and the cost record of every candidate.

A search space's ``baselines:`` may be a mapping (:func:`parse_baselines`)::

    baselines:
      merges: true                     # the untuned default and each source alone (what `true` means)
      fusion:                          # fused candidates scored on the same splits and items
        - {method: logit}              # models default to the stage's sources (names or paths)
        - {method: logit, weights: [0.5, 0.3, 0.2]}
        - {method: panel, judge: base} # judge: a source name (base included) or a model path
        - {method: moa, moa: {agents: {a: {model: arith}}, layers: [[a]], aggregator: a}}

A fusion baseline is stored like any trial (``kind: baseline``, its ``kind: fusion`` recipe, scores,
``n``, ``stderr``, ``cost``) and re-scored on held-out with the front. It is scored by the study's
evaluator in the driver's process (:class:`FusionAware`), never sent to a worker: a worker's
evaluator materializes merges. It is never the study's winner (nothing to merge or export); the
report's plot marks it apart from the merges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evomerge.errors import Problem
from evomerge.fusion.cost import merge_cost
from evomerge.fusion.spec import FusionRecipe, fusion_problems, validated
from evomerge.strict import StrictModel


def is_fusion(recipe: Any) -> bool:
    """Whether ``recipe`` (an object, a mapping or its YAML text) is a fusion recipe."""
    if isinstance(recipe, str):
        import yaml

        try:
            recipe = yaml.safe_load(recipe)
        except yaml.YAMLError:
            return False
    if isinstance(recipe, dict):
        return recipe.get("kind") == "fusion"
    return getattr(recipe, "kind", None) == "fusion"


def parse_candidate(data: Any, *, source: str = "<recipe>"):
    """A stored candidate: a fusion recipe for ``kind: fusion``, else a merge recipe
    (:func:`evomerge.recipe.parse_recipe`)."""
    from evomerge.fusion.spec import parse_fusion
    from evomerge.recipe import parse_recipe

    return parse_fusion(data, source=source) if is_fusion(data) else parse_recipe(data, source=source)


def candidate_cost(recipe: Any, outcome_cost: dict[str, float] | None = None) -> dict[str, float]:
    """The cost record of a candidate: the one its evaluation measured (fusion), else a merge's
    (:func:`evomerge.fusion.cost.merge_cost`); empty when unknown."""
    from evomerge.errors import EvomergeError

    if outcome_cost:
        return dict(outcome_cost)
    if is_fusion(recipe):
        return {}
    try:
        return merge_cost(recipe)
    except (EvomergeError, OSError):  # a source's headers cannot be read: cost unknown
        return {}


class FusionAware:
    """``evaluator`` (a suite or lm-eval evaluator) that also scores fusion candidates
    (:func:`evomerge.fusion.evaluate.evaluate_fusion`) and puts the cost record on every outcome;
    anything else is the wrapped evaluator's."""

    def __init__(self, evaluator):
        self.inner = evaluator

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def evaluate(self, recipe, *, split: str, fidelity: float = 1.0, limit: int | None = None,
                 bar: dict | None = None, items: dict | None = None):
        """The wrapped evaluator's outcome; ``bar`` and ``items`` (early stop, chosen items) are
        declared, so the workers pass them on (they look at the signature), and apply to merges."""
        if is_fusion(recipe):
            from evomerge.fusion.evaluate import evaluate_fusion

            return evaluate_fusion(self.inner, recipe, split=split, fidelity=fidelity, limit=limit)
        kw = {k: v for k, v in (("bar", bar), ("items", items)) if v is not None}
        outcome = self.inner.evaluate(recipe, split=split, fidelity=fidelity, limit=limit, **kw)
        if not getattr(outcome, "cost", None):
            outcome.cost = candidate_cost(recipe)  # a merge's cost, empty when its headers cannot be read
        return outcome


class Baselines(StrictModel):
    """A search space's ``baselines:`` mapping; each fusion entry is checked by :func:`parse_baselines`."""

    merges: bool = True
    fusion: list[Any] = []


def parse_baselines(raw: Any, where: str, sources: list[tuple[str, str]], resolve: Callable[[str], str]
                    ) -> tuple[bool, tuple[FusionRecipe, ...], list[Problem]]:
    """A search space's ``baselines:`` value: ``true`` / ``false`` (the untuned default and each source
    alone), or a mapping ``{merges: true, fusion: [entry, ...]}`` whose entries are fusion recipes
    without ``kind``; an entry's ``models`` (and ``judge``, MoA agents' ``model``) are source names of
    ``sources`` (``(name, ref)``, the base included as ``base``) or model paths (made absolute by
    ``resolve``), default: every source. Returns (merges on, fusion recipes, problems)."""
    if isinstance(raw, bool):
        return raw, (), []
    if not isinstance(raw, dict):
        return True, (), [Problem(where, f"expected true, false or a mapping {{merges, fusion}}, got {raw!r}",
                                  "e.g. baselines: {merges: true, fusion: [{method: logit}, {method: panel}]}")]
    section, problems = validated(Baselines, raw, where)  # the well-formed keys, when others are not
    named = dict(sources)

    def ref(value: Any) -> Any:
        return named.get(value) or resolve(value) if isinstance(value, str) and value else value

    out = []
    for i, entry in enumerate(section.fusion):
        at = f"{where}.fusion[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(at, f"expected a mapping (method, models, ...), got {entry!r}"))
            continue
        entry = dict(entry)
        if entry.get("method") != "moa" or "moa" not in entry:
            entry.setdefault("models", [n for n, _ in sources if n != "base"])
        if isinstance(entry.get("models"), list):
            entry["models"] = [ref(m) for m in entry["models"]]
        if "judge" in entry:
            entry["judge"] = ref(entry["judge"])
        if isinstance(entry.get("moa"), dict) and isinstance(entry["moa"].get("agents"), dict):
            agents = {}
            for name, spec in entry["moa"]["agents"].items():
                spec = {"model": spec} if isinstance(spec, str) else spec
                if isinstance(spec, dict) and not spec.get("endpoint") and "model" in spec:
                    spec = {**spec, "model": ref(spec["model"])}
                agents[name] = spec
            entry["moa"] = {**entry["moa"], "agents": agents}
        recipe, more = fusion_problems(entry, at)
        problems += more
        if recipe is not None:
            problems += _missing_models(recipe, at)
            out.append(recipe)
    return section.merges, tuple(out), problems


def _missing_models(recipe: FusionRecipe, where: str) -> list[Problem]:
    """A problem per local model of ``recipe`` that is not a model folder (headers only)."""
    from evomerge.checkpoint import Checkpoint
    from evomerge.errors import EvomergeError

    problems = []
    for ref in recipe.local_refs():
        try:
            Checkpoint.open(ref)
        except EvomergeError as err:
            problems.append(Problem(where, f"cannot open model {ref}: {err}", "give a source name or a model folder"))
    return problems


def baseline_entry(recipe: FusionRecipe) -> dict[str, Any]:
    """The normalized mapping of a fusion baseline (what a study's space.yaml holds)."""
    from evomerge.recipe import recipe_to_dict

    data = recipe_to_dict(recipe)
    data.pop("evomerge", None)
    data.pop("kind", None)
    return data
