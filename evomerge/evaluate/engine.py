"""Scoring engine: batched, gradient-free scoring of an in-memory causal LM on a suite split.

The search calls :meth:`Scorer.score` once per candidate, so everything is batched:

* ``loglik`` and ``multiple_choice``: one forward per batch of (context, continuation) pairs,
  right-padded and sorted by length; log-probabilities of the continuation tokens are gathered.
* ``generate``: greedy decoding with a KV cache, left-padded batches sorted by prompt length; a
  sequence stops at EOS or a stop string, the batch at ``max_new_tokens`` or when all stopped.

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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge.errors import EvalError
from evomerge.evaluate.suite import SPLITS, Item, Suite, Task, normalize_answer


@dataclass
class TaskResult:
    name: str
    kind: str
    primary: str
    score: float  # value of the primary metric
    stderr: float  # standard error of the primary metric
    n: int  # items scored
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class SuiteResult:
    suite: str
    split: str
    limit: int | None
    seed: int
    tasks: dict[str, TaskResult]
    combined: float
    combined_stderr: float
    seconds: float = 0.0
    cached: bool = False

    @property
    def n(self) -> int:
        return sum(t.n for t in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = {k: asdict(v) for k, v in self.tasks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        d = dict(d)
        d["tasks"] = {k: TaskResult(**v) for k, v in d["tasks"].items()}
        return cls(**d)


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def combine(results: dict[str, TaskResult]) -> tuple[float, float]:
    """Weighted mean of the tasks' primary scores and its standard error."""
    wsum = sum(r.weight for r in results.values())
    if wsum <= 0:
        return float("nan"), float("nan")
    score = sum(r.weight * r.score for r in results.values()) / wsum
    se = math.sqrt(sum((r.weight * r.stderr) ** 2 for r in results.values())) / wsum
    return score, se


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


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class Scorer:
    """Scores in-memory models on one split of a suite.

    ``Scorer(suite, split="search", limit=None, seed=0, batch_size=64, device=None, cache=None)``;
    ``device=None`` scores on the model's own device (the model is never moved). With a
    :class:`~evomerge.evaluate.cache.ScoreCache`, ``score(model, tok, model_key=...)`` returns the
    stored result for a (model_key, suite fingerprint, split, limit, seed) seen before; without a
    ``model_key`` the key is the fingerprint of the weights.
    """

    def __init__(self, suite: Suite, split: str = "search", *, limit: int | None = None, seed: int = 0,
                 batch_size: int = 64, device: str | torch.device | None = None, cache=None):
        if split not in SPLITS:
            raise EvalError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.suite = suite
        self.split = split
        self.limit = limit
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device) if device is not None else None
        self.cache = cache
        self.items = {t.name: subsample(t.splits[split], limit, seed) for t in suite.tasks}

    def cache_key(self, model_key: str) -> str:
        return f"{model_key}|{self.suite.fingerprint}|{self.split}|{self.limit}|{self.seed}"

    def score(self, model, tokenizer, *, model_key: str | None = None) -> SuiteResult:
        if tokenizer is None:
            raise EvalError("cannot score a model without a tokenizer (the model directory has no tokenizer files)")
        key = None
        if self.cache is not None:
            from evomerge.evaluate.cache import weights_fingerprint

            key = self.cache_key(model_key or weights_fingerprint(model))
            hit = self.cache.get(key)
            if hit is not None:
                hit.cached = True
                return hit
        t0 = time.perf_counter()
        lm = _LM(model, tokenizer, self.batch_size, self.device)
        results = {task.name: score_task(lm, task, self.items[task.name]) for task in self.suite.tasks}
        combined, se = combine(results)
        res = SuiteResult(suite=self.suite.name, split=self.split, limit=self.limit, seed=self.seed,
                          tasks=results, combined=combined, combined_stderr=se,
                          seconds=time.perf_counter() - t0)
        if key is not None:
            self.cache.put(key, res)
        return res


