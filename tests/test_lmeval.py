"""lm-eval adapter on a local custom task (no network): agrees with our own loglik engine."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from evomerge.evaluate import lmeval_score  # noqa: E402
from evomerge.evaluate.backends.hf import HFLM  # noqa: E402
from evomerge.zoo import ZooConfig, build_tokenizer, make_model  # noqa: E402


def test_custom_local_task(tmp_path):
    tok = build_tokenizer()
    model = make_model(ZooConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=5), len(tok)).eval()
    rows = [{"q": f"r:{w}=", "choices": [w[::-1], w, "zz"], "label": 0} for w in ["abc", "hello", "qrs", "xy"]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "zoo_rev_mc.yaml").write_text(
        "task: zoo_rev_mc\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'data.jsonl'}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    res = lmeval_score(model, tok, ["zoo_rev_mc"], include_path=tmp_path, batch_size=4)
    t = res.tasks["zoo_rev_mc"]
    assert t.n == 4 and t.primary == "acc"
    lm = HFLM(model, tok, 8, None)
    want = 0
    for r in rows:
        lls = [s for s, _ in lm.loglik([(r["q"], c) for c in r["choices"]])]
        want += int(max(range(3), key=lls.__getitem__) == 0)
    assert t.score == pytest.approx(want / 4)
