"""One tensor's task-vector merge, planned: which entries of each source's task vector are kept, how
the kept values are scaled, and how the sources combine.

A :class:`TensorPlan` is what every planned backend executes (:mod:`evomerge.methods.backends`):
the torch kernel reads it directly (eagerly, chunk by chunk, or under ``torch.compile``), the native
C kernel through its one converter (:func:`evomerge.methods.native.task_vector_job`).

**Top-k sets.** The ``k`` largest ``|d|`` with ties at the threshold kept in flat index order (the
tie rule of :mod:`evomerge.methods.sparsify`) are described by a :class:`TopCut` ``(thr, last)``:
the entries with ``|d| > thr`` and those with ``|d| == thr`` at flat index ``<= last``. For a range
of entries that lies wholly at or before ``last`` that is ``|d| >= thr``; wholly after it,
``|d| >= next_float32(thr)``. So a kernel compares with one scalar per source and range, and a
tensor is cut into ranges at every ``last + 1`` (:meth:`TensorPlan.segments`): the exact set, with
no index arithmetic in the kernel.

A cut is found by :func:`find_top_cut` (a sampled guess of the threshold and one counting pass, in
the native kernel where it builds), by :func:`select_top_cut` (an exact whole-tensor selection), or
in the resident materializer from per-source rank orders (:func:`evomerge.resident.stats.top_cut`);
:func:`build_plan` takes any of them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.methods.common import F32
from evomerge.methods.sparsify import dare_cutoff, dare_key, keep_count, magnitude_threshold, outlier_counts

KEEP_ALL = -1.0  # a segment threshold that keeps every entry (``|d| >= -1``)
DROP_NONE = math.inf  # a drop threshold that drops nothing finite


def next_up(v: float) -> float:
    """The smallest float32 above ``v`` (``|d| >= next_up(v)`` is ``|d| > v`` for float32 ``d``);
    ``inf`` and negative values unchanged."""
    if v == math.inf or v < 0:
        return v
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


@dataclass(frozen=True)
class TopCut:
    """The top-k set of ``|d|``: ``|d| > thr``, and ``|d| == thr`` at flat index ``<= last``."""

    thr: float
    last: int

    def threshold(self, start: int) -> float:
        """The scalar ``t`` with "kept iff ``|d| >= t``" for a range starting at ``start`` that does
        not contain ``last + 1`` past its first entry (see :meth:`TensorPlan.segments`)."""
        return self.thr if start <= self.last else next_up(self.thr)


@dataclass(frozen=True)
class DareMask:
    """DARE's counter-based mask of one source: keep entry ``j`` when
    ``dare_uniform24((j + key) mod 2^32) < cutoff`` (:mod:`evomerge.methods.sparsify`)."""

    key: int
    cutoff: int


@dataclass(frozen=True)
class SourcePlan:
    """One live source: ``divisor``-rescaled, trimmed task vector times ``weight``.

    ``keep``: magnitude trim, the kept top-k set (``None``: every entry); ``drop``: breadcrumbs'
    outliers, a top-k set removed again (``None``: none); ``dare``: a random drop (``None``: none);
    ``divisor``: kept values are divided by it (1.0: no rescale)."""

    index: int  # position among the method's sources
    weight: float
    keep: TopCut | None = None
    drop: TopCut | None = None
    dare: DareMask | None = None
    divisor: float = 1.0


@dataclass(frozen=True)
class Segment:
    """Entries ``start .. end - 1`` of a planned tensor with the scalar thresholds of every live
    source there: keep ``|d| >= keep[i]`` and not ``|d| >= drop[i]``."""

    start: int
    end: int
    keep: tuple[float, ...]
    drop: tuple[float, ...]


@dataclass(frozen=True)
class TensorPlan:
    """``base + lam * combine_i(weight_i * trim_i(x_i - base) / divisor_i)`` over the live sources.

    ``combine``: with ``elect``, TIES sign election and disjoint merge (divided per entry by the
    agreeing weights when ``normalize``); else the sum, divided by ``norm_div``. Sources whose
    trimmed task vector is zero or whose weight is zero are left out (they change no value)."""

    numel: int
    sources: tuple[SourcePlan, ...]
    elect: bool
    normalize: bool
    lam: float
    norm_div: float = 1.0

    @property
    def mode(self) -> str:
        """The kernels' trim variant: ``hash`` (DARE), ``band`` (breadcrumbs), ``thr`` (magnitude) or
        ``none`` (nothing trimmed)."""
        if any(s.dare is not None for s in self.sources):
            return "hash"
        if any(s.drop is not None for s in self.sources):
            return "band"
        return "thr" if any(s.keep is not None for s in self.sources) else "none"

    @property
    def rescale(self) -> bool:
        return any(s.divisor != 1.0 for s in self.sources)

    def cut_points(self) -> set[int]:
        """Flat indices where some source's threshold changes (``last + 1`` of its cuts)."""
        cuts = (c for s in self.sources for c in (s.keep, s.drop) if c is not None)
        return {c.last + 1 for c in cuts if 0 < c.last + 1 < self.numel}

    def segments(self, chunk: int | None = None) -> list[Segment]:
        """The tensor as ranges with scalar thresholds: cut at every :meth:`cut_points` entry and,
        with ``chunk``, into ranges of at most ``chunk`` entries."""
        bounds = self.cut_points() | {0, self.numel}
        if chunk:
            bounds |= set(range(0, self.numel, chunk))
        edges = sorted(bounds)
        return [Segment(s, e, tuple(src.keep.threshold(s) if src.keep else KEEP_ALL for src in self.sources),
                        tuple(src.drop.threshold(s) if src.drop else DROP_NONE for src in self.sources))
                for s, e in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------- planning


def source_trim(trim: str, p: dict[str, Any], i: int, numel: int) -> tuple[int | None, int | None, int | None] | None:
    """Source ``i``'s trim as counts: ``(keep_k, drop_k, dare_cutoff)`` (``None`` entries: no such
    step), or ``None`` when its trimmed task vector is zero (weight 0, or nothing kept)."""
    if p["weight"][i] == 0:
        return None
    d = p["density"][i] if "density" in p else 1.0
    if trim == "none" or d >= 1.0:
        return None, None, None
    if trim == "magnitude":
        k = keep_count(numel, d)
        return None if k <= 0 else (k if k < numel else None, None, None)
    if trim == "band":
        n_top, n_keep = outlier_counts(numel, d, p["gamma"][i])
        if n_keep <= 0:
            return None
        return (n_top + n_keep if n_top + n_keep < numel else None, n_top or None, None)
    if trim == "dare":
        cutoff = dare_cutoff(d)
        return None if cutoff <= 0 else (None, None, cutoff)
    raise ValueError(f"trim '{trim}' has no planned form")


def live_sources(trim: str, p: dict[str, Any], numel: int) -> list[int]:
    """The sources a plan keeps (see :func:`source_trim`)."""
    return [i for i in range(len(p["weight"])) if source_trim(trim, p, i, numel) is not None]


def build_plan(trim: str, elect: bool, p: dict[str, Any], numel: int, seed: int | None,
               top_cut: Callable[[int, int], TopCut | None]) -> TensorPlan | None:
    """The plan of one tensor from a task-vector method's resolved parameters ``p``; ``top_cut(i, k)``
    gives source ``i``'s top-``k`` set (``None``: it cannot, e.g. a nan task vector; then the whole
    plan is ``None`` and the reference pipeline defines the result)."""
    rescale = bool(p.get("rescale", False))
    sources = []
    for i, w in enumerate(p["weight"]):
        counts = source_trim(trim, p, i, numel)
        if counts is None:
            continue
        keep_k, drop_k, cutoff = counts
        keep = top_cut(i, keep_k) if keep_k is not None else None
        drop = top_cut(i, drop_k) if drop_k is not None else None
        if (keep_k is not None and keep is None) or (drop_k is not None and drop is None):
            return None
        d = p["density"][i] if "density" in p else 1.0
        divisor = d if rescale and 0.0 < d < 1.0 else 1.0
        dare = DareMask(dare_key(seed, i), cutoff) if cutoff is not None else None
        sources.append(SourcePlan(i, w, keep, drop, dare, divisor))
    total = float(sum(p["weight"]))
    norm_div = total if not elect and p["normalize"] and abs(total) >= 1e-8 else 1.0
    return TensorPlan(numel, tuple(sources), elect, bool(elect and p["normalize"]), p["lambda"], norm_div)


# ---------------------------------------------------------------- finding top-k cuts

COUNT_CHUNK = 1 << 19  # entries per chunk of the counting pass
_SAMPLE = 1 << 14  # entries in the threshold-guess sample
_SCAN = 1 << 17  # entries per piece when searching a chunk for the tie cut


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _abs_delta(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A new float32 ``|x - b|`` (conversion first: same-dtype subtraction is faster on CPU)."""
    return x.to(F32, copy=True).sub_(b.to(F32)).abs_()


def select_top_cut(x: torch.Tensor, base: torch.Tensor, k: int) -> TopCut:
    """The top-``k`` set of ``|x - base|`` (``0 < k < numel``) by an exact whole-tensor selection."""
    a = _abs_delta(_flat(x), _flat(base))
    thr = magnitude_threshold(a, k)
    above = int((a > thr).sum())
    ties = torch.nonzero(a == thr).view(-1)
    last = a.numel() - 1 if ties.numel() == k - above else int(ties[k - above - 1])
    return TopCut(float(thr), last)


def find_top_cut(x: torch.Tensor, base: torch.Tensor, k: int) -> TopCut | None:
    """The top-``k`` set of ``|x - base|`` (float32, ``0 < k < numel``); ``None`` when some
    ``|x - base|`` is nan.

    On CPU: a strided sample guesses the threshold ``v`` (bf16 task vectors take few distinct
    values, so the guess is usually exact), one counting pass finds per chunk how many ``|d|`` are
    ``> v`` and ``== v`` (``em_count`` in the native kernel, else torch), and if
    ``#(> v) < k <= #(>= v)`` the cut is the ``(k - #(> v))``-th tie in flat order; otherwise
    :func:`select_top_cut`. Elsewhere :func:`select_top_cut` (a top-k selection on the device).
    """
    xf, bf = _flat(x), _flat(base)
    n = bf.numel()
    if bf.device.type != "cpu":
        return select_top_cut(xf, bf, k)
    stride = max(1, n // _SAMPLE)
    a = _abs_delta(xf[::stride], bf[::stride])
    m = a.numel()
    kk = min(m, max(1, round(k * m / n)))
    v = float(torch.kthvalue(a, m - kk + 1).values)
    counts = _count(xf, bf, v)
    if counts is None:
        return None
    gt, eq = counts
    above, ties = int(gt.sum()), int(eq.sum())
    if not above < k <= above + ties:
        return select_top_cut(xf, bf, k)
    need = k - above  # 1-based rank of the last kept tie in flat order
    if need == ties:
        return TopCut(v, n - 1)
    cum = eq.cumsum(0)
    j = int(torch.searchsorted(cum, need))
    start, end = j * COUNT_CHUNK, min(n, (j + 1) * COUNT_CHUNK)
    need -= int(cum[j - 1]) if j > 0 else 0
    for s in range(start, end, _SCAN):  # piece by piece (small temporaries)
        hit = _abs_delta(xf[s:min(end, s + _SCAN)], bf[s:min(end, s + _SCAN)]) == v
        found = int(hit.sum())
        if found >= need:
            return TopCut(v, s + int(torch.nonzero(hit).view(-1)[need - 1]))
        need -= found
    raise AssertionError("the counting pass and the tie search disagree")


def _count(xf: torch.Tensor, bf: torch.Tensor, v: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per chunk of :data:`COUNT_CHUNK` entries, ``(#(|d| > v), #(|d| == v))`` as int64 tensors;
    ``None`` when some ``|d|`` is nan. The native kernel where it runs, else torch: the counts from
    ``u = sign(|d| - v)`` by two float reductions (``sum u`` and ``u . u``, exact below 2^24 per
    chunk), since bool reductions are several times slower on CPU."""
    from evomerge.methods import native

    got = native.count(xf, bf, v, COUNT_CHUNK)
    if isinstance(got, str):  # "nan"
        return None
    if got is not None:
        return torch.from_numpy(got[0]), torch.from_numpy(got[1])
    n = bf.numel()
    spans = [(s, min(n, s + COUNT_CHUNK)) for s in range(0, n, COUNT_CHUNK)]
    sums = torch.empty(len(spans), 3, dtype=torch.float64)
    for j, (s, e) in enumerate(spans):
        u = _abs_delta(xf[s:e], bf[s:e]).sub_(v)
        sums[j, 2] = u.sum()  # nan iff some |d| is nan (sign() maps nan to 0)
        u.sign_()
        sums[j, 0] = u.sum()
        sums[j, 1] = torch.dot(u, u)
    if bool(torch.isnan(sums[:, 2]).any()):
        return None
    gt = ((sums[:, 1] + sums[:, 0]) / 2).round().long()
    lt = ((sums[:, 1] - sums[:, 0]) / 2).round().long()
    return gt, torch.tensor([e - s for s, e in spans], dtype=torch.long) - gt - lt


def top_cuts_by_counting(xs: Sequence[torch.Tensor], base: torch.Tensor) -> Callable[[int, int], TopCut | None]:
    """``top_cut(i, k)`` for :func:`build_plan`: :func:`find_top_cut` of source ``i``."""
    return lambda i, k: find_top_cut(xs[i], base, k)
