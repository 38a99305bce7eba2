"""Checks on models: a config against its tensors (:func:`completeness_problems`, behind
:meth:`~evomerge.checkpoint.Checkpoint.verify`), models against each other before a merge
(:func:`check_compatible`), and whether a folder holds a tokenizer (:func:`has_tokenizer`).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.checkpoint.names import EMBED_SUFFIXES, TIED_HEAD, TOKENIZER_CORE, split_layer_name
from evomerge.errors import CheckpointError, IncompatibleModelsError

if TYPE_CHECKING:
    from evomerge.checkpoint.reader import Checkpoint


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds a tokenizer (one of :data:`TOKENIZER_CORE`)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_CORE)


def find_embedding(names: Iterable[str]) -> str | None:
    """The token embedding among tensor ``names``: the shortest name ending in the first of
    :data:`EMBED_SUFFIXES` that any name ends in; None when there is none."""
    for suffix in EMBED_SUFFIXES:
        hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if hits:
            return min(hits, key=len)
    return None


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
# model types whose attention and MLP tensors are named and shaped like Llama's
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "mixtral",
               "qwen2_moe", "qwen3_moe"}
# tensors every decoder layer of these model types holds (transformers' own names)
_LAYER_REQUIRED = {
    t: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")
    for t in ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2")
}
# layer stacks that are not the text decoder the config's layer count describes
_SIDE_STACK = re.compile(r"vision|visual|audio|image|speech|mtp|encoder|projector|vit\b", re.IGNORECASE)
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")


def _config_int(config: Mapping[str, Any], keys: tuple[str, ...], model: str) -> tuple[str, int] | None:
    """(key, value) of the first of ``keys`` the config (or its ``text_config``) sets; CheckpointError
    when it is not a whole number."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in keys:
        value = config.get(key, text.get(key))
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 0):
            raise CheckpointError(f"{model}: config.json sets {key} to {value!r}; expected a whole number "
                                  f">= 0 (fix: restore config.json from the source model)")
        return key, int(value)
    return None


def _heterogeneous_layers(config: Mapping[str, Any]) -> bool:
    """Whether the config declares layers of different kinds (dense and MoE, attention and SSM,
    per-layer sizes), whose tensor sets legitimately differ."""
    cfgs = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for c in cfgs:
        for key in ("first_k_dense_replace", "num_nextn_predict_layers", "moe_layer_start_index"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return True
        for key in ("interleave_moe_layer_step", "moe_layer_freq", "decoder_sparse_step", "attn_layer_period",
                    "expert_layer_period", "moe_layer_interval"):
            if isinstance(c.get(key), int) and c[key] > 1:
                return True
        for key in ("mlp_only_layers", "hybrid_override_pattern", "layers_block_type", "block_configs",
                    "attn_layer_indices", "cross_attention_layers", "moe_layers"):
            if c.get(key):
                return True
        if isinstance(c.get("layer_types"), list) and len(set(map(str, c["layer_types"]))) > 1:
            return True
        if any(isinstance(c.get(k), list) for k in ("intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads", "head_dim")):
            return True
    return False


def _ranges(idx: list[int]) -> str:
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out[:8]) + (", ..." if len(out) > 8 else "")


