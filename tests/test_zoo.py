"""The shipped demo zoo: checkpoints load, and each expert beats the base on its own skill."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.evaluate import Scorer, load_model, load_suite
from evomerge.zoo import EXPERT_NAMES, TASKS, build_tokenizer, eval_items

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evals" / "zoo"
needs_zoo = pytest.mark.skipif(not (ZOO / "base" / "config.json").is_file(), reason="zoo not built (scripts/build_zoo.py)")


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = t2.encode("c:47+385=432|abc", add_special_tokens=False)
    assert len(ids) == 16 and t2.decode(ids) == "c:47+385=432|abc"


def test_eval_items_distinct_and_deterministic():
    for t in TASKS:
        a = eval_items(t, 50, seed=1)
        assert a == eval_items(t, 50, seed=1) and len({p for p, _ in a}) == 50


@needs_zoo
def test_zoo_loads_and_experts_beat_base_on_own_skill():
    """Each expert beats the base on its own skill's full held-out split by more than 2 standard errors."""
    import math

    base, tok = load_model(ZOO / "base")
    for skill, name in EXPERT_NAMES.items():
        sc = Scorer(load_suite(ROOT / "evals" / f"zoo_{skill}.yaml"), "held-out", batch_size=128)
        expert, _ = load_model(ZOO / name)
        b, e = sc.score(base, tok), sc.score(expert, tok)
        assert b.n == e.n == 300
        assert e.combined - b.combined > 2 * math.hypot(b.combined_stderr, e.combined_stderr), (skill, b, e)
