#!/usr/bin/env python3
"""Data-aware merges against task-vector merges on the demo zoo: RegMean and Fisher merging
against task arithmetic and TIES (and the plain average), scored on held-out items.

Protocol (one run, every method treated alike):

1. Each method has a small grid of settings (below). Every setting is merged from the zoo's three
   experts (and the base, for the task-vector methods) and scored on the suite's whole *search*
   split; the setting with the best combined search score is kept.
2. The kept setting of every method, the base and each expert alone are scored on the *held-out*
   split (never seen by the selection, nor by the calibration data).
3. The table gives each task's held-out exact match and the combined score with their standard
   errors (binomial, as the suite evaluator reports them; n items per task in the header), and the
   paired difference of each data-aware method's combined score to each baseline method, with the
   standard error of the paired per-item differences.

RegMean and Fisher compute their statistics on the suite's search split (``calibration: {suite,
split: search, limit}``: each item as its prompt and gold answer), once per expert; the time is
reported (the statistics are cached on disk afterwards: a second run reads them).

    python scripts/bench_data_aware.py                    # the zoo under evals/zoo (make demo builds it)
    python scripts/bench_data_aware.py --calib-limit 100  # more calibration items per task
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPERTS = ("expert_arith", "expert_reverse", "expert_cipher")


def grids(calib: dict) -> dict[str, list[tuple[str, dict]]]:
    """method -> [(label, recipe fields)] settings searched on the search split."""
    out: dict[str, list[tuple[str, dict]]] = {"average": [("equal weights", {"method": "linear"})]}
    out["task_arithmetic"] = [(f"w={w}", {"method": "task_arithmetic", "weight": w}) for w in (0.5, 0.75, 1.0)]
    out["ties"] = [(f"w={w} d={d}", {"method": "ties", "weight": w, "params": {"density": d}})
                   for w, d in itertools.product((0.75, 1.0), (0.3, 0.6))]
    out["regmean"] = [(f"alpha={a}", {"method": "regmean", "params": {"alpha": a}, "calibration": calib})
                      for a in (0.5, 0.9, 1.0)]
    out["fisher"] = [(f"labels={lab}", {"method": "fisher", "calibration": calib | {"labels": lab}})
                     for lab in ("sampled", "data")]
    return out


def make_recipe(zoo: Path, fields: dict):
    from evomerge.recipe import parse_recipe

    fields = dict(fields)
    weight = fields.pop("weight", None)
    sources = [{"model": str(zoo / e)} | ({"params": {"weight": weight}} if weight is not None else {})
               for e in EXPERTS]
    data = {"sources": sources, **fields}
    if fields["method"] in ("task_arithmetic", "ties"):
        data["base"] = str(zoo / "base")
    return parse_recipe(data)


def paired(a, b) -> tuple[float, float]:
    """Combined-score difference a - b and its standard error from the per-item differences
    (tasks weighted equally, items paired within a task)."""
    diffs, ses = [], []
    for name, ta in a.tasks.items():
        d = [x - y for x, y in zip(ta.items, b.tasks[name].items)]
        m = sum(d) / len(d)
        var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
        diffs.append(m)
        ses.append(math.sqrt(var / len(d)))
    return sum(diffs) / len(diffs), math.sqrt(sum(s * s for s in ses)) / len(ses)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "evals" / "zoo"))
    ap.add_argument("--suite", default=str(ROOT / "evals" / "zoo_demo.yaml"))
    ap.add_argument("--calib-limit", type=int, default=50, help="calibration items per task (search split)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    zoo = Path(args.zoo)
    if not all((zoo / m / "config.json").is_file() for m in ("base", *EXPERTS)):
        print(f"the demo zoo is not at {zoo}: build it with `make demo` (or scripts/build_zoo.py)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from evomerge.calibration import source_statistics
    from evomerge.checkpoint import Checkpoint
    from evomerge.evaluate import Scorer, load_model, load_suite
    from evomerge.recipe_sections import CalibrationSpec
    from evomerge.evaluate.suite_eval import load_tokenizer, materialize_model

    suite = load_suite(args.suite)
    tok = load_tokenizer(str(zoo / "base"))
    calib = {"suite": args.suite, "split": "search", "limit": args.calib_limit}
    scorers = {s: Scorer(suite, s, batch_size=args.batch_size) for s in ("search", "held-out")}

    # statistics first, timed (computed now, or read from the cache of an earlier run)
    stat_rows = []
    for kind, extra in (("gram", {}), ("fisher", {"labels": "sampled"}), ("fisher", {"labels": "data"})):
        spec = CalibrationSpec(**calib, **extra)
        for e in EXPERTS:
            st = source_statistics(Checkpoint.open(zoo / e), spec, kind)
            stat_rows.append((f"{kind} {extra.get('labels', '')}".strip(), e, st.origin, st.seconds, st.texts, st.tokens))

    def score(recipe, split):
        t0 = time.perf_counter()
        model = materialize_model(recipe)
        t1 = time.perf_counter()
        res = scorers[split].score(model, tok)
        return res, t1 - t0, time.perf_counter() - t1

    chosen, timings = {}, {}
    for method, settings in grids(calib).items():
        best = None
        for label, fields in settings:
            recipe = make_recipe(zoo, fields)
            res, t_merge, t_score = score(recipe, "search")
            print(f"search  {method:16s} {label:16s} combined {res.combined:.3f} ± {res.combined_stderr:.3f} "
                  f"(merge {t_merge:.2f} s, score {t_score:.1f} s)", file=sys.stderr)
            timings.setdefault(method, []).append(t_merge)
            if best is None or res.combined > best[2].combined:
                best = (label, recipe, res)
        chosen[method] = best

    held = {}
    for m in ("base", *EXPERTS):
        model, _ = load_model(zoo / m)
        held[m] = scorers["held-out"].score(model, tok)
    for method, (label, recipe, _) in chosen.items():
        held[method] = score(recipe, "held-out")[0]

    tasks = [t.name for t in suite.tasks]
    n = held["base"].tasks[tasks[0]].n
    print(f"\nmeasured on {platform.machine()} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); suite {suite.name}: {len(tasks)} tasks, held-out n = {n} per task, "
          f"selection on the search split ({len(suite.tasks[0].splits['search'])} per task); calibration: "
          f"{args.calib_limit} search items per task\n")
    print("| model / method | setting (chosen on search) | search combined | "
          + " | ".join(f"held-out {t}" for t in tasks) + " | held-out combined |")
    print("|---|---|---|" + "---|" * len(tasks) + "---|")
    for name, res in held.items():
        label, search = ("-", "-")
        if name in chosen:
            label, search = chosen[name][0], f"{chosen[name][2].combined:.3f} ± {chosen[name][2].combined_stderr:.3f}"
        cells = " | ".join(f"{res.tasks[t].score:.3f} ± {res.tasks[t].stderr:.3f}" for t in tasks)
        print(f"| {name} | {label} | {search} | {cells} | **{res.combined:.3f} ± {res.combined_stderr:.3f}** |")
    print("\npaired held-out differences of the combined score (row - column), ± standard error of the "
          "per-item differences:\n")
    baselines = ["average", "task_arithmetic", "ties"]
    print("| method | " + " | ".join(f"vs {b}" for b in baselines) + " |")
    print("|---|" + "---|" * len(baselines))
    for m in ("regmean", "fisher"):
        cells = []
        for b in baselines:
            d, se = paired(held[m], held[b])
            cells.append(f"{d:+.3f} ± {se:.3f}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nstatistics (per expert; `origin`: computed in this run or read from the cache):\n")
    print("| statistic | expert | origin | seconds | texts | tokens |")
    print("|---|---|---|---|---|---|")
    for kind, e, origin, sec, texts, tokens in stat_rows:
        print(f"| {kind} | {e} | {origin} | {sec:.1f} | {texts} | {tokens} |")
    print("\nmerge time per candidate, in memory (first setting of the grid, which also reads the statistics "
          "from the cache / fastest setting): " + ", ".join(f"{m} {v[0]:.2f} / {min(v):.2f} s" for m, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
