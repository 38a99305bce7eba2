"""One stage of a search: trials created, scored rung by rung, recorded, told to the optimizer.

Multi-fidelity is successive halving over ``rungs`` (fractions of the search split): every
candidate is scored on the smallest subsample first and only promising ones go on to the next rung.
With pycma a whole population is scored rung by rung and the best ``promote`` fraction of it is
promoted (synchronous successive halving); with an Optuna sampler each trial is promoted when its
score at a rung reaches the ``1 - promote`` quantile of the scores seen at that rung so far
(asynchronous successive halving; the first ``ceil(1 / promote)`` trials are always promoted; the
quantile is taken when the candidate is submitted). A stopped candidate is recorded as PRUNED with
its partial scores. Only candidates scored on the full split count for the best trial and the
Pareto front.

Every rung below the last is scored against the promotion bar known at submission (a lower bound of
the final bar: :mod:`evomerge.search.bounds`); an evaluator that takes a ``bar`` (the suite
evaluator) stops scoring as soon as even the best values for every remaining item could not reach
it, and the candidate is pruned with its rung record marked ``stopped`` (its utility there: the
lowest it could have had). It would not have been promoted either way.

With ``multi_fidelity.estimator`` the first rung scores anchor items instead of a random subsample
once enough trials are fully scored, and its scores are the predicted full-split scores
(:mod:`evomerge.search.estimator`); no bar applies to such a rung (a prediction is not a mean of
the items scored).

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

import contextlib
import math
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from evomerge.errors import RunInterrupted
from evomerge.fusion.study import candidate_cost
from evomerge.recipe import Recipe, recipe_hash, recipe_to_yaml
from evomerge.search import dims as D
from evomerge.search.bounds import async_bar, bar_payload, promoted, sync_bar, sync_keep
from evomerge.search.objectives import Objective, objective_values, study_values, utility
from evomerge.search.study import INTERRUPTED, TrialRecords, finished
from evomerge.workers.base import CandidateJob, Executor, JobResult

PENALTY = 1e12  # pycma fitness (minimized) of a failed candidate
POLL = 5.0  # seconds between liveness checks of the executor while waiting for results


class CtrlC:
    """Ctrl-C during a run (:meth:`watch`, in the main thread): SIGINT still raises KeyboardInterrupt
    where it lands, and also sets a flag that the runner's waits check, so an interrupt that lands in
    code which swallows it (a library's bare ``except:``, a ``__del__``) still stops the run."""

    def __init__(self):
        self.pressed = threading.Event()

    @contextlib.contextmanager
    def watch(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            self.pressed.set()
            if callable(previous):
                previous(signum, frame)
            else:
                raise KeyboardInterrupt

        self.pressed.clear()
        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self.pressed.clear()

    def raise_if_pressed(self) -> None:
        if self.pressed.is_set():
            self.pressed.clear()
            raise KeyboardInterrupt


CTRL_C = CtrlC()


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
    bar: float | None = None  # the promotion bar the current rung is judged against (evomerge.search.bounds)
    fitted: Any = None  # the predictors of its first rung, scored on their anchors (evomerge.search.estimator)


class StageRunner:
    """Runs and records the trials of one stage (one Optuna study)."""

    def __init__(self, records: TrialRecords, space, objectives: list[Objective], executor: Executor,
                 rungs: tuple[float, ...], promote: float, stage: str, limit: int | None = None,
                 on_finish: Callable[[Candidate], None] | None = None, estimator=None):
        self.records, self.study = records, records.study
        self.estimator = estimator  # the first rung on anchor items (evomerge.search.estimator), or None
        self.space, self.objectives = space, objectives
        self.executor, self.rungs, self.promote = executor, tuple(rungs), promote
        self.stage, self.limit = stage, limit
        self.dims = space.dims()
        self.dists = D.distributions(self.dims)
        self.on_finish = on_finish or (lambda cand: None)
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
            number = self.records.new_trial(params=params, distributions=self.dists, user_attrs=attrs)
        else:
            number = trial.number
            self.records.set_user_attrs(number, attrs)
        cand = Candidate(number, recipe, params, trial=trial)
        self.live[number] = cand
        if error:
            self.fail(cand, error, 0.0, "")
        return cand

    def job(self, cand: Candidate) -> CandidateJob:
        cand.fitted = None
        if cand.rung == 0 and len(self.rungs) > 1 and self.estimator is not None:
            cand.fitted = self.estimator.current()
            if cand.fitted is not None:  # the anchors, and the full score predicted from them
                return CandidateJob((cand.number, cand.rung), cand.recipe, "search", self.rungs[cand.rung],
                                    self.limit, items=cand.fitted.anchor_items())
        bar = None
        if cand.rung < len(self.rungs) - 1 and cand.bar is not None:
            try:
                bar = bar_payload(self.objectives, cand.recipe, cand.bar)
            except KeyError:  # an objective the bound cannot express: score the whole rung
                bar = None
        return CandidateJob((cand.number, cand.rung), cand.recipe, "search", self.rungs[cand.rung], self.limit,
                            bar=bar)

    def record(self, cand: Candidate, res: JobResult) -> bool:
        """Store one rung's result; True when the candidate is finished (failed or last rung)."""
        cand.seconds += res.seconds
        if not res.ok:
            self.fail(cand, res.error, res.seconds, res.worker)
            return True
        scores, n, estimated = res.outcome.scores, res.outcome.n, None
        if cand.fitted is not None and cand.rung == 0:  # scored on anchors: the full scores predicted
            scores, n = cand.fitted.predict(res.outcome.items)
            estimated = {"method": cand.fitted.method, "reference": cand.fitted.reference,
                         "anchor_scores": res.outcome.scores}
        try:
            cost = candidate_cost(cand.recipe, res.outcome.cost)  # inference cost relative to one source
            values = objective_values(self.objectives, scores, cand.recipe, cost)
        except KeyError as err:
            self.fail(cand, f"objective: {err.args[0]}", res.seconds, res.worker)
            return True
        fid = self.rungs[cand.rung]
        cand.rung_data[repr(fid)] = {"scores": scores, "n": n, "objectives": values,
                                     "utility": utility(self.objectives, values)}
        if estimated:
            cand.rung_data[repr(fid)]["estimated"] = estimated
        stopped = (res.outcome.items or {}).get("stopped")
        if stopped:  # the bar was out of reach: the rung's utility is at least 'low', below the bar
            cand.rung_data[repr(fid)].update(utility=stopped["low"], stopped=stopped)
        attrs = {"rungs": cand.rung_data, "worker": res.worker}
        if res.outcome.backend:  # the worker's backend counters when this rung ended (engine starts, reloads)
            attrs["backend"] = res.outcome.backend
        if stopped:
            self.records.set_user_attrs(cand.number, attrs)
            self.prune(cand)
            return True
        if cand.rung == len(self.rungs) - 1:
            attrs.update(scores=res.outcome.scores, n=res.outcome.n, stderr=res.outcome.stderr,
                         objectives=values, seconds={"eval": cand.seconds, "total": time.time() - cand.started})
            if res.outcome.items:  # per-item results: paired comparisons, item response models
                attrs["items"] = res.outcome.items
                if self.estimator is not None:
                    self.estimator.add(cand.number, res.outcome.items)
            if cost:
                attrs["cost"] = cost
            self.records.set_user_attrs(cand.number, attrs)
            cand.values, cand.utility = values, utility(self.objectives, values)
            self._tell(cand, TrialState.COMPLETE, study_values(self.objectives, values))
            return True
        self.records.set_user_attrs(cand.number, attrs)
        return False

    def fail(self, cand: Candidate, error: str, seconds: float, worker: str) -> None:
        self.records.set_user_attrs(cand.number, {"error": error, "worker": worker,
                                                  "seconds": {"eval": cand.seconds, "total": time.time() - cand.started}})
        self._tell(cand, TrialState.FAIL, None)

    def prune(self, cand: Candidate) -> None:
        self.records.set_user_attrs(cand.number, {"seconds": {"eval": cand.seconds,
                                                              "total": time.time() - cand.started}})
        self._tell(cand, TrialState.PRUNED, None)

    def _tell(self, cand: Candidate, state: TrialState, values: list[float] | None) -> None:
        self.study.tell(cand.number, values if state == TrialState.COMPLETE else None, state=state)
        cand.state = state
        self.live.pop(cand.number, None)
        self.on_finish(cand)

    def abandon(self) -> None:
        """Mark trials this process left running as interrupted (Ctrl-C); resume retries them."""
        for cand in list(self.live.values()):
            if self.records.is_finished(cand.number):
                continue  # told just before the interrupt came
            self.records.set_user_attrs(cand.number, {"error": INTERRUPTED, "interrupted": True})
            self.study.tell(cand.number, state=TrialState.FAIL)
        self.live.clear()
        # a trial created in storage when the interrupt came, before it was tracked here: the study's
        # lock makes this process its only writer, so whatever is still running is ours
        self.records.recover_interrupted()

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
        raises :class:`RunInterrupted` when it can no longer run them, and a Ctrl-C that code it
        landed in swallowed (:data:`CTRL_C`) is raised again."""
        check = getattr(self.executor, "check", None)
        next_check = time.monotonic() + POLL
        while True:
            CTRL_C.raise_if_pressed()
            done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            if done:
                return sorted(done, key=lambda f: not f.cancelled() and isinstance(f.exception(), RunInterrupted))
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + POLL
            if check is not None:
                try:
                    check()
                except RunInterrupted as err:
                    raise self._interrupted(err) from err

    def _result(self, fut: Future) -> JobResult:
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

    def run_batch(self, cands: list[Candidate], bar: Callable[[], float | None] | None = None) -> None:
        """Score candidates at their current rung, at most ``capacity`` at once; ``bar()``: the
        promotion bar known when a candidate is submitted (scoring stops when it is out of reach)."""
        pending = list(cands)
        running: dict[Future, Candidate] = {}
        while pending or running:
            while pending and len(running) < self.executor.capacity:
                cand = pending.pop(0)
                cand.bar = bar() if bar is not None else None
                running[self._submit(cand)] = cand
            for fut in self._wait(running):
                cand = running.pop(fut)
                self.record(cand, self._result(fut))

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
            active = [cand for _, cand in new if cand.state == TrialState.RUNNING and cand.rung == rung]
            # successive halving: rung r holds ceil(promote^r n) candidates and promotes ceil(promote^(r+1) n)
            k = max(1, math.ceil(self.promote ** (rung + 1) * len(xs)))
            self.run_batch(active, None if rung == len(self.rungs) - 1 else
                           lambda rung=rung, k=k: sync_bar(self._rung_values(members, rung), k))
            if rung == len(self.rungs) - 1:
                break
            # synchronous successive halving over the whole population at this rung
            keep = sync_keep(self._rung_values(members, rung, with_index=True), k)
            for idx, cand in new:
                if cand.state == TrialState.RUNNING:
                    if idx in keep:
                        cand.rung += 1
                    else:
                        self.prune(cand)
        if len(members) < len(xs):
            return len(new)  # budget reached inside the generation: tell it on resume
        cma.tell(gen, xs, self._fitness(members, len(xs)))
        return len(new)

    def _rung_values(self, members: dict[int, Any], rung: int, with_index: bool = False) -> list:
        """Rung utilities of the population members scored at ``rung`` (with their indices)."""
        out = []
        for idx, m in members.items():
            data = m.rung_data if isinstance(m, Candidate) else m.user_attrs.get("rungs", {})
            u = self.rung_utility(data, rung)
            if u is not None:
                out.append((u, idx) if with_index else u)
        return out

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

    def async_bar(self, cand: Candidate) -> float | None:
        """The asynchronous promotion bar of ``cand``'s rung, from the utilities seen there so far
        (a trial stopped at its bound counts with the lowest utility it could have had)."""
        history = []
        for t in self.study.get_trials(deepcopy=False):
            if t.number == cand.number or t.user_attrs.get("kind", "search") != "search":
                continue
            v = self.rung_utility(t.user_attrs.get("rungs", {}), cand.rung)
            if v is not None:
                history.append(v)
        return async_bar(history, self.promote)

    def promote_async(self, cand: Candidate) -> bool:
        """Whether ``cand`` reached the bar it was submitted against at its rung."""
        return promoted(self.rung_utility(cand.rung_data, cand.rung), cand.bar)

    def _submit_async(self, cand: Candidate) -> Future:
        cand.bar = self.async_bar(cand) if cand.rung < len(self.rungs) - 1 else None
        return self._submit(cand)

    def run_async(self, can_start: Callable[[int], bool]) -> None:
        """Ask the study's sampler for a trial whenever a slot frees, until ``can_start`` says stop."""
        running: dict[Future, Candidate] = {}
        while True:
            while len(running) < self.executor.capacity and can_start(len(running)):
                trial = self.study.ask(self.dists)
                cand = self.create(dict(trial.params), {}, trial=trial)
                if cand.state == TrialState.RUNNING:
                    running[self._submit_async(cand)] = cand
            if not running:
                return
            for fut in self._wait(running):
                cand = running.pop(fut)
                if self.record(cand, self._result(fut)):
                    continue
                if self.promote_async(cand):
                    cand.rung += 1
                    running[self._submit_async(cand)] = cand
                else:
                    self.prune(cand)
