"""Shared helpers of the search tests (no tests here): tiny model families and search-space files."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.materialize import merge_to_disk
from evomerge.recipe import parse_recipe
from evomerge.tiny import build_tiny_family

TARGET_WEIGHTS = (0.25, 0.8)  # the known optimum of the weight-distance objective below


def family(root: Path, *, n_experts: int = 2, noise: float = 0.5, arch: str = "llama", seed: int = 3) -> dict[str, str]:
    """A tiny family (base + experts); large noise so task vectors dominate the weights."""
    paths = build_tiny_family(root, arch=arch, n_experts=n_experts, noise=noise, seed=seed)
    return {k: str(v) for k, v in paths.items()}


def target_model(fam: dict[str, str], out: Path, weights=TARGET_WEIGHTS) -> str:
    """A checkpoint built by a known task-arithmetic recipe: the optimum a search must find."""
    recipe = parse_recipe({"method": "task_arithmetic", "base": fam["base"],
                           "sources": [{"model": fam[f"expert{i + 1}"], "params": {"weight": w}}
                                       for i, w in enumerate(weights)]})
    return str(merge_to_disk(recipe, out, progress=False))


def ps_space(fam: dict[str, str], target: str, **over) -> dict:
    space = {
        "name": "t",
        "kind": "ps",
        "ps": {"base": fam["base"],
               "sources": [{"name": "e1", "model": fam["expert1"]}, {"name": "e2", "model": fam["expert2"]}],
               "method": "task_arithmetic", "params": {"lambda": 1.0}},
        "objectives": [{"metric": "combined"}],
        "optimizer": {"name": "pycma", "popsize": 6, "sigma0": 0.3, "seed": 1},
        "evaluation": {"kind": "weights", "target": target},
        "multi_fidelity": {"enabled": False},
        "budget": {"trials": 12},
    }
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **val}
        else:
            space[key] = val
    return space


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def write_suite(root: Path, tasks: list[dict], name: str = "tiny") -> str:
    """A suite under ``root``: each task mapping's ``rows`` ({split: [record, ...]}) written to
    ``data/<task>.<split>.jsonl``, the rest of the mapping kept as the task's entry; returns the
    suite file's path."""
    import json

    (root / "data").mkdir(exist_ok=True)
    entries = []
    for task in tasks:
        task = dict(task)
        files = {}
        for split, rows in task.pop("rows").items():
            files[split] = f"data/{task['name']}.{split}.jsonl"
            (root / files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        entries.append({**task, "data": files})
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": name, "tasks": entries}, sort_keys=False))
    return str(suite)
