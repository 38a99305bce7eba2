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
import socket
import struct
import sys
import tempfile
import threading
import zlib
from collections import Counter
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
# any one of these makes a folder's tokenizer loadable (vocab.json with merges.txt for GPT-2 style BPE)
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
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


SIZE_HINT = ("write a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
             "(powers of 1024), e.g. '5GB'")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``"5GB"`` (decimal, like transformers), ``"1.5GiB"`` (binary), ``"500MB"`` or an int.

    ``what`` names the setting in the error (``"--shard-size"``, ``"shard_size"``)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(Problem(what, f"expected a size like '5GB' or a byte count, got {text!r}", SIZE_HINT))
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if m is None:
            raise ConfigError(Problem(what, f"cannot read size {text!r}", SIZE_HINT))
        number = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
        if not math.isfinite(number) or number > 2**62:
            raise ConfigError(Problem(what, f"size {text[:40]!r} is too large", SIZE_HINT))
        value = int(number)
    if value <= 0:
        raise ConfigError(Problem(what, f"size must be positive, got {text!r}", SIZE_HINT))
    return value


# ----------------------------------------------------------------------------- OS errors and output paths


def os_error_hint(err: OSError) -> str:
    """How to fix an :class:`OSError`, by its errno."""
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "free disk space (or raise the quota), or choose an output folder on another disk"
    if code == errno.EFBIG:
        return ("a file grew past the file size limit (`ulimit -f`) or the filesystem's largest file; raise "
                "the limit, choose another filesystem, or pass a smaller --shard-size")
    if code == errno.EROFS:
        return "the filesystem is read-only; choose a folder on a writable filesystem"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission there; choose a folder you can write to, or fix its permissions"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder; choose a path whose parents are all folders"
    if code == errno.EEXIST:
        return "something already exists at that path; remove it or choose another path"
    if code == errno.EISDIR:
        return "a folder is where a file was expected; choose another path"
    if code == errno.ENOENT:
        return "a folder on the path does not exist (or was removed meanwhile); check the path"
    if code == errno.ENAMETOOLONG:
        return "the path or one of its names is too long; choose a shorter path"
    if code == errno.ELOOP:
        return "the path runs in a loop of symbolic links; fix the links or choose another path"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; raise the limit (`ulimit -n`) or close other programs"
    if code == errno.EIO:
        return "the disk or filesystem reported an input/output error; check it (dmesg) or use another"
    if code == errno.EPIPE:
        return "the program reading the output (a pipe) stopped early"
    if code == errno.ENOMEM:
        return "free memory or use a machine with more"
    if code == errno.EXDEV:
        return "the temporary folder and the output are on different filesystems; choose another output"
    return "check the path and the filesystem it is on"


def describe_os_error(err: OSError, what: str, path: str | os.PathLike | None = None) -> str:
    """``"<what> <path>: <strerror> (fix: <hint>)"``; ``path`` defaults to the error's file name(s),
    ``path=""`` leaves it out."""
    if path is None and err.filename is not None:
        path = os.fsdecode(err.filename)
        if err.filename2 is not None:
            path = f"{path} -> {os.fsdecode(err.filename2)}"
    reason = err.strerror or str(err) or type(err).__name__
    where = f"{what} {os.fspath(path)}" if path not in (None, "") else what
    return f"{where}: {reason} (fix: {os_error_hint(err)})"


