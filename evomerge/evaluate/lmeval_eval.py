"""The lm-eval evaluator (``evaluation: {kind: lmeval, tasks: [...], ...}``): a candidate recipe is
materialized in memory (as by the task-suite evaluator) and scored by lm-eval's ``simple_evaluate``
through its HF wrapper (or a running vLLM engine: ``backend: vllm``), on chosen documents of each task.

Splits: each task's evaluation documents are shuffled by a generator seeded with ``seed`` plus a
stable hash of the task's name; the first ``ceil(held_out * N)`` of that order are the ``held-out``
split, the rest the ``search`` split (disjoint, identical in every run and process). ``fidelity``
scores the first ``ceil(fidelity * n)`` documents of a task's shuffled split (so a larger fidelity
contains a smaller one's documents), ``limit`` caps the documents per task; they are passed to lm-eval
as ``samples=`` (never ``limit=``).

Reported metrics: each task's primary metric (acc, exact_match, ... as lm-eval reports it) under the
task's name; for a listed group (``mmlu``, a custom group YAML) each of its leaf tasks, and the group
under its own name (the leaves' scores weighted by documents scored, as lm-eval aggregates groups);
``combined``: the mean over the names as listed (a group counts once).

Options: ``tasks`` (lm-eval task names, required), ``include_path`` (a folder of custom task YAMLs),
``num_fewshot``, ``apply_chat_template`` (false), ``gen_kwargs`` and ``model_args`` (mappings, passed
to lm-eval and its ``HFLM``), ``batch_size`` (8), ``held_out`` (0.3), ``seed`` (0), ``device`` (cpu),
``backend`` and ``vllm`` (below), ``cache_dir`` (a folder where scores persist across processes and
restarts; default: in memory only).

A repeated candidate is never scored twice: results are cached under (recipe hash, backend, the
options that change a score, the task files' contents under ``include_path``, the documents scored),
and a hit skips materialization too. As for suites, the recipe hash covers model paths, not bytes.

Backends: ``backend: hf`` (the default) wraps each candidate's transformers model in lm-eval's
``HFLM``. ``backend: vllm`` scores with a vLLM engine that this evaluator (one per worker) starts on
its first candidate and keeps: every later candidate's weights are pushed into the running engine in
place (never through disk, never by restarting it; a candidate of another shape, e.g. another DFS
depth, gets its own engine, see :mod:`evomerge.evaluate.backends.vllm`). lm-eval's requests are
answered through :class:`evomerge.evaluate.backends.lmeval_lm.BackendLM`, which tokenizes as
``HFLM`` does; generation is greedy only (``until`` and ``max_gen_toks`` are honoured, sampling
arguments are refused), ``batch_size`` does not apply (vLLM schedules all requests of a call
together), and ``model_args`` (``HFLM``'s arguments) are refused: engine settings go under ``vllm``
(a mapping: ``max_model_len``, ``kv_cache_gb``, ``gpu_memory_utilization``, ``engine_args``, ...).
Each outcome carries the backend's counters (engine starts, reloads), which the search stores in the
trial's ``backend`` attribute. Splits, sample counts and standard errors are the same for both.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import time
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, Problem
from evomerge.recipe import Recipe, recipe_hash, tokenizer_model
from evomerge.splits import SPLITS, split_error
from evomerge.evaluate.evaluators import (
    EvalOutcome,
    register_evaluator,
    worker_name,
)

_KEYS = {"tasks", "include_path", "num_fewshot", "apply_chat_template", "gen_kwargs", "model_args",
         "batch_size", "held_out", "seed", "device", "cache_dir", "backend", "vllm"}


def _name_hash(name: str) -> int:
    """A hash of a task name that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def carve_splits(sizes: dict[str, int], held_out: float, seed: int) -> dict[str, dict[str, list[int]]]:
    """``{split: {task: shuffled document indices}}``: per task, the held-out split is the first
    ``ceil(held_out * N)`` indices of a seeded permutation (at least one, leaving at least one for
    search), the search split the rest."""
    splits: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    for task, n in sizes.items():
        order = list(range(n))
        random.Random(seed + _name_hash(task)).shuffle(order)
        k = min(max(math.ceil(held_out * n), 1), n - 1)
        splits["held-out"][task], splits["search"][task] = order[:k], order[k:]
        assert not set(order[:k]) & set(order[k:]), task
    return splits


