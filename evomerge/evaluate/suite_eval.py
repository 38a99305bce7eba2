"""The task-suite evaluator (``evaluation: {kind: suite, suite: path, ...}``): a candidate recipe is
materialized in memory and scored by :class:`evomerge.evaluate.engine.Scorer` on a suite split.

Reported metrics: each task's primary score under the task's name, and ``combined`` (the suite's
weighted mean). ``fidelity`` scores at most ``ceil(fidelity * n_max)`` items of every task, n_max being
the largest task's item count (one cap for all tasks; the engine's seeded subsets are nested, so a
larger fidelity sees the smaller one's items too); ``limit`` caps the items per task.

Options: ``suite`` (path, required), ``device`` (default cpu), ``batch_size`` (64), ``seed`` (0),
``dtype`` (materialization dtype, default the recipe's), ``cache_dir`` (a folder where scores persist
across processes and restarts; default: in memory only), ``backend`` (``hf``, the default, or
``vllm``: see :mod:`evomerge.evaluate.backends`), ``vllm`` (the vLLM engine's options, a mapping:
:mod:`evomerge.evaluate.backends.vllm`) and ``validation`` (the fraction of the search split carved
out as the ``validation`` sample a search chooses its winner on, 0 for none; default ``auto``:
:mod:`evomerge.evaluate.views`). Every outcome carries each item's score and id (``items``).

A repeated candidate is never scored twice: results are cached under (recipe hash, dtype, backend,
suite fingerprint, split, item cap, seed), and a hit skips materialization too. The recipe hash covers the model paths,
not their bytes: clear ``cache_dir`` after replacing a source model in place.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from evomerge.dtypes import dtype_problem
from evomerge.errors import ConfigError, Problem
from evomerge.evaluate import views
from evomerge.evaluate.backends.vllm import once_more_on_engine_failure
from evomerge.recipe import Recipe, recipe_hash, tokenizer_model
from evomerge.evaluate.evaluators import EvalOutcome, register_evaluator, worker_name

_KEYS = {"suite", "device", "batch_size", "seed", "dtype", "cache_dir", "backend", "vllm", "validation"}


class SuiteEvaluator:
    def __init__(self, suite: str, *, device: str = "cpu", batch_size: int = 64, seed: int = 0,
                 dtype: str | None = None, cache_dir: str | None = None, backend: str = "hf",
                 vllm: dict | None = None, validation: float | str = "auto"):
        from evomerge.evaluate.backends import make_backend
        from evomerge.evaluate.cache import ScoreCache
        from evomerge.suites import load_suite

        self.suite = load_suite(suite) if isinstance(suite, (str, Path)) else suite  # a path or a loaded Suite
        self.device, self.batch_size, self.seed, self.dtype = device, batch_size, seed, dtype
        self._scorers: dict[tuple[str, int | None], Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self.cache = ScoreCache(cache_dir)
        self.backend_name = backend
        self.backend = make_backend(backend, vllm, device)
        # the validation sample carved out of the search split (evomerge.evaluate.views)
        self.validation = views.resolve_fraction(validation, sum(len(t.splits["search"]) for t in self.suite.tasks))
        self._views: dict[str, views.SplitView] = {}

    def metric_names(self) -> list[str]:
        return [t.name for t in self.suite.tasks] + ["combined"]

    def view(self, split: str) -> views.SplitView:
        """The items ``split`` scores (``search``, ``validation`` or ``held-out``) and their ids."""
        if split not in self._views:
            self._views[split] = views.split_view(self.suite, split, self.validation)
        return self._views[split]

    def split_size(self, split: str) -> int | None:
        if split == views.VALIDATION and not self.validation:
            return None
        return sum(len(ids) for ids in self.view(split).ids.values())

    def _scorer(self, split: str, limit: int | None):
        from evomerge.evaluate.engine import Scorer

        key = (split, limit)
        if key not in self._scorers:
            view = self.view(split)
            self._scorers[key] = Scorer(view.suite, view.split, limit=limit, seed=self.seed,
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
                 limit: int | None = None, bar: dict | None = None,
                 items: dict[str, list[int]] | None = None) -> EvalOutcome:
        """Scores of ``recipe`` on ``split`` with per-item results; with ``bar`` (a
        :class:`~evomerge.evaluate.views.Bar` as a dict) scoring stops as soon as the bar is out of
        reach, and the outcome's ``items["stopped"]`` holds the bounds (scores then cover the items
        scored so far); with ``items`` (item ids per task) exactly those items are scored."""
        if items is not None:
            return self._chosen(recipe, split, items)
        start = time.perf_counter()
        per_task = [len(ids) for ids in self.view(split).ids.values()]
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
        stopped = None
        if res is None:
            model = self.model(recipe)
            tok = self._tokenizer(tokenizer_model(recipe))
            if bar is None:
                res = once_more_on_engine_failure(lambda: scorer.score(model, tok, model_key=model_key))
            else:
                res, stopped = once_more_on_engine_failure(lambda: self._bounded(scorer, model, tok, bar, model_key))
        scores = {name: r.score for name, r in res.tasks.items()} | {"combined": res.combined}
        n = {name: r.n for name, r in res.tasks.items()} | {"combined": res.n}
        se = {name: r.stderr for name, r in res.tasks.items()} | {"combined": res.combined_stderr}
        ids = views.scored_ids(self.view(split), cap, self.seed)
        if stopped is not None:
            ids = {name: ids[name][:r.n] for name, r in res.tasks.items()}
        items = views.items_payload(scorer.suite, res.tasks, ids)
        if stopped is not None:
            items["stopped"] = stopped
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name(), self.backend.stats(), items)

    def _chosen(self, recipe: Recipe, split: str, items: dict[str, list[int]]) -> EvalOutcome:
        """Scores on the items ``items`` names (ids of ``split``'s view), cached under those ids."""
        import hashlib

        from evomerge.evaluate.engine import SuiteResult, combine, score_tasks

        start = time.perf_counter()
        view = self.view(split)
        ids = {t: [int(i) for i in items[t]] for t in view.ids if items.get(t)}
        work = []
        for task in view.suite.tasks:
            if task.name in ids:
                where = {i: k for k, i in enumerate(view.ids[task.name])}
                work.append((task, [task.splits[view.split][where[i]] for i in ids[task.name]]))
        digest = hashlib.sha256(repr(sorted(ids.items())).encode()).hexdigest()[:16]
        model_key = f"{recipe_hash(recipe)}|{self.dtype}|{self.backend_name}"
        key = f"{model_key}|{view.suite.fingerprint}|{split}|items:{digest}|{self.seed}"
        res = self.cache.get(key)
        if res is None:
            model = self.model(recipe)
            tok = self._tokenizer(tokenizer_model(recipe))
            # the LM is made inside the retry: a failed engine is closed and the retry needs a fresh one
            results = once_more_on_engine_failure(lambda: score_tasks(
                self.backend.lm(model, tok, batch_size=self.batch_size, device=self.device), work))
            combined, cse = combine(results)
            res = SuiteResult(suite=view.suite.name, split=split, limit=None, seed=self.seed, tasks=results,
                              combined=combined, combined_stderr=cse, seconds=time.perf_counter() - start)
            self.cache.put(key, res)
        scores = {name: r.score for name, r in res.tasks.items()} | {"combined": res.combined}
        n = {name: r.n for name, r in res.tasks.items()} | {"combined": res.n}
        se = {name: r.stderr for name, r in res.tasks.items()} | {"combined": res.combined_stderr}
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name(), self.backend.stats(),
                           views.items_payload(view.suite, res.tasks, ids))

    def _bounded(self, scorer, model, tok, bar: dict, model_key: str):
        """``scorer``'s result scored slice by slice until ``bar`` is out of reach: (result, None) when
        every item was scored (cached like any result), (partial result, the bounds: see
        :func:`evomerge.evaluate.views.score_bounded`) when it stopped."""
        from evomerge.evaluate.engine import SuiteResult, combine

        t0 = time.perf_counter()
        b = views.Bar.from_dict(bar)
        lm = self.backend.lm(model, tok, batch_size=self.batch_size, device=scorer.device)
        work = [(t, scorer.items[t.name]) for t in scorer.suite.tasks]
        results, stopped = views.score_bounded(lm, work, b, scorer.suite, min_chunk=self.batch_size)
        combined, cse = combine(results)
        res = SuiteResult(suite=scorer.suite.name, split=scorer.split, limit=scorer.limit, seed=scorer.seed,
                          tasks=results, combined=combined, combined_stderr=cse, seconds=time.perf_counter() - t0)
        if stopped is None:
            self.cache.put(scorer.cache_key(model_key), res)
        return res, stopped

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


