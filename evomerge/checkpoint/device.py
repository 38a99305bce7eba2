"""Device checks: a ``--device`` option checked against the devices this machine has."""

from __future__ import annotations

import re

import torch

from evomerge.errors import ConfigError, Problem

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
