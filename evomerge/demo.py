"""The main job (`make demo`): the CPU demo search on the shipped zoo, then a check that its winner is real.

    python -m evomerge.demo [--space search_spaces/demo.yaml] [--study-dir results/demo]

1. ``evomerge search search_spaces/demo.yaml --study-dir results/demo`` (or ``evomerge resume`` when the
   folder already holds the study: a finished study is not searched again). The search scores candidates
   on the suite's *search* split; when it ends, the front and the baselines (each zoo model alone, the
   untuned default) are re-scored on *held-out*.
2. ``evomerge export results/demo -o results/demo/best.yaml``, then ``evomerge merge`` of that recipe to
   ``results/demo/best-model``: a plain HF checkpoint.
3. That checkpoint, loaded from disk, is scored on the held-out split. The table shows it beside the
   baselines' held-out scores from the study (each zoo model alone, the untuned default) and the best
   hand-set merge (:mod:`evomerge.search.handset`: task arithmetic lambdas and TIES densities, chosen
   on the search split), with standard errors and the winner's margin over each as a paired
   difference on the same held-out items (its standard error and 95% interval). It says, row by row,
   whether the margin exceeds two standard errors of the paired difference. The job fails (exit 1) if
   the checkpoint's score differs from the held-out score the study recorded for that trial.

The study's ``selection.md`` shows the winner's search, validation and held-out scores beside the
other candidates it was chosen among (the winner is chosen on a validation sample carved out of the
search split, so its search score's selection bias does not decide).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from evomerge.cli import main as cli_main


def verify(study_dir: Path) -> int:
    """Export and merge the winner, score the checkpoint from disk on held-out, and compare it with
    every baseline and the best hand-set merge on the same held-out items (paired)."""
    from evomerge.evaluate import Scorer, load_model, load_suite
    from evomerge.evaluate.resident import worker_evaluator
    from evomerge.search import selection as S
    from evomerge.search.handset import best_handset
    from evomerge.search.report import best_by, open_study
    from evomerge.search.selection_report import markdown, stage_summary
    from evomerge.search.study import finished, heldout_records

    best_yaml, best_model = study_dir / "best.yaml", study_dir / "best-model"
    if cli_main(["export", str(study_dir), "-o", str(best_yaml)]):
        return 2
    if cli_main(["merge", str(best_yaml), str(best_model), "--overwrite", "-q"]):
        return 2
    meta, space, studies = open_study(study_dir)
    if space.evaluation.get("kind") != "suite":
        print(f"error: the demo checks suite-scored studies; {study_dir} uses {space.evaluation.get('kind')!r}",
              file=sys.stderr)
        return 2
    study = studies[meta.stages[-1]]
    objectives = list(space.objectives)
    held = heldout_records(study)
    number = best_by(study, objectives).number
    recorded = (held.get(number) or {}).get("scores", {}).get("combined", math.nan)
    summary = stage_summary(study, objectives)
    if summary is not None:
        print("\n" + markdown(summary, f"{meta.name}: {meta.stages[-1]}"))
    model, tok = load_model(best_model)
    suite = load_suite(space.evaluation["suite"])
    win = Scorer(suite, "held-out", batch_size=128).score(model, tok)
    n_items = {k: r.n for k, r in win.tasks.items()}
    win_items = S.ItemResults({k: dict(enumerate(r.items)) for k, r in win.tasks.items()},
                              {t.name: t.weight for t in suite.tasks})

    # the best hand-set merge (task arithmetic lambdas, TIES densities), chosen on the search split
    data = yaml_space(study_dir)
    rows: dict[str, tuple[dict, dict, S.ItemResults | None]] = {}
    for t in finished(study, kind="baseline"):
        rec = held.get(t.number, {})
        if "scores" in rec:
            rows[t.user_attrs["label"]] = (rec["scores"], rec["stderr"], S.ItemResults.from_payload(rec.get("items")))
    if data.get("ps") and data["ps"].get("base"):
        evaluator = worker_evaluator(space.evaluation, device="cpu")
        sources = [s["model"] for s in data["ps"]["sources"]]
        hs = best_handset(evaluator, data["ps"]["base"], sources, dtype=data.get("dtype"))
        rows[f"hand-set: {hs.label}"] = (hs.held.scores, hs.held.stderr, S.ItemResults.from_payload(hs.held.items))
    rows[f"winner (trial {number})"] = ({k: r.score for k, r in win.tasks.items()} | {"combined": win.combined},
                                        {k: r.stderr for k, r in win.tasks.items()} | {"combined": win.combined_stderr},
                                        win_items)
    coefs = S.task_coefs(objectives, win_items.weights) or {}
    tasks = list(win.tasks)
    print(f"\nheld-out scores ({', '.join(f'{n_items[t]} {t}' for t in tasks)} items) ± standard error; the "
          "winner's margin over each row: the paired difference on the same items, its standard error and 95% interval")
    print(f"{'model':36s}" + "".join(f"{t:>14s}" for t in tasks) + f"{'combined':>16s}   winner's margin")
    verdicts = {}
    for name, (sc, se, items) in rows.items():
        cells = "".join(f"{sc[t]:>8.3f}±{se[t]:.3f}" for t in tasks)
        margin = ""
        if not name.startswith("winner") and items is not None and coefs:
            d = S.paired(win_items, items, coefs)
            beats = d.mean > 2 * d.se
            verdicts[name] = beats
            margin = (f"{d.mean:+.4f} ± {d.se:.4f} [{d.low:+.4f}, {d.high:+.4f}] "
                      f"{'> 2 se' if beats else '<= 2 se'}")
        print(f"{name:36s}{cells}{sc['combined']:>9.3f}±{se['combined']:.3f}   {margin}")
    same = math.isclose(win.combined, recorded, abs_tol=1e-9)
    print(f"\nthe exported checkpoint scores {win.combined:.4f} held-out; the study recorded {recorded:.4f} "
          f"for trial {number}: {'reproduced' if same else 'NOT REPRODUCED'}")
    for name, beats in verdicts.items():
        print(f"  {'beats' if beats else 'does NOT beat'} {name} by more than 2 standard errors of the paired difference")
    print(f"plot: {study_dir / 'pareto.png'}   table: {study_dir / 'selection.md'}   recipe: {best_yaml}   "
          f"model: {best_model}")
    return 0 if same else 1


def same_space(study_dir: Path, space_path: str) -> bool:
    """Whether the study in ``study_dir`` runs the space ``space_path`` (its normalized mapping)."""
    from evomerge.search.space import load_space

    try:
        return load_space(space_path).data == yaml_space(study_dir)
    except Exception:  # noqa: BLE001 - an unreadable space is not the same space; resume reports why
        return False


def yaml_space(study_dir: Path) -> dict:
    """The study's normalized space mapping (space.yaml)."""
    import yaml

    return yaml.safe_load((study_dir / "space.yaml").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evomerge.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--study-dir", default="results/demo")
    args = ap.parse_args(argv)
    study_dir, zoo = Path(args.study_dir), Path("evals/zoo")  # where search_spaces/demo.yaml reads it
    if not (zoo / "base" / "config.json").is_file():
        print(f"no demo zoo under {zoo}: building it (about 4 minutes on 1 thread)", file=sys.stderr)
        if cli_main(["zoo", "build", "--out", str(zoo)]):
            return 2
    t0 = time.perf_counter()
    if (study_dir / "study.json").is_file():
        if not same_space(study_dir, args.space):
            print(f"error: {study_dir} holds a study of another search space than {args.space} (an earlier "
                  f"demo's?); remove {study_dir}, or give another --study-dir", file=sys.stderr)
            return 2
        print(f"{study_dir} holds the demo study: resuming it (a finished study is not searched again)",
              file=sys.stderr)
        code = cli_main(["resume", str(study_dir)])
    else:
        code = cli_main(["search", args.space, "--study-dir", str(study_dir)])
    if code:
        return code
    print(f"search finished in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return verify(study_dir)


if __name__ == "__main__":
    sys.exit(main())
