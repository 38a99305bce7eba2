"""Greedy generation of the hf backend: sequences leave the batch when they stop, the batch stops
when every sequence has, and the answers are those of one-sequence greedy decoding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from evomerge.evaluate.backends.hf import HFLM, generation_text, stopped

ZOO = Path(__file__).resolve().parents[1] / "evals" / "zoo"


@pytest.fixture(scope="module")
def zoo_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ZOO / "expert_arith"), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(ZOO / "expert_arith"))


def _one_by_one(model, tok, prompt: str, max_new: int, until: tuple[str, ...]) -> str:
    """Greedy decoding of one sequence, no cache, no padding: the reference."""
    ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == tok.eos_token_id or any(u in tok.decode(out, skip_special_tokens=True) for u in until):
            break
    return generation_text(tok, out, tok.eos_token_id, until)


@pytest.mark.slow
def test_rows_leave_the_batch_and_answers_match_one_by_one(zoo_lm):
    model, tok = zoo_lm
    rng = random.Random(0)
    prompts = [f"a:{rng.randint(1, 999)}+{rng.randint(1, 999)}=" for _ in range(7)]
    prompts += [f"r:{''.join(rng.choice('abcdefgh') for _ in range(rng.randint(2, 7)))}=" for _ in range(4)]
    lm = HFLM(model, tok, batch_size=32, device=None)
    max_new = 12
    got = lm.generate(prompts, max_new, ("\n", "|"))
    assert got == [_one_by_one(model, tok, p, max_new, ("\n", "|")) for p in prompts]
    # every row stopped before the limit here (the expert answers, then EOS or a stop string) and
    # the rows that stopped first were not decoded further
    assert lm.steps < max_new
    assert lm.row_steps < lm.steps * len(prompts)


def test_generation_stops_when_every_sequence_has_stopped(zoo_lm):
    model, tok = zoo_lm
    lm = HFLM(model, tok, batch_size=8, device=None)
    lm.generate(["a:12+34=", "a:5+7=", "a:100+200="], 30, ("\n",))
    assert lm.steps < 30


def test_stop_strings_found_in_the_newest_tokens_are_those_of_the_whole_text(zoo_lm):
    _, tok = zoo_lm
    rng = random.Random(1)
    alphabet = [tok.convert_tokens_to_ids(c) for c in "ab|:=0123"]
    for _ in range(300):
        until = tuple(rng.choice(["|", "ab", "a:b", "==", "0123"]) for _ in range(rng.randint(1, 2)))
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
        # as generation calls it: after each new token, until the first hit
        for k in range(1, len(ids) + 1):
            want = any(u in tok.decode(ids[:k], skip_special_tokens=True) for u in until)
            assert stopped(tok, ids[:k], until) == want
            if want:
                break
