"""Tiny Hugging Face causal-LM checkpoints built locally, for tests and benchmarks (nothing downloads).

A model is described by a real transformers config (Llama, Mistral or Qwen2); its tensor names and
shapes come from instantiating the model class on the ``meta`` device (no memory), and each tensor is
generated and streamed to disk by :class:`~evomerge.checkpoint.CheckpointWriter` one at a time, so a
350M-parameter family builds without holding a model in memory. Initialization follows transformers'
``_init_weights`` for these architectures: N(0, initializer_range) for linear and embedding weights,
ones for norms, zeros for biases. The tokenizer is a byte-level BPE without merges (one token per
UTF-8 byte) with ``<pad> <s> </s> <unk>``, saved as a ``PreTrainedTokenizerFast``, so ``AutoTokenizer`` and
``generate`` work.

A "fine-tune" (``init_from`` + ``noise``) is the base's weights plus seeded Gaussian noise scaled by
``noise`` times each tensor's standard deviation (its RMS when the std is 0, e.g. norm weights, and
``initializer_range`` when both are 0, e.g. zero biases), so a family shares one base.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from evomerge.checkpoint import Checkpoint, CheckpointWriter, TensorSpec, parse_size
from evomerge.errors import ConfigError, Problem

ARCHS = ("llama", "mistral", "qwen2")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_SHARD = 5 * 10**9


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte, plus the four special tokens.

    Byte-level (GPT-2 alphabet) rather than plain characters so that transformers' own Qwen2
    tokenizer class, which ``AutoTokenizer`` substitutes for qwen2 models, encodes the same way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_ORDER.get(c, ord(c)))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (character -> byte value)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _bytes_to_unicode()


def tokenizer_size() -> int:
    """Number of tokens of the tiny tokenizer (the default ``vocab_size``)."""
    return len(_tokenizer())


def make_config(*, arch: str = "llama", num_layers: int = 4, hidden_size: int = 64,
                intermediate_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                vocab_size: int | None = None, tie_word_embeddings: bool = False,
                dtype: torch.dtype = torch.float32, max_position_embeddings: int = 512):
    """A transformers config object for a tiny model of ``arch``."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    if arch not in classes:
        raise ConfigError(Problem("arch", f"unknown tiny-model architecture {arch!r}",
                                  f"use one of {', '.join(ARCHS)}"))
    vocab = tokenizer_size() if vocab_size is None else int(vocab_size)
    if vocab < tokenizer_size():
        raise ConfigError(Problem("vocab_size", f"{vocab} is smaller than the tiny tokenizer's "
                                  f"{tokenizer_size()} tokens", "leave vocab_size unset or make it larger"))
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ConfigError(Problem("heads", f"hidden_size {hidden_size}, {num_attention_heads} heads and "
                                  f"{num_key_value_heads} kv heads do not divide evenly",
                                  "hidden_size must be a multiple of heads, heads of kv heads"))
    kw = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
              num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
              max_position_embeddings=max_position_embeddings, bos_token_id=BOS_ID,
              eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype=dtype)
    if arch == "qwen2":
        kw["layer_types"] = ["full_attention"] * num_layers
    return getattr(transformers, classes[arch])(**kw)


