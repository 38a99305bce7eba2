"""Mixture-of-Agents: prompts, layering and call counts against a hand-run pipeline, on local models
and on a real OpenAI-compatible server on localhost (evomerge.fusion.server, started here)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_fusion import save, tiny_model

from evomerge.errors import EvalError
from evomerge.evaluate import load_model
from evomerge.evaluate.backends.hf import HFLM
from evomerge.fusion import FusionBackend, load_sources, parse_fusion, score_suite
from evomerge.fusion.endpoint import Endpoint
from evomerge.fusion.prompts import INSTRUCTION, chat_messages, plain_prompt
from evomerge.fusion.server import ModelServer
from evomerge.fusion.sources import clear_loaded

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}assistant>{% endif %}")
PROMPTS = ["r:abc=", "a:12+3=", "e:hello="]


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Two tiny chat models (a character tokenizer with a chat template) on disk."""
    root = tmp_path_factory.mktemp("moa_zoo")
    refs = {}
    for name, seed in (("a", 3), ("b", 4)):
        model, tok = tiny_model(seed)
        tok.chat_template = TEMPLATE
        refs[name] = save(model, tok, root / name)
    yield refs
    clear_loaded()


def test_prompts_list_the_references():
    assert plain_prompt("a:1+2=") == "a:1+2="
    assert plain_prompt("a:1+2=", ["3", " 4\n"], instruction="use:") == "use:\n\nAnswer 1:\n3\n\nAnswer 2:\n4\n\na:1+2="
    assert chat_messages("q?") == [{"role": "user", "content": "q?"}]
    assert chat_messages("q?", ["x"]) == [{"role": "system", "content": f"{INSTRUCTION}\n\nAnswer 1:\nx"},
                                          {"role": "user", "content": "q?"}]
    assert chat_messages("q?", ["x"], instruction="i", system_role=False) == [
        {"role": "user", "content": "i\n\nAnswer 1:\nx\n\nRequest:\nq?"}]


def test_layers_feed_the_next_layer_and_calls_are_counted(agents):
    """Two layers of two local proposers and an aggregator, against the same pipeline run by hand
    with the hf backend on plain-text prompts."""
    recipe = parse_fusion({"method": "moa", "moa": {
        "agents": {"x": {"model": agents["a"], "api": "completions"}, "y": {"model": agents["b"], "api": "completions"}},
        "layers": [["x", "y"], ["y", "x"]], "aggregator": "y", "max_tokens": 4, "instruction": "use:"}})
    sources = load_sources(recipe)
    lm = FusionBackend().lm(sources)
    got = lm.generate(PROMPTS, 6, ("z",))
    hf = {k: HFLM(sources.models[agents[k]], sources.tokenizer, 8, None) for k in ("a", "b")}
    steps = {k: HFLM(sources.models[agents[k]], sources.tokenizer, 8, None) for k in ("a", "b")}
    passes = base = 0
    for q, p in enumerate(PROMPTS):
        layer1 = [hf["a"].generate([p], 4, ("z",))[0], hf["b"].generate([p], 4, ("z",))[0]]
        layer2_prompt = plain_prompt(p, layer1, instruction="use:")
        layer2 = [hf["b"].generate([layer2_prompt], 4, ("z",))[0], hf["a"].generate([layer2_prompt], 4, ("z",))[0]]
        final_prompt = plain_prompt(p, layer2, instruction="use:")
        assert got[q] == hf["b"].generate([final_prompt], 6, ("z",))[0], p
        assert layer1 != layer2 or layer1[0] != layer1[1]  # the layers see different prompts

        def n(k, text, limit, tok=sources.tokenizer):
            ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
            return len(steps[k].generate_tokens([(ids, limit, ["z"])])[0])

        agg = n("b", final_prompt, 6)
        passes += n("a", p, 4) + n("b", p, 4) + n("b", layer2_prompt, 4) + n("a", layer2_prompt, 4) + agg
        base += agg
    cost = lm.meter.figures(models=2)
    assert cost["calls"] == 5.0 and cost["models"] == 2.0
    assert cost["passes"] == pytest.approx(passes / base) and cost["read"] == pytest.approx(passes / base)
    with pytest.raises(EvalError, match="generation tasks only"):
        lm.loglik([("a", "b")])


