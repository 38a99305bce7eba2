"""Scoring engine: gradient-free scoring of an in-memory causal LM on a suite split.

The search calls :meth:`Scorer.score` once per candidate. Every task kind reduces to two
primitives that a backend (:mod:`evomerge.evaluate.backends`) provides on the candidate's model:
``loglik`` (log-probability of continuations: ``loglik`` and ``multiple_choice`` tasks) and
``generate`` (greedy continuations cut at the task's stop strings and token limit). The ``hf``
backend batches forwards of the transformers model itself; ``vllm`` pushes the model's tensors into
a running vLLM engine and lets it schedule the requests.

Scores and their standard errors:

* ``exact_match``, ``acc``, ``acc_norm``: binomial stderr ``sqrt(p (1 - p) / n)``.
* ``mean_logprob`` (loglik primary): the mean over items of each item's mean per-token log-prob;
  stderr is the sample standard deviation over items / ``sqrt(n)``. ``perplexity`` is
  ``exp(-total logprob / total tokens)``.
* ``combined``: the weighted mean of each task's primary metric (weights from the suite, default
  1), with stderr ``sqrt(sum w_i^2 se_i^2) / sum w_i`` (tasks scored on independent items).

``acc_norm`` divides each choice's log-likelihood by its length in characters (as lm-eval does).
"""

from __future__ import annotations

import math
import random
import time

import torch

from evomerge.errors import EvalError
from evomerge.evaluate.cache import weights_fingerprint
from evomerge.evaluate.results import SuiteResult, TaskResult, binomial_stderr, combine
from evomerge.suites import Item, Suite, Task, normalize_answer
from evomerge.splits import split_error


