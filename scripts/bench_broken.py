#!/usr/bin/env python3
"""What a broken candidate costs at the first rung: a DFS trial scored whole, and scored against a
promotion bar (stopped once the bar is out of reach), measured side by side in one run.

    python3 scripts/bench_broken.py [--space search_spaces/dfs.yaml] [--candidates 12] [--bar 0.3]

Candidates: points of the space's (first) stage drawn uniformly from the unit cube (``--seed``): most
random layer paths are broken (they score near 0 and generate to the token limit). Each is scored at
the first rung of the space's multi-fidelity schedule (``--fidelity``) three ways: the generation
loop as it was (every row of a batch decoded until the whole batch stopped, each row's whole text
decoded at every step: ``--legacy``, a copy of that loop kept here for the comparison), the current
loop (a row leaves the batch as soon as it hits EOS or a stop string), and the current loop with a
bar (scoring stops when even every remaining item right could not reach ``--bar``). CPU seconds of
this process (``time.process_time``, less sensitive than wall time to other work on the machine),
one thread. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from evomerge.evaluate.backends.hf import HFLM, generation_text, left_padded


class LegacyLM(HFLM):
    """The generation loop before rows left the batch: finished rows kept decoding padding, and the
    stop strings were looked for in each row's whole decoded text at every step."""

    def _greedy(self, batch, max_new, until):
        B, dev = len(batch), self.device
        ids, att = left_padded(batch, self.pad, dev)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen, past, step_ids, step_pos = [], None, ids, pos
        for _ in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=att, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            self.steps += 1
            self.row_steps += B
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            gen.append(nxt)
            if self.eos is not None:
                done |= nxt == self.eos
            if until:
                toks = torch.stack(gen, 1).tolist()
                for j in range(B):
                    if not done[j] and any(u in self.tok.decode(toks[j], skip_special_tokens=True) for u in until):
                        done[j] = True
            if bool(done.all()):
                break
            att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=dev)], 1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        return [generation_text(self.tok, row, self.eos, until) for row in torch.stack(gen, 1).tolist()]


class LegacyBackend:
    name = "hf"

    def lm(self, model, tokenizer, *, batch_size=64, device=None):
        return LegacyLM(model, tokenizer, batch_size, device)

    def stats(self):
        return {}

    def close(self):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/dfs.yaml")
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--fidelity", type=float, default=None, help="default: the space's first rung")
    ap.add_argument("--bar", type=float, default=0.3, help="promotion bar (combined score)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from evomerge.evaluate.resident import worker_evaluator
    from evomerge.search.space import load_space

    space = load_space(args.space)
    stage = space.stage_space(space.stages()[0])
    fidelity = args.fidelity or space.multi_fidelity.rungs[0]
    ev = worker_evaluator(space.evaluation, device="cpu")
    rng = random.Random(args.seed)
    dims = stage.dims()
    recipes = [stage.decode({d.name: d.from_unit(rng.random()) for d in dims}) for _ in range(args.candidates)]
    ev.model(recipes[0])  # the first model of each shape is built outside the timings
    current = Counting(ev.backend)
    modes = {"whole rung, earlier loop": (Counting(LegacyBackend()), None), "whole rung": (current, None),
             f"bar {args.bar}": (current, {"coef": {"combined": 1.0}, "value": args.bar, "offset": 0.0})}
    rows = {m: {"cpu": 0.0, "items": 0, "rows": 0, "stopped": 0} for m in modes}
    scores = []
    for recipe in recipes:
        for mode, (backend, bar) in modes.items():
            ev.cache._mem.clear()  # every mode scores from scratch
            ev.backend = backend
            ev._scorers.clear()  # a scorer keeps the backend it was made with
            before = backend.rows()
            t0 = time.process_time()
            out = ev.evaluate(recipe, split="search", fidelity=fidelity, bar=bar)
            rows[mode]["cpu"] += time.process_time() - t0
            rows[mode]["items"] += out.n["combined"]
            rows[mode]["stopped"] += bool(out.items.get("stopped"))
            rows[mode]["rows"] += backend.rows() - before
            if bar is None and mode == "whole rung":
                scores.append(out.scores["combined"])
    n = len(recipes)
    print(f"\nmeasured on {platform.machine()} ({os.cpu_count()} cores, shared: CPU seconds of this process, one thread); "
          f"{args.space}: {n} random candidates at fidelity {fidelity}, combined scores "
          f"{min(scores):.3f}..{max(scores):.3f} (median {sorted(scores)[n // 2]:.3f})\n")
    print("| scoring | CPU s per candidate | items scored per candidate | decoded rows per candidate | stopped early |")
    print("|---|---|---|---|---|")
    base = rows["whole rung, earlier loop"]["cpu"]
    for mode, r in rows.items():
        print(f"| {mode} | {r['cpu'] / n:.2f} ({base / r['cpu']:.2f}x) | {r['items'] / n:.0f} | {r['rows'] / n:.0f} | "
              f"{r['stopped']} of {n} |")
    return 0


class Counting:
    """A backend that keeps the LMs it makes, to read their decoded-row counters."""

    def __init__(self, inner):
        self.inner, self.made, self.name = inner, [], inner.name

    def lm(self, *a, **kw):
        self.made.append(self.inner.lm(*a, **kw))
        return self.made[-1]

    def rows(self) -> int:
        return sum(lm.row_steps for lm in self.made)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()


if __name__ == "__main__":
    sys.exit(main())
