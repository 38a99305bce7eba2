"""The search driver: start a study, resume it, re-score its front on the held-out split.

``start_search`` validates the space, creates the study folder (``study.json``, ``space.yaml``, the
storage), and runs every stage; ``resume_search`` reopens a folder after Ctrl-C or ``kill -9``:
trials left running are marked failed ('interrupted') and retried, completed ones are kept, and
pycma continues from the state stored after its last told generation. Each stage first scores its
baselines (the untuned default point of the space and each source model alone) so the front is
always shown against them. When a run ends (budget spent or timeout reached; not on Ctrl-C) the
Pareto front and the baselines are re-scored on the held-out split and the report is written.

Nothing is created before everything is checked: the options, the space file, the evaluator it
asks for (objectives against the metrics it reports, its suite files), the sampler and its options,
and the sources (their tensors, shapes and vocabularies must fit together), all reported at once.
A start that fails before its first trial removes what it created (never a folder or file that
was there before). ``search``, ``resume`` and ``rescore`` hold the study folder's lock
(:class:`~evomerge.search.study.StudyLock`); ``resume`` persists changed options in study.json
only once the storage opened and the study was found in it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import TrialState

from evomerge.errors import ConfigError, EvomergeError, Problem, StudyError
from evomerge.io_utils import atomic_write_text
from evomerge.recipe import DataFlowRecipe, PathStep, Recipe, parse_recipe, recipe_to_yaml
from evomerge.search import dims as D
from evomerge.search.evaluation import Evaluator, check_device, make_evaluator
from evomerge.search.objectives import COSTS, study_directions, utility
from evomerge.search.optimizers import PyCMA, make_sampler
from evomerge.search.pareto import front_trials
from evomerge.search.runner import Candidate, StageRunner
from evomerge.search.space import PS_WINNER, SearchSpace, SpaceParts, load_space, source_problems
from evomerge.search.study import (META_FILE, SPACE_FILE, StudyLock, StudyMeta, check_study_exists, create_or_load,
                                   default_storage, finished, get_attr, heldout_records, meta_text, new_trial,
                                   normalize_storage_url, open_storage, read_meta, recover_interrupted, set_attr,
                                   sqlite_path, study_names, write_meta)
from evomerge.workers import base as _workers  # module, not names: evomerge.workers may be mid-import

DEFAULT_TRIALS = 50
_POLL = 5.0  # seconds between liveness checks of the executor while the held-out re-score waits

# (space, meta, study folder) -> the executor of the run (e.g. Ray workers logging into the folder)
ExecutorFactory = Callable[[SearchSpace, StudyMeta, Path], "_workers.Executor | None"]


@dataclasses.dataclass
class SearchResult:
    study_dir: Path
    stages: dict[str, dict[str, Any]]  # per stage: finished, failed, best trial, first errors
    complete: bool  # every stage reached its trial budget

    def failed_stages(self) -> list[str]:
        """Stages in which every finished search trial failed (nothing was scored)."""
        return [stage for stage, s in self.stages.items() if s["finished"] and s["failed"] == s["finished"]]


# ---------------------------------------------------------------------------------------- checking


def option_problems(*, trials: Any = None, workers: Any = None, limit: Any = None,
                    timeout: Any = None) -> list[Problem]:
    """Problems of the run options (named as the command-line flags that set them)."""
    problems: list[Problem] = []

    def whole(value: Any, flag: str, hint: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(Problem(flag, f"expected a whole number >= 1, got {value!r}", hint))

    whole(trials, "--trials", "the total trial budget; leave it out to use the space's budget.trials")
    whole(workers, "--workers", "candidates scored at once: 1 (in this process) or more (Ray workers)")
    whole(limit, "--limit", "items scored per task; leave it out to score every item")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        problems.append(Problem("--timeout", f"expected a positive duration, got {timeout!r}",
                                "e.g. 8h, 1h30m, 45m, 90s; leave it out for no time limit"))
    return problems


def _check_options(**options: Any) -> None:
    problems = option_problems(**options)
    if problems:
        raise ConfigError(problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.where, p.message) not in seen:
            seen.add((p.where, p.message))
            out.append(p)
    return out


def _located(problems: list[Problem], source: str) -> list[Problem]:
    """``problems`` located in ``source`` (those that do not name a file yet)."""
    return [p if p.where.startswith(source) or "/" in p.where.split(":")[0] else
            Problem(f"{source}: {p.where}", p.message, p.hint) for p in problems]


def _optimizer_problems(parts: SpaceParts) -> list[Problem]:
    """The sampler built as the run will build it (Optuna), or pycma's options and dimensions checked."""
    cfg, src = parts.optimizer, parts.source
    n_obj = len(study_directions(list(parts.objectives)))
    problems: list[Problem] = []
    if not cfg.is_pycma:
        if cfg.name == "cmaes" and n_obj > 1:
            return []  # the file check says so already
        try:
            make_sampler(cfg, n_objectives=n_obj)
        except ConfigError as err:
            problems += _located(err.problems, src)
        except Exception as err:  # noqa: BLE001 - any sampler failure is a problem of the file
            problems.append(Problem(f"{src}: optimizer", f"cannot build the sampler {cfg.name}: "
                                    f"{type(err).__name__}: {err}"))
        return problems
    if n_obj > 1:
        return []  # the file check says so already
    import cma
    import numpy as np

    bad = [k for k in cfg.options if k not in cma.CMAOptions()]
    if bad:
        return [Problem(f"{src}: optimizer.options", f"unknown pycma option(s): {', '.join(map(str, bad))}",
                        "see `python -c 'import cma; print(cma.CMAOptions())'`")]
    for stage, sp in parts.stage_spaces().items():
        dims = sp.dims()
        if len(dims) < 2:
            problems.append(Problem(f"{src}: optimizer.name", f"pycma needs at least 2 search dimensions, the "
                                    f"{stage} stage has {len(dims)}", "search more parameters, or use tpe / random"))
            continue
        opts = {**cfg.options, "bounds": [0.0, 1.0], "seed": float("nan"),
                "randn": np.random.RandomState(cfg.seed).randn, "verb_log": 0, "verbose": -9, "verb_disp": 0}
        if cfg.popsize:
            opts["popsize"] = cfg.popsize
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                es = cma.CMAEvolutionStrategy(D.encode(dims, sp.default_params()), cfg.sigma0, opts)
                es.ask()
                error = None
            except Exception as err:  # noqa: BLE001 - pycma raises many kinds for bad option values
                error = f"{type(err).__name__}: {err}"
        # pycma only warns about an option value it cannot read ("... is not a safe string")
        said = list(dict.fromkeys(str(w.message).split(" (known words")[0] for w in caught
                                  if "cma" in (w.filename or "") and issubclass(w.category, UserWarning)))
        if error or said:
            problems.append(Problem(f"{src}: optimizer.options", f"pycma cannot use the options {cfg.options}: "
                                    + "; ".join(([error] if error else []) + said[:3]),
                                    "check the option values (numbers, True / False)"))
            break
    return problems