class LmEvalEvaluator:
    def __init__(self, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                 apply_chat_template: bool = False, gen_kwargs: dict | None = None,
                 model_args: dict | None = None, batch_size: int = 8, held_out: float = 0.3, seed: int = 0,
                 device: str = "cpu", task_manager=None, sizes: dict[str, int] | None = None,
                 backend: str = "hf", vllm: dict | None = None, cache_dir: str | None = None,
                 groups: dict[str, list[str]] | None = None):
        """``task_manager`` and ``sizes`` (documents per task): as found by the factory (else built);
        ``backend`` and ``vllm``: the scoring backend and its options (its engines live as long as
        this evaluator: :meth:`close` stops them)."""
        from evomerge.evaluate.backends import make_backend
        from evomerge.evaluate.lmeval import set_offline
        from evomerge.evaluate.lmeval import task_manager as make_task_manager

        set_offline()
        self.listed = list(tasks)  # as the user wrote them: tasks and groups
        self.groups = dict(groups or {})
        self.tasks = list(dict.fromkeys(t for name in self.listed for t in self.groups.get(name, [name])))
        self.include_path = include_path
        self.num_fewshot, self.apply_chat_template = num_fewshot, apply_chat_template
        self.gen_kwargs, self.model_args = gen_kwargs, model_args
        self.batch_size, self.held_out, self.seed, self.device = batch_size, held_out, seed, device
        self.task_manager = task_manager or make_task_manager(self.listed, include_path)
        if sizes is None:
            leaves, self.groups, sizes = expand_tasks(self.listed, self.task_manager)
            self.tasks = leaves
        self.sizes = {t: sizes[t] for t in self.tasks}
        self.splits = carve_splits(self.sizes, held_out, seed)
        self._tokenizers: dict[str, Any] = {}
        self.backend_name = backend
        self.backend = make_backend(backend, vllm, device)
        from evomerge.evaluate.cache import ScoreCache

        self.cache = ScoreCache(cache_dir)
        self.fingerprint = self._fingerprint()
        self.resident: Any = None  # evomerge.evaluate.resident.ResidentModels, attached by search workers

    def _fingerprint(self) -> str:
        """What, besides the candidate and the documents, decides a score: the options and the
        custom task files (their contents)."""
        h = hashlib.sha256(repr((self.tasks, self.num_fewshot, self.apply_chat_template, self.gen_kwargs,
                                 self.model_args, self.seed, self.backend_name)).encode())
        if self.include_path:
            for f in sorted(Path(self.include_path).rglob("*")):
                if f.is_file() and f.suffix in (".yaml", ".yml", ".py", ".jsonl", ".json"):
                    h.update(str(f.relative_to(self.include_path)).encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]

    def model(self, recipe: Recipe):
        """The candidate as a transformers model on ``device``: written in place into a model built
        from sources held in memory when a worker attached its :class:`ResidentModels` (``resident``),
        else materialized from the checkpoints."""
        if self.resident is not None:
            return self.resident.model(recipe)
        from evomerge.evaluate.suite_eval import materialize_model

        return materialize_model(recipe, device=self.device)

    def metric_names(self) -> list[str]:
        return [*self.tasks, *self.groups, "combined"]

    def split_size(self, split: str) -> int | None:
        return sum(len(v) for v in self.splits[split].values())

    def samples(self, split: str, fidelity: float = 1.0, limit: int | None = None) -> dict[str, list[int]]:
        """The document indices scored per task (sorted, as lm-eval walks them in document order)."""
        if split not in self.splits:
            raise ValueError(split_error(split) or f"no split {split!r} here")
        out = {}
        for task, order in self.splits[split].items():
            k = len(order) if fidelity >= 1 else max(1, math.ceil(fidelity * len(order)))
            if limit is not None:
                k = min(k, max(1, limit))
            out[task] = sorted(order[:k])
        return out

    def _tokenizer(self, ref: str):
        from evomerge.evaluate.suite_eval import load_tokenizer

        if ref not in self._tokenizers:
            self._tokenizers[ref] = load_tokenizer(ref)
        return self._tokenizers[ref]

    def evaluate(self, recipe: Recipe, *, split: str, fidelity: float = 1.0,
                 limit: int | None = None) -> EvalOutcome:
        from evomerge.evaluate.backends.vllm import once_more_on_engine_failure
        from evomerge.evaluate.lmeval import lmeval_score

        start = time.perf_counter()
        samples = self.samples(split, fidelity, limit)
        docs = hashlib.sha256(repr(sorted(samples.items())).encode()).hexdigest()[:16]
        key = f"{recipe_hash(recipe)}|lmeval|{self.fingerprint}|{split}|{docs}"
        res = self.cache.get(key)
        if res is None:
            model = self.model(recipe)
            tok = self._tokenizer(tokenizer_model(recipe))
            res = once_more_on_engine_failure(lambda: lmeval_score(
                model, tok, self.tasks, include_path=self.include_path, samples=samples,
                batch_size=self.batch_size, seed=self.seed, num_fewshot=self.num_fewshot,
                apply_chat_template=self.apply_chat_template, gen_kwargs=self.gen_kwargs,
                model_args=self.model_args, tasks_from=self.task_manager, backend=self.backend))
            self.cache.put(key, res)
        scores = {name: r.score for name, r in res.tasks.items() if name in self.tasks}
        n = {name: r.n for name, r in res.tasks.items() if name in self.tasks}
        se = {name: r.stderr for name, r in res.tasks.items() if name in self.tasks}
        gs, gn, gse = group_scores(self.groups, scores, n, se)
        scores, n, se = scores | gs, n | gn, se | gse
        # combined: the mean over the names as listed (a group counts once, with its own score)
        k = len(self.listed)
        scores["combined"] = sum(scores[name] for name in self.listed) / k
        n["combined"] = sum(n[t] for t in self.tasks)
        se["combined"] = math.sqrt(sum(se[name] ** 2 for name in self.listed)) / k
        return EvalOutcome(scores, n, se, time.perf_counter() - start, worker_name(), self.backend.stats())

    def close(self) -> None:
        """Stop what the backend started (vLLM engines)."""
        self.backend.close()


