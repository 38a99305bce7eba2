"""One stage of a search: trials created, scored rung by rung, recorded, told to the optimizer.

Multi-fidelity is successive halving over ``rungs`` (fractions of the search split): every
candidate is scored on the smallest subsample first and only promising ones go on to the next rung.
With pycma a whole population is scored rung by rung and the best ``promote`` fraction of it is
promoted (synchronous successive halving); with an Optuna sampler each trial is promoted when its
score at a rung reaches the ``1 - promote`` quantile of the scores seen at that rung so far
(asynchronous successive halving; the first ``ceil(1 / promote)`` trials are always promoted). A
stopped candidate is recorded as PRUNED with its partial scores. Only candidates scored on the full
split count for the best trial and the Pareto front.

A candidate that fails (exception, non-finite score, out of memory) is recorded as FAIL with the
reason in ``error``; pycma gets a penalty fitness, Optuna samplers skip failed trials.

Waiting on the executor is bounded: every ``POLL`` seconds without a result the executor's
``check()`` (where it has one, e.g. :class:`~evomerge.workers.ray_executor.RayExecutor`) is asked
whether it can still run jobs. When it cannot (every Ray worker lost, a dead node, an unreachable
cluster) a :class:`~evomerge.errors.RunInterrupted` saying what died and how many trials were
running is raised; the driver then records those trials as interrupted (``abandon``) and
``evomerge resume`` retries them.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from evomerge.errors import RunInterrupted
from evomerge.recipe import Recipe, recipe_hash, recipe_to_yaml
from evomerge.search import dims as D
from evomerge.search.objectives import Objective, objective_values, study_values, utility
from evomerge.search.study import finished, new_trial, set_user_attrs
from evomerge.workers import base as _workers  # module, not names: evomerge.workers may be mid-import

PENALTY = 1e12  # pycma fitness (minimized) of a failed candidate
POLL = 5.0  # seconds between liveness checks of the executor while waiting for results


@dataclass
class Candidate:
    number: int
    recipe: Recipe | None
    params: dict[str, Any]
    rung: int = 0
    rung_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    started: float = field(default_factory=time.time)
    trial: optuna.trial.Trial | None = None  # Optuna path only
    state: TrialState = TrialState.RUNNING
    values: dict[str, float] | None = None
    utility: float | None = None


class StageRunner:
    """Runs and records the trials of one stage (one Optuna study)."""

    def __init__(self, study: optuna.Study, space, objectives: list[Objective], executor: _workers.Executor,
                 rungs: tuple[float, ...], promote: float, stage: str, limit: int | None = None,
                 on_finish: Callable[[Candidate], None] | None = None):
        self.study, self.space, self.objectives = study, space, objectives
        self.executor, self.rungs, self.promote = executor, tuple(rungs), promote
        self.stage, self.limit = stage, limit
        self.dims = space.dims()
        self.dists = D.distributions(self.dims)
        self.on_finish = on_finish or (lambda c: None)
        self.live: dict[int, Candidate] = {}

    # --------------------------------------------------------------------------- trial records

    def create(self, params: dict[str, Any], attrs: dict[str, Any], trial: optuna.trial.Trial | None = None,
               recipe: Recipe | None = None) -> Candidate:
        error = None
        if recipe is None:
            try:
                recipe = self.space.decode(params)
            except Exception as err:  # noqa: BLE001 - a point that does not decode is a failed trial
                error = f"cannot decode the parameters into a recipe: {type(err).__name__}: {err}"
        attrs = {"kind": "search", "stage": self.stage, **attrs}
        if recipe is not None:
            attrs.update(recipe=recipe_to_yaml(recipe), recipe_hash=recipe_hash(recipe))
        if trial is None:
            number = new_trial(self.study, params=params, distributions=self.dists, user_attrs=attrs)
        else:
            number = trial.number
            set_user_attrs(self.study, number, attrs)
        cand = Candidate(number, recipe, params, trial=trial)
        self.live[number] = cand
        if error:
            self.fail(cand, error, 0.0, "")
        return cand

    def job(self, cand: Candidate) -> _workers.Job:
        return _workers.Job((cand.number, cand.rung), cand.recipe, "search", self.rungs[cand.rung], self.limit)

    def record(self, cand: Candidate, res: _workers.JobResult) -> bool:
        """Store one rung's result; True when the candidate is finished (failed or last rung)."""
        cand.seconds += res.seconds
        if not res.ok:
            self.fail(cand, res.error, res.seconds, res.worker)
            return True
        try:
            values = objective_values(self.objectives, res.outcome.scores, cand.recipe)
        except KeyError as err:
            self.fail(cand, f"objective: {err.args[0]}", res.seconds, res.worker)
            return True
        fid = self.rungs[cand.rung]
        cand.rung_data[repr(fid)] = {"scores": res.outcome.scores, "n": res.outcome.n, "objectives": values,
                                     "utility": utility(self.objectives, values)}
        attrs = {"rungs": cand.rung_data, "worker": res.worker}
        if res.outcome.backend:  # the worker's backend counters when this rung ended (engine starts, reloads)
            attrs["backend"] = res.outcome.backend
        if cand.rung == len(self.rungs) - 1:
            attrs.update(scores=res.outcome.scores, n=res.outcome.n, stderr=res.outcome.stderr,
                         objectives=values, seconds={"eval": cand.seconds, "total": time.time() - cand.started})
            set_user_attrs(self.study, cand.number, attrs)
            cand.values, cand.utility = values, utility(self.objectives, values)
            self._tell(cand, TrialState.COMPLETE, study_values(self.objectives, values))
            return True
        set_user_attrs(self.study, cand.number, attrs)
        return False

    def fail(self, cand: Candidate, error: str, seconds: float, worker: str) -> None:
        set_user_attrs(self.study, cand.number, {"error": error, "worker": worker,
                                                 "seconds": {"eval": cand.seconds, "total": time.time() - cand.started}})
        self._tell(cand, TrialState.FAIL, None)

    def prune(self, cand: Candidate) -> None:
        set_user_attrs(self.study, cand.number, {"seconds": {"eval": cand.seconds,
                                                             "total": time.time() - cand.started}})
        self._tell(cand, TrialState.PRUNED, None)

    def _tell(self, cand: Candidate, state: TrialState, values: list[float] | None) -> None:
        self.study.tell(cand.number, values if state == TrialState.COMPLETE else None, state=state)
        cand.state = state
        self.live.pop(cand.number, None)
        self.on_finish(cand)

    def abandon(self) -> None:
        """Mark trials this process left running as interrupted (Ctrl-C); resume retries them."""
        from evomerge.search.study import INTERRUPTED

        for cand in list(self.live.values()):
            set_user_attrs(self.study, cand.number, {"error": INTERRUPTED, "interrupted": True})
            self.study.tell(cand.number, state=TrialState.FAIL)
        self.live.clear()

    def rung_utility(self, data: dict[str, dict[str, Any]], rung: int) -> float | None:
        rec = data.get(repr(self.rungs[rung]))
        return None if rec is None else rec["utility"]

    # --------------------------------------------------------------------------- running jobs

    def _submit(self, cand: Candidate) -> Future:
        try:
            return self.executor.submit(self.job(cand))
        except RunInterrupted as err:
            raise self._interrupted(err) from err

    def _wait(self, running: dict[Future, Candidate]) -> list[Future]:
        """The futures of ``running`` that are done (at least one; interrupted ones last, so the
        results that did come in are recorded first); between polls the executor's ``check()``
        raises :class:`RunInterrupted` when it can no longer run them."""
        check = getattr(self.executor, "check", None)
        while True:
            done, _ = wait(list(running), timeout=POLL, return_when=FIRST_COMPLETED)
            if done:
                return sorted(done, key=lambda f: not f.cancelled() and isinstance(f.exception(), RunInterrupted))
            if check is not None:
                try:
                    check()
                except RunInterrupted as err:
                    raise self._interrupted(err) from err

    def _result(self, fut: Future) -> _workers.JobResult:
        try:
            return fut.result()
        except RunInterrupted as err:
            raise self._interrupted(err) from err

    def _interrupted(self, err: RunInterrupted) -> RunInterrupted:
        """``err`` worded for the study: what died and how many trials the driver records as
        interrupted (every live one: ``abandon`` marks them when this escapes ``run_stage``)."""
        what = getattr(err, "what", None) or str(err)
        n = len(self.live)
        return RunInterrupted(f"the search stopped: {what}; {n} running trial(s) of stage {self.stage} were "
                              "recorded as interrupted (not failed); the study can be resumed with `evomerge resume`")

    def run_batch(self, cands: list[Candidate]) -> None:
        """Score candidates at their current rung, at most ``capacity`` at once."""
        pending = list(cands)
        running: dict[Future, Candidate] = {}
        while pending or running:
            while pending and len(running) < self.executor.capacity:
                c = pending.pop(0)
                running[self._submit(c)] = c
            for fut in self._wait(running):
                c = running.pop(fut)
                self.record(c, self._result(fut))

    # --------------------------------------------------------------------------- pycma generations

    def run_generation(self, cma, budget_left: int) -> int:
        """Score (or reuse) one pycma generation; tells it when complete. Returns new trials finished."""
        gen, xs = cma.ask()
        stored = {t.user_attrs["cma"]["idx"]: t for t in finished(self.study)
                  if (t.user_attrs.get("cma") or {}).get("gen") == gen}
        members: dict[int, Candidate | Any] = dict(stored)
        new: list[tuple[int, Candidate]] = []
        for idx, x in enumerate(xs):
            if idx in stored:
                continue
            if len(new) >= budget_left:
                break
            params = D.decode(self.dims, x)
            cand = self.create(params, {"cma": {"gen": gen, "idx": idx, "x": x}})
            members[idx] = cand
            new.append((idx, cand))
        for rung in range(len(self.rungs)):
            active = [c for _, c in new if c.state == TrialState.RUNNING and c.rung == rung]
            self.run_batch(active)
            if rung == len(self.rungs) - 1:
                break
            # synchronous successive halving over the whole population at this rung
            scored = []
            for idx, m in members.items():
                data = m.rung_data if isinstance(m, Candidate) else m.user_attrs.get("rungs", {})
                u = self.rung_utility(data, rung)
                if u is not None:
                    scored.append((u, -idx, idx))
            keep = {idx for _, _, idx in sorted(scored, reverse=True)[:max(1, math.ceil(self.promote * len(xs)))]}
            for idx, c in new:
                if c.state == TrialState.RUNNING:
                    if idx in keep:
                        c.rung += 1
                    else:
                        self.prune(c)
        if len(members) < len(xs):
            return len(new)  # budget reached inside the generation: tell it on resume
        cma.tell(gen, xs, self._fitness(members, len(xs)))
        return len(new)

    def _fitness(self, members: dict[int, Any], n: int) -> list[float]:
        info = []
        for idx in range(n):
            m = members[idx]
            if isinstance(m, Candidate):
                state, data, u = m.state, m.rung_data, m.utility
            else:
                state, data = m.state, m.user_attrs.get("rungs", {})
                u = utility(self.objectives, m.user_attrs["objectives"]) if state == TrialState.COMPLETE else None
            info.append((state, data, u))
        fit = [PENALTY] * n
        done = [-u for s, _, u in info if s == TrialState.COMPLETE]
        worst = max(done) if done else 0.0
        pruned = []
        for idx, (state, data, u) in enumerate(info):
            if state == TrialState.COMPLETE:
                fit[idx] = -u
            elif state == TrialState.PRUNED:
                last = max((r for r in range(len(self.rungs)) if self.rung_utility(data, r) is not None),
                           default=0)
                pruned.append((-last, -(self.rung_utility(data, last) or 0.0), idx))
        for rank, (_, _, idx) in enumerate(sorted(pruned)):
            fit[idx] = worst + 1.0 + rank  # ranks below every fully scored member, in rung order
        return fit

    # --------------------------------------------------------------------------- Optuna samplers

    def promote_async(self, cand: Candidate) -> bool:
        u = self.rung_utility(cand.rung_data, cand.rung)
        history = []
        for t in self.study.get_trials(deepcopy=False):
            if t.number == cand.number or t.user_attrs.get("kind", "search") != "search":
                continue
            v = self.rung_utility(t.user_attrs.get("rungs", {}), cand.rung)
            if v is not None:
                history.append(v)
        if len(history) < math.ceil(1 / self.promote):
            return True
        history.sort(reverse=True)
        k = max(1, math.ceil(self.promote * (len(history) + 1)))
        return u >= history[min(k, len(history)) - 1]

    def run_async(self, can_start: Callable[[int], bool]) -> None:
        """Ask the study's sampler for a trial whenever a slot frees, until ``can_start`` says stop."""
        running: dict[Future, Candidate] = {}
        while True:
            while len(running) < self.executor.capacity and can_start(len(running)):
                trial = self.study.ask(self.dists)
                cand = self.create(dict(trial.params), {}, trial=trial)
                if cand.state == TrialState.RUNNING:
                    running[self._submit(cand)] = cand
            if not running:
                return
            for fut in self._wait(running):
                cand = running.pop(fut)
                if self.record(cand, self._result(fut)):
                    continue
                if self.promote_async(cand):
                    cand.rung += 1
                    running[self._submit(cand)] = cand
                else:
                    self.prune(cand)
