"""Calibration data and the per-source statistics of the data-aware merges (RegMean, Fisher).

A data-aware recipe names its data in ``calibration:`` (:class:`~evomerge.recipe_sections.CalibrationSpec`):
a suite's split (each item as its prompt followed by its gold continuation) or a JSONL field.
:func:`source_statistics` returns one source's statistics on those texts, computed once
(:mod:`evomerge.calibration_stats`) and cached on disk as a safetensors file whose name is a hash
of everything the numbers depend on:

* the model's files: resolved folder, ``config.json`` bytes, each weight file's name, size,
  modification time and safetensors header, and the tokenizer files' bytes;
* the texts themselves (after ``limit``), so two files with the same texts share statistics;
* the statistic (``gram`` / ``fisher``) and its settings (``max_length``; Fisher: ``labels``, ``seed``).

Files are written under a temporary name and renamed (a killed run leaves no partial file under the
final name; two processes computing the same statistics both write whole files). The cache lives
in ``$EVOMERGE_CACHE/calibration`` (default ``~/.cache/evomerge/calibration``). A search planning
many candidates pays the hashing once per process (memoized on the files' identities).

Kernels read a statistic through a :class:`StatRef` (file, tensor name): data a plan can carry.
Recently read statistics stay in memory (up to ``STATS_MEMORY`` bytes), so the candidates of a
search do not re-read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, EvalError, Problem

STATS_VERSION = 1
STATS_MEMORY = 2 * 2**30
_META_KEY = "evomerge_stats"


def cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge") / "calibration"


# ------------------------------------------------------------------------------------------------
# texts


def _stamp(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


_TEXTS: dict[tuple, list[str]] = {}
_DIGESTS: dict[int, tuple[list[str], str]] = {}  # id of a cached texts list -> (the list, its digest)


def texts_digest(texts: list[str]) -> str:
    """The SHA-256 of calibration texts (computed once per cached list)."""
    hit = _DIGESTS.get(id(texts))
    if hit is not None and hit[0] is texts:
        return hit[1]
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    _DIGESTS[id(texts)] = (texts, digest)
    return digest


def calibration_texts(spec) -> list[str]:
    """The texts of a :class:`~evomerge.recipe_sections.CalibrationSpec`, in file order.
    :class:`ConfigError` naming the key and file when the data cannot be read or is empty."""
    src = Path(spec.suite or spec.jsonl).expanduser()
    key = (spec.model_dump_json(), _stamp(src))
    if key in _TEXTS:
        return _TEXTS[key]
    texts = _suite_texts(spec, src) if spec.suite else _jsonl_texts(spec, src)
    if not texts:
        what = f"split '{spec.split_name}' of suite {src}" if spec.suite else f"field '{spec.field_name}' of {src}"
        raise ConfigError(Problem("calibration", f"the {what} holds no text", "name data with at least one text"))
    _TEXTS[key] = texts
    return texts


def _suite_texts(spec, path: Path) -> list[str]:
    from evomerge.suites import load_suite

    if not path.is_file():
        raise ConfigError(Problem("calibration.suite", f"suite file {path} not found",
                                  "give the path of a suite YAML (relative to the current directory)"))
    texts = []
    for task in load_suite(path).tasks:
        items = task.splits.get(spec.split_name, ())
        for item in items[:spec.limit] if spec.limit else items:
            if task.kind == "generate":
                cont = item.answers[0] if item.answers else ""
            elif task.kind == "multiple_choice":
                cont = item.choices[item.label] if 0 <= item.label < len(item.choices) else ""
            else:
                cont = item.target
            texts.append(item.prompt + cont)
    return texts


def _jsonl_texts(spec, path: Path) -> list[str]:
    from evomerge.io_utils import read_text_file

    texts = []
    for n, line in enumerate(read_text_file(path, "calibration JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ConfigError(Problem(f"{path}:{n}", f"not a JSON object ({e})", "write one JSON object per line"),
                              source=str(path)) from None
        value = rec.get(spec.field_name) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            raise ConfigError(Problem(f"{path}:{n}", f"no string field '{spec.field_name}'",
                                      "set `calibration.field` to the field holding the text"), source=str(path))
        texts.append(value)
        if spec.limit and len(texts) >= spec.limit:
            break
    return texts


# ------------------------------------------------------------------------------------------------
# statistics files


@dataclass(frozen=True)
class StatRef:
    """One statistic tensor: ``name`` in the safetensors file ``path``."""

    path: str
    name: str

    def load(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return _read_stat(self.path, self.name, torch.device(device))


@dataclass
class StatsFile:
    """A source's statistics. ``origin``: ``computed`` (this call), ``disk`` (read from the cache
    folder) or ``memory`` (this process had it). ``aliases``: weights whose statistic is another's
    (RegMean: q/k/v projections share their input's Gram matrix)."""

    path: Path
    kind: str
    key: str
    names: frozenset[str]
    aliases: dict[str, str] = field(default_factory=dict)
    origin: str = "disk"
    seconds: float = 0.0
    texts: int = 0
    tokens: int = 0

    def ref(self, weight: str) -> StatRef | None:
        """The statistic of tensor ``weight`` (None: it has none, e.g. a norm under RegMean)."""
        name = self.aliases.get(weight, weight)
        return StatRef(str(self.path), name) if name in self.names else None


_MEM: dict[tuple, StatsFile] = {}
_LOADED: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def clear_memory() -> None:
    """Forget the statistics this process has looked up or read (the files stay cached on disk)."""
    _MEM.clear()
    _LOADED.clear()
    _TEXTS.clear()
    _DIGESTS.clear()


def _read_stat(path: str, name: str, device: torch.device) -> torch.Tensor:
    key = (path, name, str(device))
    t = _LOADED.get(key)
    if t is not None:
        _LOADED.move_to_end(key)
        return t
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        t = f.get_tensor(name).to(device)
    _LOADED[key] = t
    total = sum(v.numel() * v.element_size() for v in _LOADED.values())
    while total > STATS_MEMORY and len(_LOADED) > 1:
        _, old = _LOADED.popitem(last=False)
        total -= old.numel() * old.element_size()
    return t


def _model_identity(ck) -> dict[str, Any]:
    from evomerge.vocab import VOCAB_FILES

    path = Path(ck.path).resolve()
    files = []
    for p in sorted(path.glob("*.safetensors")):
        st = p.stat()
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = hashlib.sha256(fh.read(min(n, 100 * 2**20))).hexdigest()
        files.append([p.name, st.st_size, st.st_mtime_ns, header])
    blobs = {}
    for name in ("config.json", *VOCAB_FILES):
        if (path / name).is_file():
            blobs[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    return {"path": str(path), "files": files, "blobs": blobs}


def statistics_key(ck, texts: list[str], kind: str, spec) -> str:
    """sha256 over the model's files' identity, the texts and the statistic's settings."""
    settings = {"kind": kind, "max_length": spec.max_length, "version": STATS_VERSION}
    if kind == "fisher":
        settings |= {"labels": spec.label_kind, "seed": spec.seed}
    blob = json.dumps({"model": _model_identity(ck), "texts": texts_digest(texts), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_statistics(ck, spec, kind: str, *, device: str = "cpu", directory: Path | None = None) -> StatsFile:
    """The ``kind`` statistics (``gram``: RegMean's input Gram matrices; ``fisher``: the diagonal
    Fisher) of model ``ck`` (a :class:`~evomerge.checkpoint.Checkpoint`) on ``spec``'s data:
    from this process's memory, the cache folder, or computed now and cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    texts = calibration_texts(spec)
    # keyed by the texts themselves, not by where they came from: edited data is never served stale
    memo = (str(Path(ck.path).resolve()), _stamp(*sorted(Path(ck.path).glob("*"))), texts_digest(texts),
            spec.model_dump_json(), kind, str(directory))
    hit = _MEM.get(memo)
    if hit is not None and hit.path.is_file():
        return replace(hit, origin="memory")
    key = statistics_key(ck, texts, kind, spec)
    path = directory / f"{kind}-{key[:40]}.safetensors"
    stats = _open_stats(path, kind, key) if path.is_file() else None
    if stats is None:
        stats = _compute(ck, texts, kind, spec, device, path, key)
    _MEM[memo] = stats
    return stats


def _open_stats(path: Path, kind: str, key: str) -> StatsFile | None:
    """The cached file, or None when it is unreadable or not what its name says (recomputed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            names = frozenset(f.keys())
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
        return None
    if meta.get("key") != key or meta.get("kind") != kind:
        return None
    return StatsFile(path, kind, key, names, dict(meta.get("aliases", {})), "disk", float(meta.get("seconds", 0.0)),
                     int(meta.get("texts", 0)), int(meta.get("tokens", 0)))


def _compute(ck, texts: list[str], kind: str, spec, device: str, path: Path, key: str) -> StatsFile:
    from safetensors.torch import save_file

    from evomerge.calibration_stats import fisher_diagonal, input_grams

    start = time.perf_counter()
    if kind == "gram":
        tensors, aliases, tokens = input_grams(ck.path, texts, max_length=spec.max_length, device=device)
    elif kind == "fisher":
        tensors, tokens = fisher_diagonal(ck.path, texts, max_length=spec.max_length, labels=spec.label_kind,
                                          seed=spec.seed, device=device)
        aliases = {}
    else:  # pragma: no cover - CALIBRATED_METHODS lists the kinds
        raise ValueError(f"unknown statistic {kind!r}")
    seconds = time.perf_counter() - start
    meta = {"key": key, "kind": kind, "aliases": aliases, "seconds": seconds, "texts": len(texts),
            "tokens": tokens, "model": str(ck.ref)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={_META_KEY: json.dumps(meta)})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        from evomerge.checkpoint import describe_os_error

        raise EvalError(describe_os_error(e, f"cannot write the calibration statistics of {ck.ref} to")) from e
    return StatsFile(path, kind, key, frozenset(tensors), aliases, "computed", seconds, len(texts), tokens)
