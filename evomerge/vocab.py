"""Vocabularies: read from tokenizer files, compared across models, and realigned by token string.

* :func:`read_vocab` reads a model folder's vocabulary (token of every id) straight from its files
  (``tokenizer.json``; else ``vocab.json`` / ``tokenizer.model`` with ``added_tokens.json`` and the
  ``added_tokens_decoder`` of ``tokenizer_config.json``), without building a tokenizer; results are
  cached per file identity (path, size, mtime), so a search that plans thousands of candidates
  reads each file once.
* :func:`check_same_vocab` refuses models whose vocabularies differ (naming the models and the first
  id where they do): their embedding and output-head rows mean different tokens, and a row-by-row
  merge would mix them.
* :func:`build_realignment` implements a recipe's ``tokenizer:`` section with mergekit's rules
  (``mergekit/tokenizer/build.py`` and ``embed.py`` of mergekit 0.1.5): the output vocabulary is the
  base's (``base``; ids at or past the base's embedding rows dropped), the base's plus every other
  model's tokens it lacks (``union``: new plain tokens first, then new added tokens), or another
  model's (``source: <model>``); tokens listed under ``tokens`` are added when missing. Every model's
  vocabulary-indexed tensors (token embedding, output head) are then permuted to that vocabulary by
  token string. A row a model lacks (or a ``force``d token's row) is, in this order: the token's
  ``tokens`` rule (a model's row, a model's row of another token/id, zeros); the row of the only
  model that has the token; the base's row; the mean of the rows of the models that have it; zeros
  when none has it. With ``pad_to_multiple_of`` the padding rows are each model's mean row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from evomerge.errors import CheckpointError, IncompatibleModelsError

VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "added_tokens.json", "tokenizer_config.json")
ADDED_DEFAULTS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
REALIGN_HINT = ("add a tokenizer source to the recipe, e.g. `tokenizer: {source: base}` (or `union`, or a model), "
                "which realigns the embedding and output-head rows by token string (mergekit: `tokenizer_source`); "
                "or merge models that share one tokenizer")


@dataclass(frozen=True, eq=False)
class Vocab:
    """A tokenizer's vocabulary: ``tokens[i]`` is the token of id ``i`` (None: no token has it)."""

    tokens: tuple[str | None, ...]
    index: Mapping[str, int]
    added: Mapping[int, dict]      # ids of added tokens -> their settings (special, normalized, ...)
    path: Path                     # the file it was read from

    def __len__(self) -> int:
        return len(self.tokens)

    def first_difference(self, other: "Vocab") -> int | None:
        """The first id whose token differs (or that only one of the two has); None when equal."""
        if self.tokens == other.tokens:
            return None
        for i, (a, b) in enumerate(zip(self.tokens, other.tokens)):
            if a != b:
                return i
        return min(len(self.tokens), len(other.tokens))


_CACHE: dict[str, tuple[tuple, Vocab | None]] = {}


def _stamp(folder: Path) -> tuple:
    out = []
    for name in VOCAB_FILES:
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_vocab(folder: str | os.PathLike) -> Vocab | None:
    """The vocabulary of the tokenizer in ``folder``; None when it holds no tokenizer files.
    :class:`CheckpointError` naming the file when one cannot be read."""
    folder = Path(folder)
    key = str(folder.resolve())
    stamp = _stamp(folder)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    vocab = _read(folder)
    _CACHE[key] = (stamp, vocab)
    return vocab


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer file ({e}) (fix: restore it from the model's "
                              f"source)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object (fix: restore it from the model's source)")
    return data


