"""Runtime fusion: combine models at inference time instead of merging their weights, and score both
the same way.

A fused candidate is described by a fusion recipe (``kind: fusion``, :mod:`.spec`) and scored by the
same evaluators, suites, lm-eval tasks and backends as a merge: :class:`.backend.FusionBackend`
turns it into the evaluation layer's two primitives (``loglik`` and ``generate``, plus their
token-level forms for lm-eval). Methods, one module each:

* :mod:`.logit`: the logit ensemble, log-linear pooling of the sources' next-token distributions;
* :mod:`.panel`: panel + judge, every source answers and the most likely answer wins;
* :mod:`.moa`: Mixture-of-Agents, proposer layers and an aggregator, on local models
  (:mod:`.prompts`) and OpenAI-compatible endpoints (:mod:`.endpoint`; :mod:`.server` serves a local
  model through that API).

Every candidate, merge or fusion, reports its inference cost relative to one source (:mod:`.cost`);
:mod:`.evaluate` scores fusion candidates under a study's evaluator, :mod:`.study` puts them in
studies (baselines, stored form, cost records), :mod:`.cli` runs ``evomerge eval --ensemble``. See
docs/fusion.md. Names below load their module on first use (the search imports :mod:`.study` and
:mod:`.cost` without torch).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "FusionBackend": "backend", "CostMeter": "cost", "merge_cost": "cost", "single_model_cost": "cost",
    "evaluate_fusion": "evaluate", "score_suite": "evaluate", "FusedSources": "sources",
    "check_shared_vocab": "sources", "load_sources": "sources", "AgentSpec": "spec", "FusionRecipe": "spec",
    "MoAConfig": "spec", "load_moa_config": "spec", "parse_fusion": "spec", "FusionAware": "study",
    "candidate_cost": "study", "is_fusion": "study", "parse_baselines": "study", "parse_candidate": "study",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'evomerge.fusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"evomerge.fusion.{_WHERE[name]}"), name)
