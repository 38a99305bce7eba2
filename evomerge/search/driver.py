"""The search driver: start a study, resume it, re-score its front on the held-out split.

``start_search`` validates the space, creates the study folder (``study.json``, ``space.yaml``, the
storage), and runs every stage; ``resume_search`` reopens a folder after Ctrl-C or ``kill -9``:
trials left running are marked failed ('interrupted') and retried, completed ones are kept, and
pycma continues from the state stored after its last told generation. Each stage first scores its
baselines (the untuned default point of the space and each source model alone) so the front is
always shown against them. When a run ends (budget spent or timeout reached; not on Ctrl-C) the
Pareto front and the baselines are re-scored on the held-out split and the report is written.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from optuna.trial import TrialState

from evomerge.errors import ConfigError, Problem, StudyError
from evomerge.io_utils import atomic_write_text
from evomerge.recipe import DataFlowRecipe, PathStep, Recipe, parse_recipe, recipe_to_yaml
from evomerge.search import dims as D
from evomerge.search.evaluation import Evaluator, make_evaluator
from evomerge.search.objectives import study_directions, utility
from evomerge.search.optimizers import PyCMA, make_sampler
from evomerge.search.pareto import front_trials
from evomerge.search.runner import Candidate, StageRunner
from evomerge.search.space import PS_WINNER, SearchSpace, load_space
from evomerge.search.study import (SPACE_FILE, StudyMeta, create_or_load, default_storage, finished, get_attr,
                                   heldout_records, new_trial, open_storage, read_meta, recover_interrupted,
                                   set_attr, write_meta)
from evomerge.workers import base as _workers  # module, not names: evomerge.workers may be mid-import

DEFAULT_TRIALS = 50


@dataclasses.dataclass
class SearchResult:
    study_dir: Path
    stages: dict[str, dict[str, Any]]  # per stage: finished, failed, best trial number / value
    complete: bool  # every stage reached its trial budget


def _evaluator_factory(space: SearchSpace, factory: Callable[[], Evaluator] | None):
    """A factory whose first call returns the probe evaluator (built once to validate objectives)."""
    make = factory or (lambda: make_evaluator(space.evaluation, source=f"{space.source}: evaluation"))
    probe = make()
    names = set(probe.metric_names())
    problems = [Problem(f"{space.source}: objectives", f"unknown objective metric '{o.key}'",
                        f"the evaluator reports: {', '.join(sorted(names))}; costs: params, layers")
                for o in space.objectives if o.kind == "metric" and o.key not in names]
    if problems:
        raise ConfigError(problems, source=space.source)
    pool = [probe]
    return probe, (lambda: pool.pop() if pool else make())


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


class _Run:
    def __init__(self, study_dir: Path, meta: StudyMeta, space: SearchSpace, executor: _workers.Executor | None,
                 evaluator_factory, progress: bool, timeout: float | None):
        self.dir, self.meta, self.space, self.progress = study_dir, meta, space, progress
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.storage = open_storage(meta.storage)
        self.probe, factory = _evaluator_factory(space, evaluator_factory)
        self.executor = executor or _workers.InProcessExecutor(factory, workers=meta.workers)
        self._own_executor = executor is None

    def time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def stage_study(self, stage: str, sampler=None):
        names = [o.name for o in self.space.objectives]
        metric_names = names if len(study_directions(list(self.space.objectives))) == len(names) else None
        return create_or_load(self.storage, self.meta.study_name(stage),
                              study_directions(list(self.space.objectives)), sampler, metric_names)

    def rungs(self, study) -> tuple[float, ...]:
        stored = get_attr(study, "rungs")
        if stored is not None:
            return tuple(stored)
        mf = self.space.multi_fidelity
        on = mf.enabled
        if on == "auto":
            size = self.probe.split_size("search")
            on = size is not None and size >= mf.auto_min_items
        rungs = tuple(mf.rungs) if on else (1.0,)
        set_attr(study, "rungs", list(rungs))
        return rungs

    def bind_stage(self, stage: str):
        space = self.space.stage_space(stage)
        if stage != "dfs" or self.space.kind != "ps_dfs":
            return space
        ps_study = self.stage_study("ps")
        best = best_trial(ps_study, self.space)
        if best is None:
            raise StudyError("the PS stage has no completed trial to continue the DFS stage from")
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
        recover_interrupted(study)
        n_obj = len(study.directions)
        sampler = make_sampler(cfg, n_objectives=n_obj, seed_offset=len(study.get_trials(deepcopy=False)))
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

        mf = self.space.multi_fidelity
        runner = StageRunner(study, space, list(self.space.objectives), self.executor, self.rungs(study),
                             mf.promote, stage, self.meta.limit, on_finish=on_finish)
        try:
            if self.space.baselines:
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
        bt = best_trial(study, self.space)
        return {"finished": n_done, "budget": budget,
                "failed": sum(t.state == TrialState.FAIL for t in finished(study)),
                "best_trial": None if bt is None else bt.number,
                "best_utility": None if bt is None else utility(list(self.space.objectives), bt.user_attrs["objectives"])}

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
        study = runner.study
        have = {t.user_attrs.get("label") for t in finished(study, kind="baseline")}
        todo = [(label, recipe, params) for label, recipe, params in baselines(runner.space) if label not in have]
        cands = []
        for label, recipe, params in todo:
            number = new_trial(study, params=params or {}, distributions=runner.dists,
                               user_attrs={"kind": "baseline", "label": label, "stage": runner.stage,
                                           "recipe": recipe_to_yaml(recipe)})
            cand = Candidate(number, recipe, params or {}, rung=len(runner.rungs) - 1)
            runner.live[number] = cand
            cands.append(cand)
        saved = runner.on_finish
        runner.on_finish = lambda c: None  # baselines do not count toward the budget
        try:
            runner.run_batch(cands)
        finally:
            runner.on_finish = saved

    def rescore(self, stage: str, *, force: bool = False) -> int:
        """Score the stage's Pareto front and baselines on the held-out split; returns how many were scored."""
        study = self.stage_study(stage)
        have = heldout_records(study)
        objs = list(self.space.objectives)
        targets = front_trials(study, objs, include_baselines=True)
        targets += [t for t in finished(study, kind="baseline") if t.state == TrialState.COMPLETE]
        todo = {t.number: t for t in targets if force or t.number not in have}
        futs = {n: self.executor.submit(_workers.Job(n, parse_recipe(yaml.safe_load(t.user_attrs["recipe"])), "held-out"))
                for n, t in todo.items()}
        for n, fut in futs.items():
            res = fut.result()
            rec: dict[str, Any] = {"error": res.error, "worker": res.worker, "seconds": res.seconds}
            if res.ok:
                rec.update(res.outcome.to_dict())
                try:
                    rec["objectives"] = _objective_values(objs, res.outcome.scores, todo[n])
                except KeyError as err:
                    rec["error"] = str(err)
            set_attr(study, f"heldout:{n}", rec)
        return len(todo)

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown()


