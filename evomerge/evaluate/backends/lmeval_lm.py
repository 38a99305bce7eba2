"""lm-eval's model interface on a scoring backend's LM (:class:`~evomerge.evaluate.backends.vllm.VllmLM`).

lm-eval scores a task through three calls of an ``lm_eval.api.model.LM``: ``loglikelihood``
(multiple choice, log-likelihood tasks), ``loglikelihood_rolling`` (perplexity) and
``generate_until`` (generation). :class:`BackendLM` answers them with a backend LM that is already
loaded with the candidate's weights, so a search can score lm-eval tasks on a running vLLM engine
(reloaded in place per candidate) instead of lm-eval's own HF wrapper. It derives from lm-eval's
``TemplateLM`` (registered nowhere), which turns (context, continuation) strings into token ids
exactly as lm-eval's ``HFLM`` does; the token ids then go to the engine as they are.

What matches lm-eval's ``HFLM`` with its defaults (``add_bos_token`` unset, no custom prefix token):

* tokenization: the tokenizer's own special tokens (e.g. BOS) unless the text already starts with
  the BOS string; an empty context is scored after the BOS token (EOS when there is none);
* ``loglikelihood``: (sum of the continuation's log-probabilities, whether greedy decoding yields
  it); log-probabilities are vLLM's (float32 log-softmax of the engine's logits);
* ``generate_until``: greedy decoding of at most ``max_gen_toks`` tokens (256 by default; aliases
  ``max_new_tokens``, ``max_tokens``), stopped at EOS and at the ``until`` strings, the generated
  ids decoded without special tokens and cut at the first occurrence of each stop string; the
  prompt keeps its last ``max_length - max_gen_toks`` tokens;
* ``apply_chat_template``: the HF tokenizer's chat template (as ``HFLM``).

Differences: sampling is refused (``do_sample: true`` or a temperature above 0: a search needs a
deterministic fitness), as is any generation argument that would change greedy decoding
(``num_beams`` > 1, ``repetition_penalty``, ...) with one :class:`EvalError` naming it; ``top_p``,
``top_k``, ``min_p`` and ``typical_p`` are accepted and have no effect on greedy decoding. Requests
longer than the engine's context keep their last ``max_model_len - 1`` tokens (``HFLM``:
``max_length + 1``), and ``loglikelihood_rolling`` windows are two tokens shorter than ``HFLM``'s
for the same reason, so perplexities of documents longer than the context differ slightly.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM

from evomerge.errors import EvalError

# generation arguments that do not change greedy decoding (HF ignores them without do_sample)
_GREEDY_NOOPS = {"top_p", "top_k", "min_p", "typical_p"}


class BackendLM(TemplateLM):
    """An lm-eval LM on ``lm`` (a backend LM with ``loglik_tokens``, ``generate_tokens`` and
    ``max_len``) and the candidate's HF ``tokenizer``; ``name`` fingerprints its chat template for
    lm-eval's request cache."""

    def __init__(self, lm, tokenizer, *, name: str | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self._name = name
        self._max_gen_toks = max_gen_toks
        self.max_length = int(lm.max_len)  # the engine's context (max_model_len)
        self._bos_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    # -- what lm-eval's TemplateLM asks of a model -------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: BOS, else EOS (as ``HFLM``)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return (self._name or self.tokenizer.name_or_path or "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``: with the tokenizer's special tokens unless told otherwise or the
        string already starts with the BOS text (a chat template writes it), as ``HFLM``."""
        if add_special_tokens is None:
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """One engine call for every (strings, context ids, continuation ids) request."""
        out = self.lm.loglik_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of the engine's context (lm-eval's own
        window helpers), every window of every text in one engine call."""
        from lm_eval import utils

        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, self._loglikelihood_tokens(windows) if windows else []):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations, every request (with its own limit and stop strings) in one engine call."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False) if self.eot_token_id is not None \
            else None
        work = []
        for req in requests:
            context, gen_kwargs = req.args
            refused = unsupported_generation(gen_kwargs)
            if refused:
                raise EvalError(f"{refused[0]} (fix: {refused[1]})")
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room < 1:
                raise EvalError(f"max_gen_toks {max_new} leaves no room for a prompt in the engine's context of "
                                f"{self.max_length} tokens (fix: lower max_gen_toks in gen_kwargs or raise "
                                f"vllm.max_model_len)")
            work.append((self.tok_encode(context)[-room:], max_new, until))
        outs = self.lm.generate_tokens(work) if work else []
        texts = []
        for req, (_, _, until), ids in zip(requests, work, outs):
            text = postprocess_generated_text(self.tokenizer.decode(ids, skip_special_tokens=True), until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as one prompt string, written by the HF tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvalError("apply_chat_template is set but the candidate's tokenizer has no chat template "
                            "(fix: set apply_chat_template: false, or use a tokenizer that has one)")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"backend": type(self.lm).__name__}


def unsupported_generation(gen_kwargs: dict[str, Any] | None) -> tuple[str, str] | None:
    """(what, fix) when greedy decoding with ``until`` and ``max_gen_toks`` cannot honour these
    generation arguments (lm-eval's, before or after its normalization); None when it can."""
    from lm_eval.models.utils import normalize_gen_kwargs

    try:
        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), 256))
        sampling = bool(kwargs.pop("do_sample", False)) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0
        beams = int(kwargs.pop("num_beams", 1) or 1)
    except (TypeError, ValueError) as err:
        return (f"cannot read the generation arguments {gen_kwargs!r}: {err}",
                "give max_gen_toks and num_beams as whole numbers, temperature as a number")
    kwargs.pop("until", None)
    kwargs.pop("max_gen_toks", None)
    fix = "or use backend: hf"
    if sampling:
        what = ("the vllm backend scores lm-eval generations greedily; sampling (do_sample: true or "
                "temperature > 0) is not supported")
        return what, f"set do_sample: false (temperature 0) in gen_kwargs, {fix}"
    if beams != 1:
        what = "the vllm backend scores lm-eval generations greedily; beam search (num_beams > 1) is not supported"
        return what, f"remove num_beams from gen_kwargs, {fix}"
    left = sorted(k for k in kwargs if k not in _GREEDY_NOOPS)
    if left:
        what = (f"the vllm backend does not support the generation argument(s) {', '.join(left)} (it honours "
                f"until and max_gen_toks and decodes greedily)")
        return what, f"remove them from gen_kwargs or the task's generation_kwargs, {fix}"
    return None
