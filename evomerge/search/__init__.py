"""Evolutionary search over merge recipes.

The path: ``space.load_space`` (YAML -> :class:`SearchSpace`: PS / DFS spaces with their
dimensions) -> an optimizer proposes points (``optimizers``: pycma or an Optuna sampler) ->
``<space>.decode(params)`` -> recipe -> scored by an executor's evaluator (:mod:`evomerge.evaluate.evaluators`,
:mod:`evomerge.workers`) -> recorded in the Optuna study (``study``) -> Pareto front (``pareto``)
-> held-out re-score, report and export (``driver``, ``report``).
"""

import importlib

# Loaded on first use: `evomerge merge` imports this package (for its CLI registration) and must not
# pay for optuna, pycma and the driver (~2 s) when it does not search.
_EXPORTS = {
    "SearchResult": "driver", "rescore_study": "driver", "resume_search": "driver", "start_search": "driver",
    "export_recipe": "report", "format_status": "report", "status": "report", "write_report": "report",
    "SearchSpace": "space", "load_space": "space", "parse_space": "space",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"evomerge.search.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge.search' has no attribute {name!r}")