def _objective_values(objs, scores, trial) -> dict[str, float]:
    from evomerge.search.objectives import objective_values

    return objective_values(objs, scores, parse_recipe(yaml.safe_load(trial.user_attrs["recipe"])))


def _bar(stage: str, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=f"search {stage}", unit="trial",
                disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def best_trial(study, space: SearchSpace):
    """The completed trial (search or baseline) with the highest utility, or None."""
    objs = list(space.objectives)
    best, best_u = None, -math.inf
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "objectives" not in t.user_attrs:
            continue
        u = utility(objs, t.user_attrs["objectives"])
        if u > best_u:
            best, best_u = t, u
    return best


# ------------------------------------------------------------------------------------------ entry points


def start_search(space_path: str | Path, study_dir: str | Path, *, storage: str | None = None,
                 trials: int | None = None, timeout: float | None = None, workers: int = 1,
                 limit: int | None = None, progress: bool = True, executor: _workers.Executor | None = None,
                 evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> SearchResult:
    """Create the study folder for ``space_path`` and run the search."""
    space = load_space(space_path)
    study_dir = Path(study_dir)
    if (study_dir / "study.json").exists():
        raise StudyError(f"{study_dir} already holds a study; continue it with `evomerge resume {study_dir}` "
                         "or choose another --study-dir")
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(study_dir)
    open_storage(url)  # fail before writing anything else
    meta = StudyMeta(name=space.name, storage=url, stages=space.stages(), trials=trials or space.trials,
                     timeout=timeout if timeout is not None else space.timeout, stage_trials=dict(space.stage_trials),
                     workers=workers, limit=limit, created=time.time())
    if trials is not None:
        meta.stage_trials = {}
    atomic_write_text(study_dir / SPACE_FILE, yaml.safe_dump(space.data, sort_keys=False))
    write_meta(study_dir, meta)
    return _run(study_dir, meta, space, executor, evaluator_factory, progress, meta.timeout, report)


def open_study_space(study_dir: Path) -> SearchSpace:
    path = study_dir / SPACE_FILE
    if not path.is_file():
        raise StudyError(f"{study_dir} has no {SPACE_FILE}; it was not created by `evomerge search`")
    return load_space(path)


def resume_search(study_dir: str | Path, *, storage: str | None = None, trials: int | None = None,
                  timeout: float | None = None, workers: int | None = None, progress: bool = True,
                  executor: _workers.Executor | None = None, evaluator_factory: Callable[[], Evaluator] | None = None,
                  report: bool = True) -> SearchResult:
    """Continue the study in ``study_dir`` (after Ctrl-C, kill -9, or to extend its budget)."""
    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    if storage:
        meta.storage = storage
    if trials is not None:
        meta.trials, meta.stage_trials = trials, {}
    if workers is not None:
        meta.workers = workers
    write_meta(study_dir, meta)
    space = open_study_space(study_dir)
    return _run(study_dir, meta, space, executor, evaluator_factory, progress,
                timeout if timeout is not None else meta.timeout, report)


def _run(study_dir, meta, space, executor, evaluator_factory, progress, timeout, report) -> SearchResult:
    run = _Run(study_dir, meta, space, executor, evaluator_factory, progress, timeout)
    stages: dict[str, dict[str, Any]] = {}
    complete = False
    try:
        for stage in meta.stages:
            stages[stage] = run.run_stage(stage)
            if stages[stage]["finished"] < stages[stage]["budget"]:
                break
        else:
            complete = True
        # the run ended (budget spent or timeout reached, not Ctrl-C or a crash): the fronts it has
        # are re-scored on held-out now, so a timed overnight run reports held-out scores too; a
        # resume re-scores only what joins the front later
        for stage in stages:
            run.rescore(stage)
    finally:
        run.close()
        if report:
            from evomerge.search.report import write_report

            try:
                write_report(study_dir)
            except Exception as err:  # noqa: BLE001 - never hide the search's own outcome
                print(f"warning: could not write the report: {err}", file=sys.stderr)
    return SearchResult(study_dir, stages, complete)


def rescore_study(study_dir: str | Path, *, force: bool = False, executor: _workers.Executor | None = None,
                  evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> int:
    """Re-score every stage's Pareto front and baselines on the held-out split."""
    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    space = open_study_space(study_dir)
    run = _Run(study_dir, meta, space, executor, evaluator_factory, False, None)
    try:
        n = sum(run.rescore(stage, force=force) for stage in meta.stages)
    finally:
        run.close()
    if report:
        from evomerge.search.report import write_report

        write_report(study_dir)
    return n
