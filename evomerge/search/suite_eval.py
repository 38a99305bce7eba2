"""The task-suite evaluator (``evaluation: {kind: suite, suite: path, ...}``): a candidate recipe is
materialized in memory and scored by :class:`evomerge.evaluate.engine.Scorer` on a suite split.

Reported metrics: each task's primary score under the task's name, and ``combined`` (the suite's
weighted mean). ``fidelity`` scores at most ``ceil(fidelity * n_max)`` items of every task, n_max being
the largest task's item count (one cap for all tasks; the engine's seeded subsets are nested, so a
larger fidelity sees the smaller one's items too); ``limit`` caps the items per task.

Options: ``suite`` (path, required), ``device`` (default cpu), ``batch_size`` (64), ``seed`` (0),
``dtype`` (materialization dtype, default the recipe's), ``cache_dir`` (a folder where scores persist
across processes and restarts; default: in memory only).

A repeated candidate is never scored twice: results are cached under (recipe hash, suite fingerprint,
split, item cap, seed), and a hit skips materialization too. The recipe hash covers the model paths,
not their bytes: clear ``cache_dir`` after replacing a source model in place.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, Problem
from evomerge.recipe import Recipe, model_refs, recipe_hash
from evomerge.search.evaluation import EvalOutcome, register_evaluator, worker_name

_KEYS = {"suite", "device", "batch_size", "seed", "dtype", "cache_dir"}


class SuiteEvaluator:
    def __init__(self, suite: str, *, device: str = "cpu", batch_size: int = 64, seed: int = 0,
                 dtype: str | None = None, cache_dir: str | None = None):
        from evomerge.evaluate.cache import ScoreCache
        from evomerge.evaluate.suite import load_suite

        self.suite = load_suite(suite) if isinstance(suite, (str, Path)) else suite  # a path or a loaded Suite
        self.device, self.batch_size, self.seed, self.dtype = device, batch_size, seed, dtype
        self._scorers: dict[tuple[str, int | None], Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self.cache = ScoreCache(cache_dir)

    def metric_names(self) -> list[str]:
        return [t.name for t in self.suite.tasks] + ["combined"]

    def split_size(self, split: str) -> int | None:
        return sum(len(t.splits[split]) for t in self.suite.tasks)

    def _scorer(self, split: str, limit: int | None):
        from evomerge.evaluate.engine import Scorer

        key = (split, limit)
        if key not in self._scorers:
            self._scorers[key] = Scorer(self.suite, split, limit=limit, seed=self.seed,
                                        batch_size=self.batch_size, device=self.device, cache=self.cache)
        return self._scorers[key]

    def _tokenizer(self, ref: str):
        if ref not in self._tokenizers:
            from transformers import AutoTokenizer

            from evomerge.checkpoint import Checkpoint

            self._tokenizers[ref] = AutoTokenizer.from_pretrained(str(Checkpoint.open(ref).path))
        return self._tokenizers[ref]

    def model(self, recipe: Recipe):
        """The candidate as a transformers model on ``device`` (weights materialized in memory)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from evomerge.materialize import materialize_state_dict

        config, state = materialize_state_dict(recipe, device=self.device, dtype=self.dtype)
        cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"},
                                   model_type=config["model_type"])
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4
            from transformers.modeling_utils import no_init_weights
        # weights are not initialized (they are replaced below); buffers such as rotary
        # frequencies are computed as usual
        with no_init_weights(), torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise ConfigError(Problem("candidate", f"materialized weights do not fit the model: missing "
                                      f"{missing[:3]}, unexpected {unexpected[:3]}"))
        if cfg.tie_word_embeddings:
            model.tie_weights()
        return model.eval()

    def evaluate(self, recipe: Recipe, *, split: str, fidelity: float = 1.0,
                 limit: int | None = None) -> EvalOutcome:
        start = time.perf_counter()
        per_task = [len(t.splits[split]) for t in self.suite.tasks]
        cap = None
        if fidelity < 1:
            cap = max(1, math.ceil(fidelity * max(per_task)))
        if limit is not None:
            cap = limit if cap is None else min(cap, limit)
        scorer = self._scorer(split, cap)
        model_key = f"{recipe_hash(recipe)}|{self.dtype}"
        res = self.cache.get(scorer.cache_key(model_key))
        if res is None:
            model = self.model(recipe)
            tok = self._tokenizer(recipe.tokenizer or model_refs(recipe)[0])
            res = scorer.score(model, tok, model_key=model_key)
        scores = {name: r.score for name, r in res.tasks.items()} | {"combined": res.combined}
        n = {name: r.n for name, r in res.tasks.items()} | {"combined": res.n}
        se = {name: r.stderr for name, r in res.tasks.items()} | {"combined": res.combined_stderr}
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name())


@register_evaluator("suite")
def _suite_factory(config: dict[str, Any]) -> SuiteEvaluator:
    problems = [Problem(f"evaluation.{k}", f"unknown key '{k}'", f"allowed: {', '.join(sorted(_KEYS))}")
                for k in config if k not in _KEYS]
    if not isinstance(config.get("suite"), str):
        problems.append(Problem("evaluation.suite", "required key 'suite' (a task suite YAML path) is missing"))
    if problems:
        raise ConfigError(problems)
    return SuiteEvaluator(config["suite"], device=config.get("device", "cpu"),
                          batch_size=int(config.get("batch_size", 64)), seed=int(config.get("seed", 0)),
                          dtype=config.get("dtype"), cache_dir=config.get("cache_dir"))
