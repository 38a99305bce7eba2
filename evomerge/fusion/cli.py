"""``evomerge eval --ensemble logit|panel|moa A B C --suite S.yaml``: score a fused candidate, print a table.

The table is ``evomerge eval``'s (per task: metric, score, standard error, items), followed by the
candidate's cost relative to one source (:mod:`evomerge.fusion.cost`). Options: ``--weights`` (logit:
one per model), ``--judge`` (panel: a model that ranks the answers instead of the panel),
``--normalize`` (panel: rank by per-token log-likelihood), ``--moa-config`` (moa: agents, layers,
aggregator; without ``agents`` the models given become local agents), ``--fusion-recipe`` (a
``kind: fusion`` YAML instead of the flags), and ``--split``, ``--limit``, ``--device``,
``--batch-size``, ``--backend``, ``--vllm-option`` as for a single model.
"""

from __future__ import annotations

import sys
from typing import Any

from evomerge.errors import ConfigError, EvalError, EvomergeError

ENSEMBLES = ("logit", "panel", "moa")


def format_cost(cost: dict[str, float]) -> str:
    """One line: the cost figures relative to one source."""
    if not cost:
        return "cost: nothing was scored"
    return (f"cost relative to one source: {cost['passes']:.3g} forward passes and {cost['read']:.3g}x the "
            f"parameters read per generated token; {cost['calls']:.3g} model calls per query; "
            f"{int(cost['models'])} model(s)")


def build_recipe(method: str | None, models: list[str], *, weights: list[float] | None = None,
                 judge: str | None = None, normalize: bool = False, moa_config: str | None = None,
                 recipe_path: str | None = None):
    """The fusion recipe the flags describe (or the ``--fusion-recipe`` file); ConfigError otherwise."""
    from evomerge.fusion.spec import fusion_problems, load_moa_config, parse_fusion
    from evomerge.io_utils import load_yaml_file

    if recipe_path is not None:
        if models or method or weights or judge or normalize or moa_config:
            raise ConfigError("--fusion-recipe gives the models and the method; drop the models and the --ensemble, "
                              "--weights, --judge, --normalize and --moa-config flags", source="evomerge eval")
        return parse_fusion(load_yaml_file(recipe_path, "fusion recipe"), source=recipe_path)
    data: dict[str, Any] = {"method": method, "models": list(models)}
    if weights is not None:
        data["weights"] = list(weights)
    if judge is not None:
        data["judge"] = judge
    if normalize:
        data["normalize"] = True
    if method == "moa":
        if moa_config is None and not models:
            raise ConfigError("--ensemble moa needs --moa-config (agents, layers, aggregator) or models to use as "
                              "agents", source="evomerge eval")
        if moa_config:  # the flags other than the models stay, so that the check names them
            cfg = load_moa_config(moa_config, default_models=list(models))
            del data["models"]
            data["moa"] = cfg.model_dump(exclude_none=True)
    elif moa_config is not None:
        raise ConfigError("--moa-config applies to --ensemble moa only", source="evomerge eval")
    flag = {"models": "the models", "weights": "--weights", "judge": "--judge", "normalize": "--normalize",
            "method": "--ensemble"}
    recipe, problems = fusion_problems(data)
    if problems:
        raise ConfigError([type(p)(flag.get(p.where.split(".")[0].split("[")[0], p.where), p.message, p.hint)
                           for p in problems], source="evomerge eval")
    return recipe


def ensemble_eval_command(models: list[str], suite_paths: list[str], method: str | None = None, *,
                          weights: list[float] | None = None, judge: str | None = None, normalize: bool = False,
                          moa_config: str | None = None, recipe_path: str | None = None, split: str = "search",
                          limit: int | None = None, device: str = "cpu", batch_size: int = 64,
                          backend: str = "hf", vllm_options: list[str] | dict | None = None, out=None) -> int:
    """What ``evomerge eval --ensemble`` runs; the exit status (2 on any EvomergeError, message on stderr)."""
    from evomerge.evaluate import format_results, load_suite
    from evomerge.evaluate.backends import make_backend
    from evomerge.evaluate.cli import scoring_options
    from evomerge.fusion.backend import LOGIT_ON_VLLM, FusionBackend
    from evomerge.fusion.evaluate import check_generation_only, score_suite
    from evomerge.fusion.sources import load_sources

    fused = None
    try:
        options = scoring_options(limit, batch_size, backend, vllm_options)
        recipe = build_recipe(method, models, weights=weights, judge=judge, normalize=normalize,
                              moa_config=moa_config, recipe_path=recipe_path)
        suites = [load_suite(p) for p in suite_paths]
        # what the recipe cannot score is refused before any model is loaded
        if recipe.method == "logit" and backend != "hf":
            raise EvalError(LOGIT_ON_VLLM)
        for s in suites:
            check_generation_only(recipe, [(t.name, t.kind) for t in s.tasks])
        sources = load_sources(recipe, device=device)
        fused = FusionBackend(make_backend(backend, options, device) if backend != "hf" else None, owns_inner=True)
        results, costs = [], []
        for s in suites:
            res, cost = score_suite(sources, fused, s, split, limit=limit, batch_size=batch_size)
            results.append(res)
            costs.append(cost)
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if fused is not None:
            fused.close()
    stream = out or sys.stdout
    print(format_results(results, f"{recipe.label()} ({split} split)"), file=stream)
    for s, cost in zip(suites, costs):
        print(f"{s.name}: {format_cost(cost)}", file=stream)
    return 0
