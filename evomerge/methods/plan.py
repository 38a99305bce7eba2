"""One tensor's task-vector merge, planned: which entries of each source's task vector are kept, how
the kept values are scaled, and how the sources combine.

A :class:`TensorPlan` is what every planned backend executes (:mod:`evomerge.methods.backends`):
the torch kernel reads it directly (eagerly, chunk by chunk, or under ``torch.compile``), the native
C kernel through its one converter (:func:`evomerge.methods.native.task_vector_job`).

**Top-k sets.** The ``k`` largest ``|d|`` with ties at the threshold kept in flat index order (the
tie rule of :mod:`evomerge.methods.sparsify`) are described by a :class:`TopCut` ``(thr, last)``:
the entries with ``|d| > thr`` and those with ``|d| == thr`` at flat index ``<= last``. For a range
of entries that lies wholly at or before ``last`` that is ``|d| >= thr`` (``|d| > `` the float32
below ``thr``); wholly after it, ``|d| > thr``. So a kernel compares with one scalar per source and
range, and a tensor is cut into ranges at every ``last + 1`` (:meth:`TensorPlan.segments`): the
exact set, with no index arithmetic in the kernel.

A cut is found by :func:`find_top_cuts` (a sampled guess of the threshold and one counting pass, in
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

def next_up(v: float) -> float:
    """The smallest float32 above ``v`` (``|d| >= next_up(v)`` is ``|d| > v`` for float32 ``d``);
    ``inf`` and negative values unchanged."""
    if v == math.inf or v < 0:
        return v
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def next_down(v: float) -> float:
    """The largest float32 below ``v > 0`` (``|d| > next_down(v)`` is ``|d| >= v`` for float32 ``d``);
    -1 for ``v = 0`` (below every magnitude, and no denormal to flush)."""
    if v == 0:
        return -1.0
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


@dataclass(frozen=True)
class TopCut:
    """The top-k set of ``|d|``: ``|d| > thr``, and ``|d| == thr`` at flat index ``<= last``."""

    thr: float
    last: int

    def above(self, start: int) -> float:
        """The scalar ``s`` with "kept iff ``|d| > s``" over a range starting at ``start`` that does
        not contain ``last + 1`` past its first entry (see :meth:`TensorPlan.segments`): the float32
        below ``thr`` where ties at ``thr`` are kept, else ``thr``."""
        return next_down(self.thr) if start <= self.last else self.thr


@dataclass(frozen=True)
class DareMask:
    """DARE's counter-based mask of one source: keep entry ``j`` when
    ``dare_uniform24_((j + key) mod 2^32) < cutoff`` (:mod:`evomerge.methods.sparsify`)."""

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
    source there: keep ``|d| > keep[i]`` and drop again ``|d| > drop[i]`` (``None``: no such step)."""

    start: int
    end: int
    keep: tuple[float | None, ...]
    drop: tuple[float | None, ...]


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
    nonnegative: bool = False  # every live weight >= 0 (so a zero divisor means no source agrees)

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
        return [Segment(s, e, tuple(src.keep.above(s) if src.keep else None for src in self.sources),
                        tuple(src.drop.above(s) if src.drop else None for src in self.sources))
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


Request = tuple[int, int]  # (source, k): source's top-k set
CutFinder = Callable[[list[Request]], "dict[Request, TopCut] | None"]


def build_plan(trim: str, elect: bool, p: dict[str, Any], numel: int, seed: int | None,
               find_cuts: CutFinder) -> TensorPlan | None:
    """The plan of one tensor from a task-vector method's resolved parameters ``p``. ``find_cuts``
    gets every ``(source, k)`` top-k set the plan needs, in one call, and returns them (``None``:
    it cannot, e.g. a nan task vector; the plan is then ``None`` and the reference pipeline defines
    the result)."""
    trims = {i: t for i in range(len(p["weight"])) if (t := source_trim(trim, p, i, numel)) is not None}
    requests = sorted({(i, k) for i, (keep_k, drop_k, _) in trims.items() for k in (keep_k, drop_k)
                       if k is not None})
    cuts = find_cuts(requests) if requests else {}
    if cuts is None:
        return None
    rescale = bool(p.get("rescale", False))
    sources = []
    for i, (keep_k, drop_k, cutoff) in trims.items():
        d = p["density"][i] if "density" in p else 1.0
        divisor = d if rescale and 0.0 < d < 1.0 else 1.0
        dare = DareMask(dare_key(seed, i), cutoff) if cutoff is not None else None
        sources.append(SourcePlan(i, p["weight"][i], cuts.get((i, keep_k)), cuts.get((i, drop_k)), dare, divisor))
    total = float(sum(p["weight"]))
    norm_div = total if not elect and p["normalize"] and abs(total) >= 1e-8 else 1.0
    return TensorPlan(numel, tuple(sources), elect, bool(elect and p["normalize"]), p["lambda"], norm_div,
                      all(s.weight >= 0 for s in sources))


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


def find_top_cuts(xs: Sequence[torch.Tensor], base: torch.Tensor, requests: Sequence[Request]
                  ) -> dict[Request, TopCut] | None:
    """The top-``k`` set of ``|xs[i] - base|`` (float32, ``0 < k < numel``) for every ``(i, k)`` of
    ``requests``; ``None`` when some ``|xs[i] - base|`` it reads is nan.

    On CPU: a strided sample guesses each threshold ``v`` (bf16 task vectors take few distinct
    values, so the guess is usually exact); one counting pass finds per chunk how many ``|d|`` are
    ``> v`` and ``== v`` (``em_count`` in the native kernel, else torch, all requests in one sweep),
    and if ``#(> v) < k <= #(>= v)`` the cut is the ``(k - #(> v))``-th tie in flat order;
    otherwise :func:`select_top_cut`. Elsewhere :func:`select_top_cut` (a top-k selection on the
    device).
    """
    bf = _flat(base)
    n = bf.numel()
    if bf.device.type != "cpu":
        return {(i, k): select_top_cut(xs[i], bf, k) for i, k in requests}
    flat = {i: _flat(xs[i]) for i, _ in requests}
    stride = max(1, n // _SAMPLE)
    bs = bf[::stride].to(F32)
    samples = {i: x[::stride].to(F32, copy=True).sub_(bs).abs_() for i, x in flat.items()}
    guesses = []
    for i, k in requests:
        a = samples[i]
        m = a.numel()
        guesses.append(float(torch.kthvalue(a, m - min(m, max(1, round(k * m / n))) + 1).values))
    counts = _count([flat[i] for i, _ in requests], bf, guesses)
    if counts is None:
        return None
    out = {}
    for (i, k), v, (gt, eq) in zip(requests, guesses, counts):
        above, ties = int(gt.sum()), int(eq.sum())
        if not above < k <= above + ties:
            out[i, k] = select_top_cut(flat[i], bf, k)
        elif k - above == ties:
            out[i, k] = TopCut(v, n - 1)
        else:
            out[i, k] = TopCut(v, _tie_position(flat[i], bf, v, eq, k - above))
    return out


def _tie_position(x: torch.Tensor, b: torch.Tensor, v: float, eq: torch.Tensor, need: int) -> int:
    """The flat index of the ``need``-th entry with ``|x - b| == v`` (``eq``: such entries per chunk)."""
    cum = eq.cumsum(0)
    j = int(torch.searchsorted(cum, need))
    start, end = j * COUNT_CHUNK, min(b.numel(), (j + 1) * COUNT_CHUNK)
    need -= int(cum[j - 1]) if j > 0 else 0
    for s in range(start, end, _SCAN):  # piece by piece (small temporaries)
        hit = _abs_delta(x[s:min(end, s + _SCAN)], b[s:min(end, s + _SCAN)]) == v
        found = int(hit.sum())
        if found >= need:
            return s + int(torch.nonzero(hit).view(-1)[need - 1])
        need -= found
    raise AssertionError("the counting pass and the tie search disagree")


def _count(xs: list[torch.Tensor], bf: torch.Tensor, vs: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per ``(xs[r], vs[r])`` and chunk of :data:`COUNT_CHUNK` entries, ``(#(|d| > v), #(|d| == v))``
    as int64 tensors; ``None`` when some ``|d|`` is nan. The native kernel where it runs, else torch
    in one sweep (each chunk of the base converted once): the counts from ``u = sign(|d| - v)`` by two
    float reductions (``sum u`` and ``u . u``, exact below 2^24 per chunk), since bool reductions
    are several times slower on CPU."""
    from evomerge.methods import native

    out = []
    for x, v in zip(xs, vs):
        got = native.count(x, bf, v, COUNT_CHUNK)
        if got is None:
            break
        if isinstance(got, str):  # "nan"
            return None
        out.append((torch.from_numpy(got[0]), torch.from_numpy(got[1])))
    else:
        return out
    n = bf.numel()
    spans = [(s, min(n, s + COUNT_CHUNK)) for s in range(0, n, COUNT_CHUNK)]
    sums = torch.empty(len(xs), len(spans), 3, dtype=torch.float64)
    bb = torch.empty(min(n, COUNT_CHUNK), dtype=F32)
    u = torch.empty_like(bb)
    for j, (s, e) in enumerate(spans):
        b = bb[:e - s].copy_(bf[s:e])
        for r, (x, v) in enumerate(zip(xs, vs)):
            d = u[:e - s].copy_(x[s:e]).sub_(b).abs_().sub_(v)
            sums[r, j, 2] = d.sum()  # nan iff some |d| is nan (sign() maps nan to 0)
            d.sign_()
            sums[r, j, 0] = d.sum()
            sums[r, j, 1] = torch.dot(d, d)
    if bool(torch.isnan(sums[..., 2]).any()):
        return None
    gt = ((sums[..., 1] + sums[..., 0]) / 2).round().long()
    lt = ((sums[..., 1] - sums[..., 0]) / 2).round().long()
    eq = torch.tensor([e - s for s, e in spans], dtype=torch.long) - gt - lt
    return list(zip(gt, eq))


def top_cuts_by_counting(xs: Sequence[torch.Tensor], base: torch.Tensor) -> CutFinder:
    """``find_cuts`` for :func:`build_plan`: :func:`find_top_cuts` of the sources ``xs``."""
    return lambda requests: find_top_cuts(xs, base, requests)
