"""The task-suite evaluator (``evaluation: {kind: suite, suite: path, ...}``): a candidate recipe is
materialized in memory and scored by :class:`evomerge.evaluate.engine.Scorer` on a suite split.

Reported metrics: each task's primary score under the task's name, and ``combined`` (the suite's
weighted mean). ``fidelity`` scores at most ``ceil(fidelity * n_max)`` items of every task, n_max being
the largest task's item count (one cap for all tasks; the engine's seeded subsets are nested, so a
larger fidelity sees the smaller one's items too); ``limit`` caps the items per task.

Options: ``suite`` (path, required), ``device`` (default cpu), ``batch_size`` (64), ``seed`` (0),
``dtype`` (materialization dtype, default the recipe's), ``cache_dir`` (a folder where scores persist
across processes and restarts; default: in memory only), ``backend`` (``hf``, the default, or
``vllm``: see :mod:`evomerge.evaluate.backends`) and ``vllm`` (the vLLM engine's options, a mapping:
:mod:`evomerge.evaluate.backends.vllm`).

A repeated candidate is never scored twice: results are cached under (recipe hash, dtype, backend,
suite fingerprint, split, item cap, seed), and a hit skips materialization too. The recipe hash covers the model paths,
not their bytes: clear ``cache_dir`` after replacing a source model in place.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, Problem
from evomerge.evaluate.backends.vllm import once_more_on_engine_failure
from evomerge.recipe import Recipe, model_refs, recipe_hash
from evomerge.evaluate.evaluators import EvalOutcome, register_evaluator, worker_name

_KEYS = {"suite", "device", "batch_size", "seed", "dtype", "cache_dir", "backend", "vllm"}


class SuiteEvaluator:
    def __init__(self, suite: str, *, device: str = "cpu", batch_size: int = 64, seed: int = 0,
                 dtype: str | None = None, cache_dir: str | None = None, backend: str = "hf",
                 vllm: dict | None = None):
        from evomerge.evaluate.backends import make_backend
        from evomerge.evaluate.cache import ScoreCache
        from evomerge.evaluate.suite import load_suite

        self.suite = load_suite(suite) if isinstance(suite, (str, Path)) else suite  # a path or a loaded Suite
        self.device, self.batch_size, self.seed, self.dtype = device, batch_size, seed, dtype
        self._scorers: dict[tuple[str, int | None], Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self.cache = ScoreCache(cache_dir)
        self.backend_name = backend
        self.backend = make_backend(backend, vllm, device)

    def metric_names(self) -> list[str]:
        return [t.name for t in self.suite.tasks] + ["combined"]

    def split_size(self, split: str) -> int | None:
        return sum(len(t.splits[split]) for t in self.suite.tasks)

    def _scorer(self, split: str, limit: int | None):
        from evomerge.evaluate.engine import Scorer

        key = (split, limit)
        if key not in self._scorers:
            self._scorers[key] = Scorer(self.suite, split, limit=limit, seed=self.seed,
                                        batch_size=self.batch_size, device=self.device, cache=self.cache,
                                        backend=self.backend)
        return self._scorers[key]

    def _tokenizer(self, ref: str):
        if ref not in self._tokenizers:
            self._tokenizers[ref] = load_tokenizer(ref)
        return self._tokenizers[ref]

    def model(self, recipe: Recipe):
        """The candidate as a transformers model on ``device`` (weights materialized in memory)."""
        return materialize_model(recipe, device=self.device, dtype=self.dtype)

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
        if self.backend_name != "hf":
            model_key += f"|{self.backend_name}"
        res = self.cache.get(scorer.cache_key(model_key))
        if res is None:
            model = self.model(recipe)
            tok = self._tokenizer(recipe.tokenizer or model_refs(recipe)[0])
            res = once_more_on_engine_failure(lambda: scorer.score(model, tok, model_key=model_key))
        scores = {name: r.score for name, r in res.tasks.items()} | {"combined": res.combined}
        n = {name: r.n for name, r in res.tasks.items()} | {"combined": res.n}
        se = {name: r.stderr for name, r in res.tasks.items()} | {"combined": res.combined_stderr}
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name(), self.backend.stats())

    def close(self) -> None:
        """Stop what the backend started (vLLM engines)."""
        self.backend.close()


def load_tokenizer(ref: str):
    """The tokenizer saved with the model at ``ref``."""
    from transformers import AutoTokenizer

    from evomerge.checkpoint import Checkpoint

    return AutoTokenizer.from_pretrained(str(Checkpoint.open(ref).path))


def materialize_model(recipe: Recipe, *, device: str = "cpu", dtype: str | None = None):
    """A candidate recipe as a transformers model on ``device`` (weights materialized in memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.materialize import materialize_state_dict

    config, state = materialize_state_dict(recipe, device=device, dtype=dtype)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"},
                               model_type=config["model_type"])
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    # weights are not initialized (they are replaced below); buffers such as rotary
    # frequencies are computed as usual
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(Problem("candidate", f"materialized weights do not fit the model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}"))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def _int(config: dict[str, Any], key: str, default: int, low: int, problems: list[Problem]) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(Problem(f"evaluation.{key}", f"expected a whole number >= {low}, got {value!r}"))
        return default
    return value