def _read(folder: Path) -> Vocab | None:
    ids: dict[int, str] = {}
    added: dict[int, dict] = {}
    main = folder / "tokenizer.json"
    if main.is_file():
        data = _json(main)
        model = data.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            ids.update({int(i): t for t, i in vocab.items()})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids.update({i: (e[0] if isinstance(e, list) else e) for i, e in enumerate(vocab)})
        elif vocab is not None:
            raise CheckpointError(f"{main}: unexpected model.vocab of type {type(vocab).__name__}")
        for e in data.get("added_tokens") or []:
            ids[int(e["id"])] = e["content"]
            added[int(e["id"])] = {k: e.get(k, v) for k, v in ADDED_DEFAULTS.items()}
    elif (folder / "vocab.json").is_file():
        ids.update({int(i): t for t, i in _json(folder / "vocab.json").items()})
    elif (folder / "tokenizer.model").is_file():
        ids.update(_sentencepiece(folder / "tokenizer.model"))
    else:
        return None
    path = main if main.is_file() else (folder / "vocab.json" if (folder / "vocab.json").is_file()
                                        else folder / "tokenizer.model")
    if (folder / "added_tokens.json").is_file():
        for t, i in _json(folder / "added_tokens.json").items():
            if int(i) not in ids:
                ids[int(i)] = t
                added[int(i)] = dict(ADDED_DEFAULTS)
    if (folder / "tokenizer_config.json").is_file():
        dec = _json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for i, e in dec.items():
            if isinstance(e, dict) and int(i) not in ids and "content" in e:
                ids[int(i)] = e["content"]
                added[int(i)] = {k: e.get(k, v) for k, v in ADDED_DEFAULTS.items()}
    n = max(ids) + 1 if ids else 0
    tokens = tuple(ids.get(i) for i in range(n))
    index: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t is not None and (t not in index or i in added):
            index[t] = i  # an added token shadows a vocabulary entry of the same text
    return Vocab(tokens, index, added, path)


def _sentencepiece(path: Path) -> dict[int, str]:
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover - sentencepiece ships with transformers' extras
        raise CheckpointError(f"{path}: reading a SentencePiece vocabulary needs the sentencepiece package "
                              f"(fix: pip install sentencepiece)") from None
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from None
    return {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}


def check_same_vocab(models: Mapping[str, str | os.PathLike], *, hint: str = REALIGN_HINT) -> None:
    """Raise :class:`IncompatibleModelsError` unless every model (label -> folder) that has tokenizer
    files has the same vocabulary as the first one that does (same token at every id)."""
    first: tuple[str, Vocab] | None = None
    for label, folder in models.items():
        vocab = read_vocab(folder)
        if vocab is None:
            continue
        if first is None:
            first = (label, vocab)
            continue
        i = first[1].first_difference(vocab)
        if i is not None:
            ref_label, ref = first

            def tok(v: Vocab) -> str:
                return repr(v.tokens[i]) if i < len(v.tokens) and v.tokens[i] is not None else "no token"

            raise IncompatibleModelsError(
                f"models {ref_label} and {label} have different vocabularies ({len(ref)} and {len(vocab)} tokens), so "
                f"their embedding and output-head rows stand for different tokens: they differ first at token id {i} "
                f"({tok(ref)} in {ref_label}, {tok(vocab)} in {label}) (fix: {hint})")


# ------------------------------------------------------------------------------------------------
# realignment


@dataclass(frozen=True)
class NewToken:
    """A token the output tokenizer adds to its source's, with its added-token settings."""

    content: str
    settings: dict = field(default_factory=lambda: dict(ADDED_DEFAULTS))


@dataclass(eq=False)
class Realignment:
    """The output vocabulary and each model's map onto it (see the module docstring).

    ``perm[ref][i]``: the row of model ``ref`` holding output token ``i``, or -1. ``rules`` (per token
    id needing a default row): the recipe's ``tokens`` entries, resolved. ``tokenizer_from`` /
    ``keep`` / ``new_tokens``: how the output tokenizer is written (its source folder, the ids of it
    kept, the tokens appended)."""

    tokens: tuple[str, ...]
    rows: int
    perm: dict[str, np.ndarray]
    model_rows: dict[str, int]
    base: str | None
    token_rules: dict[int, tuple]            # id -> ("zero",) | ("row", ref, row) | ("token_of", ref)
    forced: np.ndarray                       # bool per output id
    tokenizer_from: Path
    keep: int | None = None
    new_tokens: tuple[NewToken, ...] = ()
    _ops: dict[tuple, "VocabOp"] = field(default_factory=dict)

    def is_identity(self, refs: list[str]) -> bool:
        """Whether every model's rows already are the output's (nothing to permute, add or pad)."""
        n = len(self.tokens)
        return self.rows == n and not self.forced.any() and all(
            self.model_rows[r] == n and np.array_equal(self.perm[r], np.arange(n)) for r in refs)

    def op(self, models: tuple[str, ...], where: str) -> "VocabOp":
        """The row map of one output tensor merged from ``models`` (built once per model tuple)."""
        op = self._ops.get(models)
        if op is None:
            op = self._ops[models] = VocabOp.build(self, models, where)
        return op


