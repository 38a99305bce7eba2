"""Reading Hugging Face model directories: lazy safetensors reads.

:meth:`Checkpoint.open` resolves a local folder or a hub id, parses ``config.json`` and the
safetensors headers only; a tensor is read when asked for, with ``pread`` through a cached file
handle per shard (:meth:`Checkpoint.read`: resident memory stays the tensors in use) or mapped
(:meth:`Checkpoint.map`: no copy, for streaming merges that drop each tensor once used). Pickled
weights are refused. Tied embeddings are virtual: ``lm_head.weight`` of a tied model reads the
embedding.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint.checks import LAYER_KEYS, _config_int, _problem_text, completeness_problems, find_embedding
from evomerge.checkpoint.names import (DTYPES, INDEX_FILE, SINGLE_FILE, TIED_HEAD,
                                       split_layer_name)
from evomerge.checkpoint.oserrors import describe_os_error
from evomerge.errors import CheckpointError

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "convert it to safetensors once: `AutoModelForCausalLM.from_pretrained(src, dtype='auto')"
    ".save_pretrained(dst, safe_serialization=True)` (and save the tokenizer alongside)"
)

_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the data in the file


def _read_header(path: Path, model: str) -> dict[str, TensorEntry]:
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
    entries: dict[str, TensorEntry] = {}
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
        entries[name] = TensorEntry(path.name, dtype, shape, nbytes, 8 + n + start)
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

    def __init__(self, ref: str, path: Path, config: dict[str, Any], entries: dict[str, TensorEntry]):
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
        self.embedding_name: str | None = find_embedding(entries)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        # transformers leaves lm_head out of the files when tied; a config silent on tying counts as
        # tied when the head is absent and an embedding is present (the class default varies).
        self.tie_word_embeddings: bool = self.embedding_name is not None and (
            bool(tied) or (TIED_HEAD not in entries and tied is None))
        vocab = _config_int(config, ("vocab_size",), ref)
        self.vocab_size: int = vocab[1] if vocab else (
            self._entries[self.embedding_name].shape[0] if self.embedding_name else 0)
        layers = _config_int(config, LAYER_KEYS, ref)
        if layers is None:
            idx = [p[1] for p in map(split_layer_name, self.names) if p is not None]
            self.num_layers: int = max(idx) + 1 if idx else 0
        else:
            self.num_layers = layers[1]

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {self.model_type}, {self.num_layers} layers, {len(self.names)} tensors)"

    # -- opening

    @classmethod
    def open(cls, ref: str | os.PathLike) -> Checkpoint:
        """Open a local HF model directory, or a hub id (``org/name[@revision]``) via huggingface_hub."""
        model = str(ref)
        try:
            path = _resolve(ref)
            cfg_path = path / "config.json"
            if not cfg_path.is_file():
                pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                extra = (f"; it holds only pickled weights ({', '.join(pickled[:4])}), which evomerge does not "
                         f"read: {CONVERT_HINT}") if pickled else ""
                raise CheckpointError(f"{model}: config.json is missing from {path}; a model directory needs "
                                      f"the config that transformers' save_pretrained writes (copy it from "
                                      f"the model the weights came from){extra}")
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
                if not isinstance(config, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{model}: config.json in {path} is not valid JSON ({e}); "
                                      f"restore it from the source model") from e
            return cls(model, path, config, cls._load_entries(path, model))
        except OSError as e:
            raise CheckpointError(describe_os_error(e, f"{model}: cannot read")) from e

    def verify(self) -> None:
        """Raise :class:`CheckpointError` unless the tensors are what the config implies: see
        :func:`completeness_problems` (layer count, whole layers, embedding, final norm, output
        head, shapes against the config)."""
        problems = completeness_problems(self.config, {n: e.shape for n, e in self._entries.items()})
        if problems:
            raise CheckpointError(_problem_text(f"{self.ref}: the tensors do not match config.json", problems,
                                                "re-download or re-export the model; its files are damaged "
                                                "or come from different models"))

    @staticmethod
    def _load_entries(path: Path, model: str) -> dict[str, TensorEntry]:
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{model}: {INDEX_FILE} is unreadable ({type(e).__name__}: {e}); "
                                      f"re-download or re-export the model") from e
            headers: dict[str, dict[str, TensorEntry]] = {}
            entries: dict[str, TensorEntry] = {}
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

    def entry(self, name: str) -> TensorEntry:
        """Where tensor ``name`` lies: its shard file (relative to the folder), dtype, shape, size and
        byte offset (the tied head: the embedding's)."""
        entry = self._entries.get(name)
        if entry is None:
            if name == TIED_HEAD and self.tie_word_embeddings:
                return self._entries[self.embedding_name]  # type: ignore[index]
            raise CheckpointError(f"{self.ref}: no tensor {name!r} in this model ({len(self.names)} tensors, "
                                  f"e.g. {self.names[:3]}); check the tensor name or the model")
        return entry

    def has(self, name: str) -> bool:
        return name in self._entries or (name == TIED_HEAD and self.tie_word_embeddings)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def parameter_counts(self) -> tuple[tuple[int, ...], int, int]:
        """(parameters per layer, parameters outside the layers but the input embedding, the input
        embedding's parameters), from the headers (no weights read)."""
        layers = [0] * self.num_layers
        other = embedding = 0
        for name in self.names:
            n = math.prod(self.shape(name))
            parts = split_layer_name(name)
            if parts is not None and parts[1] < self.num_layers:
                layers[parts[1]] += n
            elif name == self.embedding_name:
                embedding += n
            else:
                other += n
        return tuple(layers), other, embedding

    def dtype(self, name: str) -> torch.dtype:
        return self.entry(name).dtype

    def nbytes(self, name: str) -> int:
        """Stored bytes of ``name`` (a tied ``lm_head.weight``: the embedding's)."""
        return self.entry(name).nbytes

    def _open(self, name: str) -> tuple[TensorEntry, int]:
        """``name``'s entry (a tied ``lm_head.weight``: the embedding's) and its shard's cached fd."""
        entry = self.entry(name)
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

    def held(self, place=lambda t: t) -> Checkpoint:
        """A copy of this checkpoint whose tensors are read once, now, and then served from memory
        (``place(tensor)`` puts each where it should live: pinned host memory, a device)."""
        import copy

        held = copy.copy(self)
        held._handles, held._lock = {}, threading.Lock()
        held._memory = {name: place(self.read(name)) for name in self.names}
        return held

    def held_nbytes(self) -> int:
        """Bytes held in memory by :meth:`held` (0 for a checkpoint read from its files)."""
        memory = getattr(self, "_memory", None) or {}
        return sum(t.numel() * t.element_size() for t in memory.values())

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor in its stored dtype; a tied ``lm_head.weight`` reads the embedding."""
        memory = getattr(self, "_memory", None)
        if memory is not None and name in memory:
            return memory[name].to(device, non_blocking=True)
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
