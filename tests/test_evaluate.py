"""Suites, scoring engine and cache: checked against direct (unbatched, uncached) computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError, EvalError
from evomerge.evaluate import (Extract, ScoreCache, Scorer, eval_command, extract_answer, load_suite,
                               weights_fingerprint)
from evomerge.evaluate.backends.hf import HFLM
from evomerge.evaluate.engine import subsample
from evomerge.zoo import ZooConfig, build_tokenizer, make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = make_model(ZooConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=3), len(tok))
    with torch.no_grad():  # larger weights so outputs are far from uniform
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval(), tok


def _write(tmp: Path, name: str, recs) -> str:
    (tmp / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return name


def _suite(tmp: Path, tasks_yaml: str) -> Path:
    p = tmp / "s.yaml"
    p.write_text("name: t\ntasks:\n" + tasks_yaml)
    return p


def test_shipped_suites_load():
    for p in sorted((ROOT / "evals").glob("*.yaml")):
        s = load_suite(p)
        for t in s.tasks:
            assert t.splits["search"] and t.splits["held-out"]


def test_unknown_keys_and_kind_collected(tmp_path):
    p = _suite(tmp_path, "  - name: a\n    kind: bogus\n    data: {search: x, held-out: y}\n"
                         "  - name: b\n    kind: generate\n    colour: red\n    data: {search: x}\n")
    with pytest.raises(ConfigError) as e:
        load_suite(p)
    msg = str(e.value)
    assert "unknown task kind 'bogus'" in msg and "colour" in msg and "data.held-out" in msg
    assert str(p) in msg and len(e.value.problems) >= 3


def test_suite_problems_name_line_and_key_with_a_fix(tmp_path):
    p = _suite(tmp_path, "  - name: a\n    kind: multiple_choice\n    metric: f1\n    weight: -1\n"
                         "    data: {search: x, held-out: y, train: z}\n"
                         "  - name: b\n    kind: generate\n    max_new_tokens: '8'\n    metric: acc\n"
                         "    extract: {rule: regex, pattern: '(('}\n    data: {search: x, held-out: y}\n"
                         "  - 3\n")
    with pytest.raises(ConfigError) as e:
        load_suite(p)
    got = [str(problem) for problem in e.value.problems]
    assert got == [
        f"{p}:5: tasks[0].metric: unknown metric 'f1' (fix: use acc or acc_norm)",
        f"{p}:6: tasks[0].weight: expected a number >= 0, got -1",
        f"{p}:7: tasks[0].data.train: unknown key 'train' (fix: allowed keys here: held-out, search)",
        f"{p}:10: tasks[1].max_new_tokens: expected a whole number, got '8'",
        f"{p}:11: tasks[1].metric: unknown key 'metric' for kind 'generate' (fix: allowed keys here: data, extract, "
        "kind, max_new_tokens, name, until, weight)",
        f"{p}:12: tasks[1].extract: invalid regular expression '((': missing ), unterminated subpattern at position 1",
        f"{p}:14: tasks[2]: expected a task mapping, got 3 (fix: e.g. {{name: arith, kind: generate, data: {{...}}}})",
    ]


def test_duplicate_task_names_are_refused(tmp_path):
    _write(tmp_path, "s.jsonl", [{"prompt": "a", "answer": "1"}])
    _write(tmp_path, "h.jsonl", [{"prompt": "b", "answer": "2"}])
    task = "  - name: a\n    kind: generate\n    data: {search: s.jsonl, held-out: h.jsonl}\n"
    with pytest.raises(ConfigError, match=r"s.yaml:6: tasks\[1\].name: duplicate task name 'a'"):
        load_suite(_suite(tmp_path, task + task))


def test_missing_file_malformed_line_and_overlap(tmp_path):
    _write(tmp_path, "s.jsonl", [{"prompt": "a", "answer": "1"}])
    p = _suite(tmp_path, "  - name: a\n    kind: generate\n    data: {search: s.jsonl, held-out: missing.jsonl}\n")
    with pytest.raises(EvalError, match="missing.jsonl does not exist"):
        load_suite(p)
    _write(tmp_path, "h.jsonl", [{"prompt": "b", "answer": "2"}, '{"prompt": "c", "answer": '])
    p = _suite(tmp_path, "  - name: a\n    kind: generate\n    data: {search: s.jsonl, held-out: h.jsonl}\n")
    with pytest.raises(EvalError, match=r"h.jsonl:2: malformed JSON"):
        load_suite(p)
    _write(tmp_path, "h.jsonl", [{"prompt": "b", "answer": "2"}, {"prompt": "a", "answer": "1"}])
    with pytest.raises(EvalError, match="also appear in the search split"):
        load_suite(p)
    _write(tmp_path, "h.jsonl", [{"prompt": "b", "answer": "2"}])
    assert load_suite(p).tasks[0].splits["held-out"][0].answers == ("2",)


@pytest.mark.parametrize("rule,text,want", [
    (Extract("raw"), "  42 \n", "42"),
    (Extract("first_line"), "\n  x y\nz", "x y"),
    (Extract("regex", r"####\s*(\d+)"), "so #### 17 done", "17"),
    (Extract("regex", r"\|(\w+)"), "632|abc", "abc"),
    (Extract("regex", r"\|(\w+)"), "632 abc", ""),
    (Extract("first_number"), "it is -3.5 or 7", "-3.5"),
    (Extract("last_number"), "1,234 then 5,678", "5678"),
    (Extract("last_number"), "none", ""),
])
def test_extraction_rules(rule, text, want):
    assert extract_answer(text, rule) == want


def test_loglik_matches_direct_loop(tiny):
    model, tok = tiny
    reqs = [("a:12+3=", "15"), ("r:abc=", "cbaxx"), ("", "hello"), ("e:k=", "q")]
    got = HFLM(model, tok, batch_size=3, device=None).loglik(reqs)
    for (ctx, cont), (s, n) in zip(reqs, got):
        ids = [tok.bos_token_id] + tok.encode(ctx, add_special_tokens=False)
        total = 0.0
        for c in tok.encode(cont, add_special_tokens=False):  # one unbatched forward per token
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[c].item()
            ids.append(c)
        assert n == len(cont)
        assert s == pytest.approx(total, abs=1e-4)


def test_generate_matches_naive_greedy(tiny):
    model, tok = tiny
    prompts = ["a:1+2=", "r:abcdef=", "e:q=", "c:123+456="]
    got = HFLM(model, tok, batch_size=4, device=None).generate(prompts, 6, ())
    for p, g in zip(prompts, got):
        ids = [tok.bos_token_id] + tok.encode(p, add_special_tokens=False)
        out = []
        for _ in range(6):  # no cache, no padding, one sequence
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids.append(nxt)
        assert g == tok.decode(out, skip_special_tokens=True)


def test_scorer_metrics_stderr_and_cache(tiny, tmp_path):
    model, tok = tiny
    lm = HFLM(model, tok, batch_size=8, device=None)
    prompts = [f"a:{i}+1=" for i in range(12)]
    outs = lm.generate(prompts, 4, ())
    # answers: the model's own output for the first 5 items, something impossible for the rest
    _write(tmp_path, "g.search.jsonl", [{"prompt": p, "answer": o if i < 5 else "###"} for i, (p, o) in enumerate(zip(prompts, outs))])
    _write(tmp_path, "g.held.jsonl", [{"prompt": "a:99+9=", "answer": "x"}])
    _write(tmp_path, "mc.s.jsonl", [{"prompt": "r:ab=", "choices": ["ba", "ab", "zzzz"], "label": 0}] * 2)
    _write(tmp_path, "mc.h.jsonl", [{"prompt": "r:cd=", "choices": ["dc", "cd"], "label": 0}])
    _write(tmp_path, "ll.s.jsonl", [{"prompt": "e:", "target": "abc"}, {"target": "hello"}])
    _write(tmp_path, "ll.h.jsonl", [{"target": "zz"}])
    p = _suite(tmp_path,
               "  - {name: g, kind: generate, max_new_tokens: 4, until: [], data: {search: g.search.jsonl, held-out: g.held.jsonl}}\n"
               "  - {name: mc, kind: multiple_choice, data: {search: mc.s.jsonl, held-out: mc.h.jsonl}}\n"
               "  - {name: ll, kind: loglik, weight: 0, data: {search: ll.s.jsonl, held-out: ll.h.jsonl}}\n")
    suite = load_suite(p)
    cache = ScoreCache(tmp_path / "cache")
    r = Scorer(suite, "search", batch_size=5, cache=cache).score(model, tok)
    g = r.tasks["g"]
    assert (g.score, g.n) == (pytest.approx(5 / 12), 12)
    assert g.stderr == pytest.approx(math.sqrt(5 / 12 * 7 / 12 / 12))
    lls = lm.loglik([("r:ab=", c) for c in ["ba", "ab", "zzzz"]])
    assert r.tasks["mc"].metrics["acc"] == float(max(range(3), key=lambda i: lls[i][0]) == 0)
    direct = lm.loglik([("e:", "abc"), ("", "hello")])
    assert r.tasks["ll"].score == pytest.approx((direct[0][0] / 3 + direct[1][0] / 5) / 2, abs=1e-5)
    assert r.combined == pytest.approx((g.score + r.tasks["mc"].score) / 2)  # ll has weight 0
    assert not r.cached and len(cache) == 1
    again = Scorer(suite, "search", batch_size=5, cache=ScoreCache(tmp_path / "cache")).score(model, tok)
    assert again.cached and again.combined == r.combined  # from disk, in a fresh cache object
    assert not Scorer(suite, "held-out", cache=cache).score(model, tok).cached


def test_subsample_is_seeded_and_nested():
    items = tuple(range(100))
    a, b = subsample(items, 10, 7), subsample(items, 30, 7)
    assert a == subsample(items, 10, 7) and set(a) < set(b) and a != subsample(items, 10, 8)


def test_fingerprint_changes_with_weights(tiny):
    model, _ = tiny
    f = weights_fingerprint(model)
    with torch.no_grad():
        p = next(model.parameters())
        p[0, 0] += 1
        assert weights_fingerprint(model) != f
        p[0, 0] -= 1


def test_eval_command_errors(tmp_path, tiny, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    assert eval_command(str(tmp_path / "m"), [str(ROOT / "evals/zoo_arith.yaml")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    tok.save_pretrained(tmp_path / "m")
    assert eval_command(str(tmp_path / "m"), [str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_command(str(tmp_path / "m"), [str(ROOT / "evals/zoo_arith.yaml")], limit=8) == 0
    assert "combined" in capsys.readouterr().out


def test_eval_command_rejects_bad_numbers(tmp_path, capsys):
    for kw, flag in (({"limit": 0}, "--limit"), ({"limit": -2}, "--limit"), ({"batch_size": 0}, "--batch-size")):
        assert eval_command(str(tmp_path), [str(ROOT / "evals/zoo_arith.yaml")], **kw) == 2
        assert flag in capsys.readouterr().err


def test_load_model_refuses_tensors_transformers_would_fill_randomly(tmp_path):
    """A bias missing from every layer passes the structural check (the layers agree) but not the
    load: transformers reports it missing, and eval refuses instead of scoring random values."""
    from safetensors.torch import load_file, save_file

    from evomerge.errors import CheckpointError
    from evomerge.evaluate import load_model
    from evomerge.tiny import build_tiny_model

    d = build_tiny_model(tmp_path / "q", arch="qwen2", num_layers=2)
    load_model(d)
    t = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.endswith("q_proj.bias")}
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) missing from the files .*'model.layers.0.self_attn.q_proj.bias'"):
        load_model(d)