def model_specs(config, dtype: torch.dtype) -> list[TensorSpec]:
    """Tensor names and shapes of ``config``'s causal LM, as transformers saves them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    state = model.state_dict()
    specs = [TensorSpec(name, tuple(t.shape), dtype) for name, t in state.items()]
    if config.tie_word_embeddings:
        specs = [s for s in specs if s.name != "lm_head.weight"]
    return specs


_CHUNK = 1 << 22  # noise is drawn in chunks of this many values, each from its own seeded generator


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode()) * 1_000_003 % (2**63)


def _randn(numel: int, seed: int, name: str) -> torch.Tensor:
    """Flat float32 N(0, 1) values, deterministic in (seed, name), drawn in parallel chunks.

    torch's CPU generator is serial (~30 ns a value); chunks with their own generators let several
    threads draw at once, which matters for the 350M-parameter benchmark families.
    """
    out = torch.empty(numel)

    def fill(i: int) -> None:
        out[i * _CHUNK:(i + 1) * _CHUNK].normal_(generator=torch.Generator().manual_seed(_seed(seed, name, i)))

    n_chunks = -(-numel // _CHUNK)
    if n_chunks <= 1:
        fill(0)
    else:
        with ThreadPoolExecutor(max_workers=min(n_chunks, torch.get_num_threads())) as pool:
            list(pool.map(fill, range(n_chunks)))
    return out


def _init_tensor(spec: TensorSpec, std: float, seed: int) -> torch.Tensor:
    if spec.name.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if len(spec.shape) == 1:  # RMSNorm weights
        return torch.ones(spec.shape, dtype=spec.dtype)
    return _randn(math.prod(spec.shape), seed, spec.name).mul_(std).to(spec.dtype).reshape(spec.shape)


def _perturb(base: torch.Tensor, noise: float, fallback: float, seed: int, name: str) -> torch.Tensor:
    x = base.float().reshape(-1)
    sample = x[:: max(1, x.numel() // (1 << 20))].contiguous()  # the std of up to ~1M evenly spaced values
    scale = sample.std().item() if sample.numel() > 1 else 0.0
    if not scale > 0:
        scale = x.pow(2).mean().sqrt().item() or fallback
    return x.add_(_randn(x.numel(), seed, name), alpha=noise * scale).to(base.dtype).reshape(base.shape)


def _save_tokenizer(directory: Path) -> None:
    _tokenizer().save_pretrained(str(directory))


def build_tiny_model(out_dir: str | os.PathLike, *, arch: str = "llama", num_layers: int = 4,
                     hidden_size: int = 64, intermediate_size: int = 128, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2, vocab_size: int | None = None,
                     tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: int | str | None = None, init_from: str | os.PathLike | None = None,
                     noise: float = 0.0, overwrite: bool = False) -> Path:
    """Build a random-init tiny causal LM (or, with ``init_from``, a noisy copy of one) in ``out_dir``.

    With ``init_from`` the config, dtype and tokenizer come from that model and the shape arguments
    are ignored; each tensor becomes ``base + noise * std(base) * N(0, 1)`` (seeded by ``seed``).
    Loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from transformers import GenerationConfig

    shard = DEFAULT_SHARD if max_shard_size is None else parse_size(max_shard_size)
    with tempfile.TemporaryDirectory(prefix="evomerge-tok-") as tok_dir:
        if init_from is not None:
            base = Checkpoint.open(init_from)
            config = dict(base.config)
            specs = [TensorSpec(n, base.shape(n), base.dtype(n)) for n in base.names]
            std = float(config.get("initializer_range", 0.02))
            tokenizer_from = base.path
            gen_config = (base.path / "generation_config.json")
            gen_text = gen_config.read_text() if gen_config.is_file() else None
        else:
            cfg = make_config(arch=arch, num_layers=num_layers, hidden_size=hidden_size,
                              intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                              num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                              tie_word_embeddings=tie_word_embeddings, dtype=dtype)
            specs = model_specs(cfg, dtype)
            config = cfg.to_dict()
            std = cfg.initializer_range
            _save_tokenizer(Path(tok_dir))
            tokenizer_from = Path(tok_dir)
            gen_text = GenerationConfig.from_model_config(cfg).to_json_string()
        extra = {} if gen_text is None else {"generation_config.json": gen_text}
        with CheckpointWriter(out_dir, specs, shard_size=shard, overwrite=overwrite,
                              metadata={"evomerge.tiny": json.dumps({"seed": seed, "noise": noise})}) as w:
            for spec in specs:
                if init_from is not None:
                    t = base.read(spec.name)
                    t = _perturb(t, noise, std, seed, spec.name) if noise else t
                else:
                    t = _init_tensor(spec, std, seed)
                w.write(spec.name, t)
                del t
            return w.finish(config=config, tokenizer_from=tokenizer_from, extra_files=extra)


def build_tiny_family(root: str | os.PathLike, *, arch: str = "llama", n_experts: int = 3,
                      noise: float = 0.02, seed: int = 0, overwrite: bool = False,
                      **kw) -> dict[str, Path]:
    """A base model plus ``n_experts`` noisy "fine-tunes" of it under ``root``.

    Returns ``{"base": root/base, "expert1": root/expert1, ...}``; ``kw`` goes to
    :func:`build_tiny_model` for the base (shapes, dtype, tying, sharding).
    """
    if n_experts < 0:
        raise ConfigError(Problem("n_experts", f"must be >= 0, got {n_experts}"))
    root = Path(root)
    paths = {"base": build_tiny_model(root / "base", arch=arch, seed=seed, overwrite=overwrite, **kw)}
    shard = kw.get("max_shard_size")
    for i in range(1, n_experts + 1):
        paths[f"expert{i}"] = build_tiny_model(root / f"expert{i}", init_from=paths["base"], noise=noise,
                                               seed=seed * 1000 + i, max_shard_size=shard, overwrite=overwrite)
    return paths


__all__ = ["ARCHS", "build_tiny_family", "build_tiny_model", "make_config", "model_specs",
           "tokenizer_size"]
