#!/usr/bin/env python3
"""How well a few items predict a candidate's full search-split score on the demo zoo: Spearman
rank correlation (and mean absolute error) of stratified anchors, 2PL IRT (p-IRT) and a random
subset of the same size against the full score, measured in one run.

    python3 scripts/bench_estimate.py [--space search_spaces/demo.yaml] [--candidates 48] [--items 24,48,96]

Candidates: points of the space drawn uniformly from the unit cube around nothing in particular
(``--seed``), each scored on every item of the search split the optimizer sees (per-item results).
The predictors are fitted on a reference table: the space's baselines (each source alone, the base,
the untuned default) and, in a second setting, those plus the first ``--reference`` candidates (what
a search has after its first generations); they are then judged on the remaining candidates. The
random subset's row is the mean over ``--draws`` seeds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np


def score_all(space_path: str, n: int, seed: int, cache: str | None):
    """Per-item search results ``{task: (ids, rows)}`` of the baselines and ``n`` random candidates,
    the full combined score of each, the task weights, and the number of baselines."""
    from evomerge.evaluate.resident import worker_evaluator
    from evomerge.search.space import load_space
    from evomerge.search.stages import baselines

    space = load_space(space_path)
    stage = space.stage_space(space.stages()[0])
    evaluation = {**space.evaluation, **({"cache_dir": cache} if cache else {})}
    ev = worker_evaluator(evaluation, device="cpu")
    recipes = [r for _, r, _ in baselines(stage)]
    n_base = len(recipes)
    rng = random.Random(seed)
    dims = stage.dims()
    for _ in range(n):
        recipes.append(stage.decode({d.name: d.from_unit(rng.random()) for d in dims}))
    tables: dict[str, tuple[list[int], list[list[float]]]] = {}
    full, weights = [], {}
    t0 = time.perf_counter()
    for k, recipe in enumerate(recipes):
        out = ev.evaluate(recipe, split="search")
        weights = out.items["weights"]
        for task, rec in out.items["tasks"].items():
            ids, rows = tables.setdefault(task, (rec["ids"], []))
            assert rec["ids"] == ids
            rows.append(rec["values"])
        full.append(out.scores["combined"])
        print(f"  scored {k + 1}/{len(recipes)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return {t: (ids, np.array(rows)) for t, (ids, rows) in tables.items()}, np.array(full), weights, n_base


def judge(tables, full, weights, ref: np.ndarray, test: np.ndarray, m: int, method: str, seed: int):
    from evomerge.evaluate.estimate import fit_predictors, predict_combined, spearman

    preds = fit_predictors({t: (ids, y[ref]) for t, (ids, y) in tables.items()}, m, method, seed=seed)
    got = []
    for row in test:
        values = {t: dict(zip(ids, y[row])) for t, (ids, y) in tables.items()}
        got.append(predict_combined(preds, weights, values))
    got = np.array(got)
    return spearman(got, full[test]), float(np.mean(np.abs(got - full[test])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--reference", type=int, default=16, help="candidates added to the reference table")
    ap.add_argument("--items", default="24,48,96")
    ap.add_argument("--draws", type=int, default=20, help="random subsets averaged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="results/.bench-cache", help="score cache folder ('' for none)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tables, full, weights, n_base = score_all(args.space, args.candidates, args.seed, args.cache or None)
    n_items = sum(len(ids) for ids, _ in tables.values())
    cands = np.arange(n_base, len(full))
    settings = {f"{n_base} baselines": (np.arange(n_base), cands[args.reference:]),
                f"{n_base} baselines + {args.reference} candidates": (np.arange(n_base + args.reference),
                                                                      cands[args.reference:])}
    print(f"\nmeasured on {platform.machine()} / {platform.processor() or platform.system()}, {os.cpu_count()} cores; "
          f"{args.space}: {len(cands)} random candidates, {n_items} search items; judged on the last "
          f"{len(cands) - args.reference} candidates (full combined score {full[cands].min():.3f}..{full[cands].max():.3f})\n")
    print("| reference table | items scored | anchors (Spearman / MAE) | 2PL IRT | random subset (mean of "
          f"{args.draws}) |")
    print("|---|---|---|---|---|")
    for name, (ref, test) in settings.items():
        for m in [int(x) for x in args.items.split(",")]:
            cells = []
            for method in ("anchors", "irt"):
                rho, mae = judge(tables, full, weights, ref, test, m, method, args.seed)
                cells.append(f"{rho:.3f} / {mae:.3f}")
            rs = [judge(tables, full, weights, ref, test, m, "random", s) for s in range(args.draws)]
            rho = np.mean([r for r, _ in rs])
            mae = np.mean([e for _, e in rs])
            cells.append(f"{rho:.3f} ± {np.std([r for r, _ in rs]) / np.sqrt(len(rs)):.3f} / {mae:.3f}")
            print(f"| {name} | {m} of {n_items} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
