"""The validation re-score that names a stage's winner, and scoring stored trials on another split.

When a stage's search ends, :func:`select_winner` re-scores its ``top_k`` search trials (by search
utility) and every baseline on the evaluator's ``validation`` sample (items carved out of the search
split: :mod:`evomerge.evaluate.views`), and stores the choice of
:func:`evomerge.search.selection.choose` in the study (study attribute ``evomerge:selection``;
each validation result under ``evomerge:validation:<trial>``, with its per-item results). From then
on the stage's winner (:func:`selected_trial`: what ``best.yaml``, ``export``, the DFS stage of a
``ps_dfs`` study and the demo use) is that trial. An evaluator without a validation sample (e.g.
``validation: 0``, or an evaluator kind that has none) leaves the search-best trial the winner, and
the choice records why.

The choice is made again when trials were added since (a resumed study with a larger budget);
validation results already stored are reused, so only new pool members are scored.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.search import selection as S
from evomerge.search.objectives import Objective, utility
from evomerge.search.runner import CTRL_C
from evomerge.search.study import finished, get_attr, records, set_attr
from evomerge.workers.base import CandidateJob

VALIDATION = "validation"
SELECTION = "selection"
POLL = 5.0  # seconds between liveness checks of the executor while waiting


def split_records(study, split: str) -> dict[int, dict[str, Any]]:
    """``{trial number: record}`` of the trials scored on ``split`` after the search
    (``held-out``: the front and baselines; ``validation``: the selection pool)."""
    return records(study, record_kind(split))


def record_kind(split: str) -> str:
    """The key under which results on ``split`` are stored (``heldout`` for ``held-out``)."""
    return "heldout" if split == "held-out" else split


def score_trials(executor, study, trials: dict[int, FrozenTrial], split: str,
                 values: Callable[[Any, FrozenTrial], dict[str, float]]) -> int:
    """Score the stored recipes of ``trials`` on ``split`` through ``executor``, storing each record
    as soon as it is in (a killed re-score keeps what it finished); at most ``capacity`` jobs in
    flight, fusion candidates first (:class:`FusionInDriver` scores them before any job is sent).
    ``values(outcome, trial)``: the record's objective values (a KeyError is recorded as its error).
    Returns how many were scored."""
    from evomerge.fusion.study import is_fusion, parse_candidate

    prefix = record_kind(split) + ":"
    recipes = {n: parse_candidate(yaml.safe_load(t.user_attrs["recipe"]), source=f"trial {n}")
               for n, t in trials.items()}
    pending = sorted(trials, key=lambda n: not is_fusion(recipes[n]))
    running: dict[Any, int] = {}
    while pending or running:
        while pending and len(running) < max(1, int(getattr(executor, "capacity", 1))):
            n = pending.pop(0)
            running[executor.submit(CandidateJob(n, recipes[n], split))] = n
        CTRL_C.raise_if_pressed()
        done, _ = wait(list(running), timeout=POLL, return_when=FIRST_COMPLETED)
        if not done and getattr(executor, "check", None) is not None:
            executor.check()  # RunInterrupted when the workers are gone (what is stored stays)
        for fut in done:
            n = running.pop(fut)
            res = fut.result()
            rec: dict[str, Any] = {"error": res.error, "worker": res.worker, "seconds": res.seconds}
            if res.ok:
                rec.update(res.outcome.to_dict())
                try:
                    rec["objectives"] = values(res.outcome, trials[n])
                except KeyError as err:
                    rec["error"] = str(err)
            set_attr(study, prefix + str(n), rec)
    return len(trials)


class FusionInDriver:
    """A study's executor with fusion candidates scored in this process by ``evaluator`` (the
    driver's, wrapped in :class:`~evomerge.fusion.study.FusionAware`), as finished futures: a
    worker's evaluator keeps one merge resident and materializes candidates into it, while an
    ensemble loads its own sources where it is scored. Everything else (merges, ``capacity``,
    ``check``, ``shutdown``) is the wrapped executor's. Callers submit fusion jobs before merge
    jobs, so the driver's evaluator never scores one while a worker thread uses it."""

    def __init__(self, executor, evaluator):
        self.inner, self.evaluator = executor, evaluator

    def __getattr__(self, name: str):
        if name in ("inner", "evaluator"):  # not set yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    def submit(self, job: CandidateJob) -> Future:
        from evomerge.fusion.study import FusionAware, is_fusion
        from evomerge.workers.base import run_job

        if not is_fusion(job.recipe):
            return self.inner.submit(job)
        fut: Future = Future()
        fut.set_result(run_job(FusionAware(self.evaluator), job))
        return fut


