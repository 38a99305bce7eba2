"""The native CPU merge kernel: ``native.c``, compiled on first use with the system C compiler.

Why: on CPU a whole TIES / DARE-TIES candidate through ``torch.compile`` paid about 0.75 ns per
entry of Inductor arithmetic (int64 index vectors, mask casts) plus ~30 us of guard and wrapper
overhead per launch, and a tensor whose top-k threshold splits a tie group needed one launch per
segment. ``native.c`` merges *every* task-vector tensor of a candidate in one call (the disk
pipeline calls it per tensor): a thread pool takes 32K-entry work items from a shared counter, each
item is computed in 256-entry blocks, split at tie cuts so thresholds stay scalars in the
vectorized loop, and the DARE hash is plain uint32 arithmetic. Each variant (sources, trim mode,
switches, dtypes) is its own small library, built on first use (~0.5 s), so its loop has every
branch resolved at compile time.

The same library sorts: :func:`rank_order` (the TIES rank-order statistics of the resident
materializer) is a stable LSD radix argsort, index for index ``torch.sort(stable=True)``, about 6x
faster on CPU; and :func:`all_finite` checks an output's bits in one pass.

Exactness: the C code performs the eager reference's float32 operations in the same order, with
contraction into fused multiply-adds disabled (``-ffp-contract=off``) except the one ``fmaf`` that
mirrors ``torch.add(alpha=)``; outputs are rounded to nearest even. tests/test_kernel_matrix.py
compares it bit for bit with the reference and the torch kernels, and with a float64 oracle.

The shared libraries are built into ``$EVOMERGE_CACHE`` (default ``~/.cache/evomerge``)/native, keyed
by the source, the flags, the compiler and this CPU's feature flags (``-march=native``), written
under a temporary name and renamed. No compiler, a failed build or ``EVOMERGE_NATIVE=0``: the
callers keep the ``torch.compile`` / eager kernels (same results), with one warning for a failed
build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from evomerge.methods.sparsify import DARE_BITS

MAX_SOURCES = 8
TRIM = {"none": 0, "thr": 1, "band": 2, "hash": 3}
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-strict-aliasing", "-fno-math-errno",
         "-fPIC", "-shared", "-pthread")
SOURCE = Path(__file__).with_name("native.c")

_F = ctypes.c_float * MAX_SOURCES
_I64 = ctypes.c_int64 * MAX_SOURCES
_U32 = ctypes.c_uint32 * MAX_SOURCES
_I32 = ctypes.c_int32 * MAX_SOURCES


class NativeJob(ctypes.Structure):
    """Mirror of ``em_job`` in native.c (field order and types must match; checked by ``em_abi``)."""

    _fields_ = [
        ("fn", ctypes.c_void_p), ("out", ctypes.c_void_p), ("base", ctypes.c_void_p),
        ("xs", ctypes.c_void_p * MAX_SOURCES),
        ("numel", ctypes.c_int64), ("hash_start", ctypes.c_int64),
        ("hi_cut", _I64), ("lo_cut", _I64),
        ("w", _F), ("div", _F), ("hi", _F), ("hi_up", _F), ("lo", _F), ("lo_up", _F),
        ("key", _U32), ("cutoff", _U32),
        ("lam", ctypes.c_float), ("norm_div", ctypes.c_float),
        ("n", ctypes.c_int32), ("base_dtype", ctypes.c_int32), ("x_dtype", _I32),
        ("nonfinite", ctypes.c_int32),
    ]


_lock = threading.Lock()
_state: dict = {"driver": None, "failed": None, "variants": {}}


def cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge") / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _toolchain(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    return hashlib.sha256("\0".join([" ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()


def _build(cc: str, defines: dict[str, int]) -> Path:
    """The shared library of one variant (``-DEM_...``), compiled once into the cache."""
    dflags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(dflags).encode() + _toolchain(cc).encode())
    out = cache_dir() / f"em_{key.hexdigest()[:24]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, *dflags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _load(cc: str, defines: dict[str, int]) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(cc, defines)))
    lib.em_abi.restype = ctypes.c_int
    if lib.em_abi() != ctypes.sizeof(NativeJob) * 100 + MAX_SOURCES:
        raise RuntimeError(f"native.c's em_job ({lib.em_abi()}) does not match native.NativeJob "
                           f"({ctypes.sizeof(NativeJob) * 100 + MAX_SOURCES})")
    lib.em_run.argtypes = [ctypes.POINTER(NativeJob), ctypes.c_int, ctypes.c_int]
    lib.em_run.restype = ctypes.c_int
    lib.em_all_finite.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.em_all_finite.restype = ctypes.c_int
    lib.em_rank_order.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.em_rank_order.restype = ctypes.c_int
    lib.em_count.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                             ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.em_count.restype = ctypes.c_int
    return lib


def _fail(err: Exception) -> None:
    _state["failed"] = err
    warnings.warn(f"evomerge's native CPU merge kernel is unavailable ({err}); using the torch "
                  "kernels (same results, slower)", RuntimeWarning, stacklevel=3)


def available() -> bool:
    """Whether the native kernels can be used: not disabled (``EVOMERGE_NATIVE=0``), a C compiler,
    and the driver builds (warned once otherwise)."""
    with _lock:
        if os.environ.get("EVOMERGE_NATIVE", "1") == "0" or _state["failed"] is not None:
            return False
        if _state["driver"] is None:
            cc = _compiler()
            if cc is None:
                return False
            try:
                _state["driver"] = _load(cc, {})
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _fail(err)
                return False
        return True


def block_fn(*, n: int, mode: str, elect: bool, rescale: bool, normalize: bool, xdt: int, odt: int,
             linear: bool = False) -> int | None:
    """Address of the ``em_block`` of one variant (compiled on first use; ``None`` when unavailable).
    ``xdt``: the common dtype code of base and sources (bfloat16 or float32), else -1. ``linear``:
    the linear method's variant (no base; the trim and election switches must be off)."""
    if not available():
        return None
    if linear and (mode != "none" or elect or rescale):
        raise ValueError("the linear variant has no trim, election or rescale")
    key = (n, TRIM[mode], int(elect), int(rescale), int(normalize and elect), xdt, odt, int(linear))
    with _lock:
        fn = _state["variants"].get(key)
        if fn is None:
            defines = dict(zip(("EM_N", "EM_MODE", "EM_ELECT", "EM_RESCALE", "EM_NORMALIZE", "EM_XDT",
                                "EM_ODT", "EM_LINEAR"), key))
            try:
                lib = _load(_compiler(), defines)
            except (OSError, RuntimeError, subprocess.SubprocessError, TypeError) as err:
                _fail(err)
                return None
            fn = (lib, ctypes.cast(lib.em_block, ctypes.c_void_p).value)
            _state["variants"][key] = fn
        return fn[1]


