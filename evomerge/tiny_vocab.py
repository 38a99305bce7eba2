"""Tiny models whose vocabularies differ, for tests and the mergekit parity script.

:func:`build_vocab_variant` copies a model (e.g. one of :func:`evomerge.tiny.build_tiny_family`),
adds tokens to its tokenizer (appended ids, as ``add_tokens`` assigns them), grows the token
embedding and output head by one random row per new token (and ``pad_rows`` more rows no token
uses, as models padded to a multiple do), and perturbs every weight with seeded noise, so that the
variant looks like a fine-tune that extended the vocabulary (a chat model's ``<|im_start|>``, a
tool token). Optionally a chat template is stored with the tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import torch

from evomerge.checkpoint import Checkpoint, CheckpointWriter, TensorSpec


def _noise(shape, seed: int, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=g)


def build_vocab_variant(out_dir: str | os.PathLike, init_from: str | os.PathLike, *, add_tokens=(),
                        special: bool = True, noise: float = 0.02, seed: int = 0, pad_rows: int = 0,
                        chat_template: str | None = None, overwrite: bool = False) -> Path:
    """A copy of ``init_from`` with ``add_tokens`` appended to its vocabulary (``special``: as special
    added tokens), new rows ~ N(0, initializer_range), every tensor plus ``noise`` x its std of
    seeded Gaussian noise."""
    from tokenizers import AddedToken, Tokenizer

    base = Checkpoint.open(init_from)
    config = dict(base.config)
    std = float(config.get("initializer_range", 0.02))
    tok = Tokenizer.from_file(str(base.path / "tokenizer.json"))
    n_before = tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([AddedToken(t, special=special, normalized=not special) for t in add_tokens])
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok - n_before != len(add_tokens):
        raise ValueError(f"some of {list(add_tokens)} are already in {init_from}'s vocabulary")
    rows = base.shape(base.embedding_name)[0]
    new_rows = max(rows, n_tok) + pad_rows
    config["vocab_size"] = new_rows
    vocab_names = {base.embedding_name} | ({"lm_head.weight"} if "lm_head.weight" in base.names else set())
    specs = [TensorSpec(n, (new_rows, *base.shape(n)[1:]) if n in vocab_names else base.shape(n), base.dtype(n))
             for n in base.names]
    with tempfile.TemporaryDirectory(prefix="evomerge-vocab-") as tmp:
        tmp = Path(tmp)
        tok.save(str(tmp / "tokenizer.json"), pretty=True)
        tcfg = json.loads((base.path / "tokenizer_config.json").read_text(encoding="utf-8"))
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            tcfg.pop("chat_template", None)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
        gen = base.path / "generation_config.json"
        if gen.is_file():
            (tmp / "generation_config.json").write_text(gen.read_text(encoding="utf-8"), encoding="utf-8")
        with CheckpointWriter(out_dir, specs, shard_size="5GB", overwrite=overwrite) as w:
            for spec in specs:
                t = base.read(spec.name).float()
                if spec.name in vocab_names and spec.shape[0] > t.shape[0]:
                    extra = _noise((spec.shape[0] - t.shape[0], *t.shape[1:]), seed, spec.name + "#rows") * std
                    t = torch.cat([t, extra])
                if noise:
                    scale = t.std().item() if t.numel() > 1 and t.std().item() > 0 else std
                    t = t + noise * scale * _noise(t.shape, seed, spec.name)
                w.write(spec.name, t.to(spec.dtype))
            return w.finish(config=config, tokenizer_from=tmp)
