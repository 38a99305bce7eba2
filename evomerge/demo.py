"""The main job (`make demo`): a merge search on the shipped demo zoo.

Until the search driver is wired in, this builds a tiny model family locally, merges it with TIES
through the full `evomerge merge` path, and loads the result with transformers to generate.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evomerge.cli import main as cli_main


def main() -> int:
    from evomerge.recipe import dump_recipe, parse_recipe
    from evomerge.tiny import build_tiny_family

    root = Path("results/demo-merge")
    fam = build_tiny_family(root / "family", arch="llama", n_experts=3, noise=0.05, overwrite=True)
    recipe = parse_recipe({"method": "ties", "base": str(fam["base"]),
                           "sources": [{"model": str(fam[f"expert{i}"]), "params": {"weight": 1 / 3, "density": 0.5}}
                                       for i in (1, 2, 3)]})
    path = dump_recipe(recipe, root / "recipe.yaml")
    code = cli_main(["merge", str(path), str(root / "merged"), "--overwrite"])
    if code:
        return code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "merged")
    tok = AutoTokenizer.from_pretrained(root / "merged")
    ids = tok("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"merged model at {root / 'merged'} generates {out.shape[1] - ids.shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
