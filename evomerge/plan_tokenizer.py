"""The output's tokenizer, planned with the tensors: which tokenizer the merged model gets, whether
the vocabulary-indexed tensors (token embedding, output head) are realigned by token string, and
its chat template.

* No ``tokenizer:`` source: the tokenizer of the base (else the first source, or the embed model)
  is copied, and every model whose embedding / head rows are read must have the same vocabulary
  (:func:`evomerge.vocab.check_same_vocab`): never a row-by-row merge of different tokens.
* A source (``base``, ``union``, a model): :func:`evomerge.vocab.build_realignment`; when every
  model already has the output's rows the plan is unchanged (no per-tensor work).
* ``chat_template``: a named template, ``auto`` or Jinja text (:mod:`evomerge.chat_templates`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from evomerge.checkpoint import TOKENIZER_CORE, Checkpoint, has_tokenizer
from evomerge.errors import CheckpointError
from evomerge.recipe import (MergeRecipe, Recipe, model_refs, tokenizer_source_model, tokenizer_spec,
                             vocab_models)
from evomerge.vocab import Realignment, build_realignment, check_same_vocab, read_vocab


@dataclass
class TokenizerPlan:
    """``folder``: the tokenizer copied (of model ``ref``); ``realign``: the rows' realignment (None:
    rows kept; ``identity``: realigned rows equal the models' own); ``chat_template``: template text."""

    folder: Path | None
    ref: str | None
    realign: Realignment | None = None
    identity: bool = True
    chat_template: str | None = None

    @property
    def builds(self) -> bool:
        """Whether the output tokenizer differs from ``folder``'s (tokens dropped or added, template)."""
        ra = self.realign
        return self.chat_template is not None or (ra is not None and (ra.keep is not None or bool(ra.new_tokens)))

    def write(self, parent: Path) -> Path:
        """The output tokenizer's files: ``folder`` itself, or a folder made under ``parent`` holding
        the built tokenizer (:func:`evomerge.checkpoint.tokenizer.prepare_tokenizer`)."""
        if not self.builds:
            return self.folder
        from evomerge.checkpoint.tokenizer import prepare_tokenizer

        ra = self.realign
        dst = Path(tempfile.mkdtemp(prefix="evomerge-tokenizer-", dir=parent))
        return prepare_tokenizer(dst, self.folder, keep=ra.keep if ra else None,
                                 new_tokens=ra.new_tokens if ra else (), expect=ra.tokens if ra else None,
                                 chat_template=self.chat_template)


def tokenizer_only_dir(recipe: Recipe, refs: list[str]) -> Path | None:
    """The recipe's tokenizer source model as a local folder when it holds a tokenizer but no weights
    and plays no other role in the recipe (it is then not opened as a model)."""
    tok = tokenizer_source_model(recipe)
    if not tok or refs[-1] != tok:  # model_refs lists the tokenizer last, unless it has another role
        return None
    path = Path(tok).expanduser()
    if not path.is_dir() or not has_tokenizer(path):
        return None
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return None  # a model: opened and checked like the others
    return path


def embedding_rows(ck: Checkpoint) -> int:
    """Rows of ``ck``'s token embedding (its vocabulary size as stored)."""
    return ck.shape(ck.embedding_name)[0] if ck.embedding_name else ck.vocab_size


def plan_tokenizer(recipe: Recipe, models: dict[str, Checkpoint], tok_dir: Path | None = None) -> TokenizerPlan:
    """The :class:`TokenizerPlan` of ``recipe`` over its opened ``models`` (``tok_dir``: a
    tokenizer-only folder named as the source)."""
    from evomerge.chat_templates import resolve_template

    spec = tokenizer_spec(recipe)
    rows = vocab_models(recipe)
    if isinstance(recipe, MergeRecipe):
        base = recipe.base or recipe.sources[0].model
    else:
        base = rows[0]
    template = None
    if spec is not None and spec.chat_template is not None:
        folders = [models[r].path for r in model_refs(recipe) if r in models]
        template = resolve_template(spec.chat_template, folders + ([tok_dir] if tok_dir else []))
    if spec is None or spec.source is None:
        check_same_vocab({r: models[r].path for r in rows})
        return TokenizerPlan(models[base].path, base, chat_template=template)
    source = spec.source
    if source in ("base", "union"):
        folder, ref = models[base].path, base
    else:
        ref = source
        folder = tok_dir if tok_dir is not None and source not in models else models[source].path
    src_vocab = read_vocab(folder)
    if src_vocab is None:
        raise CheckpointError(f"the recipe's tokenizer source {source} has no tokenizer files "
                              f"({', '.join(TOKENIZER_CORE)}) in {folder}, so the merged model could not be "
                              f"evaluated or used (fix: name a model folder that has a tokenizer)")
    # a model without tokenizer files is taken to have the base's vocabulary (mergekit does the same)
    found = {r: read_vocab(models[r].path) for r in dict.fromkeys([base, *rows])}
    fallback = found[base] or src_vocab
    vocabs = {r: v or fallback for r, v in found.items()}
    model_rows = {r: embedding_rows(models[r]) for r in vocabs}
    ra = build_realignment(spec, refs=rows, base=base, vocabs=vocabs, model_rows=model_rows,
                           source_vocab=src_vocab, source_folder=folder, where="tokenizer")
    return TokenizerPlan(folder, ref, ra, ra.is_identity(rows), template)