def build_realignment(spec, *, refs: list[str], base: str | None, vocabs: Mapping[str, Vocab],
                      model_rows: Mapping[str, int], source_vocab: Vocab | None, source_folder: Path,
                      where: str) -> Realignment:
    """The output vocabulary of ``spec`` (a :class:`~evomerge.recipe_sections.TokenizerSpec` with a
    source) over models ``refs`` (their vocabularies and embedding rows given), ``base`` the model
    ``base``/``union`` start from. ``source_vocab``: the vocabulary of a model source."""
    keep = None
    new: list[NewToken] = []
    if spec.source in ("base", "union"):
        bv = vocabs[base]
        keep = model_rows[base] if len(bv) > model_rows[base] else None
        out = list(bv.tokens[:keep] if keep is not None else bv.tokens)
        if spec.source == "union":
            have = set(out)
            plain, extra = [], {}
            for r in [base, *[r for r in refs if r != base]]:
                v = vocabs[r]
                for i, t in enumerate(v.tokens[:model_rows[r]]):
                    if t is None or t in have:
                        continue
                    if i in v.added:
                        extra.setdefault(t, v.added[i])
                    elif t not in extra:
                        plain.append(t)
            plain = [t for t in dict.fromkeys(plain) if t not in extra]
            new += [NewToken(t) for t in plain] + [NewToken(t, dict(s)) for t, s in extra.items()]
            out += [t.content for t in new]
    else:
        out = list(source_vocab.tokens)
    holes = [i for i, t in enumerate(out) if t is None]
    if holes:
        raise IncompatibleModelsError(f"{where}: the output tokenizer has no token at id {holes[0]} "
                                      f"({len(holes)} such ids), so its rows cannot be realigned by token "
                                      f"(fix: use another tokenizer source)")
    have = set(out)
    for t in spec.tokens:
        if t not in have:
            new.append(NewToken(t))
            out.append(t)
            have.add(t)
    n = len(out)
    pad = spec.pad_to_multiple_of
    rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    perm = {}
    for r in refs:
        v, limit = vocabs[r], model_rows[r]
        perm[r] = np.fromiter(((j if (j := v.index.get(t, -1)) < limit else -1) for t in out), np.int64, n)
    index = {t: i for i, t in enumerate(out)}
    rules: dict[int, tuple] = {}
    forced = np.zeros(n, dtype=bool)
    for t, ts in spec.tokens.items():
        i = index[t]
        forced[i] = ts.force
        src = ts.source
        if src is None:
            continue
        kind = getattr(src, "kind", None)
        if kind == "zero":
            rules[i] = ("zero",)
            continue
        model = src.model if kind == "model_token" else src
        tw = f"{where}: tokens[{t!r}].source"
        if model not in perm:
            raise IncompatibleModelsError(f"{tw}: model {model} is not one of the models whose rows are merged "
                                          f"({', '.join(refs)}) (fix: name one of them)")
        if kind == "model_token":
            row = src.token_id if src.token_id is not None else vocabs[model].index.get(src.token, -1)
            what = f"token id {src.token_id}" if src.token_id is not None else f"token {src.token!r}"
        else:
            row, what = int(perm[model][i]), f"token {t!r}"
        if not 0 <= row < model_rows[model]:
            raise IncompatibleModelsError(f"{tw}: model {model} has no row for {what} ({model_rows[model]} rows) "
                                          f"(fix: name a model that has it, or use {{kind: zero}})")
        rules[i] = ("row", model, row)
    return Realignment(tuple(out), rows, perm, dict(model_rows), base, rules, forced, source_folder, keep, tuple(new))