def int_option(config: dict[str, Any], key: str, default: int, low: int, problems: list[Problem]) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(Problem(f"evaluation.{key}", f"expected a whole number >= {low}, got {value!r}"))
        return default
    return value


@register_evaluator("suite", paths=("suite", "cache_dir"))
def suite_evaluator(config: dict[str, Any]) -> SuiteEvaluator:
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
    batch_size = int_option(config, "batch_size", 64, 1, problems)
    seed = int_option(config, "seed", 0, 0, problems)
    if "device" in config:
        problems += check_device(config["device"], "evaluation.device")
    dtype = config.get("dtype")
    if dtype is not None and (problem := dtype_problem(dtype, "evaluation.dtype")) is not None:
        problems.append(problem)
    cache_dir = config.get("cache_dir")
    if cache_dir is not None:
        if not isinstance(cache_dir, str) or not cache_dir:
            problems.append(Problem("evaluation.cache_dir", f"expected a folder path, got {cache_dir!r}"))
        elif Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            problems.append(Problem("evaluation.cache_dir", f"{cache_dir} is a file, not a folder",
                                    "give a folder path (it is created when missing)"))
    problems += backend_problems(config.get("backend", "hf"), config.get("vllm"), "evaluation.backend")
    if (why := views.fraction_problem(config.get("validation", "auto"))) is not None:
        problems.append(Problem("evaluation.validation", why, "e.g. validation: 0.25"))
    if problems:
        raise ConfigError(problems)
    try:
        return SuiteEvaluator(config["suite"], device=config.get("device", "cpu"), batch_size=batch_size,
                              seed=seed, dtype=dtype, cache_dir=cache_dir, backend=config.get("backend", "hf"),
                              vllm=config.get("vllm"), validation=config.get("validation", "auto"))
    except EvalError as err:
        raise ConfigError(Problem("evaluation.suite", str(err))) from None
    except OSError as err:  # the cache folder cannot be created
        raise ConfigError(Problem("evaluation.cache_dir", f"cannot use {cache_dir}: {err.strerror or err}")) from None


