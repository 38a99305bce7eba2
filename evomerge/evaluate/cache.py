"""Score cache: a repeated candidate is never scored twice.

Keys are ``model_key|suite fingerprint|split|limit|seed`` (see :meth:`Scorer.cache_key`), where
``model_key`` is a recipe hash (cheap, preferred by the search) or :func:`weights_fingerprint`.
The cache lives in memory and, given a directory, also on disk as one JSON file per key (written
atomically), so it survives restarts and is shared by processes scoring the same study.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from evomerge.evaluate.results import SuiteResult


def weights_fingerprint(model) -> str:
    """sha256 (16 hex digits) over every parameter and buffer: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\0".encode())
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class ScoreCache:
    def __init__(self, directory: str | Path | None = None):
        self._mem: dict[str, dict] = {}
        self.dir = Path(directory) if directory is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, key: str) -> SuiteResult | None:
        d = self._mem.get(key)
        if d is None and self.dir is not None:
            f = self._file(key)
            if f.is_file():
                try:
                    rec = json.loads(f.read_text())
                    d = rec["result"] if rec.get("key") == key else None
                except (OSError, ValueError, KeyError):
                    d = None
        if d is None:
            return None
        self._mem[key] = d
        return SuiteResult.from_dict(d)

    def put(self, key: str, result: SuiteResult) -> None:
        d = result.to_dict()
        self._mem[key] = d
        if self.dir is not None:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "result": d}, f)
            os.replace(tmp, self._file(key))

    def __len__(self) -> int:
        return len(self._mem)
