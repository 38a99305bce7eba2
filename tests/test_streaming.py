"""`evomerge merge` streams: its peak memory is a few tensors, not whole models.

A fresh process plans a 3-source TIES merge of sharded float32 checkpoints (66 MB each), runs it once
to pay one-off costs (code pages of first-used kernels, the native build), resets its
peak-RSS counter (Linux VmHWM via /proc/self/clear_refs), runs the merge, and reads the peak. The increase must stay within a small
multiple of (sources + 1) x the largest tensor, far below the size of one model.
"""

import json
import os
import subprocess
import sys

import pytest

from evomerge.tiny import build_tiny_family

SCRIPT = r"""
import json, sys
from evomerge.materialize import merge_to_disk, plan_recipe
from evomerge.recipe import parse_recipe

def hwm_kib():  # peak resident set size since the last reset (Linux VmHWM)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def reset_hwm():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

fam = json.loads(sys.argv[1])
recipe = parse_recipe({"method": "ties", "base": fam["base"],
    "sources": [{"model": fam[k], "params": {"weight": 0.4, "density": 0.5}} for k in ("expert1", "expert2", "expert3")]})
plan = plan_recipe(recipe)
# Run the same merge once first, so one-off costs are not counted: the code pages of torch's and the
# native kernel's first-used functions (file-backed, they count in RSS, and how many pages a first call
# faults in depends on the machine's readahead), the native kernel's build and load, the allocator.
merge_to_disk(recipe, sys.argv[2] + "-warm", progress=False, shard_size="20MB")
reset_hwm()
before = hwm_kib()
merge_to_disk(recipe, sys.argv[2], progress=False, shard_size="20MB")
after = hwm_kib()
base = plan.models[fam["base"]]
print(json.dumps({"before_kib": before, "after_kib": after, "largest": max(base.nbytes(n) for n in base.names),
                  "model_bytes": sum(base.nbytes(n) for n in base.names)}))
"""


@pytest.mark.slow
def test_merge_peak_rss_is_a_few_tensors(tmp_path):
    fam = build_tiny_family(tmp_path / "fam", arch="llama", n_experts=3, num_layers=16, hidden_size=256,
                            intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                            vocab_size=1024, max_shard_size="8MB", noise=0.05)
    fam = {k: str(v) for k, v in fam.items()}
    assert len(list((tmp_path / "fam" / "base").glob("*.safetensors"))) > 3  # sharded inputs
    # A fixed mmap threshold keeps glibc from parking freed 1 MiB tensors in its heap (its dynamic
    # threshold would), so the peak measures live memory rather than the allocator's retention.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(fam), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True, env=env)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    increase = (m["after_kib"] - m["before_kib"]) * 1024
    # inputs (sources + base), float32 task vectors, masks and the result: a few tensors per source
    bound = 6 * (3 + 1) * m["largest"]
    print(f"RSS increase {increase / 2**20:.1f} MiB; largest tensor {m['largest'] / 2**20:.1f} MiB; "
          f"one model {m['model_bytes'] / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB")
    assert m["model_bytes"] > 2 * bound  # the bound is meaningful: one whole model would exceed it
    assert increase <= bound
    assert json.load(open(tmp_path / "out" / "model.safetensors.index.json"))["weight_map"]