def score_task(lm: "_LM", task: Task, items: list[Item]) -> TaskResult:
    n = len(items)
    if task.kind == "generate":
        outs = lm.generate([it.prompt for it in items], task.max_new_tokens, task.until)
        hits = 0
        for it, out in zip(items, outs):
            pred = normalize_answer(task.extract(out), task.extract)
            hits += any(pred == normalize_answer(a, task.extract) for a in it.answers)
        p = hits / n
        return TaskResult(task.name, task.kind, "exact_match", p, binomial_stderr(p, n), n,
                          {"exact_match": p}, task.weight)
    if task.kind == "multiple_choice":
        reqs = [(it.prompt, c) for it in items for c in it.choices]
        lls = lm.loglik(reqs)
        acc = acc_norm = 0
        k = 0
        for it in items:
            ll = lls[k:k + len(it.choices)]
            k += len(it.choices)
            sums = [s for s, _ in ll]
            norms = [s / max(1, len(c)) for s, c in zip(sums, it.choices)]
            acc += int(max(range(len(sums)), key=sums.__getitem__) == it.label)
            acc_norm += int(max(range(len(norms)), key=norms.__getitem__) == it.label)
        m = {"acc": acc / n, "acc_norm": acc_norm / n}
        p = m[task.metric]
        return TaskResult(task.name, task.kind, task.metric, p, binomial_stderr(p, n), n, m, task.weight)
    if task.kind == "loglik":
        lls = lm.loglik([(it.prompt, it.target) for it in items])
        per_item = [s / max(1, t) for s, t in lls]
        mean = sum(per_item) / n
        var = sum((x - mean) ** 2 for x in per_item) / (n - 1) if n > 1 else float("nan")
        tot, ntok = sum(s for s, _ in lls), sum(t for _, t in lls)
        m = {"mean_logprob": mean, "perplexity": math.exp(-tot / max(1, ntok)),
             "logprob_per_item": tot / n}
        return TaskResult(task.name, task.kind, "mean_logprob", mean, math.sqrt(var / n), n, m, task.weight)
    raise EvalError(f"unknown task kind {task.kind!r}")


class _LM:
    """The two primitives every task kind reduces to, batched on one device."""

    def __init__(self, model, tokenizer, batch_size: int, device: torch.device | None):
        self.model = model
        self.tok = tokenizer
        self.bs = batch_size
        self.device = device or _model_device(model)
        cfg = getattr(model, "config", None)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 10**9
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    @torch.no_grad()
    def loglik(self, reqs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """(sum of log p(continuation | context), number of continuation tokens) per request."""
        seqs = []
        for ctx, cont in reqs:
            c = self.prefix + self.encode(ctx)
            t = self.encode(cont)
            if not t:
                raise EvalError(f"continuation {cont!r} encodes to no tokens")
            if not c:  # no BOS and no context: the first token cannot be scored
                c, t = t[:1], t[1:]
            full = (c + t)[-(self.max_len + 1):]
            seqs.append((full, len(t) if len(t) < len(full) else len(full) - 1))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.bs):
                idx = order[b:b + self.bs]
                inp = [seqs[i][0][:-1] for i in idx]
                L = max(map(len, inp))
                ids = torch.full((len(idx), L), self.pad, dtype=torch.long)
                att = torch.zeros((len(idx), L), dtype=torch.long)
                for j, s in enumerate(inp):
                    ids[j, :len(s)] = torch.tensor(s)
                    att[j, :len(s)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
                for j, i in enumerate(idx):
                    full, nt = seqs[i]
                    n_in = len(full) - 1
                    lp = torch.log_softmax(logits[j, n_in - nt:n_in].float(), dim=-1)
                    tgt = torch.tensor(full[-nt:], device=lp.device)
                    out[i] = (lp.gather(1, tgt[:, None]).sum().item() if nt else 0.0, nt)
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        """Greedy continuations (decoded, cut at the first stop string), KV-cached, left-padded."""
        enc = [(self.prefix + self.encode(p))[-max(1, self.max_len - max_new_tokens):] for p in prompts]
        if any(not e for e in enc):
            raise EvalError("a generation prompt is empty and the tokenizer has no BOS token to start from")
        texts = [""] * len(prompts)
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.bs):
                idx = order[b:b + self.bs]
                for i, t in zip(idx, self._greedy([enc[i] for i in idx], max_new_tokens, until)):
                    texts[i] = t
        finally:
            self.model.train(was_training)
        return texts

    def _greedy(self, batch: list[list[int]], max_new: int, until: tuple[str, ...]) -> list[str]:
        B, L = len(batch), max(map(len, batch))
        dev = self.device
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, L - len(s):] = torch.tensor(s)
            att[j, L - len(s):] = 1
        ids, att = ids.to(dev), att.to(dev)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen: list[torch.Tensor] = []
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=att, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            gen.append(nxt)
            if self.eos is not None:
                done |= nxt == self.eos
            if until:
                toks = torch.stack(gen, 1).tolist()
                for j in range(B):
                    if not done[j] and any(u in self.tok.decode(toks[j], skip_special_tokens=True) for u in until):
                        done[j] = True
            if bool(done.all()):
                break
            att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=dev)], 1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        toks = torch.stack(gen, 1).tolist()
        texts = []
        for row in toks:
            if self.eos is not None and self.eos in row:
                row = row[:row.index(self.eos)]
            text = self.tok.decode(row, skip_special_tokens=True)
            cut = min((text.find(u) for u in until if u in text), default=-1)
            texts.append(text[:cut] if cut >= 0 else text)
        return texts
