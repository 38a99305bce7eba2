#!/usr/bin/env python3
"""Acceptance table of the demo zoo: base, each expert and hand-set merges on every zoo suite.

    python3 scripts/zoo_table.py [--zoo evals/zoo] [--suite evals/zoo_demo.yaml] [--limit N] [--lams 0.33,0.5,0.7]

Prints exact match (± binomial stderr, n) per task on the search and held-out splits, the combined
score (mean over the four tasks), and whether the best merge beats every single zoo model on the
combined held-out score by more than two standard errors of the difference.

The hand-set merges are task arithmetic recipes (``base + lam * sum_i (expert_i - base)``, Ilharco et
al. 2023) built by the merge engine (``evomerge.materialize``), the same path `evomerge merge` takes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.evaluate import Scorer, load_model, load_suite  # noqa: E402
from evomerge.zoo import EXPERT_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def task_arithmetic(zoo: Path, lam: float):
    """The hand-set recipe: every expert's task vector added to the base with weight ``lam``."""
    from evomerge.recipe import parse_recipe

    return parse_recipe({"method": "task_arithmetic", "base": str(zoo / "base"),
                         "sources": [{"model": str(zoo / n), "params": {"weight": lam}} for n in EXPERT_NAMES.values()]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "evals/zoo"))
    ap.add_argument("--suite", default=str(ROOT / "evals/zoo_demo.yaml"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--lams", default="0.33,0.5,0.7")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    suite = load_suite(args.suite)
    names = ["base", *EXPERT_NAMES.values()]
    models = {n: load_model(Path(args.zoo) / n) for n in names}
    tok = models["base"][1]
    import copy

    from evomerge.materialize import materialize_state_dict

    candidates = {n: m for n, (m, _) in models.items()}
    for lam in (float(x) for x in args.lams.split(",")):
        m = copy.deepcopy(models["base"][0])
        _, sd = materialize_state_dict(task_arithmetic(Path(args.zoo), lam))
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        candidates[f"TA lam={lam}"] = m
    scorers = {s: Scorer(suite, s, limit=args.limit, batch_size=128) for s in ("search", "held-out")}
    res = {}
    t0 = time.perf_counter()
    for name, m in candidates.items():
        res[name] = {s: sc.score(m, tok) for s, sc in scorers.items()}
    dt = time.perf_counter() - t0
    tasks = [t.name for t in suite.tasks]
    head = f"{'model':14s} {'split':8s} " + " ".join(f"{t:>15s}" for t in tasks) + f" {'combined':>15s}"
    print(head)
    print("-" * len(head))
    for name, by in res.items():
        for s, r in by.items():
            cells = [f"{r.tasks[t].score:.3f}±{r.tasks[t].stderr:.3f}" for t in tasks]
            print(f"{name:14s} {s:8s} " + " ".join(f"{c:>15s}" for c in cells)
                  + f" {r.combined:.3f}±{r.combined_stderr:.3f}".rjust(16))
    n = {t: res["base"]["held-out"].tasks[t].n for t in tasks}
    print(f"n per task: held-out {n}; search {[res['base']['search'].tasks[t].n for t in tasks]}")
    singles = [x for x in res if not x.startswith("TA")]
    best_merge = max((x for x in res if x.startswith("TA")), key=lambda x: res[x]["held-out"].combined)
    mh = res[best_merge]["held-out"]
    ok = True
    for x in singles:
        r = res[x]["held-out"]
        margin = mh.combined - r.combined
        se = math.sqrt(mh.combined_stderr**2 + r.combined_stderr**2)
        beats = margin > 2 * se
        ok &= beats
        print(f"{best_merge} vs {x:14s}: margin {margin:+.3f}, 2*se(diff) {2 * se:.3f} -> {'BEATS' if beats else 'does not beat'}")
    scored = len(candidates) * 2
    print(f"scored {scored} (model, split) pairs in {dt:.1f}s: {60 * scored / dt:.1f} suite-splits/min "
          f"({sum(r.n for by in res.values() for r in by.values()) / dt:.0f} items/s)")
    print("ACCEPTANCE:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
