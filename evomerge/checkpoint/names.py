"""Names and sizes shared by the reader and the writer: the file names of a Hugging Face model folder,
tokenizer files, the tied output head and the embedding it shares, safetensors dtype names, decoder
layer tensor names (:func:`split_layer_name`, :func:`layer_tensor_name`) and byte sizes
(:func:`parse_size`).
"""

from __future__ import annotations

import math
import re

import torch

from evomerge.errors import ConfigError, Problem

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# any one of these makes a folder's tokenizer loadable (vocab.json with merges.txt for GPT-2 style BPE)
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Embedding tensors whose weight an untied-in-files lm_head shares, most specific first.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|h))\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``.

    Also GPT-2 style ``"transformer.h.3.attn.c_attn.weight"``. ``None`` for non-layer tensors.
    """
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), m.group(3)


def layer_tensor_name(prefix: str, idx: int, suffix: str) -> str:
    """Inverse of :func:`split_layer_name`."""
    return f"{prefix}.{idx}.{suffix}"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


SIZE_HINT = ("write a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
             "(powers of 1024), e.g. '5GB'")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``"5GB"`` (decimal, like transformers), ``"1.5GiB"`` (binary), ``"500MB"`` or an int.

    ``what`` names the setting in the error (``"--shard-size"``, ``"shard_size"``)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(Problem(what, f"expected a size like '5GB' or a byte count, got {text!r}", SIZE_HINT))
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if m is None:
            raise ConfigError(Problem(what, f"cannot read size {text!r}", SIZE_HINT))
        number = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
        if not math.isfinite(number) or number > 2**62:
            raise ConfigError(Problem(what, f"size {text[:40]!r} is too large", SIZE_HINT))
        value = int(number)
    if value <= 0:
        raise ConfigError(Problem(what, f"size must be positive, got {text!r}", SIZE_HINT))
    return value