def _space_checks(evaluator_factory: Callable[[], Evaluator] | None, probes: list[Evaluator], *,
                  local: bool) -> Callable[[SpaceParts], list[Problem]]:
    """The checks of a space beyond its file (see :func:`check_space`); a built evaluator goes to ``probes``."""

    def checks(parts: SpaceParts) -> list[Problem]:
        src = parts.source
        problems: list[Problem] = []
        if parts.evaluation is not None:
            probe = None
            try:
                probe = evaluator_factory() if evaluator_factory else make_evaluator(
                    parts.evaluation, source=f"{src}: evaluation")
            except ConfigError as err:
                problems += _located(err.problems, src)
            except EvomergeError as err:
                problems.append(Problem(f"{src}: evaluation", str(err)))
            except Exception as err:  # noqa: BLE001 - a third-party evaluator may raise anything
                problems.append(Problem(f"{src}: evaluation", f"cannot build the evaluator: "
                                        f"{type(err).__name__}: {err}"))
            if probe is not None:
                probes.append(probe)
                try:
                    names = set(probe.metric_names())
                except Exception as err:  # noqa: BLE001
                    names = set()
                    problems.append(Problem(f"{src}: evaluation", f"the evaluator cannot list its metrics: "
                                            f"{type(err).__name__}: {err}"))
                for i, o in enumerate(parts.objectives):
                    if o.kind == "metric" and names and o.key not in names:
                        problems.append(Problem(f"{src}: objectives[{i}].metric", f"unknown objective metric "
                                                f"'{o.key}'", f"the evaluator reports: {', '.join(sorted(names))}; "
                                                f"costs: {', '.join(COSTS)}"))
            if local and evaluator_factory is None and "device" in parts.evaluation:
                problems += check_device(parts.evaluation["device"], f"{src}: evaluation.device", local=True)
        if parts.optimizer is not None and parts.objectives:
            problems += _optimizer_problems(parts)
        problems += source_problems(parts)
        return _dedupe(problems)

    return checks


