"""Writing Hugging Face model directories: an atomic, streaming sharded safetensors writer.

:class:`CheckpointWriter` is told every tensor up front (:class:`TensorSpec`), lays the shards out,
writes each shard's header first and then every tensor's bytes straight to its offset, so peak
memory is one tensor. Everything goes to a temporary directory beside the output, renamed into
place by :meth:`CheckpointWriter.finish`; a failure leaves the output untouched.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint.names import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, parse_size
from evomerge.checkpoint.oserrors import describe_os_error
from evomerge.checkpoint.output import TMP_TAG, OWNER_FILE, owner_record, check_output_path, remove_stale_temps
from evomerge.errors import CheckpointError


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
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.out.name}{TMP_TAG}{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise CheckpointError(describe_os_error(e, f"cannot create a temporary folder for {self.out} in")) from e
        try:
            try:
                (self.tmp / OWNER_FILE).write_text(json.dumps(owner_record()) + "\n", encoding="utf-8")
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
