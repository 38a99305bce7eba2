"""`evomerge search | resume | status | export | report | rescore`: thin wrappers over the library.

Each ``*_command`` takes plain arguments and returns an exit code; errors are raised as
:class:`~evomerge.errors.EvomergeError` for the main CLI to print (exit 2). ``register(subparsers)``
adds the subcommands to an argparse parser (``evomerge.cli`` appends it to ``_EXTRA_COMMANDS``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from evomerge.errors import ConfigError, Problem, StudyError


def _summary(result) -> None:
    """Print the outcome; a :class:`StudyError` (exit 2) when every trial of a stage failed.

    A search in which no candidate could be scored is not a success: almost always the input is at
    fault (a model or an evaluator setting the up-front checks cannot see), so it exits like bad
    input, with the first errors, after the study (every trial and its error) was kept and the
    report written."""
    for stage, s in result.stages.items():
        best = "" if s["best_trial"] is None else f", best trial {s['best_trial']} ({s['best_utility']:.4g})"
        failed = f", {s['failed']} failed" if s.get("failed") else ""
        print(f"[{stage}] {s['finished']}/{s['budget']} trials{failed}{best}", file=sys.stderr)
    bad = result.failed_stages()
    if not result.complete and not bad:
        print(f"stopped before the budget was spent; continue with `evomerge resume {result.study_dir}`",
              file=sys.stderr)
    print(f"results in {result.study_dir}", file=sys.stderr)
    if bad:
        lines = []
        for stage in bad:
            s = result.stages[stage]
            lines.append(f"every trial of stage {stage} failed ({s['failed']} of {s['finished']}); first errors:")
            lines += [f"  - {e}" for e in s.get("errors") or ["(no error recorded)"]]
        raise StudyError("\n".join(lines) + f"\nthe study is kept in {result.study_dir} (trials.csv lists every "
                         "error); fix the cause, then continue with `evomerge resume "
                         f"{result.study_dir} --trials N`, or start a new search")


def _duration(text: str | None) -> float | None:
    from evomerge.search.space import parse_duration

    return parse_duration(text)


def _wants_ray(workers: int | None, ray: dict | None) -> bool:
    import os

    ray = dict(ray or {})
    return bool(ray.get("address") or os.environ.get("RAY_ADDRESS") or (workers or 1) > 1)


def _ray_executor(space, study_dir, workers: int | None, ray: dict | None):
    """A :class:`RayExecutor` when ``--workers`` > 1, ``--address`` or ``$RAY_ADDRESS`` ask for one."""
    ray = dict(ray or {})
    if not _wants_ray(workers, ray):
        return None
    from evomerge.workers.ray_executor import RayExecutor

    return RayExecutor.for_space(space, workers=workers if (workers or 1) > 1 else None,
                                 log_dir=study_dir, **ray)


def _check_flags(*, trials=None, workers=None, limit=None, timeout: str | None = None,
                 ray: dict | None = None) -> float | None:
    """Every problem of the numeric flags at once (a :class:`ConfigError` naming the flags, exit 2);
    returns the timeout in seconds."""
    from evomerge.search.checks import option_problems

    problems: list[Problem] = []
    seconds = None
    if timeout is not None:
        try:
            seconds = _duration(timeout)
        except ConfigError as err:
            problems += [Problem("--timeout", p.message, p.hint) for p in err.problems]
    problems += option_problems(trials=trials, workers=workers, limit=limit, timeout=seconds)
    ray = ray or {}
    for key, flag in (("gpus_per_worker", "--ray-gpus-per-worker"), ("cpus_per_worker", "--ray-cpus-per-worker")):
        v = ray.get(key)
        if v is not None and not (math.isfinite(v) and v >= 0):
            problems.append(Problem(flag, f"expected a number >= 0, got {v!r}"))
    for key, flag in RAY_TIMEOUT_FLAGS:
        v = ray.get(key)
        if v is not None and not (math.isfinite(v) and v > 0):
            problems.append(Problem(flag, f"expected a number of seconds > 0, got {v!r}"))
    if ray.get("max_retries") is not None and ray["max_retries"] < 0:
        problems.append(Problem("--ray-max-retries", f"expected a whole number >= 0, got {ray['max_retries']!r}"))
    if problems:
        raise ConfigError(problems)
    return seconds


def search_command(space: str, study_dir: str | None = None, *, trials: int | None = None,
                   timeout: str | None = None, storage: str | None = None, workers: int = 1,
                   limit: int | None = None, quiet: bool = False, ray: dict | None = None) -> int:
    from evomerge.search.driver import start_search

    seconds = _check_flags(trials=trials, workers=workers, limit=limit, timeout=timeout, ray=ray)

    def make(space_, meta, folder):  # built once the study exists (its folder holds the workers' logs)
        return _ray_executor(space_, str(folder), workers, ray)

    result = start_search(space, study_dir, storage=storage, trials=trials, timeout=seconds,
                          workers=workers, limit=limit, progress=not quiet,
                          executor_factory=make if _wants_ray(workers, ray) else None)
    _summary(result)
    return 0


def resume_command(study_dir: str, *, trials: int | None = None, timeout: str | None = None,
                   storage: str | None = None, workers: int | None = None, quiet: bool = False,
                   ray: dict | None = None) -> int:
    from evomerge.search.driver import resume_search

    seconds = _check_flags(trials=trials, workers=workers, timeout=timeout, ray=ray)

    def make(space_, meta, folder):
        return _ray_executor(space_, str(folder), meta.workers, ray)

    result = resume_search(study_dir, storage=storage, trials=trials, timeout=seconds, workers=workers,
                           progress=not quiet, executor_factory=make if _wants_ray(
                               workers if workers is not None else _recorded_workers(study_dir), ray) else None)
    _summary(result)
    return 0


def _recorded_workers(study_dir: str) -> int:
    from evomerge.search.study import read_meta

    return read_meta(Path(study_dir)).workers


def add_ray_options(command) -> None:
    group = command.add_argument_group("Ray workers (used with --workers N > 1, --address or $RAY_ADDRESS)")
    group.add_argument("--address", default=None,
                       help="existing Ray cluster, e.g. ray://head:10001 (default $RAY_ADDRESS, else a local instance)")
    group.add_argument("--ray-gpus-per-worker", type=float, default=None,
                       help="GPUs per worker, fractions share a GPU (default 1 if the cluster has GPUs, else 0)")
    group.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    group.add_argument("--ray-sources", choices=["shared", "object-store"], default="shared",
                       help="workers read models from paths all nodes share, or get them from the driver")
    group.add_argument("--ray-residency", choices=["device", "host"], default="device",
                       help="sources on each worker's device, or in host memory streamed per tensor (big models)")
    group.add_argument("--ray-max-retries", type=int, default=2,
                       help="retries of a candidate whose worker died or ran out of memory (default 2)")
    group.add_argument("--ray-dashboard", action="store_true", help="start the Ray dashboard (local instance)")
    group.add_argument("--ray-start-timeout", type=float, default=None, metavar="S",
                       help="seconds a worker may take to start and load its sources (default 600)")
    group.add_argument("--ray-restart-timeout", type=float, default=None, metavar="S",
                       help="seconds a lost worker has to come back before it no longer counts "
                       "(default 60 + twice its first start-up)")
    group.add_argument("--ray-ping-timeout", type=float, default=None, metavar="S",
                       help="seconds a busy worker may leave a ping unanswered before it is restarted (default 120)")


# RayExecutor liveness arguments settable from the command line (unset flags keep its defaults)
RAY_TIMEOUT_FLAGS = (("start_timeout", "--ray-start-timeout"), ("restart_timeout", "--ray-restart-timeout"),
                     ("ping_timeout", "--ray-ping-timeout"))


def ray_args(a) -> dict:
    out = {"address": a.address, "gpus_per_worker": a.ray_gpus_per_worker, "cpus_per_worker": a.ray_cpus_per_worker,
           "sources": a.ray_sources, "residency": a.ray_residency, "max_retries": a.ray_max_retries,
           "dashboard": a.ray_dashboard}
    for key, flag in RAY_TIMEOUT_FLAGS:
        value = getattr(a, flag[2:].replace("-", "_"))
        if value is not None:
            out[key] = value
    return out


def status_command(study_dir: str, *, as_json: bool = False) -> int:
    from evomerge.search.report import format_status, status

    st = status(study_dir)
    print(json.dumps(st, indent=2) if as_json else format_status(st))
    return 0


def export_command(study_dir: str, out: str, *, trial: int | None = None, best: bool = False,
                   objective: str | None = None, fmt: str = "evomerge", stage: str | None = None) -> int:
    from evomerge.search.report import export_recipe

    if trial is not None and (best or objective):
        raise ConfigError(Problem("export", "give either --trial N or --best [--objective X], not both"))
    if trial is not None and trial < 0:
        raise ConfigError(Problem("--trial", f"expected a trial number >= 0, got {trial}"))
    path = export_recipe(study_dir, out, trial=trial, objective=objective, fmt=fmt, stage=stage)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def report_command(study_dir: str) -> int:
    from evomerge.search.report import write_report

    for path in write_report(study_dir):
        print(path)
    return 0


def rescore_command(study_dir: str, *, force: bool = False) -> int:
    from evomerge.search.driver import rescore_study

    n = rescore_study(study_dir, force=force)
    print(f"re-scored {n} trial(s) on the held-out split; report updated", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add the search subcommands to an ``argparse`` subparsers object."""
    command = sub.add_parser("search", help="run an evolutionary merge search from a search space YAML")
    command.add_argument("space", help="search space YAML (see search_spaces/)")
    command.add_argument("--study-dir", default=None, help="results folder (default results/<space name>)")
    command.add_argument("--trials", type=int, default=None, help="trial budget (default: the YAML's budget.trials)")
    command.add_argument("--timeout", default=None,
                         help="stop proposing after this long, e.g. 8h, 45m; the front is then re-scored on "
                         "held-out (resume continues)")
    command.add_argument("--storage", default=None,
                         help="Optuna storage URL (default sqlite:///<study-dir>/study.db; postgresql://... works)")
    command.add_argument("--workers", type=int, default=1,
                         help="candidates scored at once: N > 1 starts N Ray workers (default 1, in-process)")
    command.add_argument("--limit", type=int, default=None, help="score at most N items per task (quick runs)")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_ray_options(command)
    command.set_defaults(func=lambda a: search_command(a.space, a.study_dir, trials=a.trials, timeout=a.timeout,
                                                 storage=a.storage, workers=a.workers, limit=a.limit,
                                                 quiet=a.quiet, ray=ray_args(a)))

    command = sub.add_parser("resume", help="continue a search after Ctrl-C or a crash, or extend its budget")
    command.add_argument("study_dir")
    command.add_argument("--trials", type=int, default=None, help="new total trial budget")
    command.add_argument("--timeout", default=None, help="stop proposing after this long (as for search)")
    command.add_argument("--storage", default=None, help="override the storage URL recorded in study.json")
    command.add_argument("--workers", type=int, default=None)
    command.add_argument("-q", "--quiet", action="store_true")
    add_ray_options(command)
    command.set_defaults(func=lambda a: resume_command(a.study_dir, trials=a.trials, timeout=a.timeout,
                                                 storage=a.storage, workers=a.workers, quiet=a.quiet,
                                                 ray=ray_args(a)))

    command = sub.add_parser("status", help="trials done / failed / running, best so far, front size, ETA")
    command.add_argument("study_dir")
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.set_defaults(func=lambda a: status_command(a.study_dir, as_json=a.json))

    command = sub.add_parser("export", help="write a trial's recipe (default: the best) as evomerge or mergekit YAML")
    command.add_argument("study_dir")
    command.add_argument("-o", "--out", required=True, help="recipe file to write")
    command.add_argument("--trial", type=int, default=None, help="trial number")
    command.add_argument("--best", action="store_true", help="the best trial (the default)")
    command.add_argument("--objective", default=None, help="with --best: best by this objective")
    command.add_argument("--format", dest="fmt", choices=["evomerge", "mergekit"], default="evomerge")
    command.add_argument("--stage", default=None, help="ps or dfs (two-stage studies; default the last)")
    command.set_defaults(func=lambda a: export_command(a.study_dir, a.out, trial=a.trial, best=a.best,
                                                 objective=a.objective, fmt=a.fmt, stage=a.stage))

    command = sub.add_parser("report", help="write trials.csv, pareto.csv, pareto.png and best recipes")
    command.add_argument("study_dir")
    command.set_defaults(func=lambda a: report_command(a.study_dir))

    command = sub.add_parser("rescore", help="re-score the Pareto front and baselines on the held-out split")
    command.add_argument("study_dir")
    command.add_argument("--force", action="store_true", help="score again trials already re-scored")
    command.set_defaults(func=lambda a: rescore_command(a.study_dir, force=a.force))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m evomerge.search.cli``) until the main CLI registers these."""
    from evomerge.errors import EvomergeError

    parser = argparse.ArgumentParser(prog="evomerge-search")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted; continue with `evomerge resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
