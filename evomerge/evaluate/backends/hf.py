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

    def generate_requests(self, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
        """Generations for (prompt, max_new_tokens, stop strings) requests, in order; requests with
        the same limit and stop strings are batched together."""
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, (_, max_new, until) in enumerate(reqs):
            groups.setdefault((max_new, tuple(until)), []).append(i)
        out = [""] * len(reqs)
        for (max_new, until), idx in groups.items():
            for i, text in zip(idx, self.generate([reqs[i][0] for i in idx], max_new, until)):
                out[i] = text
        return out

    def _greedy(self, batch: list[list[int]], max_new: int, until: tuple[str, ...]) -> list[str]:
        B, dev = len(batch), self.device
        step_ids, att = left_padded(batch, self.pad, dev)
        step_pos = (att.cumsum(1) - 1).clamp(min=0)
        rows: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))  # the batch rows still generating, in the order of the model's batch
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
                rows[r].append(t)
                if not (t == self.eos or until and stopped(self.tok, rows[r], until)):
                    keep.append(j)
            if not keep:
                break  # every sequence hit EOS or a stop string
            if len(keep) < len(live):  # drop finished rows: no more work spent on them
                sel = torch.tensor(keep, device=dev)
                if not _select_rows(past, sel):
                    keep = list(range(len(live)))  # a cache that cannot drop rows: finished rows run on
                else:
                    att, step_pos, nxt = att[sel], step_pos[sel], nxt[sel]
            live = [live[j] for j in keep]
            att = torch.cat([att, torch.ones((len(live), 1), dtype=att.dtype, device=dev)], 1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        return [generation_text(self.tok, row, self.eos, until) for row in rows]


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
    """Keep only the batch rows ``sel`` of a KV cache in place; False when the cache cannot."""
    reorder = getattr(past, "reorder_cache", None)
    if reorder is None:
        return False
    reorder(sel)
    return True
