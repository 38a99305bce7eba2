"""The `evomerge` command: thin wrappers over library functions.

Every :class:`~evomerge.errors.EvomergeError` is printed as ``error: ...`` and exits with status 2;
Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from evomerge.errors import EvomergeError


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    return name


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.materialize import merge_to_disk
    from evomerge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise EvomergeError(f"output folder {out} already exists; pass --overwrite to replace it "
                            "(the old folder is kept until the new one is complete)")
    start = time.perf_counter()
    path = merge_to_disk(recipe, out, device=_device(args.device), dtype=args.dtype,
                         shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    global _FAST_EXIT
    _FAST_EXIT = True  # the output is complete and renamed; nothing left to clean up
    return 0


# Set by commands whose work is fully on disk when they return (``merge``): the console entry point
# then skips the interpreter's teardown of torch and the freed tensors (0.2-0.5 s of a ~4 s merge).
# Commands that own processes or databases (search: Ray, optuna storages) never set it.
_FAST_EXIT = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="materialize a recipe (evomerge or mergekit YAML) as a checkpoint")
    p.add_argument("recipe", help="recipe YAML (evomerge format, or a mergekit config)")
    p.add_argument("out", help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype (default: the recipe's, else the base model's)")
    p.add_argument("--shard-size", default="5GB", help="largest shard file, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from evomerge.evaluate.cli import eval_command

    return eval_command(args.model, args.suite, split=args.split, limit=args.limit, device=_device(args.device),
                        batch_size=args.batch_size)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo import ZooConfig, build_zoo

    start = time.perf_counter()
    build_zoo(args.out, args.data, ZooConfig(threads=args.threads))
    print(f"built the zoo in {args.out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _register_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint on task suites and print a table")
    p.add_argument("model", help="model folder (HF checkpoint with tokenizer)")
    p.add_argument("--suite", action="append", required=True, help="suite YAML (repeatable)")
    p.add_argument("--split", choices=["search", "held-out"], default="search")
    p.add_argument("--limit", type=int, default=None, help="score a seeded subsample of this many items per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_eval)
    z = sub.add_parser("zoo", help="the demo model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="rebuild the demo zoo checkpoints and suite data (deterministic, CPU)")
    b.add_argument("--out", default="evals/zoo")
    b.add_argument("--data", default="evals/data")
    b.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the shipped zoo was built so; other counts give other weights)")
    b.set_defaults(func=cmd_zoo_build)


def _register_extra() -> list:
    from evomerge.search.cli import register as search_register

    return [_register_eval, search_register]


_EXTRA_COMMANDS: list = _register_extra()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console entry point: :func:`main`, then exit (fast where the command allows it)."""
    code = main()
    if _FAST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
