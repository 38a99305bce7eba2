#!/usr/bin/env python3
"""Benchmark `evomerge merge` against mergekit on a ~350M-parameter Llama-shaped bf16 family.

Builds (once, cached) a base and three fine-tunes locally, then for linear, ties and dare_ties runs
`evomerge merge` and, when mergekit is installed (scripts/setup_mergekit.sh, or --mergekit PATH to
a mergekit-yaml), `mergekit-yaml` on the same config in the same run. Each merge runs in its own
process; wall time, CPU time and that process's peak RSS (its VmHWM, sampled: see PeakWatcher) are reported, with GB/s counted as
bytes read (every input once) plus bytes written, and the ratios mergekit / evomerge. The tools
alternate, ``--reps`` times each (the fastest run of each is reported, all are printed); before
every run the previous output is deleted and dirty pages are flushed, outside the clock.

    python scripts/bench_merge.py                  # evomerge only, or both if mergekit is set up
    python scripts/bench_merge.py --mergekit auto  # run scripts/setup_mergekit.sh first
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(arch="llama", num_layers=24, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000)


def build_family(root: Path) -> dict[str, Path]:
    import torch

    from evomerge.tiny import build_tiny_family

    stamp = root / ".complete"
    names = ["base", "expert1", "expert2", "expert3"]
    if stamp.exists():
        return {n: root / n for n in names}
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    fam = build_tiny_family(root, n_experts=3, noise=0.02, seed=0, dtype=torch.bfloat16,
                            max_shard_size="200MB", **SHAPE)
    stamp.write_text("ok")
    print(f"built the family in {time.perf_counter() - t0:.1f} s under {root}", file=sys.stderr)
    return {n: Path(fam[n]) for n in names}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_measured(cmd: list[str], env: dict | None = None, clear: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds: user + system) of one child process. On a shared
    machine the CPU seconds move less than the wall time with other load (waits for the disk or for a
    core are not counted).

    Before the clock starts: ``clear`` (the previous output) is removed and dirty pages are flushed
    (``sync``), so neither tool pays for the other's deletes or writeback.
    """
    if clear is not None:
        shutil.rmtree(clear, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = PeakWatcher(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak.mib(usage.ru_maxrss / 1024), usage.ru_utime + usage.ru_stime


class PeakWatcher:
    """The child's own peak RSS (``VmHWM`` of ``/proc/<pid>/status``, read every 5 ms until it
    exits). ``ru_maxrss`` from ``wait4`` is not it: the kernel carries the RSS the process had before
    ``exec`` into it, and a child forked from this script starts as a copy of this script (torch and
    the family built in memory: ~900 MiB), which then hides the merge's own peak."""

    def __init__(self, pid: int):
        import threading

        self.path, self.kib = Path(f"/proc/{pid}/status"), 0
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while True:
            try:
                text = self.path.read_text()
            except OSError:
                return
            line = next((ln for ln in text.splitlines() if ln.startswith("VmHWM:")), None)
            if line is None:  # a zombie: the memory is gone
                return
            self.kib = max(self.kib, int(line.split()[1]))
            time.sleep(0.005)

    def mib(self, fallback: float) -> float:
        """The peak in MiB; ``fallback`` where /proc cannot be read."""
        self.thread.join(timeout=1.0)
        return self.kib / 1024 if self.kib else fallback


def configs(fam: dict[str, Path], method: str) -> tuple[dict, dict]:
    experts = ["expert1", "expert2", "expert3"]
    if method == "linear":
        ours = {"method": "linear", "sources": [{"model": str(fam[e]), "params": {"weight": 1 / 3}} for e in experts]}
        theirs = {"merge_method": "linear", "dtype": "bfloat16",
                  "models": [{"model": str(fam[e]), "parameters": {"weight": 1 / 3}} for e in experts]}
        return ours, theirs
    params = {"weight": 1 / 3, "density": 0.5}
    ours = {"method": method, "base": str(fam["base"]), "seed": 0,
            "sources": [{"model": str(fam[e]), "params": params} for e in experts]}
    theirs = {"merge_method": method, "base_model": str(fam["base"]), "dtype": "bfloat16",
              "models": [{"model": str(fam[e]), "parameters": params} for e in experts]}
    return ours, theirs


def find_mergekit(arg: str | None) -> str | None:
    if arg == "none":
        return None
    if arg and arg != "auto":
        return arg
    if arg == "auto":
        out = subprocess.run(["bash", str(ROOT / "scripts/setup_mergekit.sh")], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip().splitlines()[-1]
        print(f"mergekit set-up failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    default = Path(os.environ.get("MERGEKIT_VENV", Path.home() / ".cache/evomerge/mergekit-venv")) / "bin/mergekit-yaml"
    return str(default) if default.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / ".bench"), help="cache for the family and outputs")
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml, 'auto' to set it up, 'none' to skip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2, help="runs per tool and method (the fastest is reported)")
    args = ap.parse_args()
    work = Path(args.workdir)
    fam = build_family(work / "family")
    mk = find_mergekit(args.mergekit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for method in args.methods.split(","):
        ours, theirs = configs(fam, method)
        sources = [fam[s["model"].split("/")[-1]] for s in ours["sources"]] + ([fam["base"]] if "base" in ours else [])
        read = sum(dir_bytes(p) for p in sources)
        (work / f"{method}.yaml").write_text(yaml.safe_dump(ours))
        (work / f"{method}.mergekit.yaml").write_text(yaml.safe_dump(theirs))
        out, mout = work / f"out-{method}", work / f"mk-{method}"
        ours_runs, mk_runs = [], []
        for _ in range(args.reps):  # the two tools alternate; each run starts from the same state
            ours_runs.append(run_measured([sys.executable, "-m", "evomerge.cli", "merge",
                                           str(work / f"{method}.yaml"), str(out), "-q", "--device",
                                           args.device], env, clear=out))
            if mk:
                mk_runs.append(run_measured([mk, str(work / f"{method}.mergekit.yaml"), str(mout)], env,
                                            clear=mout))
        wall, rss, _ = min(ours_runs)
        gbs = (read + dir_bytes(out)) / wall / 1e9
        row = {"method": method, "ours_s": wall, "ours_rss": rss, "ours_gbs": gbs,
               "ours_cpu_s": min(c for _, _, c in ours_runs),
               "ours_all_s": [round(w, 2) for w, _, _ in ours_runs]}
        if mk:
            mwall, mrss, _ = min(mk_runs)
            row.update(mk_s=mwall, mk_rss=mrss, speedup=mwall / wall, mk_all_s=[round(w, 2) for w, _, _ in mk_runs])
        rows.append(row)
        print(row, file=sys.stderr)
    print(f"\nfamily: {SHAPE} bf16, {dir_bytes(fam['base']) / 1e9:.2f} GB per model; device {args.device}")
    head = "| method | evomerge s | evomerge CPU s | evomerge GB/s | evomerge peak RSS MiB |"
    head += " mergekit s | mergekit peak RSS MiB | speed-up |" if mk else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['method']} | {r['ours_s']:.2f} | {r['ours_cpu_s']:.2f} | {r['ours_gbs']:.2f} "
                f"| {r['ours_rss']:.0f} |")
        if mk:
            line += f" {r['mk_s']:.2f} | {r['mk_rss']:.0f} | {r['speedup']:.1f}x |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