def has_validation(evaluator) -> bool:
    """Whether ``evaluator`` has a validation sample (an evaluator kind without one may raise)."""
    try:
        return bool(evaluator.split_size(VALIDATION))
    except Exception:  # noqa: BLE001 - "unknown split" in whatever form the evaluator words it
        return False


def scored(study, objectives: list[Objective]) -> list[tuple[FrozenTrial, float]]:
    """Every completed trial with objectives (search and baseline) and its search utility."""
    return [(t, utility(objectives, t.user_attrs["objectives"]))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "objectives" in t.user_attrs]


def pool(study, objectives: list[Objective], k: int) -> list[FrozenTrial]:
    """The selection pool: the ``k`` best search trials by search utility, then every merge baseline
    (an ensemble is never the winner: there is nothing to merge or export; it is compared with the
    winner on held-out)."""
    from evomerge.fusion.study import is_fusion

    done = scored(study, objectives)
    search = [(t.number, u) for t, u in done if t.user_attrs.get("kind", "search") == "search"]
    best = set(S.top_k(search, k))
    return [t for t, _ in done if t.number in best] + \
        [t for t, _ in done if t.user_attrs.get("kind") == "baseline" and not is_fusion(t.user_attrs.get("recipe", ""))]


def entries(study, objectives: list[Objective], trials: list[FrozenTrial], split: str
            ) -> tuple[list[S.Entry], dict[str, float] | None]:
    """Selection entries of ``trials`` with their ``split`` results, and the utility's task coefficients."""
    recs = split_records(study, split)
    utils = {t.number: u for t, u in scored(study, objectives)}
    out, coefs = [], None
    for t in trials:
        rec = recs.get(t.number) or {}
        items = S.ItemResults.from_payload(rec.get("items")) if not rec.get("error") else None
        if items is not None and coefs is None:
            coefs = S.task_coefs(objectives, items.weights)
        out.append(S.Entry(t.number, t.user_attrs.get("label") or f"trial {t.number}", utils[t.number], items,
                           S.cost_constant(objectives, t.user_attrs["objectives"])))
    if coefs is None:
        for e in out:
            e.validation = None
    return out, coefs


def select_winner(run, stage: str, study) -> dict[str, Any] | None:
    """Choose (or re-choose, when trials were added) the stage's winner on the validation sample;
    returns the stored choice (None: no completed trial yet)."""
    objectives = list(run.space.objectives)
    k = getattr(getattr(run.space, "selection", None), "top_k", S.DEFAULT_TOP_K)
    members = pool(study, objectives, k)
    if not members:
        return None
    n_done = len(finished(study))
    stored = get_attr(study, SELECTION)
    if stored and stored.get("finished") == n_done and stored.get("top_k") == k:
        return stored
    if not has_validation(run.probe):
        choice: dict[str, Any] = S.choose([S.Entry(t.number, "", utility(objectives, t.user_attrs["objectives"]), None)
                                           for t in members], {}).to_dict()
        choice.update(reason="the evaluator has no validation sample: the winner is the best search score "
                             "(biased upward by the selection among all trials)")
    else:
        have = split_records(study, VALIDATION)
        # a record holding an error is scored again: a transient failure must not bar a member for good
        todo = {t.number: t for t in members if t.number not in have or have[t.number].get("error")}
        if todo:
            from evomerge.search.objectives import stored_trial_values

            def values(outcome, trial):
                return stored_trial_values(objectives, outcome, trial)

            score_trials(run.executor, study, todo, VALIDATION, values)
        ents, coefs = entries(study, objectives, members, VALIDATION)
        if coefs is None:
            choice = S.choose([S.Entry(e.number, e.label, e.search, None) for e in ents], {}).to_dict()
            choice.update(reason="no per-item validation results (the objective does not decompose over the "
                                 "suite's tasks): the winner is the best search score")
        else:
            choice = S.choose(ents, coefs).to_dict()
            choice.update(reason="highest validation score among the top search trials and the baselines")
    choice.update(pool=[t.number for t in members], top_k=k, finished=n_done, stage=stage)
    set_attr(study, SELECTION, choice)
    return choice


def selected_trial(study, objectives: list[Objective] | None = None) -> FrozenTrial | None:
    """The stage's winner as chosen on the validation sample; None when no choice is stored (or
    the chosen trial is gone: a storage edited by hand)."""
    stored = get_attr(study, SELECTION)
    if not stored:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number == stored["winner"] and "objectives" in t.user_attrs:
            return t
    return None
