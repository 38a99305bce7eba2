"""Hugging Face model directories: lazy safetensors reads and an atomic, streaming sharded writer.

Reading: :meth:`Checkpoint.open` parses ``config.json`` and the safetensors headers only; a tensor is
read when asked for, with ``pread`` through a cached file handle per shard (:meth:`Checkpoint.read`:
resident memory stays the tensors in use) or mapped (:meth:`Checkpoint.map`: no copy, for streaming
merges that drop each tensor once used). Pickled weights are refused. Tied embeddings are virtual:
``lm_head.weight`` of a tied model reads the embedding.

Writing: :class:`CheckpointWriter` is told every tensor up front, lays the shards out, writes each
shard's header first and then every tensor's bytes straight to its offset, so peak memory is one
tensor. Everything goes to a temporary directory beside the output, renamed into place by
:meth:`CheckpointWriter.finish`; a failure leaves the output untouched.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import CheckpointError, ConfigError, IncompatibleModelsError, Problem

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "convert it to safetensors once: `AutoModelForCausalLM.from_pretrained(src, dtype='auto')"
    ".save_pretrained(dst, safe_serialization=True)` (and save the tokenizer alongside)"
)
# Embedding tensors whose weight an untied-in-files lm_head shares, most specific first.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|h))\.(\d+)\.(.+)$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


# ----------------------------------------------------------------------------- names and sizes


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``.

    Also GPT-2 style ``"transformer.h.3.attn.c_attn.weight"``. ``None`` for non-layer tensors.
    """
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), m.group(3)


def layer_tensor_name(prefix: str, idx: int, suffix: str) -> str:
    """Inverse of :func:`split_layer_name`."""
    return f"{prefix}.{idx}.{suffix}"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (decimal, like transformers), ``"1.5GiB"`` (binary), ``"500MB"`` or an int."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(Problem("size", f"expected a size like '5GB' or a byte count, got {text!r}"))
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if m is None:
            raise ConfigError(Problem("size", f"cannot read size {text!r}",
                                      "write a number with a unit: B, KB, MB, GB, TB (powers of 1000) "
                                      "or KiB, MiB, GiB, TiB (powers of 1024), e.g. '5GB'"))
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ConfigError(Problem("size", f"size must be positive, got {text!r}"))
    return value


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the data in the file


def _read_header(path: Path, model: str) -> dict[str, _Entry]:
    """Parse and check one safetensors header: sane length, JSON, dtypes, sizes within the file."""
    fix = "re-download or re-export the model; the file is damaged or not a safetensors file"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{model}: {path.name} is {size} bytes, too short for a "
                                      f"safetensors header (truncated?); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 512 * 2**20:
                raise CheckpointError(f"{model}: {path.name} claims a {n}-byte header but the file "
                                      f"holds {size} bytes (truncated or not safetensors); {fix}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{model}: cannot read {path.name}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{model}: unparsable safetensors header in {path.name} ({e}); {fix}") from e
    data_size = size - 8 - n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{model}: tensor {name!r} in {path.name} has a malformed header "
                                  f"entry {info!r}; {fix}") from e
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{model}: tensor {name!r} in {path.name} has dtype {dtype_name!r}, "
                                  f"which evomerge cannot read (supported: {', '.join(DTYPES)}); "
                                  f"re-save the model in bfloat16 or float16")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{model}: tensor {name!r} in {path.name}: offsets {start}..{end} do not "
                                  f"match shape {list(shape)} of {info['dtype']} ({nbytes} bytes); {fix}")
        if end > data_size:
            raise CheckpointError(f"{model}: {path.name} is truncated: tensor {name!r} ends at byte "
                                  f"{8 + n + end} but the file holds {size} bytes; {fix}")
        entries[name] = _Entry(path.name, dtype, shape, nbytes, 8 + n + start)
    return entries


