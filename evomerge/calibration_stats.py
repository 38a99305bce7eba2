"""The statistics of the data-aware merges, computed by running one model on the calibration texts
(float32, on the given device; :mod:`evomerge.calibration` caches the results).

* :func:`input_grams` (RegMean, Jin et al. 2023): for every linear layer (``torch.nn.Linear``,
  the output head included), the Gram matrix of its inputs ``G = X^T X / N`` over the ``N``
  non-padding token positions of the texts (accumulated in float64, stored float32). Layers called
  one after the other on the same input tensor (the q/k/v projections, the gate and up projections)
  share one matrix: the later ones are recorded as aliases of the first.
* :func:`fisher_diagonal` (Fisher merging, Matena & Raffel 2022): for every parameter, the mean over
  texts of the squared gradient of the text's log-likelihood, ``F = 1/T sum_t (d/dtheta sum_i log
  p(y_i | x_<i))^2``, one text per backward pass (per-example gradients). Labels ``y``: sampled
  from the model's own prediction at each position (``sampled``: the Fisher information itself;
  seeded per text) or the text's next tokens (``data``: the empirical Fisher).
"""

from __future__ import annotations

import torch

GRAM_BATCH = 8


def _load(path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.eval()
    return model, tok


def _encode(tok, texts: list[str], max_length: int) -> list[list[int]]:
    ids = [tok(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return [x for x in ids if len(x) >= 2]


def input_grams(path, texts: list[str], *, max_length: int, device: str = "cpu"
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """``({weight name: G}, {weight name: weight name it shares G with}, token count)``."""
    model, tok = _load(path, device)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    acc: dict[str, torch.Tensor] = {}
    state = {"prev": None, "prev_name": None, "order": [], "mask": None}
    aliases: dict[str, str] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            owner = state["prev_name"] if x is state["prev"] else name
            state["order"].append((name, owner))
            state["prev"], state["prev_name"] = x, owner
            if owner != name:
                return
            flat = x.reshape(-1, x.shape[-1])
            if flat.shape[0] == state["mask"].numel():  # token positions: padding left out
                flat = flat[state["mask"]]
            flat = flat.double()
            g = flat.T @ flat
            acc[name] = g if name not in acc else acc[name] + g
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    encoded = _encode(tok, texts, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    tokens = 0
    pattern = None
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), GRAM_BATCH):
                batch = encoded[start:start + GRAM_BATCH]
                width = max(len(x) for x in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for i, x in enumerate(batch):
                    ids[i, :len(x)] = torch.tensor(x)
                    mask[i, :len(x)] = True
                state.update(prev=None, prev_name=None, order=[], mask=mask.reshape(-1).to(device))
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
                if pattern is None:
                    pattern = list(state["order"])
                elif state["order"] != pattern:
                    raise RuntimeError("the layers shared their inputs differently between batches")
                tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    for name, owner in pattern or []:
        if owner != name:
            aliases[f"{name}.weight"] = f"{owner}.weight"
    grams = {f"{n}.weight": (g / max(tokens, 1)).float().cpu() for n, g in acc.items()}
    return grams, aliases, tokens


def fisher_diagonal(path, texts: list[str], *, max_length: int, labels: str = "sampled", seed: int = 0,
                    device: str = "cpu") -> tuple[dict[str, torch.Tensor], int]:
    """``({parameter name: diagonal Fisher}, token count)``; parameter names as the model's files
    store them (a tied output head is the embedding)."""
    model, tok = _load(path, device)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    encoded = _encode(tok, texts, max_length)
    tokens = 0
    for k, x in enumerate(encoded):
        ids = torch.tensor([x], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        if labels == "sampled":
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + k)
            y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).view(-1).to(device)
        else:
            y = ids[0, 1:]
        logp.gather(1, y.view(-1, 1)).sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.double() ** 2
        tokens += len(x) - 1
    n = max(len(encoded), 1)
    return {name: (f / n).float().cpu() for name, f in fisher.items()}, tokens
