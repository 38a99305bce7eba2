"""``evomerge eval MODEL_DIR --suite S.yaml [--split held-out] [--limit N]``: load, score, print a table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from evomerge.errors import EvalError, EvomergeError
from evomerge.evaluate.engine import Scorer, SuiteResult
from evomerge.evaluate.suite import load_suite


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | str = "auto"):
    """(model, tokenizer) from a local HF directory; EvalError when either is missing.

    ``dtype="auto"`` computes in the checkpoint's stored dtype: exactly what a search scored when it
    materialized that recipe in memory, so `evomerge eval` of an exported merge reproduces its score.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise EvalError(f"{d} is not a model directory (no config.json)")
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EvalError(f"{d} has no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json); "
                        "fix: copy the tokenizer files of the model it came from into the directory")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    return model, tok


def format_results(results: list[SuiteResult], title: str = "") -> str:
    rows = [("suite", "task", "metric", "score", "± se", "n")]
    for r in results:
        for t in r.tasks.values():
            rows.append((r.suite, t.name, t.primary, f"{t.score:.4f}", f"{t.stderr:.4f}", str(t.n)))
        rows.append((r.suite, "combined", "mean", f"{r.combined:.4f}", f"{r.combined_stderr:.4f}", str(r.n)))
    w = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [title] if title else []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def eval_command(model_dir: str, suite_paths: list[str], split: str = "search", limit: int | None = None,
                 device: str = "cpu", batch_size: int = 64, out=None) -> int:
    """What ``evomerge eval`` runs. Returns the exit status (2 on any EvomergeError, message on stderr)."""
    try:
        suites = [load_suite(p) for p in suite_paths]
        model, tok = load_model(model_dir, device)
        results = [Scorer(s, split, limit=limit, batch_size=batch_size).score(model, tok) for s in suites]
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(results, f"{model_dir} ({split} split)"), file=out or sys.stdout)
    return 0
