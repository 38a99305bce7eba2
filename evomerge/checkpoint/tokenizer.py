"""The output model's tokenizer files: copied from a model, or built from one (ids past the
model's rows dropped, tokens appended), with a chat template set.

:func:`prepare_tokenizer` writes them into a folder that :meth:`CheckpointWriter.finish` then copies
(``tokenizer_from``). Editing works on ``tokenizer.json`` with the ``tokenizers`` library (no
tokenizer class is instantiated); a tokenizer stored only as ``vocab.json`` / ``tokenizer.model``
that needs new tokens goes through transformers' fast tokenizer once. The result is read back and
must hold exactly the planned vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from evomerge.checkpoint.names import TOKENIZER_FILES
from evomerge.checkpoint.oserrors import describe_os_error
from evomerge.errors import CheckpointError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# vocabulary files of slow tokenizers, made stale by an edit of tokenizer.json
SLOW_VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def prepare_tokenizer(dst: Path, src: Path, *, keep: int | None = None, new_tokens: Sequence = (),
                      expect: Sequence[str] | None = None, chat_template: str | None = None) -> Path:
    """Write the output tokenizer into the empty folder ``dst`` and return it.

    ``src``: the tokenizer copied; ``keep``: only its ids below this stay (``None``: all);
    ``new_tokens``: :class:`~evomerge.vocab.NewToken` s appended in order; ``expect``: the vocabulary
    (token of every id) the result must have; ``chat_template``: template text written as
    ``chat_template.jinja`` (any other template entry removed).
    """
    try:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    except OSError as e:
        raise CheckpointError(describe_os_error(e, f"cannot copy the tokenizer of {src} into {dst}:")) from e
    if keep is not None or new_tokens:
        if (dst / "tokenizer.json").is_file():
            _edit_tokenizer_json(dst, keep, new_tokens)
            # the slow tokenizer's files still hold the old vocabulary: a loader that prefers them
            # would see other tokens than the merged rows, so only the edited tokenizer.json stays
            for name in SLOW_VOCAB_FILES:
                (dst / name).unlink(missing_ok=True)
        elif keep is not None:
            raise CheckpointError(f"{src}: the tokenizer has ids past the model's embedding rows and no "
                                  f"tokenizer.json to drop them from (fix: use a tokenizer source with a tokenizer.json)")
        else:
            _add_with_transformers(dst, new_tokens)
    if chat_template is not None:
        set_chat_template(dst, chat_template)
    if expect is not None:
        from evomerge.vocab import read_vocab

        got = read_vocab(dst)
        tokens = tuple(got.tokens) if got is not None else ()
        if tokens != tuple(expect):
            i = next((k for k, (a, b) in enumerate(zip(tokens, expect)) if a != b), min(len(tokens), len(expect)))
            raise CheckpointError(f"the output tokenizer built from {src} does not hold the planned vocabulary "
                                  f"({len(tokens)} tokens, planned {len(expect)}; first difference at id {i}) "
                                  f"(fix: report this with the recipe)")
    return dst


def _edit_tokenizer_json(dst: Path, keep: int | None, new_tokens: Sequence) -> None:
    from tokenizers import AddedToken, Tokenizer

    path = dst / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if keep is not None:
        data["added_tokens"] = [e for e in data.get("added_tokens") or [] if int(e["id"]) < keep]
        model = data.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            dropped = {t for t, i in vocab.items() if int(i) >= keep}
            model["vocab"] = {t: i for t, i in vocab.items() if int(i) < keep}
            merges = model.get("merges")
            if isinstance(merges, list) and dropped:
                def kept(m) -> bool:
                    parts = m.split(" ") if isinstance(m, str) else list(m)
                    return not any(p in dropped for p in parts) and "".join(parts) not in dropped

                model["merges"] = [m for m in merges if kept(m)]
        elif isinstance(vocab, list):
            model["vocab"] = vocab[:keep]
        _drop_config_ids(dst, keep)
    tok = Tokenizer.from_str(json.dumps(data))
    if new_tokens:
        tok.add_tokens([AddedToken(t.content, **t.settings) for t in new_tokens])
    path.write_text(tok.to_str(pretty=True), encoding="utf-8")


def _drop_config_ids(dst: Path, keep: int) -> None:
    """Drop ``added_tokens_decoder`` entries at or past ``keep`` from tokenizer_config.json (the
    transformers 4 format keeps a copy of the added tokens there)."""
    cfg = dst / "tokenizer_config.json"
    if not cfg.is_file():
        return
    data = json.loads(cfg.read_text(encoding="utf-8"))
    dec = data.get("added_tokens_decoder")
    if isinstance(dec, dict):
        data["added_tokens_decoder"] = {k: v for k, v in dec.items() if int(k) < keep}
        cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_with_transformers(dst: Path, new_tokens: Sequence) -> None:
    """Append tokens to a tokenizer without tokenizer.json: loaded once as a fast tokenizer, saved back."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dst), use_fast=True)
    tok.add_tokens([AddedToken(t.content, **t.settings) for t in new_tokens])
    tok.save_pretrained(str(dst))


def set_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the folder's only chat template (``chat_template.jinja``)."""
    (folder / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