def expand_tasks(names: list[str], tm) -> tuple[list[str], dict[str, list[str]], dict[str, int]]:
    """The listed names as lm-eval builds them: (leaf tasks in order, each listed group's leaf tasks,
    evaluation documents per leaf task). A group (e.g. ``mmlu``, or a custom group YAML) stands for
    its leaf tasks, nested groups included; each leaf is split and scored on its own. Raises
    :class:`ConfigError` for tasks that fail to load."""
    try:
        loaded = tm.load(list(names))
    except Exception as err:  # noqa: BLE001 - lm-eval raises many kinds (missing data, bad YAML)
        raise ConfigError(Problem("evaluation.tasks", f"lm-eval cannot build the tasks {names}: {err}",
                                  "check the task YAMLs and their data files")) from None
    group_map = loaded.get("group_map", {})

    def leaves(name: str, seen: tuple[str, ...] = ()) -> list[str]:
        if name in loaded["tasks"] and name not in loaded["groups"]:
            return [name]
        out = []
        for child in group_map.get(name, []):
            if child not in seen:
                out += leaves(child, (*seen, name))
        return out

    order: list[str] = []
    groups: dict[str, list[str]] = {}
    problems = []
    for name in names:
        found = leaves(name)
        if not found:
            problems.append(Problem("evaluation.tasks", f"lm-eval built no task for '{name}'",
                                    "check its YAML (a group needs at least one task)"))
            continue
        if name in loaded["groups"]:
            groups[name] = list(dict.fromkeys(found))
        order += [t for t in found if t not in order]
    if problems:
        raise ConfigError(problems)
    return order, groups, {t: len(loaded["tasks"][t].eval_docs) for t in order}


def task_sizes(names: list[str], tm) -> dict[str, int]:
    """Evaluation documents per leaf task of ``names`` (groups expanded)."""
    return expand_tasks(names, tm)[2]


