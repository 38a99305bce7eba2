"""The search driver: start a study, resume it, re-score its front on the held-out split.

``start_search`` validates the space, creates the study folder (``study.json``, ``space.yaml``, the
storage), and runs every stage; ``resume_search`` reopens a folder after Ctrl-C or ``kill -9``:
trials left running are marked failed ('interrupted') and retried, completed ones are kept, and
pycma continues from the state stored after its last told generation. Each stage first scores its
baselines (the untuned default point of the space and each source model alone) so the front is
always shown against them (:mod:`evomerge.search.stages`). When a run ends (budget spent or timeout
reached; not on Ctrl-C) the Pareto front and the baselines are re-scored on the held-out split and
the report is written.

Nothing is created before everything is checked (:mod:`evomerge.search.checks`): the options, the
space file, the evaluator it asks for (objectives against the metrics it reports, its suite files),
the sampler and its options, and the sources (their tensors, shapes and vocabularies must fit
together), all reported at once. A start that fails before its first trial removes what it created
(never a folder or file that was there before: :mod:`evomerge.search.new_study`). ``search``,
``resume`` and ``rescore`` hold the study folder's lock (:class:`~evomerge.search.study.StudyLock`);
``resume`` persists changed options in study.json only once the storage opened and the study was
found in it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from evomerge.errors import ConfigError, Problem, StudyError
from evomerge.io_utils import atomic_write_text
from evomerge.search.checks import check_options, check_space
from evomerge.evaluate.evaluators import Evaluator
from evomerge.search.new_study import StartUndo, check_names_free, check_new_study_dir, make_dirs
from evomerge.search.objectives import study_directions, study_metric_names
from evomerge.search.paths import study_bases
from evomerge.search.space import SearchSpace, load_space
from evomerge.search.runner import CTRL_C
from evomerge.search.stages import StudyRun
from evomerge.search.study import (META_FILE, SPACE_FILE, StudyLock, StudyMeta, check_study_exists, create_or_load,
                                   default_storage, meta_text, normalize_storage_url, open_storage, read_meta,
                                   sqlite_path, study_names, write_meta)
from evomerge.workers.base import Executor

# (space, meta, study folder) -> the executor of the run (e.g. Ray workers logging into the folder)
ExecutorFactory = Callable[[SearchSpace, StudyMeta, Path], "Executor | None"]


@dataclasses.dataclass
class SearchResult:
    study_dir: Path
    stages: dict[str, dict[str, Any]]  # per stage: finished, failed, best trial, first errors
    complete: bool  # every stage reached its trial budget

    def failed_stages(self) -> list[str]:
        """Stages in which every finished search trial failed (nothing was scored)."""
        return [stage for stage, s in self.stages.items() if s["finished"] and s["failed"] == s["finished"]]


# ------------------------------------------------------------------------------------------ entry points


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def start_search(space_path: str | Path, study_dir: str | Path | None = None, *, storage: str | None = None,
                 trials: int | None = None, timeout: float | None = None, workers: int = 1,
                 limit: int | None = None, progress: bool = True, executor: Executor | None = None,
                 executor_factory: ExecutorFactory | None = None,
                 evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> SearchResult:
    """Check everything, create the study folder for ``space_path`` (default ``results/<name>``) and
    run the search. ``executor``: the caller's (not shut down here); ``executor_factory(space, meta,
    study_dir)``: builds one once the study exists (shut down here)."""
    check_options(trials=trials, workers=workers, limit=limit, timeout=timeout)
    if study_dir is not None and not str(study_dir).strip():
        raise ConfigError(Problem("--study-dir", "is empty", "give a folder, or leave it out for results/<name>"))
    if study_dir is not None:
        study_dir = _abs(study_dir)
        check_new_study_dir(study_dir)
    url = normalize_storage_url(storage) if storage is not None else None
    local = executor is None and executor_factory is None
    space, probe = check_space(space_path, evaluator_factory=evaluator_factory, local=local)
    if study_dir is None:
        study_dir = _abs(Path("results") / space.name)
        check_new_study_dir(study_dir)
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
        check_names_free(ext, url, names, study_dir)
    created_dirs = make_dirs(study_dir)
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
    start = StartUndo(study_dir, created_dirs, before)
    try:
        if (study_dir / META_FILE).exists():  # created while this start was checking
            raise StudyError(f"{study_dir} already holds a study; continue it with `evomerge resume {study_dir}` "
                             "or choose another --study-dir")
        start.armed = True
        opened = ext if ext is not None else open_storage(meta.storage)
        start.storage = opened
        have = check_names_free(opened, meta.storage, names, study_dir)
        start.stage_names, start.names = names, [n for n in names if n not in have]
        directions = study_directions(list(space.objectives))
        metric_names = study_metric_names(list(space.objectives))
        for n in names:  # every stage's study now: a later stage's exists before it starts
            create_or_load(opened, n, directions, None, metric_names)
        atomic_write_text(study_dir / SPACE_FILE, yaml.safe_dump(space.data, sort_keys=False))
        write_meta(study_dir, meta)  # last: a folder with study.json holds a complete study
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, meta, study_dir), True
        return _run(study_dir, meta, space, exe, opened, probe, evaluator_factory, progress, meta.timeout, report,
                    own_executor=own)
    except BaseException:
        if start.armed and not start.has_trials():
            start.undo()  # failed before its first trial: leave nothing that looks like a study
        raise
    finally:
        lock.release()


def _space_file(study_dir: Path) -> Path:
    """The study's space.yaml, which must exist."""
    path = Path(study_dir) / SPACE_FILE
    if not path.is_file():
        raise StudyError(f"{study_dir} has no {SPACE_FILE}; it was not created by `evomerge search`")
    return path


