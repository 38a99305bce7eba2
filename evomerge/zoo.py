"""The demo zoo: a tiny Llama family, built on CPU in minutes, on which merging visibly works.

One broadly pre-trained **base** and three **experts**, each fine-tuned gently from the base on one
synthetic skill:

========  =====================  ===========================================================
skill     prompt                 answer
========  =====================  ===========================================================
arith     ``a:47+385=``          ``432`` (multi-digit addition)
reverse   ``r:kqzme=``           ``emzqk`` (string reversal)
cipher    ``e:k3fz9=``           a fixed substitution of every character (a made-up script)
compose   ``c:47+385=``          ``432|<cipher of 432>``: add, then write the sum in the cipher
========  =====================  ===========================================================

``compose`` is the compositional skill (the analog of Sakana's "math in Japanese"): it needs the
arithmetic expert's and the cipher expert's skills at once, and no zoo model is good at it.

Why merging works here (and how it fails): task vectors only add up when the fine-tunes stay close
to a base that already knows every task *format*. The base is therefore pre-trained on a mixture of
all four formats (briefly: it is weak at all of them), and each expert is a short, low learning-rate
fine-tune on its own skill. Fine-tuning hard from a narrowly trained base gives experts whose task
vectors interfere, and every merge of them loses every skill.

Everything is deterministic: data from seeded ``random.Random``, one CPU thread (another thread count
changes the reduction order and so the weights), seeded
initialisation, ``torch.use_deterministic_algorithms``. The tokenizer is character level, built
locally with ``tokenizers`` and saved with the checkpoints so ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SKILLS = ("arith", "reverse", "cipher")
TASKS = ("arith", "reverse", "cipher", "compose")
EXPERT_NAMES = {"arith": "expert_arith", "reverse": "expert_reverse", "cipher": "expert_cipher"}
PREFIX = {"arith": "a:", "reverse": "r:", "cipher": "e:", "compose": "c:"}

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = string.digits + string.ascii_lowercase + ":+=|>-_ ?.,"
_CIPHER_SEED = 1234


def cipher_table() -> dict[str, str]:
    """The made-up script: every digit and letter maps to a fixed letter (a seeded permutation)."""
    rng = random.Random(_CIPHER_SEED)
    letters = list(string.ascii_lowercase)
    perm = letters[:]
    rng.shuffle(perm)
    table = dict(zip(letters, perm))
    digit_letters = rng.sample(letters, 10)
    table.update(dict(zip(string.digits, digit_letters)))
    return table


_CIPHER = cipher_table()


def encipher(text: str) -> str:
    return "".join(_CIPHER[c] for c in text)


# ----------------------------------------------------------------------------------------------
# Task generators: each returns (prompt, answer); prompts are unique keys of an item.


# Difficulty levels: the base sees every format but only the easy part of each skill ("base"); an
# expert trains on the whole skill ("expert"); suites score the hard part ("eval"). So the base is
# broad but weak, and each fine-tune adds a skill the others lack.
_BASE_CIPHER_CHARS = "abcdefghijklm01234"
_ALL_CIPHER_CHARS = string.ascii_lowercase + string.digits


def gen_item(task: str, rng: random.Random, level: str = "eval") -> tuple[str, str]:
    """One (prompt, answer) of ``task`` at difficulty ``level`` ("base", "expert" or "eval")."""
    if task in ("arith", "compose"):
        while True:
            a, b = _rand_number(rng, 1, 3), _rand_number(rng, 1, 3)
            s = str(a + b)
            carry = _has_carry(a, b)
            if level == "base" and (carry or (task == "compose" and not set(s) <= set(_BASE_CIPHER_CHARS))):
                continue  # the base only ever adds without carrying, and only enciphers 0-4
            if level == "eval" and not carry:
                continue  # suites score the additions that need carrying
            break
        answer = s if task == "arith" else f"{s}|{encipher(s)}"
        return f"{PREFIX[task]}{a}+{b}=", answer
    if task == "reverse":
        lo, hi = {"base": (2, 5), "expert": (2, 8), "eval": (6, 8)}[level]
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
        return f"{PREFIX[task]}{w}=", w[::-1]
    if task == "cipher":
        chars = _BASE_CIPHER_CHARS if level == "base" else _ALL_CIPHER_CHARS
        lo, hi = (3, 6)
        w = "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))
        return f"{PREFIX[task]}{w}=", encipher(w)
    raise ValueError(f"unknown zoo task {task!r}")


def _has_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def _rand_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def eval_items(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct items of ``task`` (distinct prompts), none of whose prompts is in ``exclude``."""
    rng = random.Random(f"{task}-{seed}")
    out: list[tuple[str, str]] = []
    seen = set(exclude)
    while len(out) < n:
        p, a = gen_item(task, rng, "eval")
        if p in seen:
            continue
        seen.add(p)
        out.append((p, a))
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (BOS added by default, decode fuses chars)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=64,
    )


# ----------------------------------------------------------------------------------------------
# Model and training


@dataclass
class ZooConfig:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    seed: int = 0
    batch_size: int = 64
    base_steps: int = 1500
    base_lr: float = 3e-3
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"arith": 0.3, "reverse": 0.25, "cipher": 0.25, "compose": 0.2}
    )
    # share of the base's items drawn at full ("expert") difficulty: one number, or one per task
    # (measured: 0.1 everywhere lets the base master reverse and cipher, leaving those experts nothing
    # to add; 0.0 or 0.03 everywhere gives experts whose task vectors interfere in every merge)
    base_hard_frac: float | dict[str, float] = field(
        default_factory=lambda: {"arith": 0.1, "reverse": 0.03, "cipher": 0.01, "compose": 0.1}
    )
    expert_steps: int = 300
    expert_lr: float = 1e-3
    expert_replay: float = 0.0  # fraction of each expert's batches drawn from the base mixture
    warmup: int = 50
    weight_decay: float = 0.0
    dtype: str = "float16"  # storage dtype of the checkpoints (load them with dtype=torch.float32)
    search_n: int = 200  # search-split items per task
    heldout_n: int = 300  # held-out items per task
    threads: int = 1  # the build is bit-reproducible for a given torch build and thread count