def completeness_problems(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What is wrong between a model's config and its tensors (names and shapes); empty when nothing.

    * the text decoder's layers (``<prefix>.layers.N.*``) number what ``num_hidden_layers`` says
      (MTP layers of ``num_nextn_predict_layers`` allowed on top), with no layer missing between;
    * every layer holds the tensors of layer 0 with the same shapes (unless the config declares
      layers of different kinds, e.g. dense and MoE);
    * a token embedding exists; a final norm exists when the layers have norms; an output head
      (``lm_head.weight``) exists unless ``tie_word_embeddings`` ties it to the embedding;
    * the embedding and head have ``vocab_size`` rows; for Llama-like models the embedding, head,
      attention and MLP shapes follow ``hidden_size``, heads, ``head_dim`` and ``intermediate_size``.
    """
    problems: list[str] = []
    if not shapes:
        return ["the checkpoint holds no tensors"]
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(key: str) -> Any:
        return config.get(key, text.get(key))

    def num(keys: tuple[str, ...]) -> tuple[str, int] | None:
        try:
            return _config_int(config, keys, "")
        except CheckpointError:
            problems.append(f"config.json: {keys[0]} is {get(keys[0])!r}, expected a whole number")
            return None

    stacks: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    other: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = split_layer_name(name)
        if parts is None:
            other[name] = tuple(shape)
        else:
            stacks.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = tuple(shape)
    hetero = _heterogeneous_layers(config)
    for prefix, layers in sorted(stacks.items()):
        idx = sorted(layers)
        n_missing = idx[-1] + 1 - len(idx)
        if n_missing:
            present, gaps = set(idx), []
            for i in range(idx[-1]):
                if i not in present:
                    gaps.append(i)
                    if len(gaps) >= 64:
                        break
            problems.append(f"layer(s) {_ranges(gaps)}{', ...' if n_missing > len(gaps) else ''} of {prefix} have "
                            f"no tensors at all ({n_missing} of {idx[-1] + 1} layers), though layer {idx[-1]} "
                            f"does (whole layers are missing)")
        if hetero or len(idx) < 2:
            continue
        # each layer against the majority of layers: a tensor most layers have is missing where absent,
        # a shape most layers share is wrong where different
        count: Counter[str] = Counter(suffix for i in idx for suffix in layers[i])
        for suffix in sorted(count):
            have = [i for i in idx if suffix in layers[i]]
            if 2 * len(have) >= len(idx):
                lack = [i for i in idx if suffix not in layers[i]]
                if lack:
                    problems.append(f"tensor '{prefix}.{lack[0]}.{suffix}' is missing"
                                    + (f" (and in layer(s) {_ranges(lack[1:])})" if len(lack) > 1 else "")
                                    + f", though {len(have)} other layer(s) have it, e.g. '{prefix}.{have[0]}.{suffix}'")
            else:
                problems.append(f"layer(s) {_ranges(have)} of {prefix} hold '{suffix}', which the other "
                                f"{len(idx) - len(have)} layer(s) lack")
            shapes_of = Counter(layers[i][suffix] for i in have)
            if len(shapes_of) > 1:
                common, n_common = shapes_of.most_common(1)[0]
                odd = [i for i in have if layers[i][suffix] != common]
                for i in odd[:4]:
                    problems.append(f"tensor '{prefix}.{i}.{suffix}' has shape {list(layers[i][suffix])}, but "
                                    f"{n_common} other layer(s) have {list(common)}")
    # the text decoder's layer count against the config
    main = [p for p in stacks if not _SIDE_STACK.search(p)]
    main_prefix = max(main, key=lambda p: sum(len(v) for v in stacks[p].values())) if main else None
    count = num(LAYER_KEYS)
    if main_prefix is not None and count is not None:
        key, n_cfg = count
        n_t = max(stacks[main_prefix]) + 1
        nextn = get("num_nextn_predict_layers")
        extra_ok = nextn if isinstance(nextn, int) and nextn > 0 else 0
        if not n_cfg <= n_t <= n_cfg + extra_ok:
            problems.append(f"config.json says {key} = {n_cfg}, but the tensors hold {n_t} layer(s) "
                            f"({main_prefix}.0 to {main_prefix}.{n_t - 1})")
    # embedding, final norm, head
    embed = find_embedding(other)
    if embed is None and not any("embed" in n or "wte" in n for n in other):
        problems.append("no token embedding tensor (e.g. 'model.embed_tokens.weight')")
    layer0 = stacks[main_prefix][min(stacks[main_prefix])] if main_prefix is not None else {}
    if any("norm" in s or s.startswith("ln") for s in layer0) and not any(
            "norm" in n or "ln_f" in n for n in other):
        problems.append("no final norm tensor (e.g. 'model.norm.weight'), though the layers have norms")
    tied = get("tie_word_embeddings")
    heads = [n for n in other if _HEAD_RE.search(n)]
    if tied is False and not heads:
        problems.append(f"no output head tensor '{TIED_HEAD}', and config.json says tie_word_embeddings = false "
                        f"(a tied model would read the embedding)")
    vocab = num(("vocab_size",))
    hidden = num(HIDDEN_KEYS)
    llama_like = str(config.get("model_type", "")) in _LLAMA_LIKE and not hetero
    for name in [x for x in (embed, TIED_HEAD if TIED_HEAD in other else None) if x]:
        shape = other[name]
        if vocab and len(shape) == 2 and shape[0] != vocab[1]:
            problems.append(f"tensor '{name}' has {shape[0]} rows (shape {list(shape)}), but config.json says "
                            f"vocab_size = {vocab[1]}")
        if llama_like and hidden and len(shape) == 2 and shape[1] != hidden[1]:
            problems.append(f"tensor '{name}' has shape {list(shape)}, but config.json says "
                            f"{hidden[0]} = {hidden[1]}")
    required = _LAYER_REQUIRED.get(str(config.get("model_type", ""))) if not hetero else None
    if required and main_prefix is not None:
        layers = stacks[main_prefix]
        for suffix in required:
            lack = [i for i in sorted(layers) if suffix not in layers[i]]
            if len(lack) == len(layers):  # in some layers only: reported above against the other layers
                problems.append(f"tensor '{main_prefix}.{lack[0]}.{suffix}' is missing, and so is '{suffix}' in "
                                f"every other layer; a {config.get('model_type')} layer needs it")
    if llama_like and hidden and main_prefix is not None:
        h = hidden[1]
        heads_n = num(("num_attention_heads",))
        kv = num(("num_key_value_heads",)) or heads_n
        inter = num(("intermediate_size",))
        hd = num(("head_dim",))
        head_dim = hd[1] if hd else (h // heads_n[1] if heads_n and heads_n[1] else None)
        want: dict[str, tuple[tuple[int, ...], str]] = {}
        if heads_n and head_dim:
            q, k = heads_n[1] * head_dim, kv[1] * head_dim  # type: ignore[index]
            what = f"hidden_size = {h}, {heads_n[1]} heads, {kv[1]} kv heads, head_dim {head_dim}"  # type: ignore[index]
            want.update({"self_attn.q_proj.weight": ((q, h), what), "self_attn.k_proj.weight": ((k, h), what),
                         "self_attn.v_proj.weight": ((k, h), what), "self_attn.o_proj.weight": ((h, q), what)})
        if inter:
            what = f"hidden_size = {h}, intermediate_size = {inter[1]}"
            want.update({"mlp.gate_proj.weight": ((inter[1], h), what), "mlp.up_proj.weight": ((inter[1], h), what),
                         "mlp.down_proj.weight": ((h, inter[1]), what)})
        bad = 0
        for i, layer in sorted(stacks[main_prefix].items()):
            for suffix, (shape, what) in want.items():
                if suffix in layer and layer[suffix] != shape and bad < 6:
                    bad += 1
                    problems.append(f"tensor '{main_prefix}.{i}.{suffix}' has shape {list(layer[suffix])}, but "
                                    f"config.json ({what}) implies {list(shape)}")
    return problems


def _problem_text(head: str, problems: list[str], fix: str, limit: int = 12) -> str:
    shown = problems if len(problems) <= limit else problems[:limit - 1] + [
        f"... and {len(problems) - limit + 1} more"]
    return f"{head} ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in shown) + f"\n  (fix: {fix})"


def check_compatible(ckpts: Mapping[str, Checkpoint], *, vocab_names: Iterable[str] = ()) -> None:
    """Raise :class:`IncompatibleModelsError` unless all models share architecture, tensors and shapes.

    Compares every model with the first: model_type, architectures, vocab size, tensor names (a
    tied ``lm_head.weight`` counts as present) and shapes. Dtypes may differ. ``vocab_names``:
    tensors indexed by token along dim 0 that are realigned to one vocabulary before merging; their
    row counts (and the vocab sizes) may then differ.
    """
    vocab_names = set(vocab_names)
    items = list(ckpts.items())
    if len(items) < 2:
        return
    ref_label, ref = items[0]
    ref_names = set(ref.names) | ({TIED_HEAD} if ref.has(TIED_HEAD) else set())
    problems: list[str] = []
    for label, ck in items[1:]:
        if (ck.model_type, ck.architectures) != (ref.model_type, ref.architectures):
            problems.append(f"{label}: architecture {ck.model_type} {ck.architectures} differs from "
                            f"{ref_label}: {ref.model_type} {ref.architectures}")
        if ck.vocab_size != ref.vocab_size and not vocab_names:
            problems.append(f"{label}: vocab_size {ck.vocab_size} differs from {ref_label}: {ref.vocab_size}")
        names = set(ck.names) | ({TIED_HEAD} if ck.has(TIED_HEAD) else set())
        mine = []
        for name in sorted(names - ref_names):
            mine.append(f"{label}: tensor {name!r} is not in {ref_label}")
        for name in sorted(ref_names - names):
            mine.append(f"{label}: tensor {name!r} of {ref_label} is missing")
        for name in sorted(names & ref_names):
            if name in vocab_names and ck.shape(name)[1:] == ref.shape(name)[1:]:
                continue
            if ck.shape(name) != ref.shape(name):
                mine.append(f"{label}: tensor {name!r} has shape {list(ck.shape(name))}, "
                            f"{ref_label} has {list(ref.shape(name))}")
        if len(mine) > 12:
            mine = mine[:10] + [f"{label}: ... and {len(mine) - 10} more tensor differences"]
        problems += mine
    if problems:
        raise IncompatibleModelsError(
            f"{len(items)} models cannot be merged together ({len(problems)} problem(s)):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  (fix: merge only models of one architecture and size, e.g. fine-tunes of one base)")