def _abspath(path: str | os.PathLike) -> Path:
    """Absolute, with ``.`` and ``..`` folded (``Path.absolute`` keeps them, and a name of ``..``
    would make no sense for a temporary sibling)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


_TMP_TAG = ".tmp-"
_NAME_MAX = 255
_TMP_NAME_EXTRA = 40  # ".tmp-<pid>-<8 random>" / ".old-<8 hex>" added to the output's name


def _looks_like_model_folder(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return not names or "config.json" in names or any(n.endswith(".safetensors") for n in names)


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The absolute output path of a model folder, after checks that need no writing.

    Refuses (:class:`CheckpointError`, worded for the CLI): an existing ``out`` without
    ``overwrite``; with ``overwrite``, an ``out`` that is a file or a folder that holds no model
    (``--overwrite`` replaces model folders only); a parent that is a file; a parent on a read-only
    filesystem or without write permission; a name too long for the temporary sibling. Nothing is
    created, so it can run before any work.
    """
    path = _abspath(out)
    if path.parent == path:
        raise CheckpointError(f"cannot write a model as the filesystem root {path} (fix: give a folder path, "
                              f"e.g. {path / 'merged'})")
    if len(os.fsencode(path.name)) > _NAME_MAX - _TMP_NAME_EXTRA:
        raise CheckpointError(f"output folder name {path.name[:40]!r}... in {path.parent} is too long "
                              f"({len(os.fsencode(path.name))} bytes; with the suffix of its temporary sibling "
                              f"it must fit in {_NAME_MAX}, so at most {_NAME_MAX - _TMP_NAME_EXTRA}) "
                              f"(fix: choose a shorter name)")
    try:
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"output path {path} is a broken symbolic link (to {os.readlink(path)}) "
                                  f"(fix: remove the link or choose another output path)")
        if path.exists():
            if not overwrite:
                raise CheckpointError(f"output folder {path} already exists (fix: choose another output path, "
                                      f"remove it, or pass --overwrite to replace it; the old folder is kept "
                                      f"until the new one is complete)")
            if not path.is_dir():
                raise CheckpointError(f"output path {path} is a file, not a model folder; --overwrite replaces "
                                      f"model folders only (fix: remove the file or choose another output path)")
            if not _looks_like_model_folder(path):
                raise CheckpointError(f"output folder {path} exists and holds no model (no config.json, no "
                                      f"*.safetensors); --overwrite replaces model folders only, so nothing was "
                                      f"touched (fix: choose another output path, or empty the folder)")
        anc = path.parent
        while not (anc.exists() or anc.is_symlink()) and anc.parent != anc:
            anc = anc.parent
        if not anc.is_dir():
            kind = "a broken symbolic link" if anc.is_symlink() else "a file"
            raise CheckpointError(f"cannot create output folder {path}: {anc} is {kind}, not a folder "
                                  f"(fix: choose an output path under a folder, or move {anc} away)")
        if not os.access(anc, os.W_OK | os.X_OK):
            try:
                readonly = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
            except OSError:
                readonly = False
            if readonly:
                raise CheckpointError(f"cannot create output folder {path}: {anc} is on a read-only filesystem "
                                      f"(fix: choose an output folder on a writable filesystem)")
            raise CheckpointError(f"cannot create output folder {path}: no permission to write in {anc} "
                                  f"(fix: choose a folder you can write to, or fix its permissions)")
    except OSError as e:
        raise CheckpointError(describe_os_error(e, f"cannot check output folder {path}:")) from e
    return path


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds a tokenizer (one of :data:`TOKENIZER_CORE`)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_CORE)


DEVICE_HINT = "use cpu, cuda, cuda:N (N a GPU index) or mps (Apple GPUs)"


def check_device(name: str | torch.device, what: str = "--device") -> str:
    """``name`` as a device string torch accepts, when this machine has that device; otherwise a
    :class:`ConfigError` naming ``what`` (the option) and the devices there are."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if m is None:
        raise ConfigError(Problem(what, f"unknown device {str(name)!r}", DEVICE_HINT))
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise ConfigError(Problem(what, f"device {text!r}: there is one CPU device", "use cpu"))
        return "cpu"
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(Problem(what, f"device {text!r}: no Apple GPU (MPS) is available here",
                                      "use cpu" + (" or cuda" if torch.cuda.is_available() else "")))
        return text
    if not torch.cuda.is_available():
        raise ConfigError(Problem(what, f"device {text!r}: no CUDA GPU is available here (torch "
                                  f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})",
                                  "use cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch"))
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ConfigError(Problem(what, f"device {text!r}: this machine has {count} CUDA GPU(s)",
                                  f"use cuda:0 to cuda:{count - 1}, or cpu"))
    return text


# ----------------------------------------------------------------------------- temporary folders

OWNER_FILE = ".evomerge-writer.json"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _owner_record() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start": stat[1] if stat else None}


def _owner_alive(rec: Mapping[str, Any]) -> bool | None:
    """Whether the process that wrote owner record ``rec`` still runs; None when this host cannot tell
    (another host sharing the filesystem, a malformed record)."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or rec.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if rec.get("boot_id") and boot and rec["boot_id"] != boot:
        return False  # written before the last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is not None:
        if stat[0] in ("Z", "X"):
            return False  # exited, not yet reaped: it writes nothing more
        if rec.get("start") and stat[1] != rec["start"]:
            return False  # the pid was reused by another process
    return True


_TMP_PID_RE = re.compile(r"^(\d+)-[^-]+$")


