"""What a worker keeps resident, and the evaluator that scores candidates from it.

A search scores thousands of merges of the same few models, so a worker reads each source once and
keeps it in memory; every candidate is written into a model that is built once per output shape
and reused (a DFS candidate of another depth gets a model of that depth). Two residencies:

* ``device`` (default): every source, the base and anything the method derives from them live on
  the worker's device; a candidate costs one pass of merge kernels (:mod:`evomerge.resident`).
* ``host``: sources stay in host memory (pinned when CUDA is there) and are copied to the device
  one input tensor at a time as each output tensor is merged (the reference kernels of
  :mod:`evomerge.materialize`). For sources that together do not fit on one device: the device
  holds only the candidate model plus the inputs of one tensor.

:func:`materialize` is the only place that chooses the implementation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.recipe import Recipe, model_refs
from evomerge.evaluate.suite_eval import SuiteEvaluator

RESIDENCIES = ("device", "host")

try:  # the fused in-place materializer; the reference path below works without it
    from evomerge.resident import ResidentSources
except ImportError:  # pragma: no cover - only while evomerge.resident is absent
    ResidentSources = None  # type: ignore[assignment,misc]


def _hold(ck: Checkpoint, device: torch.device, pin: bool) -> Checkpoint:
    """``ck`` read once into pinned host memory (``pin``) or onto ``device``."""
    return ck.held((lambda t: t.pin_memory()) if pin else (lambda t: t.to(device)))


class ResidentModels:
    """Sources held for one worker; :meth:`model` returns a candidate's model, materialized in place."""

    def __init__(self, device: str | torch.device = "cpu", residency: str = "device", fused: bool | None = None):
        if residency not in RESIDENCIES:
            raise ValueError(f"unknown residency {residency!r}; use one of {', '.join(RESIDENCIES)}")
        self.device, self.residency = torch.device(device), residency
        # compiled torch kernels pay off on CUDA; on CPU task vectors go to the native C kernel
        # (exact, evomerge/methods/native.py) and the rest runs eagerly (exact, nothing to compile)
        self.fused = (self.device.type == "cuda") if fused is None else fused
        self.refs: list[str] = []
        self.base: str | None = None
        self._resident: Any = None  # ResidentSources (device residency)
        self._held: dict[str, Checkpoint] = {}  # host residency / reference path
        self._models: dict[tuple, torch.nn.Module] = {}
        self.load_seconds = 0.0
        self.timings = {"materialize": 0.0, "candidates": 0}

    # ------------------------------------------------------------------ sources

    def ensure(self, recipe: Recipe) -> None:
        """Make every model ``recipe`` reads resident (reloading when a new one appears)."""
        base = getattr(recipe, "base", None)
        want = [r for r in model_refs(recipe) if r != base]
        if base in (None, self.base) and all(r in self.refs or r == self.base for r in want):
            return
        start = time.perf_counter()
        self.refs = list(dict.fromkeys(self.refs + want))
        self.base = base or self.base
        if self.residency == "device" and ResidentSources is not None:
            self._resident = None  # free the old copy first
            self._resident = ResidentSources.load(self.refs, base=self.base, device=self.device, fused=self.fused)
        else:
            pin = self.device.type == "cuda" and self.residency == "host"
            for ref in [r for r in [self.base, *self.refs] if r and r not in self._held]:
                self._held[ref] = _hold(Checkpoint.open(ref), self.device, pin)
        self.load_seconds += time.perf_counter() - start

    def nbytes(self) -> int:
        if self._resident is not None:
            return int(self._resident.nbytes())
        return sum(ck.held_nbytes() for ck in self._held.values())

    def drop_models(self) -> None:
        """Free the reusable candidate models (after an out-of-memory error)."""
        self._models.clear()
        if self._resident is not None:
            self._resident.drop_models()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ candidates

    def model(self, recipe: Recipe) -> torch.nn.Module:
        self.ensure(recipe)
        start = time.perf_counter()
        model = materialize(self, recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["materialize"] += time.perf_counter() - start
        self.timings["candidates"] += 1
        return model

    def _reference_into(self, recipe: Recipe) -> torch.nn.Module:
        """The reference kernels, tensor by tensor, written into a reused model on the device."""
        from evomerge.materialize import plan_recipe

        plan = plan_recipe(recipe, {r: self._held[r] for r in model_refs(recipe) if r in self._held},
                           device=str(self.device))
        model = self._model_for(plan.config, plan.dtype)
        state = model.state_dict()
        with torch.no_grad():
            for ot in plan.tensors:
                state[ot.name].copy_(ot.compute(self.device))
        return model

    def _model_for(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        key = (repr(sorted(cfg.items(), key=lambda kv: kv[0])), dtype)
        if key not in self._models:
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype)
            self._models[key] = model.eval().requires_grad_(False)
        return self._models[key]


def materialize(models: ResidentModels, recipe: Recipe) -> torch.nn.Module:
    """``recipe`` written into a resident model on ``models.device`` (the one switch point)."""
    if models._resident is not None:
        return models._resident.materialize_into(recipe)
    return models._reference_into(recipe)


class ResidentSuiteEvaluator(SuiteEvaluator):
    """The task-suite evaluator with candidates materialized into resident models.

    ``suite`` is a path, or an already loaded :class:`~evomerge.evaluate.suite.Suite` (sent by the
    driver when workers cannot read the suite's files)."""

    def __init__(self, suite, *, device: str = "cpu", batch_size: int = 64, seed: int = 0,
                 dtype: str | None = None, residency: str = "device", fused: bool | None = None,
                 cache_dir: str | None = None, backend: str = "hf", vllm: dict | None = None,
                 validation: float | str = "auto"):
        super().__init__(suite, device=device, batch_size=batch_size, seed=seed, dtype=dtype, cache_dir=cache_dir,
                         backend=backend, vllm=vllm, validation=validation)
        self.resident = ResidentModels(device, residency, fused)

    def model(self, recipe: Recipe):
        if self.dtype:
            recipe = recipe.model_copy(update={"dtype": self.dtype})
        return self.resident.model(recipe)


def worker_evaluator(evaluation: dict[str, Any], *, device: str, residency: str = "device",
                     fused: bool | None = None, suite=None):
    """The evaluator a worker builds from the space's ``evaluation:`` mapping: the suite and lm-eval
    evaluators with resident sources; any other kind as the registry builds it (on ``device`` when
    it takes one)."""
    from evomerge.evaluate.evaluators import evaluator_kind, make_evaluator
    from evomerge.evaluate.suite_eval import suite_evaluator

    config = {k: v for k, v in evaluation.items() if k != "kind"}
    dev = config.get("device") or device
    if evaluator_kind(evaluation) == "suite":
        if suite is None:
            suite = suite_evaluator(config).suite  # checks the keys, reads the suite's files
        return ResidentSuiteEvaluator(suite, device=dev, batch_size=int(config.get("batch_size", 64)),
                                      seed=int(config.get("seed", 0)), dtype=config.get("dtype"),
                                      residency=residency, fused=fused, cache_dir=config.get("cache_dir"),
                                      backend=config.get("backend", "hf"), vllm=config.get("vllm"),
                                      validation=config.get("validation", "auto"))
    if evaluator_kind(evaluation) in ("weights", "lmeval") and "device" not in config:
        evaluation = {**evaluation, "device": dev}
    evaluator = make_evaluator(evaluation)
    if evaluator_kind(evaluation) == "lmeval":  # candidates written into resident models, as for suites
        evaluator.resident = ResidentModels(dev, residency, fused)
    return evaluator