def check_space(path: str | Path, *, evaluator_factory: Callable[[], Evaluator] | None = None,
                base_dirs: list[Path] | None = None, local: bool = True) -> tuple[SearchSpace, Evaluator]:
    """Load ``path`` and check everything a run needs, every problem reported at once (one
    :class:`ConfigError`): the file, the evaluator it asks for and the objectives against the metrics
    it reports, the sampler and its options, and the sources' compatibility. Returns the space and
    the evaluator built to check it (the run's first evaluator). ``local``: candidates are scored in
    this process (a CUDA device asked for must be here)."""
    probes: list[Evaluator] = []
    space = load_space(path, base_dirs=base_dirs, checks=_space_checks(evaluator_factory, probes, local=local))
    return space, probes[0]


def _study_bases(study_dir: Path) -> list[Path]:
    """Where relative paths of an older study's space.yaml are looked for: the current directory
    (where they were written from, as before), then the study folder's parents (results/<name> sits
    in the folder the search ran from). New studies record absolute paths."""
    return [Path.cwd(), *Path(study_dir).resolve().parents]


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


class _Run:
    def __init__(self, study_dir: Path, meta: StudyMeta, space: SearchSpace, executor: _workers.Executor | None,
                 storage, probe: Evaluator, evaluator_factory, progress: bool, timeout: float | None,
                 own_executor: bool = False):
        self.dir, self.meta, self.space, self.progress = study_dir, meta, space, progress
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.storage = storage
        self.probe = probe
        make = evaluator_factory or (lambda: make_evaluator(space.evaluation, source=f"{space.source}: evaluation"))
        pool = [probe]  # the evaluator built to check the space is the first one used
        self.executor = executor or _workers.InProcessExecutor(lambda: pool.pop() if pool else make(),
                                                               workers=meta.workers)
        self._own_executor = executor is None or own_executor

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
        failed = sum(t.state == TrialState.FAIL for t in finished(study))
        return {"finished": n_done, "budget": budget, "failed": failed,
                "errors": _first_errors(study) if failed else [],
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
        # each result is stored as soon as it is in (a killed re-score keeps what it finished, and
        # the next resume or rescore scores only the rest); at most `capacity` jobs in flight
        pending = list(todo)
        running: dict[Any, int] = {}
        while pending or running:
            while pending and len(running) < max(1, int(getattr(self.executor, "capacity", 1))):
                n = pending.pop(0)
                recipe = parse_recipe(yaml.safe_load(todo[n].user_attrs["recipe"]))
                running[self.executor.submit(_workers.Job(n, recipe, "held-out"))] = n
            done, _ = wait(list(running), timeout=_POLL, return_when=FIRST_COMPLETED)
            if not done and getattr(self.executor, "check", None) is not None:
                self.executor.check()  # RunInterrupted when the workers are gone (what is stored stays)
            for fut in done:
                n = running.pop(fut)
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


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_new_study_dir(study_dir: Path) -> None:
    """A :class:`StudyError` unless ``study_dir`` can become a new study folder."""
    if study_dir.exists() and not study_dir.is_dir():
        raise StudyError(f"--study-dir {study_dir} is a file, not a folder; give a folder (it is created "
                         "when missing)")
    if (study_dir / META_FILE).exists():
        raise StudyError(f"{study_dir} already holds a study; continue it with `evomerge resume {study_dir}` "
                         "or choose another --study-dir")
    anc = study_dir
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise StudyError(f"cannot create the study folder {study_dir}: {anc} is a file, not a folder; "
                         "choose another --study-dir")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise StudyError(f"cannot create the study folder {study_dir}: no permission to write in {anc}; "
                         "choose another --study-dir")


def _make_dirs(study_dir: Path) -> list[Path]:
    """Create ``study_dir`` and its missing parents; the folders this call created, outermost first."""
    missing = []
    p = study_dir
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            if not d.is_dir():
                raise StudyError(f"cannot create the study folder {study_dir}: {d} is a file") from None
        except OSError as err:
            for c in reversed(created):
                try:
                    c.rmdir()
                except OSError:
                    pass
            raise StudyError(f"cannot create the study folder {study_dir}: {err.strerror or err} ({d})") from None
    return created


def _check_names_free(storage, url: str, names: list[str], study_dir: Path) -> list[str]:
    """The stage study names already in ``storage``; a :class:`StudyError` when one of them has
    trials (a study of another folder, or of this one whose study.json was lost)."""
    have = set(study_names(storage))
    found = [n for n in names if n in have]
    for n in found:
        count = len(optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False))
        if count:
            raise StudyError(f"the storage {url} already holds a study named {n!r} with {count} trial(s) (a "
                             f"study of another folder, or {study_dir} lost its {META_FILE}); set another "
                             "`name:` in the space, use another --storage, or resume the folder that owns it")
    return found


