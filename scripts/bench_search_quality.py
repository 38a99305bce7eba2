#!/usr/bin/env python3
"""Search quality at an equal evaluation budget: pycma, Optuna's CMA-ES, TPE and random search on one
space, over several seeds, against the best of a hand-set grid; every winner re-scored on held-out.

    python3 scripts/bench_search_quality.py [--space search_spaces/demo.yaml] [--trials 24] [--seeds 5]
        [--optimizers pycma,cmaes,tpe,random] [--processes 2] [--out docs/search-quality.md]

Every optimizer runs ``evomerge search`` on the space with ``--trials`` trials per seed, one
fidelity (every trial scores the whole search split, so every run scores the same number of
items), the same baselines, and the same selection (the top 5 search trials and the baselines
re-scored on the validation sample, the winner chosen there); the winner is then scored on the
held-out split. The hand-set grid (:mod:`evomerge.search.handset`: task arithmetic with every source at weight 1
and ``lambda`` in ``--ta``, TIES with weight 1, ``lambda`` 1 and every source's density in
``--ties``, each with the space's base and sources) is scored on the same search items and its best
point, chosen there, on held-out. Scores are cached in ``--cache`` (a repeated recipe is scored once across runs).

Per optimizer: the held-out score of its winner, mean over seeds with a 95% Student-t interval over
seeds; the winner's mean search score (biased upward by selection); and in how many seeds the
winner's held-out margin over the grid's best is significant (paired 95% interval over the held-out
items excludes 0) in either direction. Writes a markdown table (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(space: dict, optimizer: str, seed: int, trials: int, root: str) -> dict:
    """One search; returns its winner's search, validation and held-out records."""
    _threads()
    import yaml

    from evomerge.search import start_search
    from evomerge.search.report import best_by, open_study
    from evomerge.search.validation import split_records

    space = json.loads(json.dumps(space))
    space["name"] = f"{optimizer}-{seed}"
    space["optimizer"] = {**space.get("optimizer", {}), "name": optimizer, "seed": seed}
    space["multi_fidelity"] = {"enabled": False}
    space["budget"] = {"trials": trials}
    work = Path(tempfile.mkdtemp(prefix=f"sq-{optimizer}-{seed}-", dir=root))
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    t0 = time.perf_counter()
    start_search(path, work / "study", progress=False, report=False)
    meta, summary, studies = open_study(work / "study")
    study = studies[meta.stages[-1]]
    win = best_by(study, list(summary.objectives))
    held = split_records(study, "held-out")[win.number]
    val = split_records(study, "validation").get(win.number) or {}
    return {"optimizer": optimizer, "seed": seed, "trial": win.number, "label": win.user_attrs.get("label", ""),
            "search": win.user_attrs["scores"]["combined"], "validation": (val.get("scores") or {}).get("combined"),
            "held": held["scores"]["combined"], "held_items": held.get("items"), "seconds": time.perf_counter() - t0}


def run_grid(space: dict, ta: list[float], ties: list[float]) -> dict:
    _threads()
    from evomerge.evaluate.resident import worker_evaluator
    from evomerge.search.handset import best_handset

    ev = worker_evaluator(space["evaluation"], device="cpu")
    sources = [s["model"] if isinstance(s, dict) else s for s in space["ps"]["sources"]]
    hs = best_handset(ev, space["ps"]["base"], sources, dtype=space.get("dtype"), ta=tuple(ta), ties=tuple(ties))
    return {"rows": hs.tried, "best": hs.label, "search": hs.search["combined"], "held": hs.held.scores["combined"],
            "held_items": hs.held.items, "trials": len(hs.tried)}


def summarize(runs: list[dict], grid: dict, objectives) -> list[dict]:
    import numpy as np
    from scipy import stats

    from evomerge.search import selection as S

    out = []
    grid_items = S.ItemResults.from_payload(grid["held_items"])
    coefs = S.task_coefs(objectives, grid_items.weights)
    for opt in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == opt]
        held = np.array([r["held"] for r in mine])
        half = stats.t.ppf(0.975, len(held) - 1) * held.std(ddof=1) / np.sqrt(len(held)) if len(held) > 1 else float("nan")
        better = worse = 0
        diffs = []
        for r in mine:
            d = S.paired(S.ItemResults.from_payload(r["held_items"]), grid_items, coefs)
            diffs.append(d.mean)
            better += d.low > 0
            worse += d.high < 0
        out.append({"optimizer": opt, "seeds": len(mine), "held": held.mean(), "half": half,
                    "search": float(np.mean([r["search"] for r in mine])),
                    "vs_grid": float(np.mean(diffs)), "better": better, "worse": worse,
                    "seconds": float(np.mean([r["seconds"] for r in mine]))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--optimizers", default="pycma,cmaes,tpe,random")
    ap.add_argument("--ta", default="0.3,0.4,0.5,0.6,0.8,1.0", help="task arithmetic lambdas of the grid")
    ap.add_argument("--ties", default="0.2,0.4,0.6,0.8,1.0", help="TIES densities of the grid")
    # (the defaults are evomerge.search.handset's grid)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--cache", default="results/.bench-cache")
    ap.add_argument("--out", default=None, help="write the table to this markdown file")
    args = ap.parse_args(argv)
    from evomerge.search.space import load_space

    loaded = load_space(args.space)
    space = dict(loaded.data)
    if args.cache:
        space["evaluation"] = {**space["evaluation"], "cache_dir": os.path.abspath(args.cache)}
    ta = [float(x) for x in args.ta.split(",") if x]
    ties = [float(x) for x in args.ties.split(",") if x]
    root = tempfile.mkdtemp(prefix="evomerge-sq-")
    t0 = time.perf_counter()
    jobs = [(opt, seed) for seed in range(args.seeds) for opt in args.optimizers.split(",")]
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        grid_f = pool.submit(run_grid, space, ta, ties)
        futs = [pool.submit(run_one, space, opt, seed, args.trials, root) for opt, seed in jobs]
        runs = []
        for f in futs:
            runs.append(f.result())
            r = runs[-1]
            print(f"  {r['optimizer']} seed {r['seed']}: winner trial {r['trial']} {r['label']} search "
                  f"{r['search']:.3f} held-out {r['held']:.3f} ({r['seconds']:.0f}s)", file=sys.stderr, flush=True)
        grid = grid_f.result()
    wall = time.perf_counter() - t0
    rows = summarize(runs, grid, list(loaded.objectives))
    n_items = sum(len(v["ids"]) for v in runs[0]["held_items"]["tasks"].values())
    lines = [(f"Measured on {platform.machine()} ({os.cpu_count()} cores, {args.processes} processes of 1 thread, "
              f"shared with other work: timings noisy), {wall / 60:.1f} min in all. Space `{args.space}`; "
              f"{args.trials} trials per run (one fidelity), {args.seeds} seeds; held-out: {n_items} items."), "",
             ("| optimizer | held-out score of the winner (mean over seeds, 95% interval) | winner's search score | "
              "held-out minus grid best (mean) | seeds significantly better / worse than the grid best | s per run |"),
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['held']:.4f} ± {r['half']:.4f} | {r['search']:.4f} | {r['vs_grid']:+.4f} | "
                     f"{r['better']} / {r['worse']} of {r['seeds']} | {r['seconds']:.0f} |")
    lines.append(f"| hand-set grid best ({grid['best']}, chosen among {grid['trials']} on search) | "
                 f"{grid['held']:.4f} | {grid['search']:.4f} | 0 | - | - |")
    lines += ["", "Grid points (search split): " + ", ".join(f"{label} {s:.3f}" for label, s in grid["rows"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
