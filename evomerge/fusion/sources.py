"""The models a fusion candidate runs, loaded once per process, and the shared-tokenizer check.

:func:`load_sources` returns a :class:`FusedSources`: the recipe, each local model (loaded with
:func:`evomerge.evaluate.load_model`, through the same checks as ``evomerge eval``), the tokenizer
and each model's size for the cost figures. It is what the suite engine's ``Scorer.score`` and
lm-eval's adapter receive as "the model"; :class:`evomerge.fusion.backend.FusionBackend` turns it
into the scoring primitives. Loaded models are kept (keyed by path, device and dtype) so a fusion
baseline scored on the search split and again on held-out, or several ensembles of the same sources,
read each model once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


from evomerge.dtypes import DTYPES
from evomerge.errors import EvalError
from evomerge.fusion.cost import read_params
from evomerge.fusion.spec import FusionRecipe

_LOADED: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()
KEEP = 8  # models kept loaded


def _load(ref: str, device: str, dtype: str) -> tuple[Any, Any]:
    from evomerge.evaluate import load_model

    key = (ref, str(device), dtype)
    if key not in _LOADED:
        _LOADED[key] = load_model(ref, device, dtype)
        while len(_LOADED) > KEEP:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return _LOADED[key]


def clear_loaded() -> None:
    """Forget the models kept loaded (frees their memory once nothing else holds them)."""
    _LOADED.clear()


@dataclass
class FusedSources:
    """The loaded side of a fusion recipe: ``models[ref]``, ``tokenizers[ref]`` and ``sizes[ref]``
    (parameters read per token) of every local model, and the candidate's ``tokenizer`` (None when
    every MoA agent is remote and the recipe names none)."""

    recipe: FusionRecipe
    models: dict[str, Any]
    tokenizer: Any
    sizes: dict[str, int] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)

    def relative_size(self, ref: str) -> float:
        """``ref``'s size over the first source's (1 when either is remote)."""
        first = next(iter(self.sizes.values()), None)
        return self.sizes[ref] / first if ref in self.sizes and first else 1.0


def load_sources(recipe: FusionRecipe, *, device: str = "cpu", dtype: str | None = None) -> FusedSources:
    """Load every local model of ``recipe`` (``recipe.dtype``, else ``dtype``, else as stored) on
    ``device``; the tokenizer is ``recipe.tokenizer``'s, else the first local model's. A logit
    ensemble's sources must share one vocabulary (:func:`check_shared_vocab`)."""
    want = DTYPES.get(recipe.dtype or dtype or "auto", "auto")  # an alias (bf16) as its name; else as stored
    models, toks = {}, {}
    for ref in recipe.local_refs():
        models[ref], toks[ref] = _load(ref, device, want)
    tokenizer = None
    if recipe.tokenizer:
        from evomerge.evaluate.suite_eval import load_tokenizer

        tokenizer = load_tokenizer(recipe.tokenizer)
    elif toks:
        tokenizer = next(iter(toks.values()))
    if recipe.method in ("logit", "panel"):
        # the prompts are encoded with ``tokenizer``: it must share the models' vocabulary too
        members = {ref: (models[ref], toks[ref]) for ref in
                   (recipe.models if recipe.method == "logit" else recipe.local_refs())}
        if recipe.tokenizer and recipe.tokenizer not in members:
            first = next(iter(members.values()))[0]
            members = {**members, f"{recipe.tokenizer} (the recipe's tokenizer)": (first, tokenizer)}
        check_shared_vocab(members, "logit ensemble" if recipe.method == "logit" else "panel",
                           logits=recipe.method == "logit")
    return FusedSources(recipe, models, tokenizer, {ref: read_params(m) for ref, m in models.items()}, toks)


def check_shared_vocab(members: dict[str, tuple[Any, Any]], what: str, *, logits: bool = True) -> None:
    """EvalError unless every (model, tokenizer) of ``members`` has the first one's vocabulary (token
    to id, and the BOS / EOS / pad ids) and, with ``logits``, the same number of output logits."""
    items = list(members.items())
    ref0, (model0, tok0) = items[0]
    vocab0 = tok0.get_vocab()
    specials0 = (tok0.bos_token_id, tok0.eos_token_id, tok0.pad_token_id)
    width0 = model0.get_output_embeddings().weight.shape[0] if logits else None
    for ref, (model, tok) in items[1:]:
        vocab = tok.get_vocab()
        why = None
        if vocab != vocab0:
            diff = sorted(set(vocab.items()) ^ set(vocab0.items()), key=lambda kv: (kv[1], kv[0]))
            token, tid = diff[0]
            why = (f"their vocabularies differ ({len(vocab0)} vs {len(vocab)} tokens; e.g. id {tid} is "
                   f"{token!r} in only one of them)")
        elif (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != specials0:
            why = (f"their special tokens differ (BOS, EOS, pad ids {specials0} vs "
                   f"{(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)})")
        elif logits and model.get_output_embeddings().weight.shape[0] != width0:
            why = (f"their output layers differ ({width0} vs {model.get_output_embeddings().weight.shape[0]} "
                   f"logits)")
        if why:
            hint = ("use sources that share a tokenizer, or fuse their text instead: --ensemble panel with a judge "
                    "or --ensemble moa" if what == "logit ensemble" else "use sources that share a tokenizer, or "
                    "--ensemble moa (it passes text between models)")
            raise EvalError(f"the {what} needs one tokenizer for all its sources, but {ref0} and {ref}: {why} "
                            f"(fix: {hint})")
