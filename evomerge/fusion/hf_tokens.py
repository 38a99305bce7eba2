"""The ``hf`` backend's LM with token-level primitives, for fused candidates.

:class:`~evomerge.evaluate.backends.hf.HFLM` answers the suite engine's string requests. Fused
candidates also need the token-level pair that :class:`~evomerge.evaluate.backends.lmeval_lm.BackendLM`
(lm-eval tasks) and the panel use, which the ``vllm`` backend's LM already has:

* ``loglik_tokens([(context ids, continuation ids)])`` -> ``[(sum of log p(continuation), greedy)]``
  where ``greedy`` says whether greedy decoding yields the continuation (an exact tie counts as
  greedy); ids are used as given (no BOS added), a sequence longer than the model keeps its last
  ``max_len + 1`` tokens, as ``HFLM.loglik`` does;
* ``generate_tokens([(prompt ids, max new tokens, stop strings)])`` -> the generated ids of each
  request, up to and including the EOS or the token that completed a stop string (as vLLM returns
  them): greedy decoding with a KV cache over left-padded batches, exactly the steps of
  ``HFLM.generate``, so ``generation_text`` of these ids is ``HFLM``'s answer.

``model`` is any module called like a transformers causal LM (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values``, ``use_cache`` -> ``.logits``, ``.past_key_values``): a
source model, or :class:`evomerge.fusion.logit.EnsembleModel`.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvalError
from evomerge.evaluate.backends.hf import HFLM


class HFTokenLM(HFLM):
    """``HFLM`` plus ``loglik_tokens`` and ``generate_tokens`` (see the module docstring)."""

    @torch.no_grad()
    def loglik_tokens(self, reqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        seqs = []
        for ctx, cont in reqs:
            if not ctx or not cont:
                raise EvalError("a log-likelihood request needs at least one context and one continuation token")
            full = (list(ctx) + list(cont))[-(self.max_len + 1):]
            seqs.append((full, min(len(cont), len(full) - 1)))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        with _eval_mode(self.model):
            for b in range(0, len(order), self.bs):
                idx = order[b:b + self.bs]
                ids, att = _right_padded([seqs[i][0][:-1] for i in idx], self.pad)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
                for j, i in enumerate(idx):
                    full, nt = seqs[i]
                    n_in = len(full) - 1
                    lp = torch.log_softmax(logits[j, n_in - nt:n_in].float(), dim=-1)
                    tgt = torch.tensor(full[-nt:], device=lp.device)
                    got = lp.gather(1, tgt[:, None])[:, 0]
                    out[i] = (got.sum().item(), bool((got >= lp.max(-1).values).all()))
        return out

    @torch.no_grad()
    def generate_tokens(self, reqs: list[tuple[list[int], int, list[str] | tuple[str, ...]]]) -> list[list[int]]:
        if any(not ids for ids, _, _ in reqs):
            raise EvalError("a generation prompt encodes to no tokens")
        out: list[list[int]] = [[] for _ in reqs]
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, (_, max_new, until) in enumerate(reqs):
            groups.setdefault((int(max_new), tuple(until)), []).append(i)
        with _eval_mode(self.model):
            for (max_new, until), members in groups.items():
                order = sorted(members, key=lambda i: -len(reqs[i][0]))
                for b in range(0, len(order), self.bs):
                    idx = order[b:b + self.bs]
                    for i, ids in zip(idx, self._greedy_ids([list(reqs[i][0]) for i in idx], max_new, until)):
                        out[i] = ids
        return out

    def _greedy_ids(self, batch: list[list[int]], max_new: int, until: tuple[str, ...]) -> list[list[int]]:
        """Greedy ids of a left-padded batch; each row up to the step that finished it."""
        B, L = len(batch), max(map(len, batch))
        dev = self.device
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, L - len(s):] = torch.tensor(s)
            att[j, L - len(s):] = 1
        ids, att = ids.to(dev), att.to(dev)
        step_ids, step_pos = ids, (att.cumsum(1) - 1).clamp(min=0)
        past = None
        rows: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))
        for _ in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=att, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            for j in list(live):
                t = int(nxt[j])
                rows[j].append(t)
                if (self.eos is not None and t == self.eos) or (
                        until and any(u in self.tok.decode(rows[j], skip_special_tokens=True) for u in until)):
                    live.remove(j)
            if not live:
                break
            att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=dev)], 1)
            step_pos = step_pos[:, -1:] + 1
            # a finished row decodes padding (its outputs are no longer read)
            step_ids = torch.tensor([[rows[j][-1] if j in live else self.pad] for j in range(B)], device=dev)
        return rows


def _right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
        att[j, :len(s)] = 1
    return ids, att


class _eval_mode:
    """The model in eval mode for the block, its training flag restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)
