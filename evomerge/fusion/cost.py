"""Inference cost of a candidate, merge or fusion, relative to running one source model.

Every candidate reports four figures (the ``cost`` record of an :class:`EvalOutcome`, stored with
each trial and usable as the objectives ``{cost: passes}`` and ``{cost: read}``, minimized):

* ``passes``: model forward passes per generated token, relative to one source generating the same
  answer. A forward pass is one call of one model: the prefill that yields an answer's first token
  counts as one pass, as does every decoding step after it, and scoring a whole (prompt, answer)
  pair (one batched forward) counts as one pass. One source answering in ``T`` tokens makes ``T``
  passes, so a single model (any merge) scores exactly ``1``. A log-likelihood request is one pass
  for one source.
* ``read``: parameters read per generated token, relative to one source: every pass reads its
  model's parameters once (decoding is memory-bound), weighted by that model's size relative to the
  first source. Sizes count every parameter except the input embedding matrix (a token reads one
  row of it); a tied embedding counts once, as the output head. A merge of the sources' shape
  reads ``1``; a data-flow merge of another depth reads its own size over the source's.
* ``calls``: model calls per query (a generation or a scoring request of one model).
* ``models``: how many distinct models the candidate runs.

Per candidate (``n`` sources of equal size; ``T_qi``: the tokens source ``i`` generated for query
``q``, the final EOS or stop token included; ``T̄_q = mean_i T_qi``; ``d_q``: the distinct answers
the panel produced for ``q``; ``J``: judges, ``n`` for the panel itself or ``1`` for a named judge):

=====================  ==========================================  ============================
candidate              passes (per generated token)                calls per query
=====================  ==========================================  ============================
merge                  1                                           1
logit ensemble         n (every source runs every step)            n
panel + judge          (sum_q sum_i T_qi + J d_q) / sum_q T̄_q      n + J d_q
                       (about n + J n / T̄: n generations, and      (mean over queries)
                       J d_q <= J n scoring passes amortised
                       over the answer's tokens)
Mixture-of-Agents      (sum over calls of their generated          sum of layer sizes + 1
                       tokens) / (the aggregator's tokens)
=====================  ==========================================  ============================

On log-likelihood requests the logit ensemble and the panel both make ``n`` passes per request
(``passes = n``). Ratios are totals over the evaluation (``sum passes / sum one-source passes``),
not means of per-query ratios. Remote (OpenAI-compatible) agents count the ``completion_tokens``
their server reports (estimated as one token per 4 bytes of text, plus one, when it reports none)
and read ``relative_size`` (default 1) per pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass
class CostMeter:
    """Counts of one evaluation: ``passes`` and ``reads`` (in units of the first source's size),
    the passes one source would have made for the same answers (``base``), model ``calls`` and
    ``queries``; :meth:`figures` gives the ratios."""

    passes: float = 0.0
    reads: float = 0.0
    base: float = 0.0
    calls: float = 0.0
    queries: int = 0

    def add(self, *, passes: float, reads: float, base: float, calls: float, queries: int = 1) -> None:
        self.passes += passes
        self.reads += reads
        self.base += base
        self.calls += calls
        self.queries += queries

    def reset(self) -> None:
        self.passes = self.reads = self.base = self.calls = 0.0
        self.queries = 0

    def figures(self, models: int) -> dict[str, float]:
        """``{"passes", "read", "calls", "models"}``; empty when nothing was counted."""
        if self.base <= 0 or self.queries <= 0:
            return {}
        return {"passes": self.passes / self.base, "read": self.reads / self.base,
                "calls": self.calls / self.queries, "models": float(models)}


def single_model_cost(read: float = 1.0) -> dict[str, float]:
    """One model answering: one pass per token, ``read`` times the source's parameters per token."""
    return {"passes": 1.0, "read": float(read), "calls": 1.0, "models": 1.0}


def read_params(model) -> int:
    """Parameters a forward pass of ``model`` (a transformers causal LM) reads per token: all of
    them (each tensor once, however often it is shared) except the input embedding matrix, which
    is read one row per token, unless it is tied to the output head."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and not (head is not None and head.weight is emb.weight):
        total -= emb.weight.numel()
    return total


@functools.lru_cache(maxsize=64)
def checkpoint_read(ref: str) -> tuple[tuple[int, ...], int]:
    """(per-layer parameter counts, parameters outside the layers that a token reads) of the
    checkpoint at ``ref``, from its headers (no weights read)."""
    from evomerge.checkpoint import Checkpoint

    ck = Checkpoint.open(ref)
    layers, other, embedding = ck.parameter_counts()
    # a token reads one row of the input embedding; a tied embedding is also the whole LM head
    return layers, other + (embedding if ck.tie_word_embeddings else 0)


def merge_cost(recipe) -> dict[str, float]:
    """The cost record of a merge recipe: one model, one pass per token; ``read`` is its size over
    its first source's (1 for parameter-space merges; a data-flow or stack candidate reads the
    layers on its path, a merge of a layer range reads that range)."""
    from evomerge.recipe import DataFlowRecipe, StackRecipe, stack_to_dataflow

    if isinstance(recipe, StackRecipe):
        recipe = stack_to_dataflow(recipe)
    if not isinstance(recipe, DataFlowRecipe):
        layers = recipe.sources[0].layers if getattr(recipe, "sources", None) else None
        if not layers:
            return single_model_cost()
        per_layer, other = checkpoint_read(recipe.base or recipe.sources[0].model)
        a, b = layers
        return single_model_cost((other + sum(per_layer[a:b])) / (other + sum(per_layer)))
    ref_layers, ref_other = checkpoint_read(recipe.embed)
    read = ref_other + sum(checkpoint_read(s.model)[0][s.layer] for s in recipe.path)
    return single_model_cost(read / (ref_other + sum(ref_layers)))
