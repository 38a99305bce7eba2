"""Mixture-of-Agents prompts: what a proposer or the aggregator is asked, as chat messages or plain text.

A first-layer proposer gets the task's prompt as it is. A later proposer and the aggregator get the
same prompt with the previous layer's answers as references, under an instruction to weigh them and
write one answer of their own (the scheme of Wang et al., "Mixture-of-Agents Enhances Large
Language Model Capabilities", 2024; the wording here is evomerge's own, :data:`INSTRUCTION`).

* chat (``api: chat``): ``[{"role": "system", "content": instruction + references},
  {"role": "user", "content": prompt}]``; with ``system_role: false`` (templates without a system
  role) the instruction and references open the user message instead;
* plain text (``api: completions``): ``instruction + references + "\\n\\n" + prompt``, so the prompt
  is still the end of the text and a completion model continues it.

References are numbered: ``Answer 1:\\n<text>\\n\\nAnswer 2:\\n<text>``.
"""

from __future__ import annotations

from evomerge.errors import EvalError

INSTRUCTION = ("Other assistants have answered the request below. Their answers may be wrong, incomplete or "
               "contradict each other. Weigh them critically and reply with a single answer of your own that is "
               "correct and complete. Do not mention the other answers.")


def references_block(references: list[str]) -> str:
    return "\n\n".join(f"Answer {k}:\n{text.strip()}" for k, text in enumerate(references, 1))


def chat_messages(prompt: str, references: list[str] | None = None, *, instruction: str | None = None,
                  system_role: bool = True) -> list[dict[str, str]]:
    """The chat turns of a proposer (no references) or of a later layer / the aggregator."""
    if not references:
        return [{"role": "user", "content": prompt}]
    head = f"{instruction or INSTRUCTION}\n\n{references_block(references)}"
    if system_role:
        return [{"role": "system", "content": head}, {"role": "user", "content": prompt}]
    return [{"role": "user", "content": f"{head}\n\nRequest:\n{prompt}"}]


def plain_prompt(prompt: str, references: list[str] | None = None, *, instruction: str | None = None) -> str:
    """The completion prompt of a proposer (the prompt itself) or of a later layer / the aggregator."""
    if not references:
        return prompt
    return f"{instruction or INSTRUCTION}\n\n{references_block(references)}\n\n{prompt}"


def chat_ids(tokenizer, messages: list[dict[str, str]], what: str = "model") -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn
    (BOS once: added when the template does not write it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(f"{what} has no chat template, so it cannot take chat messages (fix: give the agent "
                        f"api: completions to send it plain text, or use a chat model)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt as the backends build them: BOS (when the tokenizer has one), then
    the text without special tokens."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return prefix + (tokenizer.encode(text, add_special_tokens=False) if text else [])
