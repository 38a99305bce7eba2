"""Tiny model builders: real transformers checkpoints that load, tokenize and generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import INDEX_FILE, Checkpoint, check_compatible
from evomerge.errors import ConfigError
from evomerge.tiny import build_tiny_family, build_tiny_model, tokenizer_size


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_each_arch_loads_and_generates(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch=arch, num_layers=2, tie_word_embeddings=arch == "qwen2",
                            max_shard_size="50KB" if arch == "mistral" else None)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    text = "Hello, world!\n  tabs\tand é"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids.input_ids[0]) == text  # byte-level: lossless for any class transformers picks
    assert tok.eos_token_id == model.config.eos_token_id and tok.pad_token_id == model.config.pad_token_id
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.input_ids.shape[1] + 4
    ck = Checkpoint.open(path)
    assert ck.vocab_size == tokenizer_size() == len(tok)
    state = model.state_dict()
    for name in ck.names:  # what transformers loaded is what the files hold
        assert torch.equal(state[name], ck.read(name)), name
    if arch == "mistral":
        assert (path / INDEX_FILE).exists()
    if arch == "qwen2":
        assert "lm_head.weight" not in ck.names and torch.equal(state["lm_head.weight"], ck.read("lm_head.weight"))
        assert any(n.endswith("q_proj.bias") for n in ck.names)


def test_deterministic_and_seeded(tmp_path):
    a = Checkpoint.open(build_tiny_model(tmp_path / "a", num_layers=1, seed=3))
    b = Checkpoint.open(build_tiny_model(tmp_path / "b", num_layers=1, seed=3))
    c = Checkpoint.open(build_tiny_model(tmp_path / "c", num_layers=1, seed=4))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.read(name), b.read(name)) and not torch.equal(a.read(name), c.read(name))
    assert abs(a.read(name).std().item() - 0.02) < 0.003  # transformers' initializer_range


def test_family_shares_base_with_requested_noise(tmp_path):
    fam = build_tiny_family(tmp_path / "fam", arch="llama", n_experts=2, noise=0.05, seed=1, num_layers=2,
                            dtype=torch.bfloat16, max_shard_size="100KB")
    assert set(fam) == {"base", "expert1", "expert2"}
    cks = {k: Checkpoint.open(p) for k, p in fam.items()}
    check_compatible(cks)
    base = cks["base"]
    assert all(ck.config == base.config for ck in cks.values())
    assert (fam["expert1"] / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    name = "model.layers.1.mlp.up_proj.weight"
    b = base.read(name).float()
    d1 = cks["expert1"].read(name).float() - b
    d2 = cks["expert2"].read(name).float() - b
    assert cks["expert1"].dtype(name) == torch.bfloat16
    assert 0.04 < (d1.std() / b.std()).item() < 0.06  # noise * std(base), up to bf16 rounding
    assert abs(torch.corrcoef(torch.stack([d1.flatten(), d2.flatten()]))[0, 1].item()) < 0.1  # independent
    norm = "model.layers.0.input_layernorm.weight"  # std 0 (all ones): noise relative to its RMS
    assert 0.02 < (cks["expert1"].read(norm).float() - 1).std().item() < 0.08
    meta = json.loads(json.dumps(base.config))
    assert meta["architectures"] == ["LlamaForCausalLM"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown tiny-model architecture 'gpt9'"):
        build_tiny_model(tmp_path / "x", arch="gpt9")
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tiny_model(tmp_path / "x", vocab_size=10)
    with pytest.raises(ConfigError, match="divide"):
        build_tiny_model(tmp_path / "x", hidden_size=30, num_attention_heads=4)
    assert not (tmp_path / "x").exists()
