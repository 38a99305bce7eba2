"""Fusion candidates scored by a study's own evaluator: same suite or lm-eval tasks, splits, items,
backend and statistics as its merges, plus the cost record.

:func:`evaluate_fusion` scores a ``kind: fusion`` candidate (a fusion baseline of a search space)
where the evaluator's ``evaluate`` would materialize a merge. Under the task-suite evaluator
(``kind: suite``, resident or not) it scores with :class:`~evomerge.evaluate.engine.Scorer` the
items the evaluator scores for the split name (its ``validation`` sample included), with its seed
and batch size, the same item cap for a ``fidelity`` and ``limit`` (``ceil(fidelity * n_max)``
items per task, at most ``limit``) and the same per-item payload. Under the lm-eval evaluator
(``kind: lmeval``) it scores the same documents (:meth:`LmEvalEvaluator.samples`) through
:func:`~evomerge.evaluate.lmeval.lmeval_score` with the fusion backend (lm-eval's requests answered
by :class:`~evomerge.evaluate.backends.lmeval_lm.BackendLM`, which tokenizes as lm-eval's ``HFLM``;
``model_args``, arguments of ``HFLM``, do not apply), with the same group scores and ``combined``.
Sources run on the evaluator's backend (``hf`` or ``vllm``; the logit ensemble on ``hf`` only) and
device, in the recipe's dtype, else the evaluator's, else as stored. Scores are not cached: a fusion
baseline is scored once per split.
"""

from __future__ import annotations

import math
import time
from typing import Any

from evomerge.errors import EvalError
from evomerge.evaluate.evaluators import EvalOutcome, worker_name
from evomerge.fusion.backend import FusionBackend
from evomerge.fusion.moa import LOGLIK_REFUSED
from evomerge.fusion.sources import FusedSources, load_sources
from evomerge.fusion.spec import FusionRecipe

REMOTE_ONLY = "remote agents only"  # the Scorer's tokenizer argument when every MoA agent is remote


def _inner(evaluator) -> Any:
    return evaluator.backend if getattr(evaluator, "backend_name", "hf") != "hf" else None


def check_generation_only(recipe: FusionRecipe, tasks: list[tuple[str, str]]) -> None:
    """EvalError before any work when a Mixture-of-Agents would meet (name, kind) tasks it cannot score."""
    bad = [name for name, kind in tasks if kind != "generate"]
    if recipe.method == "moa" and bad:
        raise EvalError(f"task(s) {', '.join(bad)}: {LOGLIK_REFUSED}")


def score_suite(sources: FusedSources, backend: FusionBackend, suite, split: str, *, limit: int | None = None,
                seed: int = 0, batch_size: int = 64, device=None):
    """(SuiteResult, cost record) of a fused candidate on one split of a suite."""
    from evomerge.evaluate.backends.vllm import once_more_on_engine_failure
    from evomerge.evaluate.engine import Scorer
    from evomerge.recipe import recipe_hash

    check_generation_only(sources.recipe, [(t.name, t.kind) for t in suite.tasks])
    scorer = Scorer(suite, split, limit=limit, seed=seed, batch_size=batch_size, device=device, backend=backend)
    tok = sources.tokenizer if sources.tokenizer is not None else REMOTE_ONLY
    key = f"{recipe_hash(sources.recipe)}|fusion"
    res = once_more_on_engine_failure(lambda: scorer.score(sources, tok, model_key=key))
    return res, backend.cost()


def evaluate_fusion(evaluator, recipe: FusionRecipe, *, split: str, fidelity: float = 1.0,
                    limit: int | None = None) -> EvalOutcome:
    """The outcome of ``recipe`` under ``evaluator`` (a suite or lm-eval evaluator), cost included."""
    from evomerge.evaluate.lmeval_eval import LmEvalEvaluator
    from evomerge.evaluate.suite_eval import SuiteEvaluator

    start = time.perf_counter()
    backend = FusionBackend(_inner(evaluator))
    items: dict[str, Any] = {}
    if isinstance(evaluator, SuiteEvaluator):
        from evomerge.evaluate import views

        view = evaluator.view(split)  # the items the evaluator scores for this split name, and their ids
        per_task = [len(ids) for ids in view.ids.values()]
        cap = max(1, math.ceil(fidelity * max(per_task))) if fidelity < 1 else None
        if limit is not None:
            cap = limit if cap is None else min(cap, limit)
        sources = load_sources(recipe, device=evaluator.device, dtype=evaluator.dtype)
        res, cost = score_suite(sources, backend, view.suite, view.split, limit=cap, seed=evaluator.seed,
                                batch_size=evaluator.batch_size, device=evaluator.device)
        scores = {name: r.score for name, r in res.tasks.items()} | {"combined": res.combined}
        n = {name: r.n for name, r in res.tasks.items()} | {"combined": res.n}
        se = {name: r.stderr for name, r in res.tasks.items()} | {"combined": res.combined_stderr}
        items = views.items_payload(view.suite, res.tasks, views.scored_ids(view, cap, evaluator.seed))
    elif isinstance(evaluator, LmEvalEvaluator):
        scores, n, se, cost = _lmeval(evaluator, recipe, backend, split, fidelity, limit)
    else:
        raise EvalError(f"fusion candidates are scored by the suite and lm-eval evaluators, not by "
                        f"{type(evaluator).__name__} (fix: use evaluation kind suite or lmeval for a study with "
                        f"fusion baselines)")
    outcome = EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name(), backend.stats(), items=items)
    outcome.cost = cost
    return outcome


def _lmeval(evaluator, recipe: FusionRecipe, backend: FusionBackend, split: str, fidelity: float,
            limit: int | None):
    from evomerge.evaluate.backends.vllm import once_more_on_engine_failure
    from evomerge.evaluate.lmeval import lmeval_score
    from evomerge.evaluate.lmeval_eval import group_scores

    sources = load_sources(recipe, device=evaluator.device)
    if sources.tokenizer is None:
        raise EvalError("lm-eval tasks need a tokenizer, and this fusion recipe runs no local model (fix: set "
                        "`tokenizer:` in the recipe to a model folder with the agents' tokenizer)")
    samples = evaluator.samples(split, fidelity, limit)
    res = once_more_on_engine_failure(lambda: lmeval_score(
        sources, sources.tokenizer, evaluator.tasks, include_path=evaluator.include_path, samples=samples,
        batch_size=evaluator.batch_size, seed=evaluator.seed, num_fewshot=evaluator.num_fewshot,
        apply_chat_template=evaluator.apply_chat_template, gen_kwargs=evaluator.gen_kwargs,
        tasks_from=evaluator.task_manager, backend=backend))
    tasks = evaluator.tasks
    scores = {name: r.score for name, r in res.tasks.items() if name in tasks}
    n = {name: r.n for name, r in res.tasks.items() if name in tasks}
    se = {name: r.stderr for name, r in res.tasks.items() if name in tasks}
    gs, gn, gse = group_scores(evaluator.groups, scores, n, se)
    scores, n, se = scores | gs, n | gn, se | gse
    k = len(evaluator.listed)
    scores["combined"] = sum(scores[name] for name in evaluator.listed) / k
    n["combined"] = sum(n[t] for t in tasks)
    se["combined"] = math.sqrt(sum(se[name] ** 2 for name in evaluator.listed)) / k
    return scores, n, se, backend.cost()
