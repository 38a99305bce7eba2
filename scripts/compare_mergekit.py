#!/usr/bin/env python3
"""Check that mergekit configs merge to mergekit's tensors: run `mergekit-yaml` and `evomerge merge`
on the same configs and compare every output tensor.

Builds (once, cached under --workdir) a tiny Llama family (a base and three noisy fine-tunes; float32,
or bfloat16 with --dtype), writes one mergekit config per shared method (linear with a layer
gradient and unnormalized, slerp with per-module gradients, task_arithmetic with a negative weight
and with lambda, ties over the whole model and over layer ranges, breadcrumbs, breadcrumbs_ties,
model_stock, a passthrough layer stack, and mergekit 0.1.5's other methods: nuslerp with a base and
row-wise without, multislerp with a base and unnormalized without, karcher, nearswap, sce,
arcee_fusion, ram and ramplus_tl), merges each with both tools and reports, per method:

* ``max |diff|``: the largest absolute difference of the float32 outputs;
* ``max rel``: the largest ``max |diff| / max |mergekit output|`` of a tensor;
* ``bf16 ulps``: the largest distance between the two outputs rounded to bfloat16, in bfloat16
  spacings at the value (0: the roundings agree; 1: they straddle a rounding boundary); entries
  within 4 float32 ulps of the tensor's largest value count as equal (terms that cancel to ~0);
* ``bf16 differ``: the share of entries whose bfloat16 roundings differ.

Rows named ``export:...`` go the other way: an evomerge recipe (gradients, a data-flow path with
scales) merged by evomerge, against its ``to_mergekit`` export merged by mergekit.

Rows named ``tok:...`` merge models whose vocabularies differ (variants of the family that add
tokens: ``chat`` adds ``<|im_start|>`` / ``<|im_end|>``, ``tool`` adds ``<tool>``, ``tool2`` adds
``<|im_end|>`` alone) under mergekit's tokenizer options: ``tokenizer_source`` ``union`` / ``base`` /
a model, a ``tokenizer:`` block with per-token rules and ``pad_to_multiple_of``, a passthrough stack,
and a ``chat_template``. The family's models have 512 embedding rows for 260 tokens, so the output
vocabulary drops the unused rows. The two outputs' tokenizers must hold the same tokens; the
embedding and head rows are compared by token string (mergekit numbers a union's new tokens in an
order that varies from run to run); the ``vocab`` column says whether the ids agree as well.

"Within bf16 rounding" means ``bf16 ulps <= 1``: what float32 results that differ only in the
order of operations give when rounded. The exit status is 1 when a method exceeds it. mergekit
computes in the config's ``dtype`` (float32 here; ``--compute bfloat16`` shows what its bfloat16
arithmetic changes, with no pass/fail), evomerge always in float32.

    scripts/setup_mergekit.sh                   # once: an isolated mergekit venv
    python scripts/compare_mergekit.py          # finds it at ~/.cache/evomerge/mergekit-venv
    python scripts/compare_mergekit.py --mergekit /path/to/mergekit-yaml --methods ties,slerp
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(arch="llama", num_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)


def build_family(root: Path, dtype: str) -> dict[str, str]:
    import torch

    from evomerge.tiny import build_tiny_family

    names = ["base", "expert1", "expert2", "expert3"]
    stamp = root / ".complete"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_family(root, n_experts=3, noise=0.05, seed=1, dtype=getattr(torch, dtype), **SHAPE)
        stamp.write_text("ok")
    return {n: str(root / n) for n in names}


def configs(f: dict[str, str], dtype: str, compute: str) -> dict[str, dict]:
    """One mergekit config per method, computed in ``compute`` and written in ``dtype``."""
    e1, e2, e3, base = f["expert1"], f["expert2"], f["expert3"], f["base"]
    common = {"dtype": compute} | ({"out_dtype": dtype} if dtype != compute else {})
    return {
        "linear": {"merge_method": "linear", **common, "models": [
            {"model": e1, "parameters": {"weight": [1.0, 0.2]}},  # a gradient over the layers
            {"model": e2, "parameters": {"weight": 0.5}},
            {"model": e3, "parameters": {"weight": 0.3}}]},
        "slerp": {"merge_method": "slerp", **common, "base_model": e1,
                  "models": [{"model": e1}, {"model": e2}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                       {"value": 0.5}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", **common, "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 1.0}},
            {"model": e2, "parameters": {"weight": -0.5}},  # task negation
            {"model": e3, "parameters": {"weight": 0.7}}]},
        "ties": {"merge_method": "ties", **common, "base_model": base, "parameters": {"normalize": True},
                 "models": [{"model": e1, "parameters": {"weight": 0.5, "density": 0.3}},
                            {"model": e2, "parameters": {"weight": 0.3, "density": 0.5}},
                            {"model": e3, "parameters": {"weight": 0.4, "density": 0.8}}]},
        "breadcrumbs": {"merge_method": "breadcrumbs", **common, "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
            {"model": e2, "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.1}}]},
        "linear_unnormalized": {"merge_method": "linear", **common, "parameters": {"normalize": False},
                                "models": [{"model": e1, "parameters": {"weight": 0.7}},
                                           {"model": e2, "parameters": {"weight": [{"filter": "mlp", "value": 0.6},
                                                                                   {"value": 0.2}]}}]},
        "ties_layer_ranges": {"merge_method": "ties", **common, "base_model": base, "slices": [{"sources": [
            {"model": base, "layer_range": [1, 4]},
            {"model": e1, "layer_range": [0, 3], "parameters": {"weight": 0.6, "density": [0.2, 0.9]}},
            {"model": e2, "layer_range": [1, 4], "parameters": {"weight": 0.4, "density": 0.5}}]}]},
        "task_arithmetic_lambda": {"merge_method": "task_arithmetic", **common, "base_model": base,
                                   "parameters": {"lambda": 0.6}, "models": [
                                       {"model": e1, "parameters": {"weight": 0.8}},
                                       {"model": e3, "parameters": {"weight": 0.5}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **common, "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
            {"model": e2, "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.1}}]},
        "model_stock": {"merge_method": "model_stock", **common, "base_model": base,
                        "models": [{"model": e1}, {"model": e2}, {"model": e3}]},
        "passthrough": {"merge_method": "passthrough", **common, "slices": [
            {"sources": [{"model": e1, "layer_range": [0, 3]}]},
            {"sources": [{"model": e2, "layer_range": [1, 4]}]}]},
        **extra_configs(f, common),
    }


def extra_configs(f: dict[str, str], common: dict) -> dict[str, dict]:
    """Configs of the methods added after the first twelve (mergekit 0.1.5's others)."""
    e1, e2, e3, base = f["expert1"], f["expert2"], f["expert3"], f["base"]
    three = [{"model": e1}, {"model": e2}, {"model": e3}]
    return {
        "nuslerp": {"merge_method": "nuslerp", **common, "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 0.3}}, {"model": e2, "parameters": {"weight": 0.7}}]},
        "nuslerp_rows": {"merge_method": "nuslerp", **common,
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "models": [{"model": e1, "parameters": {"weight": 1.0}},
                                    {"model": e2, "parameters": {"weight": [0.2, 0.8]}}]},
        "multislerp": {"merge_method": "multislerp", **common, "base_model": base, "models": [
            {"model": e1, "parameters": {"weight": 0.5}}, {"model": e2, "parameters": {"weight": 0.3}},
            {"model": e3, "parameters": {"weight": 0.4}}]},
        "multislerp_nobase": {"merge_method": "multislerp", **common, "parameters": {"normalize_weights": False},
                              "models": [{"model": e1, "parameters": {"weight": 0.6}},
                                         {"model": e2, "parameters": {"weight": [0.2, 0.6]}}]},
        "karcher": {"merge_method": "karcher", **common, "models": three},
        "nearswap": {"merge_method": "nearswap", **common, "base_model": base, "parameters": {"t": 0.02},
                     "models": [{"model": e1}]},
        "sce": {"merge_method": "sce", **common, "base_model": base, "parameters": {"select_topk": 0.5},
                "models": three},
        "arcee_fusion": {"merge_method": "arcee_fusion", **common, "base_model": base, "models": [{"model": e2}]},
        "ram": {"merge_method": "ram", **common, "base_model": base, "parameters": {"epsilon": 0.05},
                "models": three},
        "ramplus_tl": {"merge_method": "ramplus_tl", **common, "base_model": base,
                       "parameters": {"epsilon": 0.05, "r": 0.3, "alpha": 0.5}, "models": three},
    }


def native_recipes(f: dict[str, str], dtype: str) -> dict[str, dict]:
    """evomerge recipes exported with ``to_mergekit``: gradients put the final norm and lm_head at
    t = 1 here (mergekit: t = 0), which the export must preserve; a data-flow path with scales
    exports as passthrough slices with the scales folded into the output projections."""
    e1, e2, base = f["expert1"], f["expert2"], f["base"]
    return {
        "export:ties_gradients": {"method": "ties", "base": base, "dtype": dtype,
                                  "params": {"density": 0.6, "rescale_l1": True, "lambda": [0.8, 1.2]},
                                  "sources": [{"model": e1, "params": {"weight": [1.0, 0.2]}},
                                              {"model": e2, "params": {"weight": [
                                                  {"filter": "self_attn", "value": [0.0, 1.0]},
                                                  {"filter": "norm", "value": [0.3, 0.6]}, {"value": 0.4}]}}]},
        "export:dataflow": {"kind": "dataflow", "embed": e1, "head": e2, "dtype": dtype,
                            "path": [{"model": e1, "layer": 0}, {"model": e1, "layer": 1, "scale": 1.5},
                                     {"model": e2, "layer": 1, "scale": 0.8}, {"model": e2, "layer": 3}]},
    }


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def build_vocab_family(root: Path, fam: dict[str, str]) -> dict[str, str]:
    """Variants of the family's experts with added tokens (see the module docstring)."""
    from evomerge.tiny_vocab import build_vocab_variant

    stamp = root / ".complete"
    out = {n: str(root / n) for n in ("chat", "tool", "tool2")}
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        build_vocab_variant(out["chat"], fam["expert1"], add_tokens=["<|im_start|>", "<|im_end|>"], seed=21)
        build_vocab_variant(out["tool"], fam["expert2"], add_tokens=["<tool>"], seed=22)
        build_vocab_variant(out["tool2"], fam["expert3"], add_tokens=["<|im_end|>"], seed=23)
        stamp.write_text("ok")
    return out


def tokenizer_configs(f: dict[str, str], v: dict[str, str], common: dict) -> dict[str, dict]:
    """mergekit configs over models with different vocabularies (rows ``tok:...``)."""
    base, chat, tool, tool2 = f["base"], v["chat"], v["tool"], v["tool2"]
    ta = {"merge_method": "task_arithmetic", **common, "base_model": base,
          "models": [{"model": chat, "parameters": {"weight": 0.7}}, {"model": tool, "parameters": {"weight": 0.5}}]}
    return {
        "tok:union": ta | {"tokenizer_source": "union", "chat_template": "chatml"},
        "tok:base_ties": {"merge_method": "ties", **common, "base_model": base, "tokenizer_source": "base",
                          "models": [{"model": chat, "parameters": {"weight": 0.6, "density": 0.5}},
                                     {"model": tool2, "parameters": {"weight": 0.4, "density": 0.7}}]},
        "tok:model_linear": {"merge_method": "linear", **common, "tokenizer_source": chat,
                             "models": [{"model": tool, "parameters": {"weight": 0.3}},
                                        {"model": tool2, "parameters": {"weight": 0.7}}]},
        "tok:tokens_block": ta | {"tokenizer": {
            "source": "union", "pad_to_multiple_of": 64,
            "tokens": {"<|im_end|>": {"source": {"kind": "model_token", "model": tool, "token": "</s>"}, "force": True},
                       "<tool>": {"source": {"kind": "zero"}},
                       "<|im_start|>": {"source": chat},
                       "<new>": {"source": {"kind": "model_token", "model": chat, "token_id": 7}}}}},
        "tok:passthrough_union": {"merge_method": "passthrough", **common, "tokenizer_source": "union", "slices": [
            {"sources": [{"model": chat, "layer_range": [0, 3]}]}, {"sources": [{"model": tool, "layer_range": [1, 4]}]}]},
    }


def find_mergekit(arg: str | None) -> str | None:
    if arg:
        return arg
    default = Path(os.environ.get("MERGEKIT_VENV", Path.home() / ".cache/evomerge/mergekit-venv")) / "bin/mergekit-yaml"
    return str(default) if default.exists() else None


def token_order(a_dir: Path, b_dir: Path) -> tuple[str, object]:
    """How the two outputs' vocabularies relate: ``same ids``, ``same tokens, other ids`` (with the
    rows of ``a`` in ``b``'s order), or SystemExit when their tokens differ."""
    import torch

    from evomerge.vocab import read_vocab

    va, vb = read_vocab(a_dir), read_vocab(b_dir)
    if va is None or vb is None or va.tokens == vb.tokens:
        return "same ids", None
    if set(va.tokens) != set(vb.tokens) or len(va) != len(vb):
        raise SystemExit(f"the output tokenizers hold different tokens: only in {a_dir}: "
                         f"{sorted(set(va.tokens) - set(vb.tokens))[:5]}, only in {b_dir}: "
                         f"{sorted(set(vb.tokens) - set(va.tokens))[:5]}")
    return "same tokens, other ids", torch.tensor([va.index[t] for t in vb.tokens])


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Per-checkpoint comparison of two outputs (same tensor names and shapes required; embedding
    and head rows matched by token when the tokenizers number their tokens differently)."""
    import torch

    from evomerge.checkpoint import Checkpoint

    a, b = Checkpoint.open(a_dir), Checkpoint.open(b_dir)
    vocab, order = token_order(a_dir, b_dir)
    if set(a.names) != set(b.names):
        raise SystemExit(f"tensor names differ: only in {a_dir}: {sorted(set(a.names) - set(b.names))[:5]}, "
                         f"only in {b_dir}: {sorted(set(b.names) - set(a.names))[:5]}")
    worst, rel, ulps, differ, total = 0.0, 0.0, 0.0, 0, 0
    for name in a.names:
        x, y = a.read(name).float(), b.read(name).float()
        if order is not None and name in VOCAB_TENSORS:
            x = torch.cat([x[order], x[len(order):]])  # token rows in b's order, padding rows as they are
        if x.shape != y.shape:
            raise SystemExit(f"{name}: shape {list(x.shape)} vs {list(y.shape)}")
        if not x.numel():
            continue
        d = (x - y).abs()
        worst = max(worst, d.max().item())
        rel = max(rel, d.max().item() / max(x.abs().max().item(), 1e-30))
        xb, yb = x.bfloat16().float(), y.bfloat16().float()
        db = (xb - yb).abs()
        # one bf16 spacing at the larger magnitude (8 significant bits: 2^(e-8) for m * 2^e,
        # m in [0.5, 1)); entries below 4 float32 ulps of the tensor's scale count as equal: where
        # terms cancel to ~0 any change in the order of float32 operations changes the result
        # by that much, whatever its sign
        _, e = torch.frexp(torch.maximum(xb.abs(), yb.abs()))
        spacing = torch.ldexp(torch.ones_like(xb), e - 8)
        floor = torch.maximum(x.abs().max(), y.abs().max()) * 2.0 ** -22
        u = torch.where(d <= floor, 0.0, db / spacing)
        ulps = max(ulps, u.max().item())
        differ += int((db > 0).sum())
        total += db.numel()
    return {"max_abs": worst, "max_rel": rel, "ulps": ulps, "differ": differ / max(total, 1), "tensors": len(a.names),
            "layers": a.num_layers, "vocab": f"{vocab} ({a.vocab_size} rows)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "parity"))
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml (default: the scripts/setup_mergekit.sh venv)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the family and of the outputs")
    ap.add_argument("--compute", default="float32", choices=["float32", "bfloat16"],
                    help="the configs' `dtype`, mergekit's compute dtype (evomerge always computes in "
                         "float32); with bfloat16 the table shows mergekit's own rounding, no pass/fail")
    args = ap.parse_args()
    mk = find_mergekit(args.mergekit)
    if mk is None:
        print("mergekit-yaml not found: run scripts/setup_mergekit.sh or pass --mergekit", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    fam = build_family(work / f"family-{args.dtype}", args.dtype)
    from evomerge.mergekit_compat import to_mergekit
    from evomerge.recipe import parse_recipe

    cfgs = configs(fam, args.dtype, args.compute)
    # (mergekit config, the config evomerge merges): the same file, or the native recipe exported
    runs = {m: (c, c) for m, c in cfgs.items()}
    runs |= {m: (to_mergekit(parse_recipe(r)), r) for m, r in native_recipes(fam, args.dtype).items()}
    common = {"dtype": args.compute} | ({"out_dtype": args.dtype} if args.dtype != args.compute else {})
    vfam = build_vocab_family(work / f"vocab-{args.dtype}", fam)
    runs |= {m: (c, c) for m, c in tokenizer_configs(fam, vfam, common).items()}
    methods = args.methods.split(",") if args.methods else list(runs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows, bad = [], []
    for method in methods:
        stem = method.replace(":", "-")
        mk_cfg, em_cfg = work / f"{stem}.mergekit.yaml", work / f"{stem}.yaml"
        mk_cfg.write_text(yaml.safe_dump(runs[method][0], sort_keys=False))
        em_cfg.write_text(yaml.safe_dump(runs[method][1], sort_keys=False))
        outs = {"mergekit": work / f"mk-{stem}", "evomerge": work / f"em-{stem}"}
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        for tool, cmd in (("mergekit", [mk, str(mk_cfg), str(outs["mergekit"]), "--quiet"]),
                          ("evomerge", [sys.executable, "-m", "evomerge.cli", "merge", str(em_cfg),
                                        str(outs["evomerge"]), "-q"])):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{tool} failed on {method}:\n{res.stderr[-3000:]}", file=sys.stderr)
                return 1
        r = compare(outs["mergekit"], outs["evomerge"])
        rows.append((method, r))
        if r["ulps"] > 1 and args.compute == "float32":
            bad.append(method)
        print(method, r, file=sys.stderr)
    print(f"\nfamily: {SHAPE} {args.dtype}; mergekit computes in {args.compute} (config `dtype`), "
          f"evomerge in float32; outputs {args.dtype}; mergekit: {mk}")
    print("| method | tensors | layers | vocab | max abs diff | max rel diff | bf16 ulps | bf16 differ |")
    print("|---|---|---|---|---|---|---|---|")
    for method, r in rows:
        print(f"| {method} | {r['tensors']} | {r['layers']} | {r['vocab']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} "
              f"| {r['ulps']:.0f} | {100 * r['differ']:.3f}% |")
    if bad:
        print(f"beyond bf16 rounding: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
