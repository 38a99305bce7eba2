"""What a study folder shows: trials.csv, pareto.csv, pareto.png, best recipe YAMLs; status; export.

Files (all written atomically; for a two-stage study each stage's files go to ``<stage>/`` and the
last stage's are also written at the top level):

* ``trials.csv``: one row per trial: state, kind (search / baseline), objectives, per-metric scores
  and sample sizes, held-out objectives where re-scored, params, timings, worker, error.
* ``pareto.csv``: the Pareto front (baselines included when on it), search and held-out side by side.
* ``pareto.png``: two objectives: every trial, the front, and the baselines labelled (merges as
  stars, ensembles, i.e. fusion baselines, as diamonds); one objective: the score of every trial,
  best so far, and each baseline as a labelled line (dotted for an ensemble).
* ``best.yaml`` (the winner: chosen on the validation sample when the evaluator has one, else the
  highest weighted score or best first objective), ``best_<objective>.yaml`` per objective, and
  ``front/trial_<n>.yaml`` for each front member.
* ``selection.md`` / ``selection.json``: search, validation and held-out scores of the winner, the
  search-best trial, the selection pool and the baselines with 95% intervals, and the winner's
  held-out margin over each baseline with its paired interval (:mod:`evomerge.search.selection_report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import StudyError
from evomerge.io_utils import atomic_write_text
from evomerge.recipe import dump_recipe
from evomerge.search.objectives import Objective, utility
from evomerge.search.pareto import front_trials
from evomerge.search.study import (SPACE_FILE, check_study_exists, finished, heldout_records, load_study,
                                   open_storage, read_meta, study_names)


def open_study(study_dir: Path):
    """(meta, space, {stage: optuna study}) of a study folder, read only: ``space`` is the
    :class:`~evomerge.search.space.SpaceSummary` of its space.yaml (name, kind, objectives,
    evaluation; no model is opened, so a moved source model does not stop status, report or
    export). A stage not started yet (no study in the storage) is left out; a storage without the
    study at all is an error (a deleted or moved database), and nothing is created."""
    from evomerge.search.paths import study_bases
    from evomerge.search.space import load_space_summary

    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    storage = open_storage(meta.storage, create=False)
    check_study_exists(storage, meta, study_dir)
    path = study_dir / SPACE_FILE
    if not path.is_file():
        raise StudyError(f"{study_dir} has no {SPACE_FILE}; it was not created by `evomerge search`")
    space = load_space_summary(path, base_dirs=study_bases(study_dir))
    have = set(study_names(storage))
    studies = {s: load_study(storage, meta.study_name(s)) for s in meta.stages if meta.study_name(s) in have}
    return meta, space, studies


def _flat(prefix: str, d: dict[str, Any] | None) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (d or {}).items()}


def _csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return buf.getvalue()


def trial_rows(study, objectives: list[Objective]) -> list[dict[str, Any]]:
    held = heldout_records(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "kind": ua.get("kind", "search"),
                               "label": ua.get("label", "")}
        if "objectives" in ua:
            row["utility"] = utility(objectives, ua["objectives"])
        row |= _flat("search.", ua.get("objectives"))
        row |= _flat("heldout.", (held.get(t.number) or {}).get("objectives"))
        row |= _flat("score.", ua.get("scores")) | _flat("n.", ua.get("n"))
        row |= _flat("cost.", ua.get("cost"))  # inference cost relative to one source (evomerge.fusion.cost)
        row |= _flat("param.", t.params)
        sec = ua.get("seconds") or {}
        row |= {"seconds_eval": sec.get("eval"), "seconds_total": sec.get("total"), "worker": ua.get("worker"),
                "error": ua.get("error", ""), "recipe_hash": ua.get("recipe_hash", "")}
        rows.append(row)
    return rows


def pareto_rows(study, objectives: list[Objective]) -> list[dict[str, Any]]:
    held = heldout_records(study)
    rows = []
    for t in front_trials(study, objectives):
        ua = t.user_attrs
        h = held.get(t.number) or {}
        row: dict[str, Any] = {"number": t.number, "kind": ua.get("kind", "search"), "label": ua.get("label", "")}
        for o in objectives:
            row[f"search.{o.name}"] = ua["objectives"].get(o.name)
            row[f"heldout.{o.name}"] = (h.get("objectives") or {}).get(o.name)
        for m in ua.get("scores", {}):
            row[f"search.score.{m}"] = ua["scores"][m]
            row[f"heldout.score.{m}"] = (h.get("scores") or {}).get(m)
            row[f"search.n.{m}"] = (ua.get("n") or {}).get(m)
            row[f"heldout.n.{m}"] = (h.get("n") or {}).get(m)
        rows.append(row)
    return rows


def _label(t: FrozenTrial) -> str:
    return t.user_attrs.get("label") or f"#{t.number}"


def plot(study, objectives: list[Objective], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.fusion.study import is_fusion

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "objectives" in t.user_attrs]
    search = [t for t in done if t.user_attrs.get("kind", "search") == "search"]
    base = [t for t in done if t.user_attrs.get("kind") == "baseline"]
    fused = {t.number for t in base if is_fusion(t.user_attrs.get("recipe", ""))}  # ensembles, not merges
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if len(objectives) >= 2:
        a, b = objectives[0], objectives[1]
        val = lambda t, o: t.user_attrs["objectives"][o.name]  # noqa: E731
        ax.scatter([val(t, a) for t in search], [val(t, b) for t in search], s=12, c="0.7", label="trials")
        front = front_trials(study, objectives)
        pts = sorted((val(t, a), val(t, b)) for t in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="tab:red", ms=5, label="Pareto front")
        shown: set[str] = set()
        for t in base:
            ens = t.number in fused
            kind = "ensembles (fusion)" if ens else "merge baselines"
            ax.scatter([val(t, a)], [val(t, b)], marker="D" if ens else "*", s=50 if ens else 120,
                       c="tab:green" if ens else "tab:blue", label=None if kind in shown else kind)
            shown.add(kind)
            ax.annotate(_label(t), (val(t, a), val(t, b)), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{a.name} ({a.direction})")
        ax.set_ylabel(f"{b.name} ({b.direction})")
    else:
        o = objectives[0]
        xs = [t.number for t in search]
        ys = [t.user_attrs["objectives"][o.name] for t in search]
        ax.scatter(xs, ys, s=12, c="0.6", label="trials")
        best, run = [], -math.inf
        for y in ys:
            run = max(run, o.sign * y)
            best.append(o.sign * run)
        ax.step(xs, best, where="post", c="tab:red", label="best so far")
        for i, t in enumerate(base):
            y = t.user_attrs["objectives"][o.name]
            ax.axhline(y, ls=":" if t.number in fused else "--", lw=0.8, c=f"C{i % 10}")  # dotted: an ensemble
            ax.annotate(_label(t), (xs[0] if xs else 0, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{o.name} ({o.direction})")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _recipe(t: FrozenTrial):
    """The trial's stored candidate: a merge recipe, or a fusion recipe (a fusion baseline)."""
    from evomerge.fusion.study import parse_candidate

    return parse_candidate(yaml.safe_load(t.user_attrs["recipe"]), source=f"trial {t.number}")


