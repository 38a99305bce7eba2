"""``evomerge eval MODEL_DIR --suite S.yaml [--split held-out] [--limit N]``: load, score, print a table."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.checkpoint import TOKENIZER_CORE, Checkpoint, check_device, has_tokenizer
from evomerge.errors import CheckpointError, EvalError, EvomergeError
from evomerge.evaluate.engine import Scorer, SuiteResult
from evomerge.suites import load_suite


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | str = "auto"):
    """(model, tokenizer) from a model folder (or hub id), through the same checks as a merge's sources.

    The folder is opened with :meth:`Checkpoint.open` (config, safetensors headers: a missing,
    truncated, corrupt or pickle-only checkpoint is a :class:`CheckpointError`) and checked with
    :meth:`Checkpoint.verify` (tensors against the config); transformers then loads the safetensors
    only, and any tensor it reports missing, unexpected or mismatched is refused rather than scored
    as random weights. :class:`EvalError` when there is no usable tokenizer.

    ``dtype="auto"`` computes in the checkpoint's stored dtype: exactly what a search scored when it
    materialized that recipe in memory, so `evomerge eval` of an exported merge reproduces its score.
    """
    device = check_device(device)
    checkpoint = Checkpoint.open(model_dir)
    try:
        checkpoint.verify()
    finally:
        checkpoint.close()
    model_path = checkpoint.path
    name = str(model_dir)
    if not has_tokenizer(model_path):
        made_here = (model_path / "recipe.yaml").is_file()
        raise EvalError(
            f"{name} has no tokenizer (expected {', '.join(TOKENIZER_CORE)} in {model_path}), so it cannot be scored"
            + ("; it was written by `evomerge merge` from a model without one" if made_here else "")
            + " (fix: copy the tokenizer files of the model it came from into the folder"
            + (", or set the recipe's `tokenizer:` key to a model with a tokenizer and merge again)"
               if made_here else ")"))
    tok = _load_tokenizer(model_path, name)
    model = _load_weights(model_path, name, dtype)
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0] if embeddings is not None else None
    if rows is not None and len(tok) > rows:
        raise EvalError(f"{name}: the tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows, so "
                        f"token ids >= {rows} have no embedding (fix: use the tokenizer of the model the weights "
                        f"come from)")
    try:
        model = model.to(device).eval()
    except torch.OutOfMemoryError as e:
        raise EvalError(f"{name}: not enough memory on {device} for the model "
                        f"({sum(p.numel() * p.element_size() for p in model.parameters())} bytes) "
                        f"(fix: use another device or a smaller dtype)") from e
    return model, tok


@contextmanager
def _quiet_transformers():
    """transformers' own load report and warnings off while loading (evomerge reports problems itself)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _short(err: BaseException, n: int = 400) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:n]}{'...' if len(text) > n else ''}"


def _load_tokenizer(model_path: Path, name: str):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # any failure of the tokenizer files becomes one message
        raise EvalError(f"{name}: cannot load the tokenizer in {model_path} ({_short(e)}) (fix: restore the tokenizer "
                        f"files from the model it came from)") from e


def _load_weights(model_path: Path, name: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True,
                                                               output_loading_info=True)
    except MemoryError as e:
        raise EvalError(f"{name}: not enough memory to load the model (fix: free memory, or use a machine "
                        f"with more)") from e
    except Exception as e:  # transformers raises many types; each becomes one message
        raise CheckpointError(f"{name}: transformers cannot load the model in {model_path} ({_short(e)}) (fix: check "
                              f"config.json against the weights, or re-export the model with save_pretrained)") from e
    problems = []
    for key, what in (("missing_keys", "missing from the files (transformers would fill it with random values)"),
                      ("unexpected_keys", "in the files but not part of the model config.json describes"),
                      ("mismatched_keys", "of a shape other than config.json implies")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or []))
        if names:
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    problems += [f"load error: {m}" for m in (info.get("error_msgs") or [])][:3]
    if problems:
        raise CheckpointError(f"{name}: refusing to score the model in {model_path}, its weights do not match its "
                              f"config.json:\n" + "\n".join(f"  - {p}" for p in problems)
                              + "\n  (fix: re-download or re-export the model; its files are damaged or "
                                "come from another model)")
    return model


def format_results(results: list[SuiteResult], title: str = "") -> str:
    rows = [("suite", "task", "metric", "score", "± se", "n")]
    for r in results:
        for t in r.tasks.values():
            rows.append((r.suite, t.name, t.primary, f"{t.score:.4f}", f"{t.stderr:.4f}", str(t.n)))
        rows.append((r.suite, "combined", "mean", f"{r.combined:.4f}", f"{r.combined_stderr:.4f}", str(r.n)))
    w = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [title] if title else []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def parse_vllm_options(pairs: list[str] | dict | None) -> dict:
    """``["kv_cache_gb=2", ...]`` (``--vllm-option``) as a mapping, values read as YAML scalars."""
    import yaml

    if pairs is None or isinstance(pairs, dict):
        return dict(pairs or {})
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EvalError(f"--vllm-option {pair!r} is not KEY=VALUE (e.g. --vllm-option kv_cache_gb=2)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _flag(where: str) -> str:
    """A backend problem's location as the ``evomerge eval`` flag that set it."""
    if where == "vllm":
        return "--vllm-option"
    return "--vllm-option " + where[len("vllm."):] if where.startswith("vllm.") else where


def scoring_options(limit: int | None, batch_size: int | None, backend: str,
                    vllm_options: list[str] | dict | None) -> dict:
    """The checked backend options of an ``evomerge eval`` run; EvalError naming the flag otherwise."""
    from evomerge.evaluate.backends import backend_problems

    for flag, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EvalError(f"{flag} must be a whole number >= 1, got {value!r}")
    options = parse_vllm_options(vllm_options)
    problems = backend_problems(backend, options or None, "--backend")
    if problems:
        raise EvalError("; ".join(f"{_flag(p.where)}: {p.message}"
                                  + (f" (fix: {p.hint})" if p.hint else "") for p in problems))
    return options


def eval_command(model_dir: str, suite_paths: list[str], split: str = "search", limit: int | None = None,
                 device: str = "cpu", batch_size: int = 64, out=None, backend: str = "hf",
                 vllm_options: list[str] | dict | None = None) -> int:
    """What ``evomerge eval`` runs. Returns the exit status (2 on any EvomergeError, message on stderr)."""
    from evomerge.evaluate.backends import make_backend

    scoring = None
    try:
        options = scoring_options(limit, batch_size, backend, vllm_options)
        suites = [load_suite(p) for p in suite_paths]
        model, tok = load_model(model_dir, device)
        scoring = make_backend(backend, options, device)
        try:
            results = [Scorer(s, split, limit=limit, batch_size=batch_size, backend=scoring).score(model, tok)
                       for s in suites]
        except torch.OutOfMemoryError as e:
            raise EvalError(f"{model_dir}: out of memory on {device} while scoring with --batch-size "
                            f"{batch_size} (fix: pass a smaller --batch-size)") from e
        except (RuntimeError, IndexError, ValueError) as e:
            raise EvalError(f"{model_dir}: scoring failed ({_short(e)}); the model's config.json or tokenizer "
                            f"may not fit its weights (fix: check them against the model it came from)") from e
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if scoring is not None:
            scoring.close()
    print(format_results(results, f"{model_dir} ({split} split)"), file=out or sys.stdout)
    return 0
