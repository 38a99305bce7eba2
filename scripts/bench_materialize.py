#!/usr/bin/env python3
"""Benchmark in-memory candidate materialization (evomerge.resident) against a plain device copy.

Generates a Llama-shaped bf16 family (a base and three "fine-tunes") directly in memory on the
device; the checkpoints on disk hold only headers (sparse files), which is all planning reads. For
linear, task_arithmetic, ties, dare_ties, slerp and a data-flow (DFS) stack it times
``ResidentSources.materialize_into`` into a resident transformers model and prints time per
candidate, effective GB/s (bytes read, every input once, + bytes written, over the time) and the
ratio to a plain device copy (``dst.copy_(src)`` over every tensor of one model) measured in the
same run. The floor of a merge is its bytes moved at copy speed; "x floor" is time / that floor.

    python scripts/bench_materialize.py                       # CPU, ~349M parameters
    python scripts/bench_materialize.py --device cuda --size 1b
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama shapes; parameters in the name
    "tiny": dict(num_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000),
    "349m": dict(num_layers=24, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
    "1b": dict(num_layers=24, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
               num_key_value_heads=8, vocab_size=32000),
    "3b": dict(num_layers=32, hidden_size=2560, intermediate_size=6912, num_attention_heads=20,
               num_key_value_heads=4, vocab_size=32000),
}
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def header_only_checkpoint(out: Path, config, specs) -> None:
    """A model directory whose safetensors file has a real header and a sparse (unwritten) body."""
    out.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for s in specs:
        n = math.prod(s.shape) * s.dtype.itemsize
        header[s.name] = {"dtype": ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + off)
    (out / "config.json").write_text(json.dumps(config.to_dict()))


def build_family(root: Path, size: str, dtype: torch.dtype, device: torch.device):
    from evomerge.checkpoint import Checkpoint
    from evomerge.tiny import make_config, model_specs

    cfg = make_config(arch="llama", dtype=dtype, **SIZES[size])
    specs = model_specs(cfg, dtype)
    names = ["base", "expert1", "expert2", "expert3"]
    for n in names:
        header_only_checkpoint(root / n, cfg, specs)
    models = {str(root / n): Checkpoint.open(root / n) for n in names}
    # values: slices of one random pool (fast to build); experts = base + 2% noise, rounded to dtype
    gen = torch.Generator(device=device).manual_seed(0)
    pool = torch.randn(1 << 25, generator=gen, device=device)
    tensors = {str(root / n): {} for n in names}
    rng = torch.Generator().manual_seed(1)

    def draw(numel):
        start = int(torch.randint(0, pool.numel() - numel + 1, (1,), generator=rng))
        return pool[start:start + numel]

    for s in specs:
        numel = math.prod(s.shape)
        b = torch.ones(numel, device=device) if len(s.shape) == 1 else draw(numel) * 0.02
        scale = 0.02 * (float(b.std()) if numel > 1 and float(b.std()) > 0 else 0.05)
        tensors[str(root / "base")][s.name] = b.to(dtype).reshape(s.shape)
        for n in names[1:]:
            tensors[str(root / n)][s.name] = torch.add(b, draw(numel), alpha=scale).to(dtype).reshape(s.shape)
        del b
    return models, tensors, sum(math.prod(s.shape) for s in specs)


def recipes(root: Path, n_layers: int):
    from evomerge.recipe import parse_recipe

    base, ex = str(root / "base"), [str(root / f"expert{i}") for i in (1, 2, 3)]
    w = [0.5, 0.3, 0.2]
    d = [0.35, 0.5, 0.7]
    out = {
        "linear": {"method": "linear", "sources": [{"model": e, "params": {"weight": wi}} for e, wi in zip(ex, w)]},
        "task_arithmetic": {"method": "task_arithmetic", "base": base, "params": {"lambda": 0.9},
                            "sources": [{"model": e, "params": {"weight": wi}} for e, wi in zip(ex, w)]},
        "ties": {"method": "ties", "base": base, "sources": [{"model": e, "params": {"weight": wi, "density": di}}
                                                             for e, wi, di in zip(ex, w, d)]},
        "dare_ties": {"method": "dare_ties", "base": base, "seed": 1,
                      "sources": [{"model": e, "params": {"weight": wi, "density": di}} for e, wi, di in zip(ex, w, d)]},
        "slerp": {"method": "slerp", "base": base, "params": {"t": 0.4}, "sources": [{"model": ex[0]}]},
        "dfs_stack": {"kind": "dataflow", "embed": ex[0],
                      "path": [{"model": ex[i % 3], "layer": i, "scale": 1.0 if i % 4 else 0.9}
                               for i in range(n_layers)]},
    }
    inputs = {"linear": 3, "task_arithmetic": 4, "ties": 4, "dare_ties": 4, "slerp": 2, "dfs_stack": 1}
    return {k: parse_recipe(v) for k, v in out.items()}, inputs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="349m", choices=sorted(SIZES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fused", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp,dfs_stack")
    ap.add_argument("--root", default="/tmp/evomerge-bench-materialize")
    args = ap.parse_args(argv)

    from evomerge.resident import ResidentSources

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    root = Path(args.root) / f"{args.size}-{args.dtype}"
    t0 = time.perf_counter()
    models, tensors, n_params = build_family(root, args.size, dtype, device)
    fused = None if args.fused == "auto" else args.fused == "on"
    rs = ResidentSources.from_tensors(models, tensors, device=device, fused=fused)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {name}; torch {torch.__version__}; {n_params / 1e6:.0f}M parameters, {args.dtype}; "
          f"fused kernels: {rs.fused}; family built in {time.perf_counter() - t0:.1f} s", flush=True)

    all_recipes, inputs = recipes(root, SIZES[args.size]["num_layers"])
    model_bytes = n_params * dtype.itemsize
    # copy floor: every tensor of one source into the resident target model, same dtype
    first = next(iter(all_recipes.values()))
    target = rs.model_for(first)
    sd = {k: v for k, v in target.state_dict().items()}
    src = tensors[str(root / "expert1")]

    def copy_all():
        for k, v in src.items():
            sd[k].copy_(v)

    copy_t = timed(copy_all, device, args.reps)
    copy_bw = 2 * model_bytes / copy_t
    print(f"# plain copy of one model ({model_bytes / 1e9:.2f} GB read + written): {copy_t * 1e3:.1f} ms, "
          f"{copy_bw / 1e9:.1f} GB/s", flush=True)
    print(f"{'candidate':16s} {'ms/cand':>9s} {'GB moved':>9s} {'eff GB/s':>9s} {'% of copy BW':>13s} "
          f"{'x floor':>8s} {'first (compile, stats)':>24s}  tensors by backend")
    for method in args.methods.split(","):
        recipe = all_recipes[method]
        t_first = time.perf_counter()
        target = rs.model_for(recipe)
        used = Counter(rs.materialize(recipe, target).backends.values())  # compiles kernels, builds rank orders
        sync(device)
        t_first = time.perf_counter() - t_first
        t = timed(lambda: rs.materialize_into(recipe, target), device, args.reps)
        copy_t = min(copy_t, timed(copy_all, device, args.reps))  # re-measured next to each method
        copy_bw = 2 * model_bytes / copy_t
        moved = (inputs[method] + 1) * model_bytes
        bw = moved / t
        print(f"{method:16s} {t * 1e3:9.1f} {moved / 1e9:9.2f} {bw / 1e9:9.1f} {100 * bw / copy_bw:12.0f}% "
              f"{t / (moved / copy_bw):8.2f} {t_first:23.1f}s  "
              + " ".join(f"{b}:{c}" for b, c in sorted(used.items())), flush=True)
    print(f"# best plain copy over the run: {copy_t * 1e3:.1f} ms, {copy_bw / 1e9:.1f} GB/s (ratios use the best "
          "copy measured up to that row)")
    print(f"# rank-order statistics held: {rs.stats_nbytes() / 1e9:.2f} GB (host); resident sources: "
          f"{rs.nbytes() / 1e9:.2f} GB ({device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
