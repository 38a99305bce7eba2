"""Logit ensemble: the sources run in lockstep and their next-token distributions are pooled.

Pooling is **log-linear** (a weighted geometric mean of the distributions, renormalised), not a
linear mixture of probabilities. With source log-probabilities ``log p_i(v | x)`` over the shared
vocabulary and weights ``w_i >= 0`` normalised to ``sum_i w_i = 1``::

    s(v | x)          = sum_i w_i log p_i(v | x)
    log p_ens(v | x)  = s(v | x) - logsumexp_u s(u | x)

so ``p_ens`` is a distribution (generation could sample from it); greedy decoding takes
``argmax_v s(v | x)``. A continuation's log-likelihood is ``sum_t log p_ens(y_t | x, y_<t)``.
Only the ratios of the weights matter (they are normalised); with one source, or identical sources,
``p_ens`` is the source's distribution. This is the logarithmic opinion pool (Genest and Zidek,
"Combining probability distributions: a critique and an annotated bibliography", Statistical
Science 1986), a product of experts (Hinton, "Training products of experts by minimizing
contrastive divergence", Neural Computation 2002) with exponents ``w_i``.

Parameters: ``models`` (transformers causal LMs on one device, one tokenizer: see
:func:`evomerge.fusion.sources.check_shared_vocab`) and ``weights`` (one per model; default equal).
Scores in float32 (each source's logits are cast to float32 before the log-softmax).

:class:`EnsembleModel` is called like a transformers causal LM, so the ``hf`` backend's own scoring
code (:class:`~evomerge.evaluate.backends.hf.HFLM`: batching, padding, KV cache, EOS, stop strings,
token limits) runs the ensemble unchanged: every source keeps its own KV cache and all of them take
every step (a source of weight 0 is not run). The ``vllm`` backend does not apply (it exposes the
top log-probabilities of one model per engine, not every source's full distribution at each step).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from evomerge.errors import EvalError
from evomerge.evaluate.backends.hf import HFLM


def normalized_weights(weights: list[float] | None, n: int) -> list[float]:
    """``weights`` divided by their sum (equal weights when None); EvalError when unusable."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise EvalError(f"the logit ensemble has {n} source(s) but {len(weights)} weight(s) (fix: give one weight "
                        f"per source)")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise EvalError(f"logit ensemble weights must be finite, >= 0 and not all 0, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


class EnsembleModel(torch.nn.Module):
    """The log-linear pool of ``models`` as one causal LM: ``forward`` returns the pooled,
    renormalised log-probabilities as ``logits`` and one KV cache per source as ``past_key_values``."""

    def __init__(self, models: list, weights: list[float] | None = None):
        super().__init__()
        if not models:
            raise EvalError("a logit ensemble needs at least one model")
        weights = normalized_weights(weights, len(models))
        # a zero weight adds nothing: such a source is left out (not run, no cache, no context limit)
        kept = [(m, w) for m, w in zip(models, weights) if w > 0]
        self.members = torch.nn.ModuleList([m for m, _ in kept])
        self.weights = [w for _, w in kept]
        limits = [int(getattr(m.config, "max_position_embeddings", 0) or 0) or 10**9 for m in self.members]
        self.config = SimpleNamespace(max_position_embeddings=min(limits))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False):
        mixed = None
        caches = []
        for i, (m, w) in enumerate(zip(self.members, self.weights)):
            out = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=None if past_key_values is None else past_key_values[i], use_cache=use_cache)
            caches.append(out.past_key_values if use_cache else None)
            lp = torch.log_softmax(out.logits, dim=-1, dtype=torch.float32)
            mixed = lp.mul_(w) if mixed is None else mixed.add_(lp, alpha=w)
        logp = mixed - torch.logsumexp(mixed, dim=-1, keepdim=True)
        return SimpleNamespace(logits=logp, past_key_values=caches if use_cache else None)


class LogitEnsembleLM(HFLM):
    """The scoring primitives (``loglik``, ``generate``, ``generate_requests``, ``loglik_tokens``,
    ``generate_tokens``) of the log-linear pool of ``models``, through the ``hf`` backend's code."""

    def __init__(self, models: list, tokenizer, weights: list[float] | None = None, *, batch_size: int = 64,
                 device: torch.device | None = None):
        super().__init__(EnsembleModel(models, weights), tokenizer, batch_size, device)