def open_study_space(study_dir: Path, **kw: Any) -> SearchSpace:
    """The study's space.yaml loaded (relative paths of older studies: see :func:`study_bases`)."""
    return load_space(_space_file(study_dir), base_dirs=study_bases(Path(study_dir)), **kw)


def _open_existing(study_dir: Path, meta: StudyMeta, *, evaluator_factory, local: bool):
    """The study's storage (which must hold it) and its space, checked as a start checks it."""
    opened = open_storage(meta.storage, create=False)
    check_study_exists(opened, meta, study_dir)
    space, probe = check_space(_space_file(study_dir), evaluator_factory=evaluator_factory,
                               base_dirs=study_bases(study_dir), local=local)
    return opened, space, probe


def resume_search(study_dir: str | Path, *, storage: str | None = None, trials: int | None = None,
                  timeout: float | None = None, workers: int | None = None, progress: bool = True,
                  executor: Executor | None = None, executor_factory: ExecutorFactory | None = None,
                  evaluator_factory: Callable[[], Evaluator] | None = None,
                  report: bool = True) -> SearchResult:
    """Continue the study in ``study_dir`` (after Ctrl-C, kill -9, or to extend its budget). Changed
    options are written to study.json only after the storage opened and holds the study, and the
    space checked: a failed resume leaves study.json as it was."""
    check_options(trials=trials, workers=workers, timeout=timeout)
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
        opened, space, probe = _open_existing(study_dir, new, evaluator_factory=evaluator_factory, local=local)
        if meta_text(new) != meta_text(meta):
            write_meta(study_dir, new)
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, new, study_dir), True
        return _run(study_dir, new, space, exe, opened, probe, evaluator_factory, progress,
                    timeout if timeout is not None else new.timeout, report, own_executor=own)


def _run(study_dir, meta, space, executor, storage, probe, evaluator_factory, progress, timeout, report, *,
         own_executor: bool = False) -> SearchResult:
    run = StudyRun(study_dir, meta, space, executor, storage, probe, evaluator_factory, progress, timeout,
                   own_executor=own_executor)
    stages: dict[str, dict[str, Any]] = {}
    complete = False
    try:
        with CTRL_C.watch():  # a Ctrl-C is never lost, even where a library swallows it
            for stage in meta.stages:
                stages[stage] = run.run_stage(stage)
                if stages[stage]["finished"] < stages[stage]["budget"]:
                    break
            else:
                complete = True
            # the run ended (budget spent or timeout reached, not Ctrl-C or a crash): the fronts it
            # has are re-scored on held-out now, so a timed overnight run reports held-out scores
            # too; a resume re-scores only what joins the front later
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


def rescore_study(study_dir: str | Path, *, force: bool = False, executor: Executor | None = None,
                  executor_factory: ExecutorFactory | None = None,
                  evaluator_factory: Callable[[], Evaluator] | None = None, report: bool = True) -> int:
    """Re-score every stage's Pareto front and baselines on the held-out split."""
    study_dir = _abs(study_dir)
    meta = read_meta(study_dir)
    with StudyLock.acquire(study_dir, "rescore"):
        local = executor is None and executor_factory is None
        opened, space, probe = _open_existing(study_dir, meta, evaluator_factory=evaluator_factory, local=local)
        exe, own = executor, False
        if exe is None and executor_factory is not None:
            exe, own = executor_factory(space, meta, study_dir), True
        run = StudyRun(study_dir, meta, space, exe, opened, probe, evaluator_factory, False, None, own_executor=own)
        try:
            have = set(study_names(opened))
            started = [stage for stage in meta.stages if meta.study_name(stage) in have]
            for stage in started:  # a study from before winners were chosen on validation gets its choice
                run.select(stage)
            n = sum(run.rescore(stage, force=force) for stage in started)
        finally:
            run.close()
        if report:
            from evomerge.search.report import write_report

            write_report(study_dir)
    return n