def _merges(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """``trials`` without the fusion baselines (an ensemble is never a winner: nothing to merge)."""
    from evomerge.fusion.study import is_fusion

    return [t for t in trials if not is_fusion(t.user_attrs.get("recipe", ""))]


def best_by(study, objectives: list[Objective], objective: str | None = None) -> FrozenTrial | None:
    """The best trial by ``objective``; without one, the stage's winner: chosen on the validation
    sample when the choice is made (:mod:`evomerge.search.validation`), else the highest utility."""
    from evomerge.search.validation import selected_trial

    done = _merges([t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "objectives" in t.user_attrs])
    if not done:
        return None
    if objective is None and (chosen := selected_trial(study)) is not None:
        return chosen
    if objective is None:
        return max(done, key=lambda t: (utility(objectives, t.user_attrs["objectives"]), -t.number))
    o = next((o for o in objectives if o.name == objective or o.key == objective), None)
    if o is None:
        raise StudyError(f"unknown objective {objective!r}; this study's objectives: "
                         f"{', '.join(x.name for x in objectives)}")
    return max(done, key=lambda t: (o.sign * t.user_attrs["objectives"][o.name], -t.number))


def write_stage(study, objectives: list[Objective], out: Path, title: str) -> list[Path]:
    written = [atomic_write_text(out / "trials.csv", _csv(trial_rows(study, objectives))),
               atomic_write_text(out / "pareto.csv", _csv(pareto_rows(study, objectives)))]
    if best_by(study, objectives) is None:
        return written
    written.append(plot(study, objectives, out / "pareto.png", title))
    written.append(dump_recipe(_recipe(best_by(study, objectives)), out / "best.yaml"))
    if len(objectives) > 1:
        for o in objectives:
            written.append(dump_recipe(_recipe(best_by(study, objectives, o.name)), out / f"best_{_slug(o.name)}.yaml"))
    for t in front_trials(study, objectives):
        written.append(dump_recipe(_recipe(t), out / "front" / f"trial_{t.number}.yaml"))
    from evomerge.search.selection_report import markdown, stage_summary, summary_json

    summary = stage_summary(study, objectives)
    if summary is not None:  # the winner chosen on validation, against every baseline on held-out
        written.append(atomic_write_text(out / "selection.md", markdown(summary, title)))
        written.append(atomic_write_text(out / "selection.json", summary_json(summary)))
    return written


def write_report(study_dir: str | Path) -> list[Path]:
    """Write every report file of the study; returns their paths."""
    study_dir = Path(study_dir)
    meta, space, studies = open_study(study_dir)
    objs = list(space.objectives)
    written = []
    try:
        for i, (stage, study) in enumerate(studies.items()):
            last = i == len(studies) - 1
            if len(studies) > 1:
                written += write_stage(study, objs, study_dir / stage, f"{meta.name}: {stage}")
            if last:
                written += write_stage(study, objs, study_dir, meta.name)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise StudyError(f"cannot write the report in {study_dir}: {err.strerror or err}{where}; the study "
                         "folder must be writable") from None
    return written


def status(study_dir: str | Path) -> dict[str, Any]:
    """Counts, best so far, front size and ETA of every stage."""
    study_dir = Path(study_dir)
    meta, space, studies = open_study(study_dir)
    objs = list(space.objectives)
    out: dict[str, Any] = {"name": meta.name, "storage": meta.storage, "stages": {}}
    for stage, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        search = [t for t in trials if t.user_attrs.get("kind", "search") == "search"]
        count = lambda st: sum(t.state == st for t in search)  # noqa: E731
        fin = finished(study)
        budget = meta.budget(stage)
        secs = [t.user_attrs["seconds"]["total"] for t in fin if isinstance(t.user_attrs.get("seconds"), dict)
                and t.user_attrs["seconds"].get("total") is not None]
        eta = None
        if budget and secs:
            eta = max(budget - len(fin), 0) * (sum(secs) / len(secs)) / max(meta.workers, 1)
        best = best_by(study, objs)
        out["stages"][stage] = {
            "complete": count(TrialState.COMPLETE), "pruned": count(TrialState.PRUNED),
            "failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") for t in search),
            "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in search),
            "running": count(TrialState.RUNNING), "finished": len(fin), "budget": budget,
            "baselines": sum(t.user_attrs.get("kind") == "baseline" for t in trials),
            "best": None if best is None else {"trial": best.number, "label": best.user_attrs.get("label", ""),
                                               "objectives": best.user_attrs["objectives"]},
            "front_size": len(front_trials(study, objs)), "eta_seconds": eta,
        }
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = [f"study {st['name']}  ({st['storage']})"]
    for stage, s in st["stages"].items():
        lines.append(f"[{stage}] finished {s['finished']}/{s['budget'] or '?'}: {s['complete']} complete, "
                     f"{s['pruned']} pruned, {s['failed']} failed; {s['running']} running, "
                     f"{s['interrupted']} interrupted (retried); {s['baselines']} baselines")
        if s["best"]:
            vals = ", ".join(f"{k}={v:.4g}" for k, v in s["best"]["objectives"].items())
            lines.append(f"  best: trial {s['best']['trial']} {s['best']['label']} {vals}")
        lines.append(f"  Pareto front: {s['front_size']} trial(s)")
        if s["eta_seconds"] is not None:
            lines.append(f"  ETA: {time.strftime('%H:%M:%S', time.gmtime(s['eta_seconds']))} (h:m:s)")
    return "\n".join(lines)