def test_moa_with_a_remote_agent_on_a_local_openai_server(agents, tmp_path):
    model_b, tok = load_model(agents["b"])
    with ModelServer(model_b, tok, name="bee") as srv:
        recipe = parse_fusion({"method": "moa", "moa": {
            "agents": {"loc": {"model": agents["a"], "api": "chat"},
                       "rem": {"model": "bee", "endpoint": srv.url, "api": "chat", "relative_size": 2}},
            "layers": [["loc", "rem"]], "aggregator": "rem", "max_tokens": 5}})
        sources = load_sources(recipe)
        suite_dir = tmp_path / "s"
        suite_dir.mkdir()
        (suite_dir / "g.s.jsonl").write_text("".join(f'{{"prompt": "{p}", "answer": "x"}}\n' for p in PROMPTS))
        (suite_dir / "g.h.jsonl").write_text('{"prompt": "q:1=", "answer": "x"}\n')
        (suite_dir / "s.yaml").write_text("name: g\ntasks:\n  - {name: g, kind: generate, max_new_tokens: 6, "
                                          "until: ['z'], data: {search: g.s.jsonl, held-out: g.h.jsonl}}\n")
        from evomerge.evaluate import load_suite

        backend = FusionBackend()
        res, cost = score_suite(sources, backend, load_suite(suite_dir / "s.yaml"), "search")
        assert srv.requests == 2 * len(PROMPTS)  # rem is a proposer and the aggregator
        got = backend.lm(sources).generate(PROMPTS, 6, ("z",))
        # by hand: chat turns through the template, greedy decoding with the hf backend
        model_a = sources.models[agents["a"]]
        for q, p in enumerate(PROMPTS):
            def chat(model, msgs, limit):
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                return HFLM(model, tok, 8, None).generate([text], limit, ("z",))[0]

            refs = [chat(model_a, chat_messages(p), 5), chat(model_b, chat_messages(p), 5)]
            assert got[q] == chat(model_b, chat_messages(p, refs), 6), p
        assert res.tasks["g"].n == 3 and cost["calls"] == 3.0 and cost["models"] == 2.0
        assert cost["read"] > cost["passes"]  # the remote agent counts twice per pass
        # the completions API directly: the hf backend's answer and the server's token count
        ep = Endpoint(srv.url, "bee", api="completions")
        (text, n), = ep.complete([("r:abc=", 6, ["z"])])
        assert text == HFLM(model_b, tok, 8, None).generate(["r:abc="], 6, ("z",))[0]
        ids = [tok.bos_token_id] + tok.encode("r:abc=", add_special_tokens=False)
        assert n == len(HFLM(model_b, tok, 8, None).generate_tokens([(ids, 6, ["z"])])[0])
        with pytest.raises(EvalError, match=r"HTTP 404 the model 'other' does not exist"):
            Endpoint(srv.url, "other").complete([([{"role": "user", "content": "x"}], 2, [])])
        with pytest.raises(EvalError, match="temperature must be 0"):
            ep.complete([("x", 2, [])], temperature=0.5)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EvalError, match=r"cannot reach http://127.0.0.1:\d+/v1/chat/completions.*start the server"):
        Endpoint(f"http://127.0.0.1:{port}/v1", "bee", timeout=5).complete([([{"role": "user", "content": "x"}], 2, [])])


def test_local_chat_agent_needs_a_chat_template(tmp_path):
    model, tok = tiny_model(6)
    ref = save(model, tok, Path(tmp_path) / "plain")
    recipe = parse_fusion({"method": "moa", "models": [ref]})
    lm = FusionBackend().lm(load_sources(recipe))
    with pytest.raises(EvalError, match="has no chat template.*api: completions"):
        lm.generate(["a"], 2, ())