@dataclass(eq=False)
class VocabOp:
    """How the vocabulary-indexed tensors of ``models`` (one output tensor's inputs) become the
    output's rows: :meth:`apply`. Default rows (``need`` ids): kind 0 zeros, 1 a model's row
    (``src_model`` index into ``models``, ``src_row``), 2 the mean of the models that have it."""

    realign: Realignment
    models: tuple[str, ...]
    need: np.ndarray
    kind: np.ndarray
    src_model: np.ndarray
    src_row: np.ndarray

    @classmethod
    def build(cls, ra: Realignment, models: tuple[str, ...], where: str) -> "VocabOp":
        n = len(ra.tokens)
        present = np.stack([ra.perm[m] >= 0 for m in models])
        count = present.sum(0)
        need_mask = (count < len(models)) | ra.forced
        kind = np.full(n, -1, dtype=np.int64)
        src_model = np.zeros(n, dtype=np.int64)
        src_row = np.zeros(n, dtype=np.int64)
        kind[count == 0] = 0
        one = count == 1
        kind[one] = 1
        src_model[one] = present[:, one].argmax(0)
        src_row[one] = np.stack([ra.perm[m] for m in models])[src_model[one], np.nonzero(one)[0]]
        many = need_mask & (count > 1)
        kind[many] = 2
        if ra.base in models:
            b = models.index(ra.base)
            from_base = many & present[b]
            kind[from_base], src_model[from_base], src_row[from_base] = 1, b, ra.perm[ra.base][from_base]
        for i, rule in ra.token_rules.items():
            if not need_mask[i]:
                continue
            if rule[0] == "zero":
                kind[i] = 0
            else:
                if rule[1] not in models:
                    raise IncompatibleModelsError(
                        f"{where}: token {ra.tokens[i]!r} takes its row from model {rule[1]}, whose rows are not among "
                        f"this tensor's inputs ({', '.join(models)}) (fix: name one of them)")
                kind[i], src_model[i], src_row[i] = 1, models.index(rule[1]), rule[2]
        need = np.nonzero(need_mask)[0]
        return cls(ra, models, need, kind[need], src_model[need], src_row[need])

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's tensor (vocabulary along dim 0) with the output's rows, float32."""
        ra, models = self.realign, self.models
        n = len(ra.tokens)
        ts = [tensors[m] for m in models]
        rest = tuple(ts[0].shape[1:])
        dev = ts[0].device
        defaults = torch.zeros((len(self.need), *rest), dtype=torch.float32, device=dev)
        for k, t in enumerate(ts):
            sel = np.nonzero((self.kind == 1) & (self.src_model == k))[0]
            if len(sel):
                defaults[torch.from_numpy(sel).to(dev)] = t[torch.from_numpy(self.src_row[sel]).to(dev)].float()
        mean = np.nonzero(self.kind == 2)[0]
        if len(mean):
            ids = self.need[mean]
            acc = torch.zeros((len(mean), *rest), dtype=torch.float32, device=dev)
            cnt = torch.zeros(len(mean), dtype=torch.float32, device=dev)
            for m, t in zip(models, ts):
                rows = ra.perm[m][ids]
                has = np.nonzero(rows >= 0)[0]
                h = torch.from_numpy(has).to(dev)
                acc[h] = acc[h] + t[torch.from_numpy(rows[has]).to(dev)].float()
                cnt[h] += 1
            defaults[torch.from_numpy(mean).to(dev)] = acc / cnt.view(-1, *([1] * len(rest)))
        need_pos = np.full(n, -1, dtype=np.int64)
        need_pos[self.need] = np.arange(len(self.need))
        out: dict[str, torch.Tensor] = {}
        for m, t in zip(models, ts):
            rows = ra.perm[m]
            own = np.nonzero((rows >= 0) & ~ra.forced)[0]
            miss = np.setdiff1d(np.arange(n), own, assume_unique=True)
            x = torch.empty((ra.rows, *rest), dtype=torch.float32, device=dev)
            x[torch.from_numpy(own).to(dev)] = t[torch.from_numpy(rows[own]).to(dev)].float()
            if len(miss):
                x[torch.from_numpy(miss).to(dev)] = defaults[torch.from_numpy(need_pos[miss]).to(dev)]
            if ra.rows > n:
                x[n:] = x[:n].mean(dim=0)
            out[m] = x
        return out


def vocab_tensor_names(names: list[str], embedding: str | None, rows: int, shape) -> set[str]:
    """The tensors indexed by token along dim 0: the token embedding and an output head
    (``lm_head`` / ``embed_out`` / ``output``) with as many rows."""
    import re

    head = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
    out = {embedding} if embedding else set()
    out |= {n for n in names if head.search(n) and shape(n)[0] == rows}
    return out