def check_output_file(out: str | Path, flag: str = "-o") -> Path:
    """A :class:`StudyError` unless a file can be written at ``out`` (not a folder, its folder exists
    or can be made, writable)."""
    raw = os.fspath(out)
    out = Path(out).expanduser()
    if raw.endswith(("/", os.sep)) or out.is_dir():
        raise StudyError(f"{flag} {raw} names a folder; give a file path, e.g. {out / 'recipe.yaml'}")
    anc = out.parent
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise StudyError(f"cannot write {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise StudyError(f"cannot write {out}: no permission to write in {anc}")
    return out


def _write(out: Path, text: str) -> Path:
    try:
        return atomic_write_text(out, text)
    except OSError as err:
        raise StudyError(f"cannot write {out}: {err.strerror or err}") from None


def export_recipe(study_dir: str | Path, out: str | Path, *, trial: int | None = None, objective: str | None = None,
                  fmt: str = "evomerge", stage: str | None = None) -> Path:
    """Write the recipe of trial ``trial`` (default: the best, by ``objective`` if given) to ``out``
    (checked first, written atomically)."""
    from evomerge.recipe import recipe_to_yaml

    if fmt not in ("evomerge", "mergekit"):
        raise StudyError(f"unknown export format {fmt!r}; use evomerge or mergekit")
    out = check_output_file(out)
    study_dir = Path(study_dir)
    meta, space, studies = open_study(study_dir)
    stage = stage or meta.stages[-1]
    if stage not in meta.stages:
        raise StudyError(f"unknown stage {stage!r}; this study has {', '.join(meta.stages)}")
    if stage not in studies:
        raise StudyError(f"stage {stage} has not started yet; nothing to export")
    study = studies[stage]
    if trial is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not match or "recipe" not in match[0].user_attrs:
            raise StudyError(f"stage {stage} has no trial {trial} with a recipe")
        t = match[0]
    else:
        t = best_by(study, list(space.objectives), objective)
        if t is None:
            raise StudyError(f"stage {stage} has no completed trial yet")
    recipe = _recipe(t)
    if fmt == "mergekit" and getattr(recipe, "kind", None) == "fusion":
        raise StudyError(f"trial {t.number} of stage {stage} is an ensemble ({t.user_attrs.get('label', 'fusion')}), "
                         "which mergekit cannot build; export it with --format evomerge and score it with "
                         "`evomerge eval --fusion-recipe FILE`")
    if fmt == "mergekit":
        from evomerge.mergekit_compat import to_mergekit

        return _write(out, yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
    return _write(out, recipe_to_yaml(recipe))