def remove_stale_temps(out: str | os.PathLike, *, quiet: bool = False) -> list[Path]:
    """Remove the temporary folders that writers of ``out`` left behind when they were killed.

    A temporary folder ``<out>.tmp-<pid>-<random>`` holds an owner record (pid, host, boot id, start
    time of the process). It is stale when that process is gone (or the machine rebooted since), and
    only then removed; a live writer's folder, one made on another host, and one without a record
    whose pid still runs are left alone. Returns the folders removed."""
    out = _abspath(out)
    prefix = out.name + _TMP_TAG
    removed: list[Path] = []
    try:
        entries = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in entries:
        try:
            if p.is_symlink() or not p.is_dir():
                continue
            rec_path = p / OWNER_FILE
            if rec_path.is_file():
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
                alive = _owner_alive(rec) if isinstance(rec, dict) else None
            else:
                # killed between creating the folder and writing its record (microseconds): the pid
                # is in the name; a folder of an older evomerge has none and is left alone
                m = _TMP_PID_RE.match(p.name[len(prefix):])
                if m is None:
                    if not quiet:
                        print(f"note: left {p} alone: it has no owner record (an older evomerge made it); "
                              f"remove it by hand if no merge into {out} is running", file=sys.stderr)
                    continue
                alive = _owner_alive({"pid": int(m.group(1)), "host": socket.gethostname()})
        except (OSError, ValueError):
            continue
        if alive is False:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                if not quiet:
                    print(f"note: removed {p}, left by a writer that is no longer running", file=sys.stderr)
    return removed


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


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
# model types whose attention and MLP tensors are named and shaped like Llama's
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "mixtral",
               "qwen2_moe", "qwen3_moe"}
# tensors every decoder layer of these model types holds (transformers' own names)
_LAYER_REQUIRED = {
    t: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")
    for t in ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2")
}
# layer stacks that are not the text decoder the config's layer count describes
_SIDE_STACK = re.compile(r"vision|visual|audio|image|speech|mtp|encoder|projector|vit\b", re.IGNORECASE)
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")