class _Start:
    """What a starting search created, to remove it when the start fails before its first trial."""

    def __init__(self, study_dir: Path, created_dirs: list[Path], before: set[str]):
        self.dir, self.created_dirs, self.before = study_dir, created_dirs, before
        self.storage = None
        self.stage_names: list[str] = []  # every stage study of the search
        self.names: list[str] = []  # those this start created in the storage
        self.armed = False

    def has_trials(self) -> bool:
        if self.storage is None:
            return False
        try:
            have = set(study_names(self.storage))
            return any(optuna.load_study(study_name=n, storage=self.storage).get_trials(deepcopy=False)
                       for n in self.stage_names if n in have)
        except Exception:  # noqa: BLE001 - cannot tell: keep everything
            return True

    def undo(self) -> None:
        if self.storage is not None:
            for n in self.names:
                try:
                    optuna.delete_study(study_name=n, storage=self.storage)
                except Exception:  # noqa: BLE001 - best effort; the files go below
                    pass
            try:
                self.storage.engine.dispose()
            except Exception:  # noqa: BLE001
                pass
        if self.dir in self.created_dirs:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for name in set(os.listdir(self.dir)) - self.before:
                p = self.dir / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for d in reversed(self.created_dirs):
            if d != self.dir:
                try:
                    d.rmdir()  # only when empty: another process may have put something there
                except OSError:
                    pass


def start_search(space_path: str | Path, study_dir: str | Path | None = None, *, storage: str | None = None,
                 trials: int | None = None, timeout: float | None = None, workers: int = 1,
                 limit: int | None = None, progress: bool = True, executor: _workers.Executor | None = None,
                 executor_factory: ExecutorFactory | None = None,
                 evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> SearchResult:
    """Check everything, create the study folder for ``space_path`` (default ``results/<name>``) and
    run the search. ``executor``: the caller's (not shut down here); ``executor_factory(space, meta,
    study_dir)``: builds one once the study exists (shut down here)."""
    _check_options(trials=trials, workers=workers, limit=limit, timeout=timeout)
    if study_dir is not None and not str(study_dir).strip():
        raise ConfigError(Problem("--study-dir", "is empty", "give a folder, or leave it out for results/<name>"))
    if study_dir is not None:
        study_dir = _abs(study_dir)
        _check_new_study_dir(study_dir)
    url = normalize_storage_url(storage) if storage is not None else None
    local = executor is None and executor_factory is None
    space, probe = check_space(space_path, evaluator_factory=evaluator_factory, local=local)
    if study_dir is None:
        study_dir = _abs(Path("results") / space.name)
        _check_new_study_dir(study_dir)
    # the user's storage is opened before anything is made, unless it is a SQLite file inside the
    # study folder still to be created
    db = sqlite_path(url) if url is not None else None
    inside = db is not None and not db.parent.exists() and _abs(db).parent == study_dir
    ext = open_storage(url) if url is not None and not inside else None
    meta = StudyMeta(name=space.name, storage=url or default_storage(study_dir), stages=space.stages(),
                     trials=trials or space.trials, timeout=timeout if timeout is not None else space.timeout,
                     stage_trials=dict(space.stage_trials) if trials is None else {},
                     workers=workers, limit=limit, created=time.time())
    names = [meta.study_name(s) for s in meta.stages]
    if ext is not None:
        _check_names_free(ext, url, names, study_dir)
    created_dirs = _make_dirs(study_dir)
    before = set(os.listdir(study_dir))
    try:
        lock = StudyLock.acquire(study_dir, "search")
    except BaseException:
        for d in reversed(created_dirs):  # made just now and still empty: not ours to keep
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    start = _Start(study_dir, created_dirs, before)
    try:
        if (study_dir / META_FILE).exists():  # created while this start was checking
            raise StudyError(f"{study_dir} already holds a study; continue it with `evomerge resume {study_dir}` "
                             "or choose another --study-dir")
        start.armed = True
        st = ext if ext is not None else open_storage(meta.storage)
        start.storage = st
        have = _check_names_free(st, meta.storage, names, study_dir)
        start.stage_names, start.names = names, [n for n in names if n not in have]
        directions = study_directions(list(space.objectives))
        metric_names = [o.name for o in space.objectives] if len(directions) == len(space.objectives) else None
        for n in names:  # every stage's study now: a later stage's exists before it starts
            create_or_load(st, n, directions, None, metric_names)
        atomic_write_text(study_dir / SPACE_FILE, yaml.safe_dump(space.data, sort_keys=False))
        write_meta(study_dir, meta)  # last: a folder with study.json holds a complete study
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, meta, study_dir), True
        return _run(study_dir, meta, space, exe, st, probe, evaluator_factory, progress, meta.timeout, report,
                    own_executor=own)
    except BaseException:
        if start.armed and not start.has_trials():
            start.undo()  # failed before its first trial: leave nothing that looks like a study
        raise
    finally:
        lock.release()


