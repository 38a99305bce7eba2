"""The evaluation layer: task suites (YAML + JSONL), in-memory scoring on a backend (``hf`` or
``vllm``), caching, the lm-eval adapter, and the evaluators a search calls (registry in
:mod:`evomerge.evaluate.evaluators`; suite, lm-eval and weight-distance kinds; the resident evaluator
of search workers in :mod:`evomerge.evaluate.resident`). Nothing here imports ``search`` or ``workers``.

Public API (see docs in each module)::

    load_suite(path) -> Suite
    Scorer(suite, split="search", *, limit=None, seed=0, batch_size=64, device=None, cache=None,
           backend=None)  # backend: evomerge.evaluate.backends.make_backend("hf" | "vllm", options)
        .score(model, tokenizer, *, model_key=None) -> SuiteResult
    ScoreCache(directory=None); weights_fingerprint(model) -> str
    lmeval_score(model, tokenizer, tasks, *, include_path=None, limit=None, batch_size=16) -> SuiteResult
    load_model(model_dir, device="cpu") -> (model, tokenizer)
    eval_command(model_dir, suite_paths, split="search", limit=None, device="cpu", batch_size=64,
                 backend="hf", vllm_options=None) -> int
"""

from evomerge.evaluate.cache import ScoreCache, weights_fingerprint
from evomerge.evaluate.cli import eval_command, format_results, load_model
from evomerge.evaluate.engine import Scorer, SuiteResult, TaskResult, combine
from evomerge.evaluate.lmeval import lmeval_score
from evomerge.evaluate.suite import Extract, Item, Suite, Task, extract_answer, load_suite

__all__ = [
    "Extract", "Item", "ScoreCache", "Scorer", "Suite", "SuiteResult", "Task", "TaskResult", "combine",
    "eval_command", "extract_answer", "format_results", "lmeval_score", "load_model", "load_suite",
    "weights_fingerprint",
]
