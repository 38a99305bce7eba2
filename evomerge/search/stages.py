"""One run of a study's stages (:class:`StudyRun`), for the entry points in :mod:`evomerge.search.driver`.

Each stage first scores its baselines (:func:`baselines`: the untuned default point of the space
and each source model alone) so the front is always shown against them, then its optimizer's
candidates (pycma generations, or an Optuna sampler's trials as workers free up) are scored by a
:class:`~evomerge.search.runner.StageRunner` until the stage's budget is spent or the run's time is
up. The DFS stage of a ``ps_dfs`` space runs over the PS stage's winner, merged into
``<study>/ps_winner``. :meth:`StudyRun.rescore` scores a stage's Pareto front and baselines on the
held-out split.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import TrialState

from evomerge.errors import StudyError
from evomerge.recipe import DataFlowRecipe, PathStep, Recipe, parse_recipe, recipe_to_yaml
from evomerge.search import dims as D
from evomerge.evaluate.evaluators import Evaluator, make_evaluator
from evomerge.search.objectives import stored_trial_values, study_directions, study_metric_names, utility
from evomerge.search.optimizers import PyCMA, make_sampler
from evomerge.search.pareto import front_trials
from evomerge.search.paths import PS_WINNER
from evomerge.search.runner import Candidate, StageRunner
from evomerge.search.space import SearchSpace
from evomerge.search.study import StudyMeta, TrialRecords, create_or_load, finished, get_attr, heldout_records, set_attr
from evomerge.workers.base import Executor, InProcessExecutor

DEFAULT_TRIALS = 50


def _first_errors(study, k: int = 3) -> list[str]:
    out: list[str] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        err = t.user_attrs.get("error")
        if err and not t.user_attrs.get("interrupted") and err not in out:
            out.append(err)
            if len(out) >= k:
                break
    return out


def _source_alone(ref: str, num_layers: int) -> DataFlowRecipe:
    """A recipe that rebuilds ``ref`` exactly (its own layers, scale 1)."""
    return DataFlowRecipe(kind="dataflow", path=[PathStep(model=ref, layer=i) for i in range(num_layers)],
                          embed=ref, head=ref)


def baselines(space) -> list[tuple[str, Recipe | None, dict[str, Any] | None]]:
    """``(label, recipe, params)`` of a stage's baselines: the untuned point, then each source alone."""
    from evomerge.search.dfs import DFSSpace

    out: list[tuple[str, Recipe | None, dict[str, Any] | None]] = []
    default = space.default_params()
    out.append(("untuned default", space.decode(default), default))
    if isinstance(space, DFSSpace):
        for (name, ref), n in zip(space.models, space.layers):
            out.append((f"source {name}", _source_alone(ref, n), None))
    else:
        for name, ref in space.sources:
            out.append((f"source {name}", _source_alone(ref, space.num_layers), None))
        if space.base:
            out.append(("base", _source_alone(space.base, space.num_layers), None))
    return out


def fusion_baselines(space: SearchSpace) -> list[tuple[str, Any]]:
    """``(label, fusion recipe)`` of the space's fusion baselines, models called by their source names
    (a label repeated gets ``#k``)."""
    named = {}
    if space.ps is not None:
        named = {ref: name for name, ref in space.ps.sources} | ({space.ps.base: "base"} if space.ps.base else {})
    elif space.dfs is not None:
        named = {ref: name for name, ref in space.dfs.models}
    out: list[tuple[str, Any]] = []
    for recipe in space.fusion_baselines:
        label = recipe.label(named)
        taken = {lab for lab, _ in out}
        k = 2
        while label in taken:
            label, k = f"{recipe.label(named)} #{k}", k + 1
        out.append((label, recipe))
    return out


