"""The ``hf`` backend: a transformers model in this process, scored with batched forwards.

* ``loglik``: one forward per batch of (context, continuation) pairs, right-padded and sorted by
  length; log-probabilities of the continuation tokens are gathered.
* ``generate``: greedy decoding with a KV cache, left-padded batches sorted by prompt length; a
  sequence stops at EOS or a stop string (found in its newest tokens: :func:`stopped`) and leaves
  the batch (its rows of the KV cache are dropped, so no step is spent on it), the batch stops at
  ``max_new_tokens`` or as soon as every sequence has stopped.

Every request starts with the tokenizer's BOS token (when it has one) followed by the text encoded
without special tokens; the ``vllm`` backend builds the same token ids, so both score the same thing.
"""

from __future__ import annotations

import contextlib

import torch

from evomerge.errors import EvalError


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generation_text(tokenizer, ids: list[int], eos: int | None, until) -> str:
    """Generated token ids as the answer text: cut at EOS, decoded without special tokens, cut at
    the first stop string (every backend finishes its generations so)."""
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(u) for u in until if u in text), default=-1)
    return text[:cut] if cut >= 0 else text


class HFBackend:
    """Scores the candidate's transformers model itself (nothing to start, nothing to load)."""

    name = "hf"

    def lm(self, model, tokenizer, *, batch_size: int = 64, device: torch.device | None = None) -> "HFLM":
        return HFLM(model, tokenizer, batch_size, device)

    def stats(self) -> dict[str, float]:
        """Nothing started, nothing loaded: no counters."""
        return {}

    def close(self) -> None:
        pass


class HFLM:
    """The two primitives every task kind reduces to, on a transformers model, batched on one device."""

    def __init__(self, model, tokenizer, batch_size: int, device: torch.device | None):
        self.model = model
        self.tok = tokenizer
        self.bs = batch_size
        self.device = device or model_device(model)
        cfg = getattr(model, "config", None)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 10**9
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self.steps = self.row_steps = 0  # generation's forward passes, and the batch rows they ran

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

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
        return [(total, nt) for (total, _), (_, nt) in zip(self._scored(seqs), seqs)]

    def loglik_tokens(self, reqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation: an
        exact tie counts as greedy) per request of token ids, used as given (no BOS added, as
        lm-eval tokenizes); a sequence longer than the model keeps its last ``max_len + 1`` tokens."""
        seqs = []
        for ctx, cont in reqs:
            if not ctx or not cont:
                raise EvalError("a log-likelihood request needs at least one context and one continuation token")
            full = (list(ctx) + list(cont))[-(self.max_len + 1):]
            seqs.append((full, min(len(cont), len(full) - 1)))
        return self._scored(seqs)

    @torch.no_grad()
    def _scored(self, seqs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of the log-probabilities of each sequence's last ``nt`` tokens, whether each is a
        top-1 token) for (token ids, nt) pairs: one forward per right-padded batch, longest first."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        with eval_mode(self.model):
            for b in range(0, len(order), self.bs):
                idx = order[b:b + self.bs]
                ids, att = right_padded([seqs[i][0][:-1] for i in idx], self.pad, self.device)
                logits = self.model(input_ids=ids, attention_mask=att).logits
                for j, i in enumerate(idx):
                    full, nt = seqs[i]
                    if not nt:
                        continue
                    n_in = len(full) - 1
                    lp = torch.log_softmax(logits[j, n_in - nt:n_in].float(), dim=-1)
                    got = lp.gather(1, torch.tensor(full[-nt:], device=lp.device)[:, None])[:, 0]
                    out[i] = (got.sum().item(), bool((got >= lp.max(-1).values).all()))
        return out

    def generate(self, prompts: list[str], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        """Greedy continuations (decoded, cut at the first stop string), KV-cached, left-padded."""
        return self.generate_requests([(p, max_new_tokens, until) for p in prompts])

    def generate_requests(self, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
        """Generations for (prompt, max_new_tokens, stop strings) requests, in order; requests with
        the same limit and stop strings are batched together."""
        return generate_texts(self, reqs)

    @torch.no_grad()
    def generate_tokens(self, reqs: list[tuple[list[int], int, list[str] | tuple[str, ...]]]) -> list[list[int]]:
        """The generated ids of each (prompt ids, max new tokens, stop strings) request, prompt ids used
        as given, up to and including the EOS or the token that completed a stop string (as vLLM
        returns them); requests with the same limit and stop strings share batches."""
        if any(not ids for ids, _, _ in reqs):
            raise EvalError("a generation prompt encodes to no tokens")
        out: list[list[int]] = [[] for _ in reqs]
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, (_, max_new, until) in enumerate(reqs):
            groups.setdefault((int(max_new), tuple(until)), []).append(i)
        with eval_mode(self.model):
            for (max_new, until), members in groups.items():
                order = sorted(members, key=lambda i: -len(reqs[i][0]))
                for b in range(0, len(order), self.bs):
                    idx = order[b:b + self.bs]
                    for i, ids in zip(idx, self._greedy([list(reqs[i][0]) for i in idx], max_new, until)):
                        out[i] = ids
        return out

    def _greedy(self, batch: list[list[int]], max_new: int, until: tuple[str, ...]) -> list[list[int]]:
        """Greedy ids of a left-padded batch, each row up to the token that finished it."""
        B, dev = len(batch), self.device
        step_ids, att = left_padded(batch, self.pad, dev)
        step_pos = (att.cumsum(1) - 1).clamp(min=0)
        rows: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))  # the rows in the model's batch, in its order
        going = [True] * B  # rows still generating (a cache that cannot drop rows keeps finished ones)
        past = None
        for _ in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=att, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            self.steps += 1  # forward passes, and rows they ran (what a stopped row no longer costs)
            self.row_steps += len(live)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            keep = []
            for j, (r, t) in enumerate(zip(live, nxt.tolist())):
                if not going[r]:
                    continue
                rows[r].append(t)
                if t == self.eos or until and stopped(self.tok, rows[r], until):
                    going[r] = False
                else:
                    keep.append(j)
            if not keep:
                break  # every sequence hit EOS or a stop string
            if len(keep) < len(live) and _select_rows(past, sel := torch.tensor(keep, device=dev)):
                att, step_pos, nxt = att[sel], step_pos[sel], nxt[sel]  # no more work spent on them
                live = [live[j] for j in keep]
            att = torch.cat([att, torch.ones((len(live), 1), dtype=att.dtype, device=dev)], 1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        return rows


def generate_texts(lm, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
    """Answers of ``lm`` (any LM with ``prefix``, ``encode``, ``max_len``, ``tok``, ``eos`` and
    ``generate_tokens``) to (prompt, max new tokens, stop strings) requests: the prompt ids every
    backend builds (BOS, the text without special tokens, its last ``max_len - max_new`` tokens)
    and the same finishing (:func:`generation_text`)."""
    token_reqs = []
    for prompt, max_new, until in reqs:
        ids = (lm.prefix + lm.encode(prompt))[-max(1, lm.max_len - max_new):]
        if not ids:
            raise EvalError("a generation prompt is empty and the tokenizer has no BOS token to start from")
        token_reqs.append((ids, max_new, list(until)))
    return [generation_text(lm.tok, ids, lm.eos, until)
            for ids, (_, _, until) in zip(lm.generate_tokens(token_reqs), reqs)]


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block, its training flag restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def right_padded(batch: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input ids, attention mask)`` of token sequences right-padded with ``pad`` to one length."""
    L = max(map(len, batch))
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for j, s in enumerate(batch):
        ids[j, :len(s)] = torch.tensor(s)
        att[j, :len(s)] = 1
    return ids.to(device), att.to(device)