def group_scores(groups: dict[str, list[str]], scores: dict[str, float], n: dict[str, int],
                 se: dict[str, float]) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Each group's score: the mean of its leaf tasks' scores weighted by the documents scored (as
    lm-eval aggregates groups by size), its sample size and standard error (leaves scored on
    independent documents)."""
    gs, gn, gse = {}, {}, {}
    for g, leaves in groups.items():
        total = sum(n[t] for t in leaves)
        gs[g] = sum(n[t] * scores[t] for t in leaves) / total
        gn[g] = total
        gse[g] = math.sqrt(sum((n[t] * se[t]) ** 2 for t in leaves)) / total
    return gs, gn, gse


@register_evaluator("lmeval", paths=("include_path", "cache_dir"))
def _lmeval_factory(config: dict[str, Any]) -> LmEvalEvaluator:
    """The lm-eval evaluator; every problem of the mapping at once (a :class:`ConfigError`)."""
    from evomerge.evaluate.backends import backend_problems
    from evomerge.evaluate.evaluators import check_device
    from evomerge.evaluate.suite_eval import int_option

    problems = [Problem(f"evaluation.{k}", f"unknown key '{k}'", f"allowed: {', '.join(sorted(_KEYS))}")
                for k in config if k not in _KEYS]
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        problems.append(Problem("evaluation.tasks", "required key 'tasks' (a list of lm-eval task names) is missing"
                                if tasks is None else f"expected a list of lm-eval task names, got {tasks!r}",
                                "e.g. tasks: [arc_easy] or custom tasks under include_path"))
        tasks = None
    include_path = config.get("include_path")
    if include_path is not None and (not isinstance(include_path, str) or not Path(include_path).is_dir()):
        problems.append(Problem("evaluation.include_path", f"{include_path!r} is not a folder",
                                "give the folder holding the custom task YAMLs"))
        include_path = False  # unusable: task names are not looked up
    num_fewshot = config.get("num_fewshot")
    if num_fewshot is not None:
        num_fewshot = int_option(config, "num_fewshot", 0, 0, problems)
    chat = config.get("apply_chat_template", False)
    if not isinstance(chat, bool):
        problems.append(Problem("evaluation.apply_chat_template", f"expected true or false, got {chat!r}"))
    for key in ("gen_kwargs", "model_args"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            problems.append(Problem(f"evaluation.{key}", f"expected a mapping, got {config[key]!r}",
                                    "e.g. {max_gen_toks: 16}" if key == "gen_kwargs" else "e.g. {max_length: 512}"))
    batch_size = int_option(config, "batch_size", 8, 1, problems)
    seed = int_option(config, "seed", 0, 0, problems)
    held_out = config.get("held_out", 0.3)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 < held_out < 1:
        problems.append(Problem("evaluation.held_out", f"expected a fraction strictly between 0 and 1, got {held_out!r}",
                                "e.g. held_out: 0.3 (the share of each task's documents kept for held-out)"))
    if "device" in config:
        problems += check_device(config["device"], "evaluation.device")
    cache_dir = config.get("cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir
                                  or (Path(cache_dir).exists() and not Path(cache_dir).is_dir())):
        problems.append(Problem("evaluation.cache_dir", f"expected a folder path, got {cache_dir!r}",
                                "give a folder path (it is created when missing)"))
    backend = config.get("backend", "hf")
    problems += backend_problems(backend, config.get("vllm"), "evaluation.backend")
    if backend == "vllm" and config.get("model_args"):
        problems.append(Problem("evaluation.model_args", "model_args are arguments of lm-eval's HFLM and do not "
                                "apply to backend vllm", "remove them; engine settings go under evaluation.vllm "
                                "(e.g. vllm: {max_model_len: 512}), or use backend: hf"))
    if backend == "vllm" and isinstance(config.get("gen_kwargs"), dict):
        try:
            from evomerge.evaluate.backends.lmeval_lm import unsupported_generation

            refused = unsupported_generation(config["gen_kwargs"])
        except ImportError:  # no lm-eval: reported below
            refused = None
        if refused:
            problems.append(Problem("evaluation.gen_kwargs", *refused))
    try:
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        problems.append(Problem("evaluation.kind", f"the lmeval evaluator needs lm-eval with its HF extra ({err})",
                                "pip install 'lm-eval[hf]'"))
        raise ConfigError(problems) from None
    tm = None
    if tasks is not None and include_path is not False:
        from evomerge.evaluate.lmeval import set_offline, task_manager

        set_offline()
        tm = task_manager(tasks, include_path)
        for name in tasks:
            if name not in tm.all_tasks:
                close = difflib.get_close_matches(name, tm.all_tasks, n=3)
                problems.append(Problem("evaluation.tasks", f"unknown lm-eval task '{name}'",
                                        f"did you mean: {', '.join(close)}?" if close else
                                        "custom tasks must be YAMLs under include_path"))
    if problems:
        raise ConfigError(problems)
    leaves, groups, sizes = expand_tasks(tasks, tm)
    few = [Problem("evaluation.tasks", f"task '{t}' has {n} document(s); at least 2 are needed "
                   "(one for each split)") for t, n in sizes.items() if n < 2]
    if few:
        raise ConfigError(few)
    return LmEvalEvaluator(tasks, include_path=include_path, num_fewshot=num_fewshot, apply_chat_template=chat,
                           gen_kwargs=config.get("gen_kwargs"), model_args=config.get("model_args"),
                           batch_size=batch_size, held_out=float(held_out), seed=seed,
                           device=config.get("device", "cpu"), task_manager=tm, sizes=sizes, backend=backend,
                           vllm=config.get("vllm"), cache_dir=cache_dir, groups=groups)