def _config_int(config: Mapping[str, Any], keys: tuple[str, ...], model: str) -> tuple[str, int] | None:
    """(key, value) of the first of ``keys`` the config (or its ``text_config``) sets; CheckpointError
    when it is not a whole number."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in keys:
        value = config.get(key, text.get(key))
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 0):
            raise CheckpointError(f"{model}: config.json sets {key} to {value!r}; expected a whole number "
                                  f">= 0 (fix: restore config.json from the source model)")
        return key, int(value)
    return None


def _heterogeneous_layers(config: Mapping[str, Any]) -> bool:
    """Whether the config declares layers of different kinds (dense and MoE, attention and SSM,
    per-layer sizes), whose tensor sets legitimately differ."""
    cfgs = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for c in cfgs:
        for key in ("first_k_dense_replace", "num_nextn_predict_layers", "moe_layer_start_index"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return True
        for key in ("interleave_moe_layer_step", "moe_layer_freq", "decoder_sparse_step", "attn_layer_period",
                    "expert_layer_period", "moe_layer_interval"):
            if isinstance(c.get(key), int) and c[key] > 1:
                return True
        for key in ("mlp_only_layers", "hybrid_override_pattern", "layers_block_type", "block_configs",
                    "attn_layer_indices", "cross_attention_layers", "moe_layers"):
            if c.get(key):
                return True
        if isinstance(c.get("layer_types"), list) and len(set(map(str, c["layer_types"]))) > 1:
            return True
        if any(isinstance(c.get(k), list) for k in ("intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads", "head_dim")):
            return True
    return False


def _ranges(idx: list[int]) -> str:
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out[:8]) + (", ..." if len(out) > 8 else "")


def completeness_problems(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What is wrong between a model's config and its tensors (names and shapes); empty when nothing.

    * the text decoder's layers (``<prefix>.layers.N.*``) number what ``num_hidden_layers`` says
      (MTP layers of ``num_nextn_predict_layers`` allowed on top), with no layer missing between;
    * every layer holds the tensors of layer 0 with the same shapes (unless the config declares
      layers of different kinds, e.g. dense and MoE);
    * a token embedding exists; a final norm exists when the layers have norms; an output head
      (``lm_head.weight``) exists unless ``tie_word_embeddings`` ties it to the embedding;
    * the embedding and head have ``vocab_size`` rows; for Llama-like models the embedding, head,
      attention and MLP shapes follow ``hidden_size``, heads, ``head_dim`` and ``intermediate_size``.
    """
    problems: list[str] = []
    if not shapes:
        return ["the checkpoint holds no tensors"]
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(key: str) -> Any:
        return config.get(key, text.get(key))

    def num(keys: tuple[str, ...]) -> tuple[str, int] | None:
        try:
            return _config_int(config, keys, "")
        except CheckpointError:
            problems.append(f"config.json: {keys[0]} is {get(keys[0])!r}, expected a whole number")
            return None

    stacks: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    other: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = split_layer_name(name)
        if parts is None:
            other[name] = tuple(shape)
        else:
            stacks.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = tuple(shape)
    hetero = _heterogeneous_layers(config)
    for prefix, layers in sorted(stacks.items()):
        idx = sorted(layers)
        n_missing = idx[-1] + 1 - len(idx)
        if n_missing:
            present, gaps = set(idx), []
            for i in range(idx[-1]):
                if i not in present:
                    gaps.append(i)
                    if len(gaps) >= 64:
                        break
            problems.append(f"layer(s) {_ranges(gaps)}{', ...' if n_missing > len(gaps) else ''} of {prefix} have "
                            f"no tensors at all ({n_missing} of {idx[-1] + 1} layers), though layer {idx[-1]} "
                            f"does (whole layers are missing)")
        if hetero or len(idx) < 2:
            continue
        # each layer against the majority of layers: a tensor most layers have is missing where absent,
        # a shape most layers share is wrong where different
        count: Counter[str] = Counter(suffix for i in idx for suffix in layers[i])
        for suffix in sorted(count):
            have = [i for i in idx if suffix in layers[i]]
            if 2 * len(have) >= len(idx):
                lack = [i for i in idx if suffix not in layers[i]]
                if lack:
                    problems.append(f"tensor '{prefix}.{lack[0]}.{suffix}' is missing"
                                    + (f" (and in layer(s) {_ranges(lack[1:])})" if len(lack) > 1 else "")
                                    + f", though {len(have)} other layer(s) have it, e.g. '{prefix}.{have[0]}.{suffix}'")
            else:
                problems.append(f"layer(s) {_ranges(have)} of {prefix} hold '{suffix}', which the other "
                                f"{len(idx) - len(have)} layer(s) lack")
            shapes_of = Counter(layers[i][suffix] for i in have)
            if len(shapes_of) > 1:
                common, n_common = shapes_of.most_common(1)[0]
                odd = [i for i in have if layers[i][suffix] != common]
                for i in odd[:4]:
                    problems.append(f"tensor '{prefix}.{i}.{suffix}' has shape {list(layers[i][suffix])}, but "
                                    f"{n_common} other layer(s) have {list(common)}")
    # the text decoder's layer count against the config
    main = [p for p in stacks if not _SIDE_STACK.search(p)]
    main_prefix = max(main, key=lambda p: sum(len(v) for v in stacks[p].values())) if main else None
    count = num(LAYER_KEYS)
    if main_prefix is not None and count is not None:
        key, n_cfg = count
        n_t = max(stacks[main_prefix]) + 1
        nextn = get("num_nextn_predict_layers")
        extra_ok = nextn if isinstance(nextn, int) and nextn > 0 else 0
        if not n_cfg <= n_t <= n_cfg + extra_ok:
            problems.append(f"config.json says {key} = {n_cfg}, but the tensors hold {n_t} layer(s) "
                            f"({main_prefix}.0 to {main_prefix}.{n_t - 1})")
    # embedding, final norm, head
    embed = next((min((n for n in other if n == s or n.endswith("." + s)), key=len)
                  for s in EMBED_SUFFIXES if any(n == s or n.endswith("." + s) for n in other)), None)
    if embed is None and not any("embed" in n or "wte" in n for n in other):
        problems.append("no token embedding tensor (e.g. 'model.embed_tokens.weight')")
    layer0 = stacks[main_prefix][min(stacks[main_prefix])] if main_prefix is not None else {}
    if any("norm" in s or s.startswith("ln") for s in layer0) and not any(
            "norm" in n or "ln_f" in n for n in other):
        problems.append("no final norm tensor (e.g. 'model.norm.weight'), though the layers have norms")
    tied = get("tie_word_embeddings")
    heads = [n for n in other if _HEAD_RE.search(n)]
    if tied is False and not heads:
        problems.append(f"no output head tensor '{TIED_HEAD}', and config.json says tie_word_embeddings = false "
                        f"(a tied model would read the embedding)")
    vocab = num(("vocab_size",))
    hidden = num(HIDDEN_KEYS)
    llama_like = str(config.get("model_type", "")) in _LLAMA_LIKE and not hetero
    for name in [x for x in (embed, TIED_HEAD if TIED_HEAD in other else None) if x]:
        shape = other[name]
        if vocab and len(shape) == 2 and shape[0] != vocab[1]:
            problems.append(f"tensor '{name}' has {shape[0]} rows (shape {list(shape)}), but config.json says "
                            f"vocab_size = {vocab[1]}")
        if llama_like and hidden and len(shape) == 2 and shape[1] != hidden[1]:
            problems.append(f"tensor '{name}' has shape {list(shape)}, but config.json says "
                            f"{hidden[0]} = {hidden[1]}")
    required = _LAYER_REQUIRED.get(str(config.get("model_type", ""))) if not hetero else None
    if required and main_prefix is not None:
        layers = stacks[main_prefix]
        for suffix in required:
            lack = [i for i in sorted(layers) if suffix not in layers[i]]
            if len(lack) == len(layers):  # in some layers only: reported above against the other layers
                problems.append(f"tensor '{main_prefix}.{lack[0]}.{suffix}' is missing, and so is '{suffix}' in "
                                f"every other layer; a {config.get('model_type')} layer needs it")
    if llama_like and hidden and main_prefix is not None:
        h = hidden[1]
        heads_n = num(("num_attention_heads",))
        kv = num(("num_key_value_heads",)) or heads_n
        inter = num(("intermediate_size",))
        hd = num(("head_dim",))
        head_dim = hd[1] if hd else (h // heads_n[1] if heads_n and heads_n[1] else None)
        want: dict[str, tuple[tuple[int, ...], str]] = {}
        if heads_n and head_dim:
            q, k = heads_n[1] * head_dim, kv[1] * head_dim  # type: ignore[index]
            what = f"hidden_size = {h}, {heads_n[1]} heads, {kv[1]} kv heads, head_dim {head_dim}"  # type: ignore[index]
            want.update({"self_attn.q_proj.weight": ((q, h), what), "self_attn.k_proj.weight": ((k, h), what),
                         "self_attn.v_proj.weight": ((k, h), what), "self_attn.o_proj.weight": ((h, q), what)})
        if inter:
            what = f"hidden_size = {h}, intermediate_size = {inter[1]}"
            want.update({"mlp.gate_proj.weight": ((inter[1], h), what), "mlp.up_proj.weight": ((inter[1], h), what),
                         "mlp.down_proj.weight": ((h, inter[1]), what)})
        bad = 0
        for i, layer in sorted(stacks[main_prefix].items()):
            for suffix, (shape, what) in want.items():
                if suffix in layer and layer[suffix] != shape and bad < 6:
                    bad += 1
                    problems.append(f"tensor '{main_prefix}.{i}.{suffix}' has shape {list(layer[suffix])}, but "
                                    f"config.json ({what}) implies {list(shape)}")
    return problems


def _problem_text(head: str, problems: list[str], fix: str, limit: int = 12) -> str:
    shown = problems if len(problems) <= limit else problems[:limit - 1] + [
        f"... and {len(problems) - limit + 1} more"]
    return f"{head} ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in shown) + f"\n  (fix: {fix})"


def check_complete(ckpt: Checkpoint) -> None:
    """:meth:`Checkpoint.verify` as a function."""
    ckpt.verify()


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
        self.out = check_output_path(out_dir, overwrite=overwrite)
        self.overwrite = overwrite
        self.shard_size = parse_size(shard_size, "shard size (--shard-size)")
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
        self._place: dict[str, tuple[int, int]] = {}  # name -> (shard index, absolute file offset)
        self._handles: dict[int, Any] = {}
        self._written: set[str] = set()
        self._done = False
        self.total_size = sum(s.nbytes for s in self._specs.values())
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(describe_os_error(e, f"cannot create the parent folder of output folder {self.out}:")) from e
        remove_stale_temps(self.out)  # a killed writer's full-size shards would take the space we need
        try:
            # the pid in the name identifies the owner even before the owner record is written
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.out.name}{_TMP_TAG}{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise CheckpointError(describe_os_error(e, f"cannot create a temporary folder for {self.out} in")) from e
        try:
            try:
                (self.tmp / OWNER_FILE).write_text(json.dumps(_owner_record()) + "\n", encoding="utf-8")
            except OSError as e:
                raise self._io_error(e, f"write {OWNER_FILE}") from e
            for i, group in enumerate(groups):
                self._write_header(i, group, meta)
        except BaseException:
            self.abort()
            raise

    def _io_error(self, err: OSError, what: str) -> CheckpointError:
        """A CheckpointError for a failed file operation inside the temporary folder."""
        return CheckpointError(describe_os_error(err, f"cannot {what} in {self.tmp} (the temporary folder of "
                                                      f"output folder {self.out}, which was left as it was)",
                                                 path=""))

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
        try:
            with open(self.tmp / self.files[i], "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(start + offset)  # full size now; tensors fill it in any order
                if offset and hasattr(os, "posix_fallocate"):
                    try:  # reserve the blocks now: a full disk fails here, and the writes stay simple copies
                        os.posix_fallocate(f.fileno(), start, offset)
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                            raise
                        # filesystems without fallocate support: the sparse file works as well
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                raise CheckpointError(f"no space left on the disk of output folder {self.out} for shard "
                                      f"{self.files[i]} ({start + offset} bytes; {self.total_size} bytes of "
                                      f"tensors in all) (fix: free disk space, or choose an output folder on "
                                      f"another disk; nothing was written to {self.out})") from e
            raise self._io_error(e, f"write shard {self.files[i]} ({start + offset} bytes)") from e

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
        try:
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = open(self.tmp / self.files[shard], "r+b")
            f.seek(offset)
            f.write(memoryview(data))
        except OSError as e:
            raise self._io_error(e, f"write tensor {name!r} to {self.files[shard]}") from e
        self._written.add(name)

    def finish(self, *, config: dict, tokenizer_from: str | os.PathLike | None = None,
               extra_files: Mapping[str, str] | None = None) -> Path:
        """Write config, index, tokenizer and extra files, check completeness, rename into place."""
        try:
            missing = [n for n in self._specs if n not in self._written]
            if missing:
                raise CheckpointError(f"{self.out}: {len(missing)} tensor(s) were never written, e.g. "
                                      f"{missing[:5]}; write every declared tensor before finish()")
            try:
                self._close_handles()
            except OSError as e:  # a buffered write that only fails when flushed
                raise self._io_error(e, "write the shards") from e
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_size},
                         "weight_map": {n: self.files[self._place[n][0]] for n in sorted(self._specs)}}
                self._write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
            if tokenizer_from is not None:
                src = Path(tokenizer_from)
                if not src.is_dir():
                    raise CheckpointError(f"{self.out}: tokenizer source {src} is not a directory; pass "
                                          f"the model directory whose tokenizer files should be copied")
                for fname in TOKENIZER_FILES:
                    if (src / fname).is_file():
                        try:
                            shutil.copyfile(src / fname, self.tmp / fname)
                        except OSError as e:
                            raise self._io_error(e, f"copy tokenizer file {fname} (from {src})") from e
            for fname, text in (extra_files or {}).items():
                target = (self.tmp / fname).resolve()
                if fname in ("", ".") or self.tmp.resolve() not in target.parents:
                    raise CheckpointError(f"{self.out}: extra file name {fname!r} must be a relative "
                                          f"path inside the output directory")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise self._io_error(e, f"create the folder of {fname}") from e
                self._write_text(str(target.relative_to(self.tmp.resolve())), text)
            self._write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            try:
                (self.tmp / OWNER_FILE).unlink(missing_ok=True)  # the finished model carries no owner record
            except OSError as e:
                raise self._io_error(e, f"remove {OWNER_FILE}") from e
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out

    def _write_text(self, fname: str, text: str) -> None:
        try:
            (self.tmp / fname).write_text(text, encoding="utf-8")
        except OSError as e:
            raise self._io_error(e, f"write {fname}") from e

    def _commit(self) -> None:
        try:
            if not (self.out.exists() or self.out.is_symlink()):
                try:
                    os.rename(self.tmp, self.out)
                    return
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self.overwrite:
                        raise
            if not self.overwrite:  # appeared while we were writing
                raise CheckpointError(f"output folder {self.out} appeared while the merge was writing (fix: "
                                      f"choose another output path, or pass --overwrite to replace it)")
            aside = self.out.with_name(f"{self.out.name}.old-{zlib.crc32(str(self.tmp).encode()):08x}")
            os.rename(self.out, aside)
            try:
                os.rename(self.tmp, self.out)
            except BaseException:
                os.rename(aside, self.out)
                raise
        except OSError as e:
            raise CheckpointError(describe_os_error(e, f"cannot move the finished model into place at {self.out}:")
                                  + f"; {self.out} was left as it was") from e
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