def left_padded(batch: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input ids, attention mask)`` of token sequences left-padded with ``pad`` to one length."""
    B, L = len(batch), max(map(len, batch))
    ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for j, s in enumerate(batch):
        ids[j, L - len(s):] = torch.tensor(s)
        att[j, L - len(s):] = 1
    return ids.to(device), att.to(device)


# tokens decoded per character of the longest stop string when looking for it in a row's newest
# tokens: a token decodes to at least a byte, a character takes at most 4 bytes
_STOP_WINDOW = 4


def stopped(tok, ids: list[int], until: tuple[str, ...]) -> bool:
    """Whether the generation ``ids`` holds a stop string, checked after every new token: a stop
    string that was not there before lies in the newest tokens, so only they are decoded, and a hit
    there is confirmed on the whole generation (no decode of the whole row per step). A miss would
    only let a row run to its token limit; the answer is cut from the whole decode either way
    (:func:`generation_text`)."""
    window = _STOP_WINDOW * max(map(len, until)) + 2
    if len(ids) <= window:
        text = tok.decode(ids, skip_special_tokens=True)
        return any(u in text for u in until)
    tail = tok.decode(ids[-window:], skip_special_tokens=True)
    if not any(u in tail for u in until):
        return False
    text = tok.decode(ids, skip_special_tokens=True)
    return any(u in text for u in until)


def _select_rows(past, sel: torch.Tensor) -> bool:
    """Keep only the batch rows ``sel`` of a KV cache (or of a list of caches, one per model of an
    ensemble) in place; False when a cache cannot."""
    caches = list(past) if isinstance(past, (list, tuple)) else [past]
    if not all(callable(getattr(c, "reorder_cache", None)) for c in caches):
        return False
    for c in caches:
        c.reorder_cache(sel)
    return True
