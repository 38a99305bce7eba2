"""Panel + judge: every source answers, and the answer the judges find most likely is returned.

After LLM-Blender (Jiang, Ren and Lin, "LLM-Blender: Ensembling Large Language Models with Pairwise
Ranking and Generative Fusion", ACL 2023), whose ranker compares the candidates' answers; here the
ranker is likelihood under the panel itself (or a named judge model), so nothing is trained.

For a generation request with prompt ``x`` every member ``i`` decodes greedily (the task's token
limit, EOS and stop strings, as the backend always does), giving answers ``a_i``. Each distinct,
non-empty answer ``a`` is scored by the judges ``J`` (every member, or one named judge)::

    score(a) = (1 / |J|) sum_{j in J} log p_j(a | x)          (normalize: divided by a's token count)

and the answer with the highest score is returned (a tie goes to the lower-numbered member; when
every answer is empty, the first member's). For log-likelihood requests (``loglik`` and
``multiple_choice`` tasks) the panel's mean log-likelihood is used:
``log p(y | x) = (1 / n) sum_i log p_i(y | x)`` (a mean of log-probabilities, not renormalised: it
ranks choices as the geometric mean of the members' probabilities does).

Parameters: ``members`` (each a :class:`Member`: a source model and how to get its scoring LM),
``judges`` (default: the members), ``normalize`` (rank by mean per-token log-likelihood), and a
:class:`~evomerge.fusion.cost.CostMeter` that counts the passes (the cost definitions are in
:mod:`evomerge.fusion.cost`). Members share one tokenizer. The members' LMs come from the
evaluation backend: on ``hf`` one LM per model; on ``vllm`` the backend loads each model into its
engine in place before that model's requests, so one engine serves the whole panel. The judges run
in the reverse of the answering order and successive log-likelihood calls alternate directions, so
each call starts with the model already loaded: a panel of n scores a generation call with 2n - 2
reloads (2n - 1 the first time) instead of 2n.

``loglik_tokens`` (lm-eval) reports a continuation as greedy when some member decodes it greedily:
the panel's answer is always one of its members' greedy answers, so this is necessary, not
sufficient, for the panel to return it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evomerge.errors import EvalError
from evomerge.evaluate.backends.hf import generate_texts, generation_text
from evomerge.fusion.cost import CostMeter


@dataclass
class Member:
    """One model of a panel: ``lm()`` returns its scoring LM (ready to answer: on vLLM this loads the
    model into the engine), ``size`` its parameters relative to the first source, ``max_len`` its
    context in tokens (known without loading it)."""

    ref: str
    lm: Callable[[], Any]
    size: float = 1.0
    max_len: int = 10**9


class PanelLM:
    """The scoring primitives of a panel (see the module docstring)."""

    def __init__(self, members: list[Member], tokenizer, *, judges: list[Member] | None = None,
                 normalize: bool = False, meter: CostMeter | None = None):
        if not members:
            raise EvalError("a panel needs at least one model")
        self.members, self.judges = members, judges or members
        self.tok, self.normalize = tokenizer, normalize
        self.meter = meter if meter is not None else CostMeter()
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self._reverse = True  # the direction of the last log-likelihood call (the first runs forward)

    @property
    def max_len(self) -> int:
        """The shortest context of the members (and judges)."""
        return min(m.max_len for m in self.members + self.judges)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[str], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        return self.generate_requests([(p, max_new_tokens, until) for p in prompts])

    def generate_requests(self, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
        """Answers to (prompt, max new tokens, stop strings): the same prompt ids and finishing as the
        backends (BOS, the text without special tokens, its last ``max_len - max_new`` tokens)."""
        return generate_texts(self, reqs)

    def generate_tokens(self, reqs: list[tuple[list[int], int, list[str]]]) -> list[list[int]]:
        """The chosen member's generated ids per request (prompt ids used as given)."""
        outs = self._each(self.members, lambda m: m.lm().generate_tokens(reqs))
        pairs, owners = [], []
        for q, (ids, _, until) in enumerate(reqs):
            seen: set[str] = set()
            for i, out in enumerate(outs):
                text = generation_text(self.tok, out[q], self.eos, until)
                cont = self.encode(text)
                if cont and text not in seen:
                    seen.add(text)
                    pairs.append((list(ids), cont))
                    owners.append((q, i))
        # the judges in reverse: the model answering last is still loaded (one engine reload fewer)
        per = self._each(self.judges, lambda j: j.lm().loglik_tokens(pairs) if pairs else [], reverse=True)
        totals = [0.0] * len(pairs)
        for lps in per:  # summed in the judges' order, whatever the order they ran in
            for k, (lp, _) in enumerate(lps):
                totals[k] += lp
        best: list[tuple[float, int]] = [(-math.inf, 0)] * len(reqs)
        scored = [0] * len(reqs)
        for (q, i), total, (_, cont) in zip(owners, totals, pairs):
            score = total / len(self.judges) / (len(cont) if self.normalize else 1)
            scored[q] += 1
            if score > best[q][0]:  # ties keep the lower-numbered member (seen first)
                best[q] = (score, i)
        jsize = sum(j.size for j in self.judges)
        for q in range(len(reqs)):
            steps = [len(out[q]) for out in outs]
            self.meter.add(passes=sum(steps) + len(self.judges) * scored[q],
                           reads=sum(s * m.size for s, m in zip(steps, self.members)) + jsize * scored[q],
                           base=sum(steps) / len(steps), calls=len(outs) + len(self.judges) * scored[q])
        return [outs[i][q] for q, (_, i) in enumerate(best)]

    # ------------------------------------------------------------------ log-likelihood

    def loglik(self, reqs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """(the members' mean of log p(continuation | context), continuation tokens) per request."""
        per = self._each(self.members, lambda m: m.lm().loglik(reqs), reverse=self._turn())
        self._count_loglik(len(reqs))
        return [(sum(p[k][0] for p in per) / len(per), per[0][k][1]) for k in range(len(reqs))]

    def loglik_tokens(self, reqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(the members' mean log-likelihood, whether some member decodes the continuation greedily)."""
        per = self._each(self.members, lambda m: m.lm().loglik_tokens(reqs), reverse=self._turn())
        self._count_loglik(len(reqs))
        return [(sum(p[k][0] for p in per) / len(per), any(p[k][1] for p in per)) for k in range(len(reqs))]

    @staticmethod
    def _each(members: list[Member], fn: Callable[[Member], Any], *, reverse: bool = False) -> list[Any]:
        """``fn(member)`` for every member, run in reverse order when asked; results in the members'
        order. On a vLLM engine a member's ``lm()`` loads its weights unless they are the ones loaded
        last, so running from the model loaded last saves a reload."""
        out: list[Any] = [None] * len(members)
        for i in (reversed(range(len(members))) if reverse else range(len(members))):
            out[i] = fn(members[i])
        return out

    def _turn(self) -> bool:
        """Alternate directions for successive log-likelihood calls (each starts where the last ended)."""
        self._reverse = not self._reverse
        return self._reverse

    def _count_loglik(self, n: int) -> None:
        if n:
            k = len(self.members)
            self.meter.add(passes=k * n, reads=n * sum(m.size for m in self.members), base=n, calls=k * n, queries=n)
