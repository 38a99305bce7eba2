"""Evolutionary search over merge recipes.

The path: ``space.load_space`` (YAML -> :class:`SearchSpace`: PS / DFS spaces with their
dimensions) -> an optimizer proposes points (``optimizers``: pycma or an Optuna sampler) ->
``<space>.decode(params)`` -> recipe -> scored by an executor's evaluator (``evaluation``,
:mod:`evomerge.workers`) -> recorded in the Optuna study (``study``) -> Pareto front (``pareto``)
-> held-out re-score, report and export (``driver``, ``report``).
"""

from evomerge.search.driver import SearchResult, rescore_study, resume_search, start_search
from evomerge.search.evaluation import EvalOutcome, Evaluator, make_evaluator, register_evaluator
from evomerge.search.report import export_recipe, format_status, status, write_report
from evomerge.search.space import SearchSpace, load_space, parse_space

__all__ = [
    "EvalOutcome", "Evaluator", "SearchResult", "SearchSpace", "export_recipe", "format_status", "load_space",
    "make_evaluator", "parse_space", "register_evaluator", "rescore_study", "resume_search", "start_search",
    "status", "write_report",
]
