"""Everything a run checks before it creates or changes anything, every problem reported at once.

:func:`check_space` loads a space file and checks, besides the file itself, the evaluator it asks
for (the objectives against the metrics it reports, its suite files, a local CUDA device), the
sampler built as the run will build it (or pycma's options and dimensions), and the sources
(:func:`source_problems`: their tensors, shapes and vocabularies must fit together, read from the
headers). :func:`option_problems` checks the run options (named as the command-line flags).
``start_search``, ``resume_search`` and ``rescore_study`` (:mod:`evomerge.search.driver`) call
these before a study folder, storage or ``study.json`` is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, EvomergeError, Problem
from evomerge.search import dims as D
from evomerge.search.dfs import DFSSpace
from evomerge.evaluate.evaluators import Evaluator, check_device, make_evaluator
from evomerge.search.objectives import COSTS, ModelSize, model_size, study_directions
from evomerge.search.optimizers import make_sampler, pycma_option_problem, pycma_options
from evomerge.search.paths import PS_WINNER
from evomerge.search.space import SearchSpace, SpaceParts, load_space


def option_problems(*, trials: Any = None, workers: Any = None, limit: Any = None,
                    timeout: Any = None) -> list[Problem]:
    """Problems of the run options (named as the command-line flags that set them)."""
    problems: list[Problem] = []

    def whole(value: Any, flag: str, hint: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(Problem(flag, f"expected a whole number >= 1, got {value!r}", hint))

    whole(trials, "--trials", "the total trial budget; leave it out to use the space's budget.trials")
    whole(workers, "--workers", "candidates scored at once: 1 (in this process) or more (Ray workers)")
    whole(limit, "--limit", "items scored per task; leave it out to score every item")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        problems.append(Problem("--timeout", f"expected a positive duration, got {timeout!r}",
                                "e.g. 8h, 1h30m, 45m, 90s; leave it out for no time limit"))
    return problems


def check_options(**options: Any) -> None:
    problems = option_problems(**options)
    if problems:
        raise ConfigError(problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.where, p.message) not in seen:
            seen.add((p.where, p.message))
            out.append(p)
    return out


def _located(problems: list[Problem], source: str) -> list[Problem]:
    """``problems`` located in ``source`` (those that do not name a file yet)."""
    return [p if p.where.startswith(source) or "/" in p.where.split(":")[0] else
            Problem(f"{source}: {p.where}", p.message, p.hint) for p in problems]


def _optimizer_problems(parts: SpaceParts) -> list[Problem]:
    """The sampler built as the run will build it (Optuna), or pycma's options and dimensions checked."""
    cfg, src = parts.optimizer, parts.source
    n_obj = len(study_directions(list(parts.objectives)))
    problems: list[Problem] = []
    if not cfg.is_pycma:
        if cfg.name == "cmaes" and n_obj > 1:
            return []  # the file check says so already
        try:
            make_sampler(cfg, n_objectives=n_obj)
        except ConfigError as err:
            problems += _located(err.problems, src)
        except Exception as err:  # noqa: BLE001 - any sampler failure is a problem of the file
            problems.append(Problem(f"{src}: optimizer", f"cannot build the sampler {cfg.name}: "
                                    f"{type(err).__name__}: {err}"))
        return problems
    if n_obj > 1:
        return []  # the file check says so already
    import warnings

    import cma

    bad = pycma_option_problem(cfg, f"{src}: optimizer.options")
    if bad is not None:
        return [bad]
    for stage, stage_space in parts.stage_spaces().items():
        dims = stage_space.dims()
        if len(dims) < 2:
            problems.append(Problem(f"{src}: optimizer.name", f"pycma needs at least 2 search dimensions, the "
                                    f"{stage} stage has {len(dims)}", "search more parameters, or use tpe / random"))
            continue
        opts = pycma_options(cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                strategy = cma.CMAEvolutionStrategy(D.encode(dims, stage_space.default_params()), cfg.sigma0, opts)
                strategy.ask()
                error = None
            except Exception as err:  # noqa: BLE001 - pycma raises many kinds for bad option values
                error = f"{type(err).__name__}: {err}"
        # pycma only warns about an option value it cannot read ("... is not a safe string")
        said = list(dict.fromkeys(str(w.message).split(" (known words")[0] for w in caught
                                  if "cma" in (w.filename or "") and issubclass(w.category, UserWarning)))
        if error or said:
            problems.append(Problem(f"{src}: optimizer.options", f"pycma cannot use the options {cfg.options}: "
                                    + "; ".join(([error] if error else []) + said[:3]),
                                    "check the option values (numbers, True / False)"))
            break
    return problems


def _space_checks(evaluator_factory: Callable[[], Evaluator] | None, probes: list[Evaluator], *,
                  local: bool, opened: dict[str, Any] | None = None) -> Callable[[SpaceParts], list[Problem]]:
    """The checks of a space beyond its file (see :func:`check_space`); a built evaluator goes to ``probes``."""

    def checks(parts: SpaceParts) -> list[Problem]:
        src = parts.source
        problems: list[Problem] = []
        if parts.evaluation is not None:
            probe = None
            try:
                probe = evaluator_factory() if evaluator_factory else make_evaluator(
                    parts.evaluation, source=f"{src}: evaluation")
            except ConfigError as err:
                problems += _located(err.problems, src)
            except EvomergeError as err:
                problems.append(Problem(f"{src}: evaluation", str(err)))
            except Exception as err:  # noqa: BLE001 - a third-party evaluator may raise anything
                problems.append(Problem(f"{src}: evaluation", f"cannot build the evaluator: "
                                        f"{type(err).__name__}: {err}"))
            if probe is not None:
                probes.append(probe)
                try:
                    names = set(probe.metric_names())
                except Exception as err:  # noqa: BLE001
                    names = set()
                    problems.append(Problem(f"{src}: evaluation", f"the evaluator cannot list its metrics: "
                                            f"{type(err).__name__}: {err}"))
                for i, o in enumerate(parts.objectives):
                    if o.kind == "metric" and names and o.key not in names:
                        problems.append(Problem(f"{src}: objectives[{i}].metric", f"unknown objective metric "
                                                f"'{o.key}'", f"the evaluator reports: {', '.join(sorted(names))}; "
                                                f"costs: {', '.join(COSTS)}"))
            if local and evaluator_factory is None and "device" in parts.evaluation:
                problems += check_device(parts.evaluation["device"], f"{src}: evaluation.device", local=True)
        if parts.optimizer is not None and parts.objectives:
            problems += _optimizer_problems(parts)
        problems += source_problems(parts, opened)
        return _dedupe(problems)

    return checks


def check_space(path: str | Path, *, evaluator_factory: Callable[[], Evaluator] | None = None,
                base_dirs: list[Path] | None = None, local: bool = True) -> tuple[SearchSpace, Evaluator]:
    """Load ``path`` and check everything a run needs, every problem reported at once (one
    :class:`ConfigError`): the file, the evaluator it asks for and the objectives against the metrics
    it reports, the sampler and its options, and the sources' compatibility. Returns the space and
    the evaluator built to check it (the run's first evaluator). ``local``: candidates are scored in
    this process (a CUDA device asked for must be here)."""
    from evomerge.checkpoint import Checkpoint

    probes: list[Evaluator] = []
    opened: dict[str, Checkpoint] = {}  # each source opened once: for its size, then its tensors

    def sizes(ref: str) -> ModelSize:
        if ref not in opened:
            opened[ref] = Checkpoint.open(ref)
        return model_size(ref, opened[ref])

    space = load_space(path, base_dirs=base_dirs, sizes=sizes,
                       checks=_space_checks(evaluator_factory, probes, local=local, opened=opened))
    return space, probes[0]


# ------------------------------------------------------------------------------------- sources


_COMPAT_HINT = ("merge only models of one architecture and size (e.g. fine-tunes of one base): remove or "
                "replace the model that differs")


def source_problems(parts: SpaceParts, opened: dict[str, Any] | None = None) -> list[Problem]:
    """Every stage's models checked against each other from their headers (no weights read): a PS
    stage's base and sources must share architecture, tensor names and shapes and vocabulary; a DFS
    stage's models must have layers of the embed model's tensor names and shapes, and the embed and
    head models one vocabulary. Each problem names the models and the tensor. ``opened``: checkpoints
    already open, by reference (those opened here are added)."""
    from evomerge.checkpoint import Checkpoint, check_compatible

    problems: list[Problem] = []
    opened = {} if opened is None else opened

    def open_model(ref: str, where: str) -> Checkpoint | None:
        if ref not in opened:
            try:
                opened[ref] = Checkpoint.open(ref)
            except EvomergeError as err:
                problems.append(Problem(f"{parts.source}: {where}", f"cannot open model {ref}: {err}"))
                return None
        return opened[ref]

    ps = parts.ps
    if ps is not None:
        models: dict[str, Checkpoint] = {}
        for label, ref, where in ([(f"base ({ps.base})", ps.base, "ps.base")] if ps.base else []) + [
                (f"{name} ({ref})", ref, "ps.sources") for name, ref in ps.sources]:
            checkpoint = open_model(ref, where)
            if checkpoint is not None:
                models[label] = checkpoint
        try:
            check_compatible(models)
        except EvomergeError as err:
            lines = [ln[4:] for ln in str(err).splitlines() if ln.startswith("  - ")]
            by_model: dict[str, list[str]] = {}
            for line in lines:
                label = next((m for m in models if line.startswith(m + ": ")), "")
                by_model.setdefault(label, []).append(line[len(label) + 2:] if label else line)
            first = next(iter(models), "")
            for label, details in by_model.items() or {"": [str(err)]}.items():
                problems.append(Problem(f"{parts.source}: ps.sources", _mismatch(label, first, details), _COMPAT_HINT))
    dfs = parts.dfs
    if dfs is not None:
        stand_in = (ps.base or ps.sources[0][1]) if ps is not None else None  # the PS winner's shape
        checkpoints: list[tuple[str, Checkpoint]] = []
        for name, ref in dfs.models:
            real = stand_in if ref == PS_WINNER else ref
            checkpoint = open_model(real, "dfs.models") if real is not None else None
            label = f"{name} ({ref})" if ref != PS_WINNER else f"{name} (the PS winner, shaped like {real})"
            checkpoints.append((label, checkpoint))
        if all(model is not None for _, model in checkpoints):
            problems += _dfs_problems(parts.source, dfs, checkpoints)
    return problems


def _mismatch(label: str, ref_label: str, details: list[str], shown: int = 4) -> str:
    """One message per model that does not fit: its first differences, and how many more."""
    # check_compatible's "... and N more tensor differences" line counts in the total
    more = 0
    kept = []
    for d in details:
        if d.startswith("... and ") and d.split()[2].isdigit():
            more += int(d.split()[2])
        else:
            kept.append(d)
    text = "; ".join(kept[:shown])
    more += max(len(kept) - shown, 0)
    if more:
        text += f"; and {more} more difference(s)"
    head = f"model {label} does not fit {ref_label}" if label else "the models do not fit together"
    return f"{head}: {text}"


def _layer_map(checkpoint, layer: int) -> dict[str, tuple[int, ...]]:
    from evomerge.checkpoint import split_layer_name

    out = {}
    for n in checkpoint.names:
        parts = split_layer_name(n)
        if parts is not None and parts[1] == layer:
            out[parts[2]] = tuple(checkpoint.shape(n))
    return out


def _dfs_problems(source: str, dfs: DFSSpace, checkpoints: list[tuple[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []
    where = f"{source}: dfs.models"
    embed_label, embed = checkpoints[dfs.embed]
    head_label, head = checkpoints[dfs.head]
    ref = _layer_map(embed, 0)
    for label, checkpoint in checkpoints:
        mine: list[str] = []
        for layer in range(checkpoint.num_layers):
            got = _layer_map(checkpoint, layer)
            for suffix in sorted(set(got) | set(ref)):
                if suffix not in ref:
                    mine.append(f"its layer {layer} has tensor '{suffix}', they do not")
                elif suffix not in got:
                    mine.append(f"its layer {layer} lacks tensor '{suffix}'")
                elif got[suffix] != ref[suffix]:
                    mine.append(f"layer {layer} tensor '{suffix}' has shape {list(got[suffix])}, theirs "
                                f"{list(ref[suffix])}")
            if mine:
                break  # the first layer that differs says enough
        if mine:
            problems.append(Problem(where, _mismatch(label, f"the layers of {embed_label} (the embed model)", mine),
                                    _COMPAT_HINT))
    if head is not embed and head.vocab_size != embed.vocab_size:
        problems.append(Problem(f"{source}: dfs.head", f"vocabularies differ: {embed_label} (embed) has "
                                f"{embed.vocab_size} tokens, {head_label} (head) has {head.vocab_size}",
                                "use embed and head models with one tokenizer"))
    return problems