@register_evaluator("suite", paths=("suite", "cache_dir"))
def _suite_factory(config: dict[str, Any]) -> SuiteEvaluator:
    """The suite evaluator; every problem of the mapping at once (a :class:`ConfigError`), and the
    suite file's own problems (missing, invalid, data files) as the suite loader reports them."""
    from evomerge.errors import EvalError
    from evomerge.evaluate.backends import backend_problems
    from evomerge.evaluate.evaluators import check_device

    problems = [Problem(f"evaluation.{k}", f"unknown key '{k}'", f"allowed: {', '.join(sorted(_KEYS))}")
                for k in config if k not in _KEYS]
    suite = config.get("suite")
    if not isinstance(suite, str) or not suite:
        problems.append(Problem("evaluation.suite", "required key 'suite' (a task suite YAML path) is missing"
                                if suite is None else f"expected a task suite YAML path, got {suite!r}"))
    elif not Path(suite).is_file():
        problems.append(Problem("evaluation.suite", f"suite file {suite} "
                                + ("is a folder" if Path(suite).is_dir() else "does not exist"),
                                "give the path of a task suite YAML (e.g. evals/zoo_demo.yaml)"))
    batch_size = _int(config, "batch_size", 64, 1, problems)
    seed = _int(config, "seed", 0, 0, problems)
    if "device" in config:
        problems += check_device(config["device"], "evaluation.device")
    dtype = config.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        problems.append(Problem("evaluation.dtype", f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16"))
    cache_dir = config.get("cache_dir")
    if cache_dir is not None:
        if not isinstance(cache_dir, str) or not cache_dir:
            problems.append(Problem("evaluation.cache_dir", f"expected a folder path, got {cache_dir!r}"))
        elif Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            problems.append(Problem("evaluation.cache_dir", f"{cache_dir} is a file, not a folder",
                                    "give a folder path (it is created when missing)"))
    problems += backend_problems(config.get("backend", "hf"), config.get("vllm"), "evaluation.backend")
    if problems:
        raise ConfigError(problems)
    try:
        return SuiteEvaluator(config["suite"], device=config.get("device", "cpu"), batch_size=batch_size,
                              seed=seed, dtype=dtype, cache_dir=cache_dir, backend=config.get("backend", "hf"),
                              vllm=config.get("vllm"))
    except EvalError as err:
        raise ConfigError(Problem("evaluation.suite", str(err))) from None
    except OSError as err:  # the cache folder cannot be created
        raise ConfigError(Problem("evaluation.cache_dir", f"cannot use {cache_dir}: {err.strerror or err}")) from None
