"""Merge or ensemble? The demo zoo's three experts fused at inference time against their best merges,
on the held-out split, with standard errors, paired differences and inference cost.

    python scripts/bench_fusion.py --plot results/fusion.png [--zoo evals/zoo] [--suite evals/zoo_demo.yaml]
        [--merge results/demo/best.yaml] [--limit N] [--weight-trials 12] [--threads 2]

Candidates (each scored by the same suite engine on the same held-out items):

* each zoo model alone (base and the three experts) and two merges of the experts: a task-arithmetic
  merge (weights 1, lambda 1) and ``--merge`` (default: the demo study's exported winner,
  ``results/demo/best.yaml``, when it exists);
* the experts' logit ensemble with equal weights, and with weights searched on the *search* split
  (``--weight-trials`` seeded Dirichlet draws plus the equal point, the best by search-split combined
  score; its held-out score is then an honest estimate);
* panel + judge: the panel ranks the answers itself, or the base model ranks them.

Printed: per candidate the held-out combined score ± standard error (n items), per-task scores, the
cost relative to one source (forward passes and parameters read per generated token, model calls
per query) and seconds; then each candidate's paired difference from the best merge (per-item
differences on the same items: mean ± standard error). ``--plot`` writes quality against cost
(parameters read per token), merges and single models as circles, ensembles as diamonds. Seconds
are wall time on a shared machine and may be noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def paired(a, b) -> tuple[float, float]:
    """Combined-score difference a - b over the same items: (mean, standard error), tasks weighted as
    the suite weights them, each task's per-item differences independent."""
    wsum = sum(t.weight for t in a.tasks.values())
    mean = se2 = 0.0
    for name, ta in a.tasks.items():
        d = [x - y for x, y in zip(ta.items, b.tasks[name].items)]
        n = len(d)
        m = sum(d) / n
        var = sum((x - m) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        mean += ta.weight * m
        se2 += (ta.weight ** 2) * var / n
    return mean / wsum, math.sqrt(se2) / wsum


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", required=True, help="where to write the quality-vs-cost PNG")
    ap.add_argument("--zoo", default=str(ROOT / "evals" / "zoo"))
    ap.add_argument("--suite", default=str(ROOT / "evals" / "zoo_demo.yaml"))
    ap.add_argument("--merge", default=str(ROOT / "results" / "demo" / "best.yaml"),
                    help="a merge recipe to compare (default: the demo study's winner, when present)")
    ap.add_argument("--limit", type=int, default=None, help="held-out items per task (default: all)")
    ap.add_argument("--weight-trials", type=int, default=12)
    ap.add_argument("--weight-limit", type=int, default=60, help="search-split items per task for the weight search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)

    import torch

    from evomerge.evaluate import Scorer, load_model, load_suite
    from evomerge.evaluate.suite_eval import materialize_model
    from evomerge.fusion import FusionBackend, FusionRecipe, load_sources, score_suite
    from evomerge.recipe import MergeRecipe, SourceSpec, parse_recipe

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    zoo = Path(args.zoo)
    experts = [str(zoo / f"expert_{k}") for k in ("arith", "reverse", "cipher")]
    base = str(zoo / "base")
    suite = load_suite(args.suite)
    bs = args.batch_size

    rows: list[dict] = []

    def add(name: str, kind: str, res, cost: dict, seconds: float) -> None:
        rows.append({"name": name, "kind": kind, "res": res, "cost": cost, "seconds": seconds})
        print(f"  scored {name}: {res.combined:.4f} ± {res.combined_stderr:.4f} in {seconds:.1f} s", file=sys.stderr)

    def single(name: str, model, tok) -> None:
        t0 = time.perf_counter()
        res = Scorer(suite, "held-out", limit=args.limit, batch_size=bs).score(model, tok)
        add(name, "model" if name.startswith(("base", "expert")) else "merge", res,
            {"passes": 1.0, "read": 1.0, "calls": 1.0, "models": 1.0}, time.perf_counter() - t0)

    def fused(name: str, recipe: FusionRecipe, split: str = "held-out", limit: int | None = args.limit, keep=True):
        t0 = time.perf_counter()
        res, cost = score_suite(load_sources(recipe), FusionBackend(), suite, split, limit=limit, batch_size=bs)
        if keep:
            add(name, "ensemble", res, cost, time.perf_counter() - t0)
        return res

    tok = None
    for ref in [base, *experts]:
        model, tok = load_model(ref)
        single(Path(ref).name, model, tok)
    ta = MergeRecipe(method="task_arithmetic", base=base, sources=[SourceSpec(model=e, params={"weight": 1.0})
                                                                   for e in experts], params={"lambda": 1.0})
    single("task arithmetic merge", materialize_model(ta), tok)
    merge_path = Path(args.merge)
    if merge_path.is_file():
        import yaml

        recipe = parse_recipe(yaml.safe_load(merge_path.read_text()), source=str(merge_path))
        single(f"demo winner ({recipe.method})", materialize_model(recipe), tok)
    else:
        print(f"  no {merge_path}: the demo winner is left out (run `make demo` to have it)", file=sys.stderr)

    fused("logit ensemble, equal weights", FusionRecipe(method="logit", models=experts))
    # weights searched on the search split (seeded Dirichlet draws and the equal point)
    rng = random.Random(0)
    points = [[1.0, 1.0, 1.0]] + [[rng.gammavariate(1.0, 1.0) for _ in experts] for _ in range(args.weight_trials)]
    t0 = time.perf_counter()
    best_w, best_s = None, -math.inf
    for w in points:
        w = [x / sum(w) for x in w]
        s = fused("", FusionRecipe(method="logit", models=experts, weights=w), "search", args.weight_limit,
                  keep=False).combined
        if s > best_s:
            best_w, best_s = w, s
    search_s = time.perf_counter() - t0
    fused("logit ensemble, searched weights " + "/".join(f"{w:.2f}" for w in best_w),
          FusionRecipe(method="logit", models=experts, weights=best_w))
    rows[-1]["seconds_search"] = search_s
    fused("panel + judge (the panel)", FusionRecipe(method="panel", models=experts))
    fused("panel + judge (base judges)", FusionRecipe(method="panel", models=experts, judge=base))

    merges = [r for r in rows if r["kind"] == "merge"]
    best_merge = max(merges, key=lambda r: r["res"].combined)
    tasks = list(rows[0]["res"].tasks)
    n = rows[0]["res"].tasks[tasks[0]].n
    cpu = platform.processor() or platform.machine()
    try:  # the CPU's model name where Linux tells it
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nheld-out split of {Path(args.suite).name}, {n} items per task; measured on {platform.system()} {cpu}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}, float16 zoo; load average at start "
          f"{load0[0]:.2f}, at the end {os.getloadavg()[0]:.2f}: seconds are wall time and noisy under load")
    head = ["candidate", "combined ± se", *tasks, "passes/tok", "read/tok", "calls/query", "s",
            f"Δ vs {best_merge['name']}"]
    table = []
    for r in rows:
        res, c = r["res"], r["cost"]
        diff = "" if r is best_merge else "{:+.4f} ± {:.4f}".format(*paired(res, best_merge["res"]))
        table.append([r["name"], f"{res.combined:.4f} ± {res.combined_stderr:.4f}",
                      *[f"{res.tasks[t].score:.3f}" for t in tasks], f"{c['passes']:.2f}", f"{c['read']:.2f}",
                      f"{c['calls']:.2f}", f"{r['seconds']:.1f}", diff])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in table:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
    searched = next(r for r in rows if "seconds_search" in r)
    print(f"\nweight search: {len(points)} points on {args.weight_limit} search items per task in "
          f"{searched['seconds_search']:.0f} s; best search-split combined {best_s:.4f}")
    plot(rows, Path(args.plot), n)
    print(f"plot: {args.plot}")
    return 0


def plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evomerge.search.report import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    style = {"model": ("o", "0.55", "single models"), "merge": ("o", "tab:red", "merges"),
             "ensemble": ("D", "tab:green", "ensembles")}
    shown = set()
    for r in rows:
        marker, color, label = style[r["kind"]]
        x, y, se = r["cost"]["read"], r["res"].combined, r["res"].combined_stderr
        ax.errorbar([x], [y], yerr=[se], fmt=marker, color=color, ms=7, capsize=3,
                    label=None if label in shown else label)
        shown.add(label)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(5, 3), textcoords="offset points")
    ax.set_xlabel("parameters read per generated token (relative to one source)")
    ax.set_ylabel(f"held-out combined exact match ({n} items per task, ± 1 se)")
    ax.set_title("merge or ensemble? demo zoo, held-out")
    ax.set_xlim(0.5, max(r["cost"]["read"] for r in rows) + 1.5)  # room for the labels
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