class StudyRun:
    def __init__(self, study_dir: Path, meta: StudyMeta, space: SearchSpace, executor: Executor | None,
                 storage, probe: Evaluator, evaluator_factory, progress: bool, timeout: float | None,
                 own_executor: bool = False):
        self.dir, self.meta, self.space, self.progress = study_dir, meta, space, progress
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.storage = storage
        self.probe = probe
        make = evaluator_factory or (lambda: make_evaluator(space.evaluation, source=f"{space.source}: evaluation"))
        pool = [probe]  # the evaluator built to check the space is the first one used
        from evomerge.search.validation import FusionInDriver

        self.executor = FusionInDriver(executor or InProcessExecutor(lambda: pool.pop() if pool else make(),
                                                                     workers=meta.workers), probe)
        self._own_executor = executor is None or own_executor

    def time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def stage_study(self, stage: str, sampler=None):
        objectives = list(self.space.objectives)
        return create_or_load(self.storage, self.meta.study_name(stage), study_directions(objectives), sampler,
                              study_metric_names(objectives))

    def rungs(self, study) -> tuple[float, ...]:
        stored = get_attr(study, "rungs")
        if stored is not None:
            return tuple(stored)
        fidelity = self.space.multi_fidelity
        on = fidelity.enabled
        if on == "auto":
            size = self.probe.split_size("search")
            on = size is not None and size >= fidelity.auto_min_items
        rungs = tuple(fidelity.rungs) if on else (1.0,)
        set_attr(study, "rungs", list(rungs))
        return rungs

    def bind_stage(self, stage: str):
        space = self.space.stage_space(stage)
        if stage != "dfs" or self.space.kind != "ps_dfs":
            return space
        ps_study = self.stage_study("ps")
        best = best_trial(ps_study, self.space)
        if best is None:
            errors = _first_errors(ps_study)
            listing = "".join(f"\n  - {e}" for e in errors)
            raise StudyError("the PS stage has no completed trial to continue the DFS stage from"
                             + (f": every trial failed, e.g.{listing}" if errors else ""))
        winner = self.dir / "ps_winner"
        recipe = parse_recipe(yaml.safe_load(best.user_attrs["recipe"]))
        if not (winner / "recipe.yaml").is_file() or (winner / "recipe.yaml").read_text() != recipe_to_yaml(recipe):
            from evomerge.materialize import merge_to_disk

            merge_to_disk(recipe, winner, overwrite=True, progress=False)
        models = tuple((n, str(winner) if r == PS_WINNER else r) for n, r in space.models)
        return dataclasses.replace(space, models=models)

    def run_stage(self, stage: str) -> dict[str, Any]:
        cfg = self.space.optimizer
        space = self.bind_stage(stage)
        budget = self.meta.budget(stage) or DEFAULT_TRIALS
        study = self.stage_study(stage)
        records = TrialRecords(study, self.storage)
        records.recover_interrupted()
        n_obj = len(study.directions)
        sampler = make_sampler(cfg, n_objectives=n_obj, seed_offset=len(study.get_trials(deepcopy=False)),
                               x0=space.default_params(), search_space=D.distributions(space.dims()))
        study.sampler = sampler
        done = len(finished(study))
        bar = _bar(stage, budget, done, self.progress)
        best = [None]

        def on_finish(c: Candidate) -> None:
            if c.utility is not None and (best[0] is None or c.utility > best[0]):
                best[0] = c.utility
            bar.update(1)
            if best[0] is not None:
                bar.set_postfix_str(f"best {self._utility_name()} {best[0]:.4g}")

        fidelity = self.space.multi_fidelity
        estimator = None
        if fidelity.estimator and len(self.rungs(study)) > 1:  # the first rung on anchor items
            from evomerge.search.estimator import RungEstimator

            estimator = RungEstimator(fidelity.estimator, fidelity.anchors, fidelity.reference, seed=self.space.seed)
            estimator.load(study)
        runner = StageRunner(records, space, list(self.space.objectives), self.executor, self.rungs(study),
                             fidelity.promote, stage, self.meta.limit, on_finish=on_finish, estimator=estimator)
        try:
            if self.space.baselines or self.space.fusion_baselines:
                self.run_baselines(runner)
            if cfg.is_pycma:
                x0 = D.encode(runner.dims, space.default_params())
                cma = PyCMA(study, len(runner.dims), cfg, x0)
                while self.time_left():
                    left = budget - len(finished(study))
                    if left <= 0:
                        break
                    runner.run_generation(cma, left)
            else:
                self.retry_interrupted(study, runner)

                def can_start(in_flight: int) -> bool:
                    return self.time_left() and len(finished(study)) + in_flight < budget

                runner.run_async(can_start)
        except BaseException:
            runner.abandon()
            raise
        finally:
            bar.close()
        n_done = len(finished(study))
        if n_done >= budget:
            set_attr(study, "stage_done", True)
        self.select(stage)  # the winner, chosen on the validation sample before it is named
        top = best_trial(study, self.space)
        failed = sum(t.state == TrialState.FAIL for t in finished(study))
        return {"finished": n_done, "budget": budget, "failed": failed,
                "errors": _first_errors(study) if failed else [],
                "best_trial": None if top is None else top.number,
                "best_utility": None if top is None else utility(list(self.space.objectives), top.user_attrs["objectives"])}

    def _utility_name(self) -> str:
        objs = self.space.objectives
        return "score" if all(o.weight is not None for o in objs) else objs[0].name

    def retry_interrupted(self, study, runner: StageRunner) -> None:
        """Enqueue (once) the params of search trials that were interrupted, for Optuna samplers."""
        retried = set(get_attr(study, "retried") or [])
        todo = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get("interrupted") and t.user_attrs.get("kind") == "search"
                and t.number not in retried and t.params]
        for t in todo:
            study.enqueue_trial(t.params, skip_if_exists=False)
            retried.add(t.number)
        if todo:
            set_attr(study, "retried", sorted(retried))

    def run_baselines(self, runner: StageRunner) -> None:
        """Score the stage's baselines not scored yet: the fusion baselines (in the study's last
        stage, scored in this process: :class:`~evomerge.search.validation.FusionInDriver`) first,
        then the merge baselines on the workers. Baselines do not count toward the budget."""
        have = {t.user_attrs.get("label") for t in finished(runner.study, kind="baseline")}
        todo: list[tuple[str, Any, dict[str, Any] | None]] = []
        if runner.stage == self.space.stages()[-1]:  # once, in the stage whose front the report shows
            todo += [(label, recipe, None) for label, recipe in fusion_baselines(self.space)]
        if self.space.baselines:
            todo += baselines(runner.space)
        cands = []
        for label, recipe, params in todo:
            if label in have:
                continue
            number = runner.records.new_trial(params=params or {}, distributions=runner.dists,
                                              user_attrs={"kind": "baseline", "label": label, "stage": runner.stage,
                                                          "recipe": recipe_to_yaml(recipe)})
            cand = Candidate(number, recipe, params or {}, rung=len(runner.rungs) - 1)
            runner.live[number] = cand
            cands.append(cand)
        saved = runner.on_finish
        runner.on_finish = lambda c: None
        try:
            runner.run_batch(cands)
        finally:
            runner.on_finish = saved

    def select(self, stage: str) -> dict[str, Any] | None:
        """Name the stage's winner on the validation sample (:mod:`evomerge.search.validation`)."""
        from evomerge.search.validation import select_winner

        return select_winner(self, stage, self.stage_study(stage))

    def rescore(self, stage: str, *, force: bool = False) -> int:
        """Score the stage's Pareto front, its selection pool (the winner chosen on validation and the
        candidates it was chosen among) and baselines on the held-out split; returns how many were scored."""
        from evomerge.search.validation import score_trials

        study = self.stage_study(stage)
        have = heldout_records(study)
        objs = list(self.space.objectives)
        targets = front_trials(study, objs, include_baselines=True)
        targets += [t for t in finished(study, kind="baseline") if t.state == TrialState.COMPLETE]
        chosen = set((get_attr(study, "selection") or {}).get("pool", []))
        targets += [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number in chosen]
        todo = {t.number: t for t in targets if force or t.number not in have}
        # each result is stored as soon as it is in (a killed re-score keeps what it finished, and
        # the next resume or rescore scores only the rest)
        return score_trials(self.executor, study, todo, "held-out",
                            lambda outcome, trial: stored_trial_values(objs, outcome, trial))

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown()


def _bar(stage: str, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=f"search {stage}", unit="trial",
                disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def best_trial(study, space: SearchSpace):
    """The stage's winner: the trial chosen on the validation sample when the choice is made
    (:func:`evomerge.search.validation.selected_trial`), else the completed trial (search or
    baseline) with the highest utility, or None."""
    from evomerge.search.report import best_by

    return best_by(study, list(space.objectives))