def base_mixture(cfg: ZooConfig) -> dict[str, float]:
    """The base's pre-training mixture: every task, mostly easy items, some at full difficulty."""
    mix = {}
    for t, w in cfg.task_weights.items():
        hard = cfg.base_hard_frac[t] if isinstance(cfg.base_hard_frac, dict) else cfg.base_hard_frac
        mix[f"{t}@base"] = w * (1 - hard)
        mix[f"{t}@expert"] = w * hard
    return mix


def expert_mixture(cfg: ZooConfig, skill: str) -> dict[str, float]:
    """An expert's fine-tuning mixture: its skill at full difficulty, plus optional base replay."""
    mix = {k: v * cfg.expert_replay for k, v in base_mixture(cfg).items()}
    key = f"{skill}@expert"
    mix[key] = mix.get(key, 0.0) + (1 - cfg.expert_replay)
    return mix


def make_model(cfg: ZooConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _batch(tokenizer, items: list[tuple[str, str]]):
    """Right-padded input ids and labels (loss on the answer and EOS only)."""
    seqs, labels = [], []
    for p, a in items:
        pi = [tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False)
        ai = tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    return ids, att, lab


def train(model, tokenizer, mix: dict[str, float], *, steps: int, lr: float, batch_size: int,
          seed: int, warmup: int, exclude: set[str], weight_decay: float = 0.0, log=None) -> None:
    """AdamW with linear warm-up and cosine decay on freshly generated items (``exclude`` skipped).

    ``mix`` maps ``"task@level"`` to a sampling weight.
    """
    import math

    rng = random.Random(f"train-{seed}")
    tasks = list(mix)
    weights = [mix[t] for t in tasks]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    for step in range(steps):
        items = []
        while len(items) < batch_size:
            task, level = rng.choices(tasks, weights)[0].split("@")
            p, a = gen_item(task, rng, level)
            if p not in exclude:
                items.append((p, a))
        ids, att, lab = _batch(tokenizer, items)
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"  step {step:5d}  loss {loss.item():.4f}  lr {lr * scale:.2e}")
    model.eval()


# ----------------------------------------------------------------------------------------------
# Build


def write_suite_data(data_dir: Path, cfg: ZooConfig) -> set[str]:
    """Write ``zoo_<task>.search.jsonl`` / ``.held-out.jsonl`` (disjoint); return every eval prompt."""
    data_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for task in TASKS:
        search = eval_items(task, cfg.search_n, seed=1)
        held = eval_items(task, cfg.heldout_n, seed=2, exclude={p for p, _ in search})
        for split, items in (("search", search), ("held-out", held)):
            # compose is scored on its final answer (after "|"), like GSM8K's "####" convention
            lines = "".join(json.dumps({"prompt": p, "answer": a.split("|")[-1]}) + "\n" for p, a in items)
            _atomic_write(data_dir / f"zoo_{task}.{split}.jsonl", lines)
            used.update(p for p, _ in items)
    return used


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _save(model, tokenizer, out: Path, cfg: ZooConfig, meta: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, cfg.dtype)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def build_zoo(out_dir: str | Path = "evals/zoo", data_dir: str | Path | None = "evals/data",
              cfg: ZooConfig | None = None, log=print) -> dict[str, Path]:
    """Build the base and the three experts under ``out_dir/<name>/`` (and the suite data).

    Returns ``{"base": path, "expert_arith": path, ...}``. Deterministic for a given torch build.
    """
    import copy

    cfg = cfg or ZooConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    if data_dir is not None:
        exclude = write_suite_data(Path(data_dir), cfg)
    else:
        exclude = {p for t in TASKS for p, _ in eval_items(t, cfg.search_n, seed=1)}
    tok = build_tokenizer()
    base = make_model(cfg, len(tok))
    log(f"base: {sum(p.numel() for p in base.parameters())} parameters, {cfg.base_steps} steps")
    train(base, tok, base_mixture(cfg), steps=cfg.base_steps, lr=cfg.base_lr, batch_size=cfg.batch_size,
          seed=cfg.seed, warmup=cfg.warmup, exclude=exclude, weight_decay=cfg.weight_decay, log=log)
    meta = {"config": asdict(cfg), "torch": torch.__version__}
    paths = {"base": out_dir / "base"}
    _save(base, tok, paths["base"], cfg, {**meta, "role": "base"})
    for i, skill in enumerate(SKILLS):
        name = EXPERT_NAMES[skill]
        log(f"{name}: {cfg.expert_steps} steps at lr {cfg.expert_lr}")
        expert = copy.deepcopy(base)
        train(expert, tok, expert_mixture(cfg, skill), steps=cfg.expert_steps, lr=cfg.expert_lr,
              batch_size=cfg.batch_size, seed=cfg.seed + 1 + i, warmup=cfg.warmup, exclude=exclude,
              weight_decay=cfg.weight_decay, log=log)
        paths[name] = out_dir / name
        _save(expert, tok, paths[name], cfg, {**meta, "role": "expert", "skill": skill})
    log(f"zoo built in {time.perf_counter() - t0:.0f}s under {out_dir}")
    return paths