def open_study_space(study_dir: Path, **kw: Any) -> SearchSpace:
    """The study's space.yaml loaded (relative paths of older studies: see :func:`_study_bases`)."""
    path = Path(study_dir) / SPACE_FILE
    if not path.is_file():
        raise StudyError(f"{study_dir} has no {SPACE_FILE}; it was not created by `evomerge search`")
    return load_space(path, base_dirs=_study_bases(Path(study_dir)), **kw)


def _open_existing(study_dir: Path, meta: StudyMeta, *, evaluator_factory, local: bool):
    """The study's storage (which must hold it) and its space, checked as a start checks it."""
    st = open_storage(meta.storage, create=False)
    check_study_exists(st, meta, study_dir)
    if not (study_dir / SPACE_FILE).is_file():
        raise StudyError(f"{study_dir} has no {SPACE_FILE}; it was not created by `evomerge search`")
    space, probe = check_space(study_dir / SPACE_FILE, evaluator_factory=evaluator_factory,
                               base_dirs=_study_bases(study_dir), local=local)
    return st, space, probe


def resume_search(study_dir: str | Path, *, storage: str | None = None, trials: int | None = None,
                  timeout: float | None = None, workers: int | None = None, progress: bool = True,
                  executor: _workers.Executor | None = None, executor_factory: ExecutorFactory | None = None,
                  evaluator_factory: Callable[[], Evaluator] | None = None,
                  report: bool = True) -> SearchResult:
    """Continue the study in ``study_dir`` (after Ctrl-C, kill -9, or to extend its budget). Changed
    options are written to study.json only after the storage opened and holds the study, and the
    space checked: a failed resume leaves study.json as it was."""
    _check_options(trials=trials, workers=workers, timeout=timeout)
    study_dir = _abs(study_dir)
    meta = read_meta(study_dir)
    with StudyLock.acquire(study_dir, "resume"):
        new = dataclasses.replace(meta, stage_trials=dict(meta.stage_trials), stages=list(meta.stages))
        if storage is not None:
            new.storage = normalize_storage_url(storage)
        if trials is not None:
            new.trials, new.stage_trials = trials, {}
        if workers is not None:
            new.workers = workers
        local = executor is None and executor_factory is None
        st, space, probe = _open_existing(study_dir, new, evaluator_factory=evaluator_factory, local=local)
        if meta_text(new) != meta_text(meta):
            write_meta(study_dir, new)
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, new, study_dir), True
        return _run(study_dir, new, space, exe, st, probe, evaluator_factory, progress,
                    timeout if timeout is not None else new.timeout, report, own_executor=own)


def _run(study_dir, meta, space, executor, storage, probe, evaluator_factory, progress, timeout, report, *,
         own_executor: bool = False) -> SearchResult:
    run = _Run(study_dir, meta, space, executor, storage, probe, evaluator_factory, progress, timeout,
               own_executor=own_executor)
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
                  executor_factory: ExecutorFactory | None = None,
                  evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> int:
    """Re-score every stage's Pareto front and baselines on the held-out split."""
    study_dir = _abs(study_dir)
    meta = read_meta(study_dir)
    with StudyLock.acquire(study_dir, "rescore"):
        local = executor is None and executor_factory is None
        st, space, probe = _open_existing(study_dir, meta, evaluator_factory=evaluator_factory, local=local)
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, meta, study_dir), True
        run = _Run(study_dir, meta, space, exe, st, probe, evaluator_factory, False, None, own_executor=own)
        try:
            have = set(study_names(st))
            n = sum(run.rescore(stage, force=force) for stage in meta.stages if meta.study_name(stage) in have)
        finally:
            run.close()
        if report:
            from evomerge.search.report import write_report

            write_report(study_dir)
    return n
