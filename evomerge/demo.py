"""The main job (`make demo`): the CPU demo search on the shipped zoo, then a check that its winner is real.

    python -m evomerge.demo [--study-dir results/demo] [--space search_spaces/demo.yaml]

1. ``evomerge search search_spaces/demo.yaml --study-dir results/demo`` (or ``evomerge resume`` when the
   folder already holds the study: a finished study is not searched again). The search scores candidates
   on the suites' *search* split; at the end the front and the baselines are re-scored on *held-out*.
2. ``evomerge export results/demo -o results/demo/best.yaml``, then ``evomerge merge`` of that recipe to
   ``results/demo/best-model``: a plain HF checkpoint.
3. The exported checkpoint, loaded from disk, and every zoo model are scored on the held-out split. The
   table shows each with its binomial standard error and the winner's margin over each zoo model; the
   job fails (exit 1) if the checkpoint's score differs from the held-out score the study recorded for
   that trial, and says so if the winner does not beat every zoo model by more than 2 standard errors.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from evomerge.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _heldout_of_best(study_dir: Path) -> tuple[int, float]:
    """(trial number, recorded held-out combined score) of the study's best trial."""
    from evomerge.search.report import _open, best_by
    from evomerge.search.study import heldout_records

    meta, space, studies = _open(study_dir)
    study = studies[meta.stages[-1]]
    objectives = list(space.objectives)
    best = best_by(study, objectives)
    rec = heldout_records(study).get(best.number) or {}
    value = (rec.get("objectives") or {}).get(objectives[0].name, float("nan"))
    return best.number, value


def verify(study_dir: Path, suite_path: Path, zoo: Path) -> int:
    import torch

    from evomerge.evaluate import Scorer, load_model, load_suite

    torch.set_num_threads(2)
    best_yaml, best_model = study_dir / "best.yaml", study_dir / "best-model"
    if cli_main(["export", str(study_dir), "-o", str(best_yaml)]):
        return 2
    if cli_main(["merge", str(best_yaml), str(best_model), "--overwrite", "-q"]):
        return 2
    number, recorded = _heldout_of_best(study_dir)
    if math.isnan(recorded):  # the timeout stopped the search before its end-of-run re-score
        if cli_main(["rescore", str(study_dir)]):
            return 2
        number, recorded = _heldout_of_best(study_dir)
    scorer = Scorer(load_suite(suite_path), "held-out", batch_size=128)
    rows = {}
    for name in ("base", "expert_arith", "expert_reverse", "expert_cipher"):
        model, tok = load_model(zoo / name)
        rows[name] = scorer.score(model, tok)
    model, tok = load_model(best_model)
    rows[f"best (trial {number})"] = win = scorer.score(model, tok)

    tasks = list(win.tasks)
    print(f"\nheld-out scores ({win.tasks[tasks[0]].n} items per task), exact match ± standard error")
    print(f"{'model':18s}" + "".join(f"{t:>15s}" for t in tasks) + f"{'combined':>16s}  margin over it")
    ok_beats = True
    for name, r in rows.items():
        cells = "".join(f"{r.tasks[t].score:>9.3f}±{r.tasks[t].stderr:.3f}" for t in tasks)
        margin = ""
        if r is not win:
            m = win.combined - r.combined
            se2 = 2 * math.hypot(win.combined_stderr, r.combined_stderr)
            ok_beats &= m > se2
            margin = f"{m:+.3f} ({'>' if m > se2 else '<='} 2se {se2:.3f})"
        print(f"{name:18s}{cells}{r.combined:>9.3f}±{r.combined_stderr:.3f}  {margin}")
    same = math.isclose(win.combined, recorded, abs_tol=1e-9)
    print(f"\nthe exported checkpoint scores {win.combined:.4f} held-out; the study recorded {recorded:.4f} "
          f"for trial {number}: {'reproduced' if same else 'NOT REPRODUCED'}")
    print("the winner beats every zoo model by more than 2 standard errors" if ok_beats else
          "the winner does NOT beat every zoo model by more than 2 standard errors")
    print(f"plot: {study_dir / 'pareto.png'}   recipe: {best_yaml}   model: {best_model}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evomerge.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--study-dir", default="results/demo")
    ap.add_argument("--suite", default="evals/zoo_demo.yaml")
    ap.add_argument("--zoo", default="evals/zoo")
    args = ap.parse_args(argv)
    study_dir, zoo = Path(args.study_dir), Path(args.zoo)
    if not (zoo / "base" / "config.json").is_file():
        print(f"no demo zoo under {zoo}: building it (about 3 minutes on 2 cores)", file=sys.stderr)
        if cli_main(["zoo", "build", "--out", str(zoo)]):
            return 2
    t0 = time.perf_counter()
    if (study_dir / "study.json").is_file():
        print(f"{study_dir} holds the demo study: resuming it (a finished study is not searched again)",
              file=sys.stderr)
        code = cli_main(["resume", str(study_dir)])
    else:
        code = cli_main(["search", args.space, "--study-dir", str(study_dir)])
    if code:
        return code
    print(f"search finished in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return verify(study_dir, Path(args.suite), zoo)


if __name__ == "__main__":
    sys.exit(main())
