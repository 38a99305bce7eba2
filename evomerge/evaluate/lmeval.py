"""lm-eval adapter: score an in-memory model on lm-eval tasks through lm-eval's HF wrapper.

``lmeval_score(model, tokenizer, tasks, include_path=None, limit=None, batch_size=16)`` accepts any
lm-eval task name, or names of custom task YAMLs found under ``include_path`` (a directory; their
``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}`` point at local files, so nothing is
downloaded). The model is wrapped with ``HFLM(pretrained=model, tokenizer=tokenizer)``: no disk
round trip, scored on the device it is on. ``samples`` scores chosen documents per task. Results come back as a :class:`SuiteResult` whose
tasks carry lm-eval's metrics, the primary metric's stderr and the sample count.

``backend``: a scoring backend from :func:`evomerge.evaluate.backends.make_backend`. None or ``hf``
scores with lm-eval's ``HFLM`` as above; ``vllm`` pushes the model's weights into the backend's running
vLLM engine (in place, started once per model shape) and answers lm-eval's requests with it through
:class:`evomerge.evaluate.backends.lmeval_lm.BackendLM` (greedy generation only; ``model_args`` are
``HFLM``'s and are refused there). The results are parsed the same way for both.

Offline use: set ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` (done here when every task's
data is local). Needs ``accelerate`` (lm-eval's HF extra).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from evomerge.errors import EvalError
from evomerge.evaluate.engine import SuiteResult, TaskResult, combine

_PRIMARY_ORDER = ("acc", "exact_match", "acc_norm", "word_perplexity", "perplexity")


def set_offline() -> None:
    """Tell the HF libraries not to reach the network (unless the caller already chose otherwise)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_manager(names: list[str], include_path: str | Path | None = None):
    """An lm-eval ``TaskManager`` that knows ``names``. When every name is a custom task under
    ``include_path``, lm-eval's own task folder (thousands of YAMLs, seconds to index) is not read."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def parse_results(out: dict, primary: str | None = None) -> dict[str, TaskResult]:
    """Per task of a ``simple_evaluate`` result: its primary metric (``primary`` when the task
    reports it, else the first of acc, exact_match, acc_norm, ...), that metric's stderr (binomial
    when lm-eval gives none) and the sample count."""
    results: dict[str, TaskResult] = {}
    for name, metrics in out["results"].items():
        vals = {k.split(",")[0]: v for k, v in metrics.items()
                if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        errs = {k.split(",")[0].replace("_stderr", ""): v for k, v in metrics.items()
                if "_stderr," in k and isinstance(v, (int, float))}
        if not vals:
            continue
        key = primary if primary in vals else next((m for m in _PRIMARY_ORDER if m in vals), sorted(vals)[0])
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0) or 0)
        se = errs.get(key)
        if se is None or (isinstance(se, float) and math.isnan(se)):
            se = math.sqrt(vals[key] * (1 - vals[key]) / n) if n and 0 <= vals[key] <= 1 else float("nan")
        results[name] = TaskResult(name, "lm_eval", key, float(vals[key]), float(se), n,
                                   {k: float(v) for k, v in vals.items()})
    return results


def lmeval_score(model, tokenizer, tasks: list[str] | str, *, include_path: str | Path | None = None,
                 limit: int | float | None = None, batch_size: int = 16, primary: str | None = None,
                 offline: bool = True, seed: int = 0, samples: dict[str, list[int]] | None = None,
                 num_fewshot: int | None = None, apply_chat_template: bool = False,
                 gen_kwargs: dict | None = None, model_args: dict | None = None,
                 tasks_from=None, backend=None) -> SuiteResult:
    """``samples``: the document indices to score per task (instead of ``limit``); ``model_args``:
    extra keyword arguments of lm-eval's ``HFLM``; ``tasks_from``: a ``TaskManager`` to reuse;
    ``backend``: the scoring backend (None: lm-eval's ``HFLM`` on the model itself)."""
    if offline:
        set_offline()
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise EvalError(f"the lm-eval adapter needs lm-eval with its HF extra ({e}); "
                        "fix: pip install 'lm-eval[hf]' (or accelerate)") from None
    if tokenizer is None:
        raise EvalError("cannot score a model without a tokenizer")
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"lm-eval include_path {include_path} is not a directory of task YAMLs")
    tm = tasks_from if tasks_from is not None else task_manager(names, include_path)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}; "
                        f"custom tasks must be YAMLs under include_path ({include_path})")
    if backend is None or getattr(backend, "name", "hf") == "hf":
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(model_args or {}))
    else:
        if model_args:
            raise EvalError(f"model_args ({', '.join(sorted(model_args))}) are arguments of lm-eval's HFLM and do "
                            f"not apply to the {backend.name} backend (fix: remove them; engine settings go under "
                            f"the vllm options)")
        from evomerge.evaluate.backends.lmeval_lm import BackendLM

        lm = BackendLM(backend.lm(model, tokenizer, batch_size=batch_size), tokenizer)
    t0 = time.perf_counter()
    out = evaluator.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, samples=samples,
                                   num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                   gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, log_samples=False)
    results = parse_results(out, primary)
    if not results:
        raise EvalError(f"lm-eval returned no metrics for {names}")
    combined, cse = combine(results)
    return SuiteResult(suite="lm-eval:" + ",".join(names), split="lm-eval",
                       limit=limit if isinstance(limit, int) else None, seed=seed, tasks=results,
                       combined=combined, combined_stderr=cse, seconds=time.perf_counter() - t0)