def subsample(items: tuple[Item, ...], limit: int | None, seed: int) -> list[Item]:
    """A seeded random subset of ``limit`` items (all when ``limit`` is None or >= len).

    Subsets are nested: for one seed, the first ``k`` items of a larger limit are the subset of
    limit ``k``, so a cheap search score and a precise re-score look at consistent items.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


class Scorer:
    """Scores in-memory models on one split of a suite.

    ``Scorer(suite, split="search", limit=None, seed=0, batch_size=64, device=None, cache=None,
    backend=None)``; ``device=None`` scores on the model's own device (the model is never moved);
    ``backend`` (default: the ``hf`` backend) turns the model into the two scoring primitives. With a
    :class:`~evomerge.evaluate.cache.ScoreCache`, ``score(model, tok, model_key=...)`` returns the
    stored result for a (model_key, suite fingerprint, split, limit, seed) seen before; without a
    ``model_key`` the key is the fingerprint of the weights.
    """

    def __init__(self, suite: Suite, split: str = "search", *, limit: int | None = None, seed: int = 0,
                 batch_size: int = 64, device: str | torch.device | None = None, cache=None,
                 backend=None):
        from evomerge.evaluate.backends import HFBackend

        if split_error(split):
            raise EvalError(split_error(split))
        self.suite = suite
        self.split = split
        self.limit = limit
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device) if device is not None else None
        self.cache = cache
        self.backend = backend if backend is not None else HFBackend()
        self.items = {t.name: subsample(t.splits[split], limit, seed) for t in suite.tasks}

    def cache_key(self, model_key: str) -> str:
        return f"{model_key}|{self.suite.fingerprint}|{self.split}|{self.limit}|{self.seed}"

    def score(self, model, tokenizer, *, model_key: str | None = None) -> SuiteResult:
        if tokenizer is None:
            raise EvalError("cannot score a model without a tokenizer (the model directory has no tokenizer files)")
        key = None
        if self.cache is not None:
            key = self.cache_key(model_key or weights_fingerprint(model))
            hit = self.cache.get(key)
            if hit is not None:
                hit.cached = True
                return hit
        t0 = time.perf_counter()
        lm = self.backend.lm(model, tokenizer, batch_size=self.batch_size, device=self.device)
        results = score_tasks(lm, [(task, self.items[task.name]) for task in self.suite.tasks])
        combined, se = combine(results)
        res = SuiteResult(suite=self.suite.name, split=self.split, limit=self.limit, seed=self.seed,
                          tasks=results, combined=combined, combined_stderr=se,
                          seconds=time.perf_counter() - t0)
        if key is not None:
            self.cache.put(key, res)
        return res


def score_tasks(lm, work: list[tuple[Task, list[Item]]]) -> dict[str, TaskResult]:
    """Every task's result; the requests of all tasks go to the backend together (one ``generate``
    call with each request's own token limit and stop strings, one ``loglik`` call), so a serving
    engine schedules them as one batch."""
    gen: list[tuple[str, int, tuple[str, ...]]] = []
    ll: list[tuple[str, str]] = []
    spans: dict[str, tuple[int, int]] = {}
    for task, items in work:
        if task.kind == "generate":
            spans[task.name] = (len(gen), len(items))
            gen += [(it.prompt, task.max_new_tokens, task.until) for it in items]
        elif task.kind == "multiple_choice":
            reqs = [(it.prompt, c) for it in items for c in it.choices]
            spans[task.name] = (len(ll), len(reqs))
            ll += reqs
        elif task.kind == "loglik":
            spans[task.name] = (len(ll), len(items))
            ll += [(it.prompt, it.target) for it in items]
        else:
            raise EvalError(f"unknown task kind {task.kind!r}")
    gen_out = lm.generate_requests(gen) if gen else []
    ll_out = lm.loglik(ll) if ll else []
    results = {}
    for task, items in work:
        s, k = spans[task.name]
        results[task.name] = task_result(task, items, (gen_out if task.kind == "generate" else ll_out)[s:s + k])
    return results


def score_task(lm, task: Task, items: list[Item]) -> TaskResult:
    return score_tasks(lm, [(task, items)])[task.name]


def task_result(task: Task, items: list[Item], outputs: list) -> TaskResult:
    """A task's metrics from the backend's outputs for its requests (generations for ``generate``,
    (log-prob, tokens) pairs for the others, in request order)."""
    n = len(items)
    if task.kind == "generate":
        per_item = []
        for it, out in zip(items, outputs):
            pred = normalize_answer(task.extract(out), task.extract)
            per_item.append(float(any(pred == normalize_answer(a, task.extract) for a in it.answers)))
        p = sum(per_item) / n
        return TaskResult(task.name, task.kind, "exact_match", p, binomial_stderr(p, n), n,
                          {"exact_match": p}, task.weight, per_item)
    if task.kind == "multiple_choice":
        acc = acc_norm = 0
        k = 0
        hit = {"acc": [], "acc_norm": []}
        for it in items:
            ll = outputs[k:k + len(it.choices)]
            k += len(it.choices)
            sums = [s for s, _ in ll]
            norms = [s / max(1, len(c)) for s, c in zip(sums, it.choices)]
            hit["acc"].append(float(max(range(len(sums)), key=sums.__getitem__) == it.label))
            hit["acc_norm"].append(float(max(range(len(norms)), key=norms.__getitem__) == it.label))
            acc += int(hit["acc"][-1])
            acc_norm += int(hit["acc_norm"][-1])
        m = {"acc": acc / n, "acc_norm": acc_norm / n}
        p = m[task.metric]
        return TaskResult(task.name, task.kind, task.metric, p, binomial_stderr(p, n), n, m, task.weight,
                          hit[task.metric])
    lls = outputs
    per_item = [s / max(1, t) for s, t in lls]
    mean = sum(per_item) / n
    var = sum((x - mean) ** 2 for x in per_item) / (n - 1) if n > 1 else float("nan")
    tot, ntok = sum(s for s, _ in lls), sum(t for _, t in lls)
    m = {"mean_logprob": mean, "perplexity": math.exp(-tot / max(1, ntok)),
         "logprob_per_item": tot / n}
    return TaskResult(task.name, task.kind, "mean_logprob", mean, math.sqrt(var / n), n, m, task.weight, per_item)
