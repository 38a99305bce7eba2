"""The main job (`make demo`): the CPU demo search on the shipped zoo, then a check that its winner is real.

    python -m evomerge.demo [--space search_spaces/demo.yaml] [--study-dir results/demo]

1. ``evomerge search search_spaces/demo.yaml --study-dir results/demo`` (or ``evomerge resume`` when the
   folder already holds the study: a finished study is not searched again). The search scores candidates
   on the suite's *search* split; when it ends, the front and the baselines (each zoo model alone, the
   untuned default) are re-scored on *held-out*.
2. ``evomerge export results/demo -o results/demo/best.yaml``, then ``evomerge merge`` of that recipe to
   ``results/demo/best-model``: a plain HF checkpoint.
3. That checkpoint, loaded from disk, is scored on the held-out split. The table shows it beside the
   baselines' held-out scores from the study, with binomial standard errors and the winner's margin
   over each. The job fails (exit 1) if the checkpoint's score differs from the held-out score the
   study recorded for that trial, and says so if the winner does not beat every zoo model by more
   than 2 standard errors.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from evomerge.cli import main as cli_main


def verify(study_dir: Path) -> int:
    from evomerge.evaluate import Scorer, load_model, load_suite
    from evomerge.search.report import best_by, open_study
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
    held = heldout_records(study)
    number = best_by(study, list(space.objectives)).number
    recorded = (held.get(number) or {}).get("scores", {}).get("combined", math.nan)
    model, tok = load_model(best_model)
    win = Scorer(load_suite(space.evaluation["suite"]), "held-out", batch_size=128).score(model, tok)

    # (scores, stderr) per row: the baselines as the study scored them, the winner as loaded from disk
    rows = {t.user_attrs["label"]: (held[t.number]["scores"], held[t.number]["stderr"])
            for t in finished(study, kind="baseline") if "scores" in held.get(t.number, {})}
    rows[f"winner (trial {number})"] = ({k: r.score for k, r in win.tasks.items()} | {"combined": win.combined},
                                        {k: r.stderr for k, r in win.tasks.items()} | {"combined": win.combined_stderr})
    tasks = list(win.tasks)
    print(f"\nheld-out scores ({win.tasks[tasks[0]].n} items per task) ± standard error")
    print(f"{'model':20s}" + "".join(f"{t:>15s}" for t in tasks) + f"{'combined':>16s}  winner's margin")
    beats_all = True
    for name, (sc, se) in rows.items():
        cells = "".join(f"{sc[t]:>9.3f}±{se[t]:.3f}" for t in tasks)
        margin = ""
        if not name.startswith("winner"):
            m = win.combined - sc["combined"]
            two_se = 2 * math.hypot(win.combined_stderr, se["combined"])
            if name.startswith("source") or name == "base":
                beats_all &= m > two_se
            margin = f"{m:+.3f} ({'>' if m > two_se else '<='} 2se {two_se:.3f})"
        print(f"{name:20s}{cells}{sc['combined']:>9.3f}±{se['combined']:.3f}  {margin}")
    same = math.isclose(win.combined, recorded, abs_tol=1e-9)
    print(f"\nthe exported checkpoint scores {win.combined:.4f} held-out; the study recorded {recorded:.4f} "
          f"for trial {number}: {'reproduced' if same else 'NOT REPRODUCED'}")
    print("the winner beats every zoo model by more than 2 standard errors" if beats_all else
          "the winner does NOT beat every zoo model by more than 2 standard errors")
    print(f"plot: {study_dir / 'pareto.png'}   recipe: {best_yaml}   model: {best_model}")
    return 0 if same else 1


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
