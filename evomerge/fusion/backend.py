"""The fusion backend: a fused candidate as the scoring primitives the evaluation layer already uses.

``FusionBackend(inner=None).lm(sources, tokenizer, batch_size=, device=)`` returns, for the
:class:`~evomerge.fusion.sources.FusedSources` of a fusion recipe, an LM with ``loglik``,
``generate``, ``generate_requests``, ``loglik_tokens``, ``generate_tokens`` and ``max_len`` (MoA:
generation only), so the suite engine (``Scorer(suite, backend=FusionBackend()).score(sources, tok)``)
and lm-eval's adapter (``lmeval_score(sources, tok, tasks, backend=FusionBackend())``, through
:class:`~evomerge.evaluate.backends.lmeval_lm.BackendLM`) score it unchanged:

* ``logit``: :class:`~evomerge.fusion.logit.LogitEnsembleLM` (``hf`` only);
* ``panel``: :class:`~evomerge.fusion.panel.PanelLM` over one LM per source;
* ``moa``: :class:`~evomerge.fusion.moa.MoALM` over local and remote agents.

``inner`` is the evaluation backend the sources run on: None (or the ``hf`` backend) runs each
source as a transformers model in this process; a ``vllm`` backend loads each source into its
running engine, in place, right before that source's requests (panel members, local MoA agents),
so one engine serves them all (``owns_inner``: :meth:`close` stops it). :meth:`cost` gives the cost record of the last scoring
(:mod:`evomerge.fusion.cost`).
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvalError
from evomerge.fusion.cost import CostMeter
from evomerge.evaluate.backends.hf import HFLM
from evomerge.fusion.logit import LogitEnsembleLM, normalized_weights
from evomerge.fusion.moa import MoALM, make_agents
from evomerge.fusion.panel import Member, PanelLM
from evomerge.fusion.sources import FusedSources

LOGIT_ON_VLLM = ("the logit ensemble needs every source's full next-token distribution at every step, in "
                 "lockstep, which a vLLM engine (one model, top log-probabilities) does not give (fix: score it "
                 "with backend hf; the panel and Mixture-of-Agents run on vllm)")


class FusionBackend:
    """Fused candidates' scoring primitives on top of an evaluation backend (see the module docstring)."""

    name = "fusion"

    def __init__(self, inner=None, *, owns_inner: bool = False):
        self.inner, self.owns_inner = inner, owns_inner
        self.meter = CostMeter()
        self._static: dict[str, float] | None = None
        self._models = 0
        self._held: tuple | None = None  # (ref, model, inner load count, LM) of the source loaded last

    @property
    def inner_name(self) -> str:
        return getattr(self.inner, "name", "hf") if self.inner is not None else "hf"

    def lm(self, sources: FusedSources, tokenizer=None, *, batch_size: int = 64, device=None):
        recipe = sources.recipe
        tok = sources.tokenizer if sources.tokenizer is not None else None
        self.meter.reset()
        self._static = None
        if recipe.method == "logit":
            if self.inner_name != "hf":
                raise EvalError(LOGIT_ON_VLLM)
            weights = normalized_weights(recipe.weights, len(recipe.models))
            used = [(ref, w) for ref, w in zip(recipe.models, weights) if w > 0]
            self._models = len(used)
            self._static = {"passes": float(len(used)), "read": sum(sources.relative_size(r) for r, _ in used),
                            "calls": float(len(used)), "models": float(len(used))}
            return LogitEnsembleLM([sources.models[r] for r in recipe.models], tok, recipe.weights,
                                   batch_size=batch_size, device=device)
        members = {ref: self._member(sources, ref, batch_size, device) for ref in sources.models}
        self._models = len(recipe.local_refs()) + (sum(not a.local for a in recipe.moa.agents.values())
                                                   if recipe.moa is not None else 0)
        if recipe.method == "panel":
            judges = [members[recipe.judge]] if recipe.judge else None
            return PanelLM([members[r] for r in recipe.models], tok, judges=judges, normalize=recipe.normalize,
                           meter=self.meter)
        return MoALM(recipe.moa, make_agents(recipe.moa, members, sources.tokenizers), tok, meter=self.meter)

    def _member(self, sources: FusedSources, ref: str, batch_size: int, device) -> Member:
        model, tok = sources.models[ref], sources.tokenizers.get(ref, sources.tokenizer)
        if self.inner_name == "hf":
            lm = HFLM(model, tok, batch_size, device)
            return Member(ref, lambda: lm, sources.relative_size(ref), lm.max_len)
        inner = self.inner
        # the engine's context: the model's, or the max_model_len option when smaller
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 10**9
        option = (getattr(inner, "options", None) or {}).get("max_model_len")

        def loaded():
            """The member's LM, its weights loaded into the engine unless they are the ones loaded last
            (nothing was loaded or started through the inner backend since: its counts have not
            moved; a merge loaded in between, e.g. by the study's evaluator, moves them)."""
            held, stamp = self._held, (inner.loads, inner.engine_starts)  # a restarted engine starts over
            if held is not None and held[0] == ref and held[1] is model and held[2] == stamp:
                return held[3]
            lm = inner.lm(model, tok, batch_size=batch_size, device=device)
            self._held = (ref, model, (inner.loads, inner.engine_starts), lm)
            return lm

        return Member(ref, loaded, sources.relative_size(ref), min(limit, int(option)) if option else limit)

    def cost(self) -> dict[str, float]:
        """The cost record of the candidate last scored: ``passes``, ``read``, ``calls``, ``models``."""
        if self._static is not None:
            return dict(self._static)
        return self.meter.figures(self._models)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats() if self.inner is not None else {}

    def close(self) -> None:
        """Stop the inner backend's engines when this backend made it (``owns_inner``)."""
        if self.inner is not None and self.owns_inner:
            self.inner.close()
