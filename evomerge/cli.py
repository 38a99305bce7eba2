"""The `evomerge` command: thin wrappers over library functions.

Every :class:`~evomerge.errors.EvomergeError` is printed as ``error: ...`` and exits with status 2;
Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time

from evomerge.dtypes import DTYPE_NAMES
from evomerge.errors import EvomergeError
from evomerge.splits import SEARCH, SPLITS


def _weight(text: str) -> float:
    """A ``--weights`` value: a model folder after ``--weights`` would otherwise read as a bad number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (fix: give the model folders before "
                                         f"--weights, e.g. evomerge eval A B C --ensemble logit --weights 0.5 0.3 0.2)")


def _device(name: str) -> str:
    """``--device`` checked against this machine (cpu, cuda, cuda:N, mps); ConfigError otherwise."""
    from evomerge.checkpoint import check_device

    return check_device(name, "--device")


# ------------------------------------------------------------------------- argument types
# Each raises argparse.ArgumentTypeError: argparse then prints "argument --flag: <message>" with the
# usage line and exits with status 2, before any work.

_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(:\d+)?", re.IGNORECASE)


def device_arg(text: str) -> str:
    """A device name's syntax (cpu, cuda, cuda:N, mps); availability is checked when the command runs."""
    if not _DEVICE_RE.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N (N a GPU index) or mps")
    return text.strip().lower()


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def size_arg(text: str) -> str:
    """A size like 5GB, 500MB or 2GiB (checked here, parsed again where used)."""
    from evomerge.checkpoint import SIZE_HINT, parse_size
    from evomerge.errors import ConfigError

    try:
        parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"{err.problems[0].message}; {SIZE_HINT}") from None
    return text


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.checkpoint import check_output_path
    from evomerge.materialize import merge_to_disk
    from evomerge.loader import load_recipe

    device = _device(args.device)
    out = check_output_path(args.out, overwrite=args.overwrite)  # before any work, with CLI wording
    recipe = load_recipe(args.recipe)
    start = time.perf_counter()
    path = merge_to_disk(recipe, out, device=device, dtype=args.dtype,
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

    command = sub.add_parser("merge", help="materialize a recipe (evomerge or mergekit YAML) as a checkpoint")
    command.add_argument("recipe", help="recipe YAML (evomerge format, or a mergekit config)")
    command.add_argument("out", help="output folder (refused if it exists, unless --overwrite)")
    command.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    command.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                         help="output dtype (default: the recipe's, else the base model's)")
    command.add_argument("--shard-size", type=size_arg, default="5GB",
                         help="largest shard file, e.g. 2GB, 500MB (default 5GB)")
    command.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    command.set_defaults(func=cmd_merge)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from evomerge.evaluate.cli import eval_command

    if args.ensemble or args.fusion_recipe:  # a fused candidate (evomerge.fusion)
        from evomerge.fusion.cli import ensemble_eval_command

        return ensemble_eval_command(args.model, args.suite, args.ensemble, weights=args.weights, judge=args.judge,
                                     normalize=args.normalize, moa_config=args.moa_config,
                                     recipe_path=args.fusion_recipe, split=args.split, limit=args.limit,
                                     device=_device(args.device), batch_size=args.batch_size, backend=args.backend,
                                     vllm_options=args.vllm_option)
    fusion_only = [flag for flag, value in (("--weights", args.weights), ("--judge", args.judge),
                                            ("--normalize", args.normalize), ("--moa-config", args.moa_config)) if value]
    if fusion_only:
        print(f"error: {', '.join(fusion_only)}: for ensembles only (fix: add --ensemble logit|panel|moa)", file=sys.stderr)
        return 2
    if len(args.model) != 1:
        print(f"error: evomerge eval scores one model folder, got {len(args.model)} (fix: give one folder, or fuse "
              f"several with --ensemble logit|panel|moa)", file=sys.stderr)
        return 2
    return eval_command(args.model[0], args.suite, split=args.split, limit=args.limit, device=_device(args.device),
                        batch_size=args.batch_size, backend=args.backend, vllm_options=args.vllm_option)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo import ZooConfig, build_zoo

    start = time.perf_counter()
    build_zoo(args.out, args.data, ZooConfig(threads=args.threads))
    print(f"built the zoo in {args.out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _register_eval(sub) -> None:
    command = sub.add_parser("eval", help="score a checkpoint on task suites and print a table")
    command.add_argument("model", nargs="*", help="model folder (HF checkpoint with tokenizer); with --ensemble, the "
                                                  "models to fuse")
    command.add_argument("--suite", action="append", required=True, help="suite YAML (repeatable)")
    command.add_argument("--split", choices=SPLITS, default=SEARCH)
    command.add_argument("--limit", type=positive_int, default=None,
                         help="score a seeded subsample of this many items per task")
    command.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    command.add_argument("--batch-size", type=positive_int, default=64)
    command.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                         help="hf: the transformers model in this process (default); vllm: a vLLM engine (the vllm extra)")
    command.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                         help="a vLLM engine option, e.g. kv_cache_gb=2 or tensor_parallel_size=2 (repeatable)")
    fusion = command.add_argument_group("ensembles (run the models together instead of merging: docs/fusion.md)")
    fusion.add_argument("--ensemble", choices=["logit", "panel", "moa"], default=None,
                        help="logit: pooled next-token log-probabilities; panel: every model answers, the most "
                             "likely answer wins; moa: Mixture-of-Agents (with --moa-config)")
    fusion.add_argument("--weights", type=_weight, nargs="+", default=None, metavar="W",
                        help="logit: one weight per model (normalised; default equal)")
    fusion.add_argument("--judge", default=None, metavar="MODEL", help="panel: rank the answers by this model")
    fusion.add_argument("--normalize", action="store_true", help="panel: rank by per-token log-likelihood")
    fusion.add_argument("--moa-config", default=None, metavar="FILE",
                        help="moa: agents (local folders or OpenAI-compatible endpoints), layers, aggregator")
    fusion.add_argument("--fusion-recipe", default=None, metavar="FILE",
                        help="a kind: fusion recipe YAML instead of the models and flags")
    command.set_defaults(func=cmd_eval)
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
    """Run one command; returns the exit status: 0, 2 for bad input or a failed command (one
    ``error: ...`` line, no traceback), 130 on Ctrl-C, an error's own ``exit_code`` (3: a search
    stopped by a fault). Usage errors and ``--help`` return argparse's status instead of exiting."""
    import warnings

    # warnings meant for users (e.g. a mergekit key mergekit ignores) as one line each, no source line
    warnings.showwarning = lambda message, category, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: usage error (2, message already printed) or --help (0)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    command = " ".join(["evomerge", args.command] + [str(v) for k, v in sorted(vars(args).items())
                                                      if k.endswith("_command") and isinstance(v, str)])
    try:
        return int(args.func(args) or 0)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # a file operation no specific check foresaw: say which file and how to fix it
        if err.errno == errno.EPIPE:
            return 2  # the reader of stdout went away; nothing useful to print
        from evomerge.checkpoint import describe_os_error

        what = f"`{command}` failed on" if err.filename is not None else f"`{command}` failed"
        print(f"error: {describe_os_error(err, what)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: `{command}` ran out of memory (fix: free memory or use a machine with more; for eval, "
              f"pass a smaller --batch-size)", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # torch.OutOfMemoryError (a GPU's memory), or the CPU allocator's failure
        if type(err).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(err):
            raise
        print(f"error: `{command}` ran out of memory ({' '.join(str(err).split())[:200]}) (fix: free memory, use "
              f"a device with more, or for eval a smaller --batch-size)", file=sys.stderr)
        return 2


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
