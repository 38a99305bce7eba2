#!/usr/bin/env python3
"""Search throughput: candidates per minute with 1 and 2 Ray workers, resident in-memory candidates
against the naive path (write each merged checkpoint to disk, load it back), measured in one run.

    python3 scripts/bench_search.py [--trials 16] [--limit 8] [--workers 1,2]
    python3 scripts/bench_search.py --device cuda --layers 16 --hidden 1024   # a lent GPU

Sources: the demo zoo (evals/zoo) when it is built, else a generated tiny family (said in the
output). Every configuration runs the same TIES search (pycma, popsize 4, fixed seed, no baselines,
one fidelity) on the demo suite (evals/zoo_demo.yaml, ``--limit`` items per task). Columns:
candidates per minute (search wall time, worker start-up excluded), worker busy fraction (time
evaluating / (wall x workers)), driver time per trial (wall x workers - busy, per trial: the
driver's own work plus waiting at generation barriers), materialization ms per candidate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from evomerge.evaluate.evaluators import EvalOutcome  # noqa: E402  (evomerge.search first: import order)
from evomerge.evaluate.suite_eval import SuiteEvaluator  # noqa: E402


class DiskSuiteEvaluator(SuiteEvaluator):
    """The naive path: every candidate written as a checkpoint, then loaded with from_pretrained."""

    def model(self, recipe):
        from transformers import AutoModelForCausalLM

        from evomerge.materialize import merge_to_disk

        tmp = Path(tempfile.mkdtemp(prefix="evomerge-naive-"))
        try:
            start = time.perf_counter()
            path = merge_to_disk(recipe, tmp / "m", progress=False, dtype=self.dtype)
            model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.device).eval()
            self.materialize_s = getattr(self, "materialize_s", 0.0) + time.perf_counter() - start
            return model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def naive_factory(evaluation: dict, device: str) -> DiskSuiteEvaluator:
    cfg = {k: v for k, v in evaluation.items() if k not in ("kind",)}
    return DiskSuiteEvaluator(cfg["suite"], device=device, batch_size=int(cfg.get("batch_size", 64)))


def resident_factory(evaluation: dict, device: str):
    from evomerge.evaluate.resident import worker_evaluator

    return worker_evaluator(evaluation, device=device)


def sources(args, root: Path) -> tuple[str, list[str], str]:
    zoo = REPO / "evals" / "zoo"
    experts = sorted(p for p in zoo.glob("expert_*") if (p / "config.json").is_file()) if zoo.is_dir() else []
    if not args.generate and (zoo / "base" / "config.json").is_file() and experts:
        return "demo zoo (evals/zoo)", [str(p) for p in experts], str(zoo / "base")
    from evomerge.tiny import build_tiny_family

    fam = build_tiny_family(root / "fam", arch="llama", n_experts=3, noise=0.05, seed=0,
                            num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.hidden * 2)
    label = (f"generated tiny family (llama, {args.layers} layers, hidden {args.hidden}"
             + ("; evals/zoo is not built" if not args.generate else "") + ")")
    return label, [str(fam[k]) for k in sorted(fam) if k != "base"], str(fam["base"])


def space_file(root: Path, experts: list[str], base: str, args) -> Path:
    space = {"name": "bench", "kind": "ps", "seed": 0,
             "ps": {"base": base, "sources": [{"name": f"e{i}", "model": m} for i, m in enumerate(experts)],
                    "method": "ties", "params": {"weight": {"low": 0.0, "high": 1.5},
                                                 "density": {"low": 0.2, "high": 1.0}, "lambda": 1.0}},
             "objectives": [{"metric": "combined"}],
             "optimizer": {"name": "pycma", "popsize": 4, "sigma0": 0.25, "seed": 1},
             "evaluation": {"kind": "suite", "suite": str(REPO / "evals" / "zoo_demo.yaml"), "batch_size": 32},
             "multi_fidelity": {"enabled": False}, "budget": {"trials": args.trials}, "baselines": False}
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def run_one(label: str, path: Path, root: Path, args, *, workers: int | None, naive: bool) -> dict:
    import functools

    import optuna

    from evomerge.search import start_search
    from evomerge.search.space import load_space
    from evomerge.search.study import read_meta

    space = load_space(path)
    make = naive_factory if naive else resident_factory
    executor = None
    if workers is not None:
        from evomerge.workers.ray_executor import RayExecutor

        gpus = 1.0 / workers if args.device == "cuda" else 0.0
        executor = RayExecutor(evaluator_factory=functools.partial(make, space.evaluation), workers=workers,
                               gpus_per_worker=gpus, cpus_per_worker=1.0, num_gpus=None)
        executor.wait_ready(600)
    out = root / label.replace(" ", "_")
    start_search(path, out, executor=executor, limit=args.limit, progress=False, report=False,
                 evaluator_factory=None if workers is not None else functools.partial(make, space.evaluation,
                                                                                     args.device))
    meta = read_meta(out)
    study = optuna.load_study(study_name=meta.study_name("ps"), storage=meta.storage)
    trials = [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]
    eval_s = sum(t.user_attrs.get("seconds", {}).get("eval", 0.0) for t in trials)
    n_w = workers or 1
    if executor is not None:
        st = executor.stats()
        mat = sum(v.get("materialize", 0.0) for v in executor.timings.values())
        executor.shutdown()
    else:
        st, mat = None, float("nan")
    # the search's wall time: first trial started to last trial finished (the held-out re-score of
    # the front that follows is not part of the search loop)
    search_wall = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    n = len(trials)
    return {"label": label, "workers": n_w, "n": n, "wall": search_wall,
            "per_min": 60.0 * n / search_wall, "busy": min(1.0, eval_s / (search_wall * n_w)),
            "driver_ms": 1000.0 * max(0.0, search_wall * n_w - eval_s) / max(n, 1),
            "eval_ms": 1000.0 * eval_s / max(n, 1),
            "retries": (st or {}).get("retries", 0), "materialize_ms": 1000.0 * mat / max(n, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--limit", type=int, default=8, help="items per task of the demo suite")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--generate", action="store_true", help="use a generated family even if the zoo is built")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)
    import ray
    import torch

    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        what, experts, base = sources(args, root)
        path = space_file(root, experts, base, args)
        print(f"sources: {what}; suite: evals/zoo_demo.yaml, {args.limit} items/task; {args.trials} trials "
              f"(TIES, pycma popsize 4); device {args.device}; torch threads {torch.get_num_threads()}")
        counts = [int(x) for x in args.workers.split(",") if x]
        gpus = torch.cuda.device_count() if args.device == "cuda" else None
        ray.init(address="local", num_cpus=max(counts + [os.cpu_count() or 1]), num_gpus=gpus,
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                                           "HF_HUB_OFFLINE": "1"}})
        rows = [run_one("in-process resident", path, root, args, workers=None, naive=False)]
        for w in counts:
            if not args.skip_naive:
                rows.append(run_one(f"ray naive disk x{w}", path, root, args, workers=w, naive=True))
            rows.append(run_one(f"ray resident x{w}", path, root, args, workers=w, naive=False))
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    naive = {r["workers"]: r["per_min"] for r in rows if "naive" in r["label"]}
    print()
    print(f"| {'path':<22} | workers | trials | cand/min | vs naive | busy | driver ms/trial | eval ms/cand |")
    print(f"|{'-' * 24}|---------|--------|----------|----------|------|-----------------|--------------|")
    for r in rows:
        ratio = r["per_min"] / naive[r["workers"]] if r["workers"] in naive else float("nan")
        print(f"| {r['label']:<22} | {r['workers']:>7} | {r['n']:>6} | {r['per_min']:>8.1f} | {ratio:>7.2f}x "
              f"| {r['busy']:.2f} | {r['driver_ms']:>15.0f} | {r['eval_ms']:>12.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
