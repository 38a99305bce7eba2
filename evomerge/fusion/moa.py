"""Mixture-of-Agents: layers of proposers that see the previous layer's answers, then an aggregator.

Wang et al., "Mixture-of-Agents Enhances Large Language Model Capabilities" (2024). For a request
with prompt ``x``::

    A_1 = [agent(x) for agent in layers[0]]                          # proposers answer the prompt
    A_k = [agent(x, references=A_{k-1}) for agent in layers[k-1]]    # later layers see the last answers
    answer = aggregator(x, references=A_L)

Prompts are built by :mod:`evomerge.fusion.prompts` (chat messages for ``api: chat`` agents, plain
text for ``api: completions``). Proposers decode at most ``max_tokens`` tokens (default: the task's
limit) and stop at the task's stop strings; the aggregator uses the task's limit and stop strings,
and its answer is finished as every backend finishes one (cut at EOS, then at the first stop
string). Local agents run on the evaluation backend and decode greedily; remote agents
(OpenAI-compatible endpoints, :mod:`evomerge.fusion.endpoint`) use the configured ``temperature``
as proposers and 0 as the aggregator.

Parameters (:class:`~evomerge.fusion.spec.MoAConfig`): ``agents``, ``layers``, ``aggregator``,
``max_tokens``, ``temperature``, ``instruction``, ``system_role``, ``timeout``, ``concurrency``.
Calls per query: ``sum(len(layer) for layer in layers) + 1``; the cost figures are defined in
:mod:`evomerge.fusion.cost`.

Generation only: Mixture-of-Agents passes text between models, so it has no log-likelihood of a
given continuation; ``loglik`` and ``multiple_choice`` tasks raise an :class:`EvalError`.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvalError
from evomerge.evaluate.backends.hf import generation_text
from evomerge.fusion.cost import CostMeter
from evomerge.fusion.endpoint import Endpoint
from evomerge.fusion.panel import Member
from evomerge.fusion.prompts import chat_ids, chat_messages, plain_prompt, text_ids
from evomerge.fusion.spec import MoAConfig

LOGLIK_REFUSED = ("Mixture-of-Agents passes text between models and has no log-likelihood of a given "
                  "continuation, so it scores generation tasks only (fix: drop the loglik / multiple_choice "
                  "tasks, or use the logit ensemble or the panel for them)")


class LocalAgent:
    """An agent on a local model: ``member.lm()`` gives its scoring LM (token-level primitives)."""

    def __init__(self, name: str, member: Member, tokenizer, api: str, *, instruction: str | None = None,
                 system_role: bool = True):
        self.name, self.member, self.tok, self.api = name, member, tokenizer, api
        self.instruction, self.system_role = instruction, system_role
        self.size = member.size

    def prompt_ids(self, prompt: str, references: list[str] | None) -> list[int]:
        if self.api == "chat":
            msgs = chat_messages(prompt, references, instruction=self.instruction, system_role=self.system_role)
            return chat_ids(self.tok, msgs, f"agent {self.name} ({self.member.ref})")
        return text_ids(self.tok, plain_prompt(prompt, references, instruction=self.instruction))

    def run(self, requests: list[tuple[str, list[str] | None, int, list[str]]], *, proposer: bool
            ) -> list[tuple[str, int]]:
        """(answer, generated tokens) per (prompt, references, max tokens, stop strings)."""
        lm = self.member.lm()
        token_reqs = []
        for prompt, refs, max_new, until in requests:
            ids = self.prompt_ids(prompt, refs)[-max(1, int(lm.max_len) - max_new):]
            token_reqs.append((ids, max_new, list(until)))
        outs = lm.generate_tokens(token_reqs)
        return [(generation_text(self.tok, ids, self.tok.eos_token_id, until), len(ids))
                for ids, (_, _, until) in zip(outs, token_reqs)]


class RemoteAgent:
    """An agent on an OpenAI-compatible server."""

    def __init__(self, name: str, endpoint: Endpoint, *, size: float = 1.0, temperature: float = 0.0,
                 instruction: str | None = None, system_role: bool = True):
        self.name, self.endpoint, self.size, self.temperature = name, endpoint, size, temperature
        self.instruction, self.system_role = instruction, system_role

    def run(self, requests: list[tuple[str, list[str] | None, int, list[str]]], *, proposer: bool
            ) -> list[tuple[str, int]]:
        chat = self.endpoint.api == "chat"
        reqs = [((chat_messages(p, refs, instruction=self.instruction, system_role=self.system_role) if chat
                  else plain_prompt(p, refs, instruction=self.instruction)), max_new, until)
                for p, refs, max_new, until in requests]
        return self.endpoint.complete(reqs, temperature=self.temperature if proposer else 0.0)


class MoALM:
    """The ``generate`` primitives of a Mixture-of-Agents (``loglik`` refused: see the module docstring)."""

    def __init__(self, config: MoAConfig, agents: dict[str, Any], tokenizer=None, *, meter: CostMeter | None = None):
        self.config, self.agents, self.tok = config, agents, tokenizer
        self.meter = meter if meter is not None else CostMeter()

    @property
    def max_len(self) -> int:
        """The aggregator's context when it is local (lm-eval truncates prompts to it), else unbounded."""
        agg = self.agents[self.config.aggregator]
        return agg.member.max_len if isinstance(agg, LocalAgent) else 10**9

    def generate(self, prompts: list[str], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        return self.generate_requests([(p, max_new_tokens, until) for p in prompts])

    def generate_requests(self, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
        """The aggregator's answer per (prompt, max new tokens, stop strings), in order."""
        if not reqs:
            return []
        cfg = self.config
        spent = [[0.0, 0.0] for _ in reqs]  # passes, reads per query
        refs: list[list[str]] | None = None
        for layer in cfg.layers:
            answers = []
            for name in layer:
                agent = self.agents[name]
                work = [(p, None if refs is None else refs[q], cfg.max_tokens or max_new, list(until))
                        for q, (p, max_new, until) in enumerate(reqs)]
                outs = agent.run(work, proposer=True)
                for q, (_, steps) in enumerate(outs):
                    spent[q][0] += steps
                    spent[q][1] += steps * agent.size
                answers.append([text for text, _ in outs])
            refs = [[a[q] for a in answers] for q in range(len(reqs))]
        agg = self.agents[cfg.aggregator]
        final = agg.run([(p, refs[q], max_new, list(until)) for q, (p, max_new, until) in enumerate(reqs)],
                        proposer=False)
        for q, (_, steps) in enumerate(final):
            self.meter.add(passes=spent[q][0] + steps, reads=spent[q][1] + steps * agg.size, base=max(steps, 1),
                           calls=cfg.calls_per_query())
        return [text for text, _ in final]

    def generate_tokens(self, reqs: list[tuple[list[int], int, list[str]]]) -> list[list[int]]:
        """For lm-eval: the prompt ids decoded to text, the answer encoded back."""
        if self.tok is None:
            raise EvalError("lm-eval tasks need a tokenizer, and this Mixture-of-Agents has no local model (fix: set "
                            "`tokenizer:` in the fusion recipe to a model folder with the agents' tokenizer)")
        texts = self.generate_requests([(self.tok.decode(ids, skip_special_tokens=True), max_new, tuple(until))
                                        for ids, max_new, until in reqs])
        return [self.tok.encode(t, add_special_tokens=False) for t in texts]

    def loglik(self, reqs):
        raise EvalError(LOGLIK_REFUSED)

    def loglik_tokens(self, reqs):
        raise EvalError(LOGLIK_REFUSED)


def make_agents(config: MoAConfig, members: dict[str, Member], tokenizers: dict[str, Any]) -> dict[str, Any]:
    """The agents of ``config``: local ones on ``members[ref]`` (and ``tokenizers[ref]``), remote ones
    on their endpoints."""
    agents: dict[str, Any] = {}
    for name, spec in config.agents.items():
        if spec.local:
            agents[name] = LocalAgent(name, members[spec.model], tokenizers[spec.model], spec.api,
                                      instruction=config.instruction, system_role=config.system_role)
        else:
            ep = Endpoint(spec.endpoint, spec.model, api=spec.api, api_key_env=spec.api_key_env,
                          timeout=config.timeout, concurrency=config.concurrency)
            agents[name] = RemoteAgent(name, ep, size=spec.relative_size, temperature=config.temperature,
                                       instruction=config.instruction, system_role=config.system_role)
    return agents
