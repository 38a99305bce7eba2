"""The evaluation contract the search driver calls, the evaluator registry, and a cheap built-in
evaluator with a known optimum.

An evaluator scores one candidate recipe on a split (``"search"`` or ``"held-out"``), optionally on
a deterministic subsample (``fidelity`` in (0, 1]: the same fraction always gives the same items,
and a larger fraction contains a smaller one) and at most ``limit`` items per task::

    class Evaluator(Protocol):
        def metric_names(self) -> list[str]            # scores it reports, e.g. tasks + "combined"
        def split_size(self, split: str) -> int | None  # items in the split, all tasks (None: unknown)
        def evaluate(self, recipe, *, split, fidelity=1.0, limit=None) -> EvalOutcome

Evaluators are built from the search space's ``evaluation:`` mapping by the factory registered for
its ``kind`` (:func:`register_evaluator`), once per worker, so a Ray worker can build its own. The
task-suite evaluator (kind ``suite``) is :mod:`evomerge.evaluate.suite_eval`; ``weights`` (below)
is built in.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from evomerge.errors import ConfigError, Problem
from evomerge.recipe import Recipe, model_refs
from evomerge.splits import HELD_OUT, SEARCH, split_error


@dataclass
class EvalOutcome:
    """Scores of one candidate: per metric value, sample size and standard error."""

    scores: dict[str, float]
    n: dict[str, int] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    backend: dict[str, float] = field(default_factory=dict)  # the worker's backend counters (engine starts, reloads)
    # per-item results where the evaluator has them: {"weights": {task: w}, "tasks": {task: {"ids", "values"}}}
    # (see evomerge.search.selection); "stopped": the evaluation stopped early at a bound (partial scores)
    items: dict[str, Any] = field(default_factory=dict)
    # inference cost relative to one source ({"passes", "read", "calls", "models"}: evomerge.fusion.cost);
    # set for fused candidates by their evaluation, for merges by the search (empty: not computed)
    cost: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "n": dict(self.n), "stderr": dict(self.stderr),
                "seconds": self.seconds, "worker": self.worker, "backend": dict(self.backend),
                "items": dict(self.items), "cost": dict(self.cost)}


@runtime_checkable
class Evaluator(Protocol):
    def metric_names(self) -> list[str]: ...

    def split_size(self, split: str) -> int | None: ...

    def evaluate(self, recipe: Recipe, *, split: str, fidelity: float = 1.0,
                 limit: int | None = None) -> EvalOutcome: ...


EvaluatorFactory = Callable[[dict[str, Any]], Evaluator]
_FACTORIES: dict[str, EvaluatorFactory] = {}
# modules imported (once) to let a kind register itself when it is first asked for
_PROVIDERS = {"suite": "evomerge.evaluate.suite_eval", "lmeval": "evomerge.evaluate.lmeval_eval"}
# keys of each kind's mapping that are file paths: made absolute when a study is created, so the
# study works from any directory (a kind registered elsewhere declares its own: ``paths=``)
_PATH_KEYS: dict[str, tuple[str, ...]] = {"suite": ("suite", "cache_dir"), "weights": ("target",),
                                          "lmeval": ("include_path", "cache_dir")}


def register_evaluator(kind: str, *, paths: tuple[str, ...] | None = None
                       ) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    """Decorator: ``factory(config: dict) -> Evaluator`` for ``evaluation: {kind: <kind>, ...}``.

    ``config`` is the mapping without ``kind``; the factory must raise :class:`ConfigError` for
    unknown keys and missing files. ``paths``: the keys whose values are file paths (relative ones
    are made absolute in a study's space.yaml).
    """

    def deco(factory: EvaluatorFactory) -> EvaluatorFactory:
        _FACTORIES[kind] = factory
        if paths is not None:
            _PATH_KEYS[kind] = tuple(paths)
        return factory

    return deco


def evaluator_kind(config: dict[str, Any]) -> str:
    return str(config.get("kind") or ("suite" if "suite" in config else "weights"))


def evaluator_path_keys(kind: str) -> tuple[str, ...]:
    """Keys of an ``evaluation:`` mapping of ``kind`` that are file paths."""
    return _PATH_KEYS.get(kind, ())


def evaluator_kinds() -> list[str]:
    """Every evaluator kind available (the providers imported first, so each has registered)."""
    for kind, module in _PROVIDERS.items():
        if kind not in _FACTORIES:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    return sorted(_FACTORIES)


def make_evaluator(config: dict[str, Any], *, source: str = "evaluation") -> Evaluator:
    """Build the evaluator an ``evaluation:`` mapping asks for; a :class:`ConfigError` whose
    problems are located at ``source`` (e.g. ``space.yaml: evaluation``) when the mapping is bad."""
    kind = evaluator_kind(config)
    if kind not in _FACTORIES and kind in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[kind])
        except ImportError as err:
            raise ConfigError(Problem(f"{source}.kind", f"evaluator kind '{kind}' cannot be loaded: {err}",
                                      "install what the message names")) from None
    if kind not in _FACTORIES:
        raise ConfigError(Problem(f"{source}.kind", f"unknown evaluator kind '{kind}'",
                                  f"use one of: {', '.join(evaluator_kinds()) or 'none'}"))
    try:
        return _FACTORIES[kind]({k: v for k, v in config.items() if k != "kind"})
    except ConfigError as err:
        # the factories locate problems as "evaluation.<key>": say which file too
        prefix = source[: -len("evaluation")] if source.endswith("evaluation") else ""
        if not prefix:
            raise
        fixed = [Problem(prefix + p.where if p.where.startswith("evaluation") else p.where, p.message, p.hint)
                 for p in err.problems]
        raise ConfigError(fixed, source=err.source) from None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def subsample(items: list, fraction: float, seed: int = 0) -> list:
    """A deterministic fraction of ``items`` (nested: a larger fraction contains a smaller one)."""
    if fraction >= 1:
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = max(1, math.ceil(fraction * len(items)))
    return [items[i] for i in sorted(order[:k])]


# ---------------------------------------------------------------------------------------------------
# the weight-distance evaluator


class WeightDistanceEvaluator:
    """Scores a candidate by how close its merged weights are to a target checkpoint's.

    Per tensor: ``score = -||merged - target||^2 / ||target||^2`` (0 is a perfect match; a tensor the
    candidate lacks, or with another shape, scores -1). Tensors are grouped by name filter (default
    ``attn: self_attn``, ``mlp: mlp``, ``other``: the rest); a group's score is the mean over its
    tensors, ``combined`` the mean over groups. The ``search`` split holds the target's tensors at
    even positions of its sorted name list, ``held-out`` the odd ones; ``fidelity`` subsamples a
    split's tensors (only those are materialized). A target built by a known recipe is a known
    optimum: the merge that reproduces it scores 0. Cheap, exact and deterministic: for tests,
    benchmarks of the search itself, and demonstrations.

    Options: ``target`` (checkpoint path, required), ``groups`` ({name: filter}), ``device``.
    """

    def __init__(self, target: str, groups: dict[str, str] | None = None, device: str = "cpu"):
        from evomerge.checkpoint import Checkpoint

        self.target = Checkpoint.open(target)
        self.groups = dict(groups or {"attn": "self_attn", "mlp": "mlp"})
        self.device = device
        self._models: dict[str, Any] = {}
        names = sorted(self.target.names)
        self.splits = {SEARCH: names[0::2], HELD_OUT: names[1::2]}

    def group_of(self, name: str) -> str:
        for g, filt in self.groups.items():
            if filt in name:
                return g
        return "other"

    def metric_names(self) -> list[str]:
        return [*self.groups, "other", "combined"]

    def split_size(self, split: str) -> int | None:
        return len(self.splits[split])

    def _open(self, recipe: Recipe) -> dict[str, Any]:
        from evomerge.checkpoint import Checkpoint

        for ref in model_refs(recipe):
            if ref not in self._models:
                self._models[ref] = Checkpoint.open(ref)
        return {ref: self._models[ref] for ref in model_refs(recipe)}

    def evaluate(self, recipe: Recipe, *, split: str, fidelity: float = 1.0,
                 limit: int | None = None) -> EvalOutcome:
        import time

        import torch

        from evomerge.materialize import plan_recipe

        start = time.perf_counter()
        if split_error(split):
            raise ValueError(split_error(split))
        names = subsample(self.splits[split], fidelity)
        if limit is not None:
            names = names[:limit]
        plan = plan_recipe(recipe, self._open(recipe), device=self.device)
        planned = {t.name: t for t in plan.tensors}
        per_group: dict[str, list[float]] = {}
        dev = torch.device(self.device)
        for name in names:
            want = self.target.read(name, device=dev).float()
            t = planned.get(name)
            if t is None or tuple(t.shape) != tuple(want.shape):
                err = 1.0
            else:
                got = t.compute(dev).float()
                err = float(((got - want) ** 2).sum() / (want.pow(2).sum() + 1e-12))
            per_group.setdefault(self.group_of(name), []).append(-err)
        scores, n, se = {}, {}, {}
        for g, vals in per_group.items():
            scores[g] = sum(vals) / len(vals)
            n[g] = len(vals)
            var = sum((v - scores[g]) ** 2 for v in vals) / max(len(vals) - 1, 1)
            se[g] = math.sqrt(var / len(vals))
        scores["combined"] = sum(scores.values()) / len(scores)
        n["combined"] = sum(n.values())
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name())


def check_device(value: Any, where: str, *, local: bool = False) -> list[Problem]:
    """Problems of a ``device:`` option (a string such as cpu, cuda, cuda:1); with ``local`` a CUDA
    device must be present in this process (workers on other machines may have one when it has not)."""
    if not isinstance(value, str) or not value:
        return [Problem(where, f"expected a device name (cpu, cuda, cuda:N), got {value!r}")]
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return [Problem(where, f"unknown device {value!r}", "use cpu, cuda or cuda:N")]
    if local and dev.type == "cuda" and not torch.cuda.is_available():
        return [Problem(where, f"device {value!r} was asked for but no CUDA device is available",
                        "use device: cpu")]
    return []


@register_evaluator("weights", paths=("target",))
def _weights_factory(config: dict[str, Any]) -> Evaluator:
    from evomerge.errors import EvomergeError

    allowed = {"target", "groups", "device"}
    problems = [Problem(f"evaluation.{k}", f"unknown key '{k}'", f"allowed: {', '.join(sorted(allowed))}")
                for k in config if k not in allowed]
    if not isinstance(config.get("target"), str):
        problems.append(Problem("evaluation.target", "required key 'target' (a checkpoint path) is missing"))
    groups = config.get("groups")
    if groups is not None and (not isinstance(groups, dict) or not groups or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in groups.items())):
        problems.append(Problem("evaluation.groups", f"expected a mapping of group name to tensor-name filter, "
                                f"got {groups!r}", "e.g. {attn: self_attn, mlp: mlp}"))
    if "device" in config:
        problems += check_device(config["device"], "evaluation.device")
    if problems:
        raise ConfigError(problems)
    try:
        return WeightDistanceEvaluator(config["target"], config.get("groups"),
                                       config.get("device", "cpu"))
    except EvomergeError as err:
        raise ConfigError(Problem("evaluation.target", f"cannot open the target model: {err}")) from None