def _resolve(ref: str | os.PathLike) -> Path:
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{ref}: is a file; expected a model directory holding config.json "
                                  f"and *.safetensors (pass the directory, not a file in it)")
        return path
    text = str(ref)
    if not _HUB_RE.match(text) or text.startswith((".", "~")):
        raise CheckpointError(f"{ref}: no such model directory (and not a Hugging Face hub id like "
                              f"'org/name'); check the path")
    repo, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise CheckpointError(
            f"{ref}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}); check the path, or the hub id and your network / "
            f"HF_HUB_OFFLINE / HF_TOKEN settings, or download the model and pass its directory") from e
    return Path(local)


class Checkpoint:
    """A Hugging Face model directory opened lazily: config and headers now, tensors on demand."""

    def __init__(self, ref: str, path: Path, config: dict[str, Any], entries: dict[str, _Entry]):
        self.ref = ref
        self.path = path
        self.config = config
        self._entries = entries
        self._handles: dict[str, int] = {}  # shard file name -> open file descriptor
        self._lock = threading.Lock()
        self.names: list[str] = list(entries)
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.model_type: str = str(config.get("model_type", ""))
        self.architectures: list[str] = list(config.get("architectures") or [])
        self.embedding_name: str | None = self._find_embedding()
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        # transformers leaves lm_head out of the files when tied; a config silent on tying counts as
        # tied when the head is absent and an embedding is present (the class default varies).
        self.tie_word_embeddings: bool = self.embedding_name is not None and (
            bool(tied) or (TIED_HEAD not in entries and tied is None))
        self.vocab_size: int = int(config.get("vocab_size") or text.get("vocab_size") or (
            self._entries[self.embedding_name].shape[0] if self.embedding_name else 0))
        layers = None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            layers = config.get(key, text.get(key))
            if layers is not None:
                break
        if layers is None:
            idx = [p[1] for p in map(split_layer_name, self.names) if p is not None]
            layers = max(idx) + 1 if idx else 0
        self.num_layers: int = int(layers)

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {self.model_type}, {self.num_layers} layers, {len(self.names)} tensors)"

    # -- opening

    @classmethod
    def open(cls, ref: str | os.PathLike) -> Checkpoint:
        """Open a local HF model directory, or a hub id (``org/name[@revision]``) via huggingface_hub."""
        path = _resolve(ref)
        model = str(ref)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{model}: config.json is missing from {path}; a model directory needs "
                                  f"the config that transformers' save_pretrained writes (copy it from "
                                  f"the model the weights came from)")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{model}: config.json in {path} is not valid JSON ({e}); "
                                  f"restore it from the source model") from e
        return cls(model, path, config, cls._load_entries(path, model))

    @staticmethod
    def _load_entries(path: Path, model: str) -> dict[str, _Entry]:
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{model}: {INDEX_FILE} is unreadable ({type(e).__name__}: {e}); "
                                      f"re-download or re-export the model") from e
            headers: dict[str, dict[str, _Entry]] = {}
            entries: dict[str, _Entry] = {}
            for name, file in weight_map.items():
                if file not in headers:
                    shard = path / file
                    if not shard.is_file():
                        raise CheckpointError(f"{model}: shard {file} named by {INDEX_FILE} (for tensor "
                                              f"{name!r}) is missing; re-download the model or restore "
                                              f"the file")
                    headers[file] = _read_header(shard, model)
                if name not in headers[file]:
                    raise CheckpointError(f"{model}: tensor {name!r} is listed in {INDEX_FILE} under "
                                          f"{file} but that shard does not hold it; the index and the "
                                          f"shards disagree, re-download or re-export the model")
                entries[name] = headers[file][name]
            return entries
        files = sorted(path.glob("*.safetensors"))
        if (path / SINGLE_FILE).is_file():
            files = [path / SINGLE_FILE]
        if files:
            entries = {}
            for f in files:
                entries.update(_read_header(f, model))
            return entries
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(f"{model}: only pickled weights found ({', '.join(pickled[:4])}); "
                                  f"evomerge reads safetensors only, since unpickling runs arbitrary "
                                  f"code; {CONVERT_HINT}")
        raise CheckpointError(f"{model}: no weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE} "
                              f"with its shards); point at a saved model directory")

    # -- queries

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            if name == TIED_HEAD and self.tie_word_embeddings:
                return self._entries[self.embedding_name]  # type: ignore[index]
            raise CheckpointError(f"{self.ref}: no tensor {name!r} in this model ({len(self.names)} tensors, "
                                  f"e.g. {self.names[:3]}); check the tensor name or the model")
        return entry

    def _find_embedding(self) -> str | None:
        for suffix in EMBED_SUFFIXES:
            hits = sorted((n for n in self._entries if n == suffix or n.endswith("." + suffix)), key=len)
            if hits:
                return hits[0]
        return None

    def has(self, name: str) -> bool:
        return name in self._entries or (name == TIED_HEAD and self.tie_word_embeddings)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        """Stored bytes of ``name`` (a tied ``lm_head.weight``: the embedding's)."""
        if name not in self._entries and name == TIED_HEAD and self.tie_word_embeddings:
            name = self.embedding_name  # type: ignore[assignment]
        return self._entry(name).nbytes

    def _open(self, name: str) -> tuple[_Entry, int]:
        """``name``'s entry (a tied ``lm_head.weight``: the embedding's) and its shard's cached fd."""
        if name not in self._entries and name == TIED_HEAD and self.tie_word_embeddings:
            name = self.embedding_name  # type: ignore[assignment]
        entry = self._entry(name)
        with self._lock:
            fd = self._handles.get(entry.file)
            if fd is None:
                try:
                    fd = os.open(self.path / entry.file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.ref}: cannot open {entry.file} ({e}); re-download or "
                                          f"re-export the model") from e
                self._handles[entry.file] = fd
        return entry, fd

    def map(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype on the CPU, backed by a private (copy-on-write) memory map
        of its shard instead of a copy: reading it reads the page cache directly, which saves the
        copy :meth:`read` makes (about a third of a 3-source linear merge's time on CPU). Writes to
        the tensor stay private. The mapping is released when the tensor and every view of it are
        freed, so keep such tensors short-lived (streaming); file-backed pages count in RSS while
        mapped. An empty tensor, data not aligned to its element size, or a file that cannot be
        mapped (some FUSE and network filesystems) is read instead.

        The shard's size is checked first: a file truncated after :meth:`open` and before this call
        is a :class:`CheckpointError`. (Truncating a shard while one of its tensors is mapped and
        being read still kills the process with SIGBUS, as it would any program that maps it.)
        """
        entry, fd = self._open(name)
        if entry.nbytes == 0 or entry.offset % entry.dtype.itemsize:
            return self.read(name)
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise CheckpointError(f"{self.ref}: cannot stat {entry.file} ({e})") from e
        if size < entry.offset + entry.nbytes:
            raise CheckpointError(f"{self.ref}: tensor {name!r} ends at byte {entry.offset + entry.nbytes} of "
                                  f"{entry.file}, which now holds {size} bytes; the file changed or is "
                                  f"damaged, re-download or re-export the model")
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, entry.offset + entry.nbytes - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError):
            # filesystems without mmap (some FUSE and network mounts), vm.max_map_count reached:
            # the same bytes through pread
            return self.read(name)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset - start)
        return flat.view(entry.dtype).reshape(entry.shape)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor in its stored dtype; a tied ``lm_head.weight`` reads the embedding."""
        entry, fd = self._open(name)
        # pread into a fresh tensor: one copy from the page cache, memory of its own
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < entry.nbytes:
            try:
                got = os.preadv(fd, [view[done:]], entry.offset + done)
            except OSError as e:
                got, err = 0, e
            else:
                err = None
            if got <= 0:
                raise CheckpointError(f"{self.ref}: reading tensor {name!r} from {entry.file} stopped at "
                                      f"byte {done} of {entry.nbytes} ({err or 'file shorter than its header says'}); "
                                      f"the file changed or is damaged, re-download or re-export the model")
            done += got
        tensor = buf.view(entry.dtype).reshape(entry.shape)
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)

    def close(self) -> None:
        """Close the cached shard file handles (reads reopen them)."""
        handles, self._handles = getattr(self, "_handles", {}), {}
        for fd in handles.values():
            os.close(fd)

    def __getstate__(self) -> dict:  # picklable for worker processes; handles are per process
        state = self.__dict__.copy()
        state["_handles"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def check_compatible(ckpts: Mapping[str, Checkpoint]) -> None:
    """Raise :class:`IncompatibleModelsError` unless all models share architecture, tensors and shapes.

    Compares every model with the first: model_type, architectures, vocab size, tensor names (a
    tied ``lm_head.weight`` counts as present) and shapes. Dtypes may differ.
    """
    items = list(ckpts.items())
    if len(items) < 2:
        return
    ref_label, ref = items[0]
    ref_names = set(ref.names) | ({TIED_HEAD} if ref.has(TIED_HEAD) else set())
    problems: list[str] = []
    for label, ck in items[1:]:
        if (ck.model_type, ck.architectures) != (ref.model_type, ref.architectures):
            problems.append(f"{label}: architecture {ck.model_type} {ck.architectures} differs from "
                            f"{ref_label}: {ref.model_type} {ref.architectures}")
        if ck.vocab_size != ref.vocab_size:
            problems.append(f"{label}: vocab_size {ck.vocab_size} differs from {ref_label}: {ref.vocab_size}")
        names = set(ck.names) | ({TIED_HEAD} if ck.has(TIED_HEAD) else set())
        mine = []
        for name in sorted(names - ref_names):
            mine.append(f"{label}: tensor {name!r} is not in {ref_label}")
        for name in sorted(ref_names - names):
            mine.append(f"{label}: tensor {name!r} of {ref_label} is missing")
        for name in sorted(names & ref_names):
            if ck.shape(name) != ref.shape(name):
                mine.append(f"{label}: tensor {name!r} has shape {list(ck.shape(name))}, "
                            f"{ref_label} has {list(ref.shape(name))}")
        if len(mine) > 12:
            mine = mine[:10] + [f"{label}: ... and {len(mine) - 10} more tensor differences"]
        problems += mine
    if problems:
        raise IncompatibleModelsError(
            f"{len(items)} models cannot be merged together ({len(problems)} problem(s)):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  (fix: merge only models of one architecture and size, e.g. fine-tunes of one base)")


# ----------------------------------------------------------------------------- writing


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointWriter:
    """Streaming sharded safetensors writer into a temporary directory, renamed into place at finish.

    ``with CheckpointWriter(out, specs, shard_size=...) as w: w.write(name, t) ...; w.finish(config=...)``.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec], *, shard_size: int | str,
                 overwrite: bool = False, metadata: dict[str, str] | None = None):
        self.out = Path(out_dir).expanduser().absolute()
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} already exists; choose another output path, remove it, or "
                                  f"pass --overwrite (overwrite=True) to replace it once the new model is complete")
        self.shard_size = parse_size(shard_size)
        meta = {"format": "pt", **(metadata or {})}
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{self.out}: safetensors metadata must map str to str; bad keys {bad}")
        self._specs: dict[str, TensorSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise CheckpointError(f"{self.out}: tensor {spec.name!r} is listed twice in the specs")
            if spec.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{self.out}: tensor {spec.name!r} has dtype {spec.dtype}, which "
                                      f"safetensors cannot store here; cast it to bfloat16/float16/float32")
            self._specs[spec.name] = TensorSpec(spec.name, tuple(int(s) for s in spec.shape), spec.dtype)
        # Lay out shards: in spec order, start a new shard when the next tensor would overflow.
        groups: list[list[TensorSpec]] = []
        used = 0
        for spec in self._specs.values():
            if not groups or (groups[-1] and used + spec.nbytes > self.shard_size):
                groups.append([])
                used = 0
            groups[-1].append(spec)
            used += spec.nbytes
        groups = groups or [[]]
        n = len(groups)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.out.name}.tmp-", dir=self.out.parent))
        self._place: dict[str, tuple[int, int]] = {}  # name -> (shard index, absolute file offset)
        self._handles: dict[int, Any] = {}
        self._written: set[str] = set()
        self._done = False
        self.total_size = sum(s.nbytes for s in self._specs.values())
        try:
            for i, group in enumerate(groups):
                self._write_header(i, group, meta)
        except BaseException:
            self.abort()
            raise

    def _write_header(self, i: int, group: list[TensorSpec], meta: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        for spec in group:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        for spec in group:
            self._place[spec.name] = (i, start + header[spec.name]["data_offsets"][0])
        with open(self.tmp / self.files[i], "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(start + offset)  # full size now; tensors fill it in any order
            if offset and hasattr(os, "posix_fallocate"):
                try:  # reserve the blocks now: a full disk fails here, and the writes stay simple copies
                    os.posix_fallocate(f.fileno(), start, offset)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise CheckpointError(f"{self.out}: no space left for {self.files[i]} "
                                              f"({start + offset} bytes); free disk space or choose "
                                              "another output folder") from e
                    # filesystems without fallocate support: the sparse file works as well

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        self.abort()
        if exc_type is None:
            raise CheckpointError(f"{self.out}: the writer was closed without finish(); nothing was written")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes to its place. Shape and dtype must match its spec exactly."""
        spec = self._specs.get(name)
        if spec is None:
            raise CheckpointError(f"{self.out}: tensor {name!r} was not declared in the writer's specs")
        if name in self._written:
            raise CheckpointError(f"{self.out}: tensor {name!r} was written twice")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(f"{self.out}: tensor {name!r} is {list(tensor.shape)} {tensor.dtype} but "
                                  f"its spec says {list(spec.shape)} {spec.dtype}; cast/reshape it before writing")
        shard, offset = self._place[name]
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(self.tmp / self.files[shard], "r+b")
        f.seek(offset)
        f.write(memoryview(data))
        self._written.add(name)

    def finish(self, *, config: dict, tokenizer_from: str | os.PathLike | None = None,
               extra_files: Mapping[str, str] | None = None) -> Path:
        """Write config, index, tokenizer and extra files, check completeness, rename into place."""
        try:
            missing = [n for n in self._specs if n not in self._written]
            if missing:
                raise CheckpointError(f"{self.out}: {len(missing)} tensor(s) were never written, e.g. "
                                      f"{missing[:5]}; write every declared tensor before finish()")
            self._close_handles()
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_size},
                         "weight_map": {n: self.files[self._place[n][0]] for n in sorted(self._specs)}}
                (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            if tokenizer_from is not None:
                src = Path(tokenizer_from)
                if not src.is_dir():
                    raise CheckpointError(f"{self.out}: tokenizer source {src} is not a directory; pass "
                                          f"the model directory whose tokenizer files should be copied")
                for fname in TOKENIZER_FILES:
                    if (src / fname).is_file():
                        shutil.copyfile(src / fname, self.tmp / fname)
            for fname, text in (extra_files or {}).items():
                target = (self.tmp / fname).resolve()
                if fname in ("", ".") or self.tmp.resolve() not in target.parents:
                    raise CheckpointError(f"{self.out}: extra file name {fname!r} must be a relative "
                                          f"path inside the output directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out

    def _commit(self) -> None:
        if not self.out.exists():
            os.rename(self.tmp, self.out)
            return
        if not self.overwrite:  # appeared while we were writing
            raise CheckpointError(f"{self.out} appeared while writing; pass overwrite=True to replace it")
        aside = self.out.with_name(f"{self.out.name}.old-{zlib.crc32(str(self.tmp).encode()):08x}")
        os.rename(self.out, aside)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            os.rename(aside, self.out)
            raise
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)

    def _close_handles(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def abort(self) -> None:
        """Drop everything written so far; the output path is left as it was."""
        self._close_handles()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True