def dtype_code(*ts: torch.Tensor) -> int:
    """The code of the tensors' common dtype when the fused loads handle it (bfloat16, float32), else -1."""
    dts = {t.dtype for t in ts}
    dt = dts.pop() if len(dts) == 1 else None
    return DTYPES[dt] if dt in (torch.bfloat16, torch.float32) else -1


def readable(*ts: torch.Tensor) -> bool:
    """Whether native.c can read (and write) these tensors in place: contiguous CPU
    float32/bfloat16/float16 of one size."""
    return (all(t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() for t in ts)
            and len({t.numel() for t in ts}) <= 1)


def _threads(threads: int | None) -> int:
    return int(threads or torch.get_num_threads())


def supports(out: torch.Tensor, base: torch.Tensor | None, xs: list[torch.Tensor]) -> bool:
    """Whether native.c can compute this tensor (CPU, contiguous, float32/bfloat16/float16, 1..8 sources)."""
    return 1 <= len(xs) <= MAX_SOURCES and readable(out, *([base] if base is not None else []), *xs)


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether every value of ``t`` is finite (one pass over its bits), or ``None`` when the native
    library cannot check it (not a contiguous CPU float32/bfloat16/float16 tensor, or unavailable)."""
    if not readable(t) or not available():
        return None
    return bool(_state["driver"].em_all_finite(t.data_ptr(), DTYPES[t.dtype], t.numel()))


def count(x: torch.Tensor, base: torch.Tensor, v: float, chunk: int, threads: int | None = None):
    """Per chunk of ``chunk`` entries, how many float32 ``|x - base|`` are ``> v`` and ``== v``:
    ``(gt, eq)`` int64 numpy arrays, or ``"nan"`` when some ``|x - base|`` is nan, or ``None`` when
    native.c cannot compute it here (see :func:`rank_order`). The TIES counting pass."""
    n = x.numel()
    if not readable(x, base) or not available():
        return None
    m = (n + chunk - 1) // chunk
    gt, eq = np.empty(m, np.int64), np.empty(m, np.int64)
    rc = _state["driver"].em_count(x.data_ptr(), DTYPES[x.dtype], base.data_ptr(), DTYPES[base.dtype], n, v,
                                   chunk, gt.ctypes.data, eq.ctypes.data, _threads(threads))
    if rc < 0:
        raise RuntimeError(f"native counting pass rejected {n} entries in chunks of {chunk}")
    return "nan" if rc else (gt, eq)


def rank_order(x: torch.Tensor, base: torch.Tensor, threads: int | None = None):
    """``torch.sort(|x - base|, descending=True, stable=True).indices`` (float32 ``|x - base|``) as
    an int32 numpy array, by a four-pass (8-bit digits) LSD radix sort of the magnitudes' bits on a
    thread pool (about 6x faster than torch's CPU sort; every nan ties with every other nan, as in
    torch), or ``None`` when native.c cannot compute it here (not contiguous CPU
    float32/bfloat16/float16 tensors of one size below 2^31, or unavailable). Scratch: 12 bytes per
    entry besides the 4-byte result."""
    n = x.numel()
    if n >= 2**31 or not readable(x, base) or not available():
        return None
    order, idx1 = np.empty(n, np.int32), np.empty(n, np.int32)
    key0, key1 = np.empty(n, np.uint32), np.empty(n, np.uint32)
    rc = _state["driver"].em_rank_order(x.data_ptr(), DTYPES[x.dtype], base.data_ptr(), DTYPES[base.dtype], n,
                                        order.ctypes.data, key0.ctypes.data, key1.ctypes.data, idx1.ctypes.data,
                                        _threads(threads))
    if rc != 0:
        raise RuntimeError(f"native rank order failed ({rc}) for {n} entries")
    return order


def task_vector_job(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], plan) -> NativeJob | None:
    """The job computing ``plan`` (a :class:`~evomerge.methods.plan.TensorPlan`) into the flat ``out``
    from flat ``base`` and the live sources ``xs`` (plan order), or ``None`` when native.c cannot
    compute it here. The one converter between plans and native.c: a source's top-k cut ``(thr,
    last)`` becomes the thresholds ``thr`` (entries ``<= last``) and ``next_up(thr)`` (after it)."""
    from evomerge.methods.plan import next_up

    if not supports(out, base, xs) or len(xs) != len(plan.sources):
        return None
    fn = block_fn(n=len(xs), mode=plan.mode, elect=plan.elect, rescale=plan.rescale, normalize=plan.normalize,
                  xdt=dtype_code(base, *xs), odt=DTYPES[out.dtype])
    if fn is None:
        return None
    numel = out.numel()
    job = NativeJob(fn=fn, out=out.data_ptr(), base=base.data_ptr(), numel=numel, n=len(xs),
              base_dtype=DTYPES[base.dtype], lam=plan.lam, norm_div=plan.norm_div, hash_start=0)
    for i, (x, src) in enumerate(zip(xs, plan.sources)):
        job.xs[i], job.x_dtype[i], job.w[i], job.div[i] = x.data_ptr(), DTYPES[x.dtype], src.weight, src.divisor
        hi, hc = (src.keep.thr, src.keep.last) if src.keep else (-1.0, -1)  # |d| >= -1: every entry
        lo, lc = (src.drop.thr, src.drop.last) if src.drop else (math.inf, -1)  # none dropped
        job.hi[i], job.hi_up[i], job.hi_cut[i] = hi, next_up(hi), min(hc, numel)
        job.lo[i], job.lo_up[i], job.lo_cut[i] = lo, next_up(lo), min(lc, numel)
        job.key[i], job.cutoff[i] = (src.dare.key, src.dare.cutoff) if src.dare else (0, 1 << DARE_BITS)
    return job


def linear_job(out: torch.Tensor, xs: list[torch.Tensor], weights) -> NativeJob | None:
    """The linear method's job: ``out = x_0 * w_0``, then ``out = fma(x_i, w_i, out)`` in float32,
    rounded to ``out``'s dtype (see native.c), or ``None`` when native.c cannot compute it here."""
    if not xs or not supports(out, xs[0], xs):
        return None
    fn = block_fn(n=len(xs), mode="none", elect=False, rescale=False, normalize=False,
                  xdt=dtype_code(*xs), odt=DTYPES[out.dtype], linear=True)
    if fn is None:
        return None
    job = NativeJob(fn=fn, out=out.data_ptr(), base=None, numel=out.numel(), n=len(xs), base_dtype=DTYPES[xs[0].dtype],
              lam=1.0, norm_div=1.0)
    for i, (x, w) in enumerate(zip(xs, weights)):
        job.xs[i], job.x_dtype[i], job.w[i] = x.data_ptr(), DTYPES[x.dtype], w
    return job


def run(jobs: list[NativeJob], threads: int | None = None) -> list[bool]:
    """Run ``jobs`` (filled ``NativeJob`` structs, ``fn`` from :func:`block_fn`) in one call; per job, True
    when every output value was finite."""
    if not jobs:
        return []
    if not available():
        raise RuntimeError("the native kernel is not available")
    arr = (NativeJob * len(jobs))(*jobs)
    if _state["driver"].em_run(arr, len(jobs), _threads(threads)) != 0:
        raise RuntimeError("native merge kernel rejected a job (no kernel, sources outside 1..8 or "
                           "negative size)")
    return [not j.nonfinite for j in arr]
