"""Chunked, fused CPU pipeline for the sign-electing task-vector merges (TIES, DARE-TIES).

Same results as :func:`~evomerge.methods.task_arithmetic.merge_task_vectors` with ``elect=True``
(up to float32 rounding of the weighting), but much faster on CPU, where the plain version is
bound by memory traffic (each whole-tensor op streams several full float32 tensors through RAM),
by mixed-dtype and bool ops (2-10x slower than same-dtype float ops), and by ``kthvalue``.

The tensor is cut into flat chunks of :data:`CHUNK` entries that fit in the CPU caches, and every
step for a chunk (convert, subtract the base, trim, weight, elect, merge) runs on cached data with
float32-only ops into reused buffers. Magnitude trimming needs a threshold per *whole* tensor, so it
runs first, in its own chunked counting pass (:func:`_trim_plans`):

1. a strided sample of ``|delta|`` guesses the k-th largest value ``v`` (bf16 task vectors take few
   distinct values, so ``v`` usually has many ties and the guess is usually exact);
2. one counting pass computes, per chunk, ``#(|delta| > v)`` and ``#(|delta| == v)``: in the native
   kernel (``em_count``, threads over chunks), else from ``u = sign(|delta| - v)`` by two float
   reductions (``sum u`` and ``u . u``; exact for counts below 2^24); a nan in a task vector is
   reported either way (the plain pipeline then defines the result);
3. if ``#(> v) < k <= #(>= v)``, ``v`` is the exact threshold; the documented tie rule (keep the
   first ``k - #(> v)`` ties in flat order) becomes a cut position ``P``: entries before ``P`` keep
   ``|delta| >= v``, entries from ``P`` on keep ``|delta| > v`` -- both one ``hardshrink``. Otherwise
   (or for non-finite task vectors) the exact whole-tensor selection of
   :mod:`~evomerge.methods.sparsify` is used for that source.

The merge step then runs in the native C kernel (:mod:`evomerge.methods.native`: one call per
tensor, DARE masks hashed in the kernel instead of materialized) when it builds on this machine,
else in the torch chunk loop below; both perform the same float32 operations in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.methods.common import F32
from evomerge.methods.sparsify import DARE_BITS, dare_cutoff, dare_mask, keep_count, magnitude_threshold

CHUNK = 1 << 17  # entries per chunk: a few float32 buffers of 512 KiB stay in L2/L3
COUNT_CHUNK = 1 << 19  # the counting pass holds two buffers: larger chunks, fewer op dispatches
_SAMPLE = 1 << 14  # entries in the threshold-guess sample
_MIN_NUMEL = 1 << 15  # below this the plain pipeline is as fast


def _prev(v: float) -> float:
    """The largest float32 below ``v`` (for ``v >= 0``; ``-tiny`` below 0)."""
    t = torch.tensor(v, dtype=F32)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=F32)))


@dataclass
class _Trim:
    """How source ``i`` is trimmed: keep ``|delta| > lam_lo`` before flat index ``cut`` and
    ``|delta| > lam_hi`` from ``cut`` on (``None``: keep everything; ``mask``: a DARE mask)."""

    lam_lo: float | None = None
    lam_hi: float | None = None
    cut: int = 0
    mask: torch.Tensor | None = None


def fusable(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> bool:
    """Whether the fused pipeline applies: CPU float tensors of one shape, big enough to pay."""
    if base.device.type != "cpu" or base.numel() < _MIN_NUMEL:
        return False
    return all(t.device.type == "cpu" and t.is_floating_point() for t in (*tensors, base))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _chunks(n: int, size: int = CHUNK):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _delta_into(buf: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``buf = float32(x) - b`` (conversion first: same-dtype subtraction is faster on CPU)."""
    buf.copy_(x)
    return buf.sub_(b)


def _trim_plans(xs: list[torch.Tensor], bf: torch.Tensor, ks: list[int | None]) -> list[_Trim] | None:
    """Magnitude-trim plans for the sources with ``ks[i]`` not None (``0 < k < n``); ``None`` when a
    task vector is not finite (the caller falls back to the plain pipeline)."""
    n = bf.numel()
    plans: list[_Trim] = [_Trim() for _ in xs]
    todo = [i for i, k in enumerate(ks) if k is not None]
    if not todo:
        return plans
    # 1. guesses from a strided sample
    stride = max(1, n // _SAMPLE)
    bs = bf[::stride].to(F32)
    guess = {}
    for i in todo:
        a = xs[i][::stride].to(F32, copy=True).sub_(bs).abs_()
        m = a.numel()
        kk = min(m, max(1, round(ks[i] * m / n)))
        guess[i] = float(torch.kthvalue(a, m - kk + 1).values)
    # 2. counting pass: per chunk, how many |delta| are > v and == v
    spans = _chunks(n, COUNT_CHUNK)
    buf = torch.empty(min(n, COUNT_CHUNK), dtype=F32)
    bb = torch.empty_like(buf)
    counts = _native_counts(xs, bf, todo, guess)
    if isinstance(counts, str):  # "nan": a task vector is not finite
        return None
    if counts is not None:
        gt, eq = counts
    else:  # torch: sum(u) and u.u for u = sign(|delta| - v)
        sums = torch.empty(len(todo), len(spans), 3, dtype=torch.float64)
        for j, (s, e) in enumerate(spans):
            L = e - s
            b = bb[:L].copy_(bf[s:e])
            u = buf[:L]
            for r, i in enumerate(todo):
                _delta_into(u, xs[i][s:e], b).abs_().sub_(guess[i])
                sums[r, j, 2] = u.sum()  # nan iff some |delta| is nan (sign() maps nan to 0)
                u.sign_()
                sums[r, j, 0] = u.sum()
                sums[r, j, 1] = torch.dot(u, u)
        if bool(torch.isnan(sums[..., 2]).any()):
            return None
        # counts per chunk: gt = (S2 + S1) / 2, lt = (S2 - S1) / 2
        gt = ((sums[..., 1] + sums[..., 0]) / 2).round().long()
        lt = ((sums[..., 1] - sums[..., 0]) / 2).round().long()
        lens = torch.tensor([e - s for s, e in spans], dtype=torch.long)
        eq = lens - gt - lt
    for r, i in enumerate(todo):
        k, v = ks[i], guess[i]
        above, ties = int(gt[r].sum()), int(eq[r].sum())
        if not (above < k <= above + ties):
            plans[i] = _exact_plan(xs[i], bf, k)
            continue
        keep_ties = k - above
        cut = n
        if keep_ties < ties:  # 3. the tie cut: just after the keep_ties-th tie in flat order
            cum = eq[r].cumsum(0)
            j = int(torch.searchsorted(cum, keep_ties))
            s, e = spans[j]
            need = keep_ties - (int(cum[j - 1]) if j > 0 else 0)  # 1-based rank of the tie in span j
            for s2, e2 in _chunks(e - s):  # find it sub-chunk by sub-chunk (small nonzero outputs)
                a = _delta_into(buf[:e2 - s2], xs[i][s + s2:s + e2], bb[:e2 - s2].copy_(bf[s + s2:s + e2])).abs_()
                hit = a == v
                found = int(hit.sum())
                if found >= need:
                    cut = s + s2 + int(torch.nonzero(hit).view(-1)[need - 1]) + 1
                    break
                need -= found
        plans[i] = _Trim(lam_lo=_prev(v), lam_hi=v, cut=cut)
    return plans


def _native_counts(xs, bf, todo, guess):
    """The counting pass in the native kernel: ``(gt, eq)`` long tensors of shape (len(todo), chunks),
    ``"nan"`` when a task vector holds a nan, ``None`` when the kernel cannot run here. For finite
    and infinite ``|d|`` the same counts as the torch loop (``sign(|d| - v)`` is 1, 0, -1 exactly
    when ``|d| >, ==, < v``); both report a nan."""
    from evomerge.methods import native

    gts, eqs = [], []
    for i in todo:
        got = native.count(xs[i], bf, guess[i], COUNT_CHUNK)
        if got is None or isinstance(got, str):
            return got
        gts.append(torch.from_numpy(got[0]))
        eqs.append(torch.from_numpy(got[1]))
    native.counts_run += 1
    return torch.stack(gts), torch.stack(eqs)


def _exact_plan(x: torch.Tensor, bf: torch.Tensor, k: int) -> _Trim:
    """The trim plan from an exact whole-tensor selection (when the sampled guess missed)."""
    a = (x.to(F32) - bf.to(F32)).abs_()
    thr = magnitude_threshold(a, k)
    v = float(thr)
    above = int((a > thr).sum())
    ties = int((a == thr).sum())
    cut = a.numel()
    if k - above < ties:
        cut = int(torch.nonzero(a == thr).view(-1)[k - above - 1]) + 1
    return _Trim(lam_lo=_prev(v), lam_hi=v, cut=cut)


def _native_merge(xs, bf, live, weights, plans, keep_probs, dare, lam, normalize, out_dtype):
    """The chunk loop below as one call of the native C kernel (:mod:`evomerge.methods.native`): the
    same float32 operations in the same order, so the same bits. ``None`` when it cannot run here or
    an output is not finite (the torch loop then defines that case)."""
    from evomerge.methods import native

    if not native.available():
        return None
    n = bf.numel()
    xs_live = [xs[i] for i in live]
    cuts = None
    if any(plans[i].lam_lo is not None for i in live):
        # keep |d| >= v up to index cut - 1, |d| > v from cut on
        cuts = [((plans[i].lam_hi, plans[i].cut - 1), (math.inf, n)) if plans[i].lam_lo is not None
                else native.KEEP_ALL for i in live]
    hash_ = None
    if dare is not None and any(dare[i] is not None for i in live):
        hash_ = [0]
        for i in live:
            hash_ += [dare[i][0], dare_cutoff(dare[i][1])] if dare[i] is not None else [0, 1 << DARE_BITS]
    mode = "hash" if hash_ else "thr" if cuts else "none"
    out = torch.empty(n, dtype=out_dtype)
    job = native.task_vector_job(out, bf, xs_live, mode=mode, elect=True, normalize=normalize,
                                 weights=[weights[i] for i in live],
                                 divs=[keep_probs[i] if keep_probs[i] is not None else 1.0 for i in live],
                                 lam=lam, cuts=cuts, hash_=hash_)
    if job is None or not native.run([job])[0]:
        return None
    return out


def fused_elect_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    lam: float,
    normalize: bool,
    densities: Sequence[float] | None = None,
    keep_probs: Sequence[float | None] | None = None,
    dare: Sequence[tuple[int, float] | None] | None = None,
    out_dtype: torch.dtype = F32,
) -> torch.Tensor | None:
    """``base + lam * disjoint_merge_i(w_i * s_i * trim_i(theta_i - base))`` in float32, chunked.

    ``densities``: magnitude trim (TIES: top ``floor(density * numel)`` by magnitude, ties by flat
    index); ``dare``: per source ``(key, density)`` of its DARE keep mask
    (:func:`~evomerge.methods.sparsify.dare_mask`; ``None``: no drop); ``keep_probs``: per source,
    divide the kept values by this (rescale; ``None``: no rescale). The float32 ops per entry are the plain
    pipeline's, in its order (mask, divide, weight, sum in source order), so results match it
    bit for bit. ``out_dtype``: the result's dtype (each float32 chunk rounded once). Returns ``None`` when a task vector
    is not finite, so that the caller can run the plain pipeline (which defines that case).
    """
    shape = base.shape
    bf = _flat(base)
    xs = [_flat(t) for t in tensors]
    n = bf.numel()
    S = len(xs)
    keep_probs = list(keep_probs) if keep_probs is not None else [None] * S
    ks: list[int | None] = [None] * S
    dropped = [w == 0 for w in weights]
    if densities is not None:
        for i, d in enumerate(densities):
            if d < 1.0:
                k = keep_count(n, d)
                if k <= 0:
                    dropped[i] = True
                elif k < n:
                    ks[i] = k
    live = [i for i in range(S) if not dropped[i]]
    ks_live = [ks[i] if i in live else None for i in range(S)]
    plans = _trim_plans(xs, bf, ks_live)
    if plans is None:
        return None
    if live:
        out = _native_merge(xs, bf, live, weights, plans, keep_probs, dare, lam, normalize, out_dtype)
        if out is not None:
            return out.view(shape)
    if dare is not None:
        for i, kd in enumerate(dare):
            if kd is not None:
                plans[i].mask = dare_mask((n,), kd[1], kd[0], bf.device)

    out = torch.empty(n, dtype=out_dtype)
    L0 = min(n, CHUNK)
    accbuf = torch.empty(L0, dtype=F32) if out_dtype != F32 else None
    bb = torch.empty(L0, dtype=F32)
    sgn = torch.empty(L0, dtype=F32)
    ones = torch.ones(L0, dtype=F32)
    total = torch.empty(L0, dtype=F32)
    div = torch.empty(L0, dtype=F32) if normalize else None
    zero_div = torch.empty(L0, dtype=torch.bool) if normalize else None
    bufs = {i: torch.empty(L0, dtype=F32) for i in live}
    # with no negative weight a zero divisor means no source agrees (a zero never agrees), so the
    # merged value there is 0 and clamping the divisor to the smallest normal float is exact
    # (and cheaper than finding the zeros)
    clamp_div = all(weights[i] >= 0 for i in live)
    tiny = torch.finfo(F32).tiny
    for s, e in _chunks(n):
        L = e - s
        b = bb[:L].copy_(bf[s:e])
        tot = total[:L].zero_()
        for i in live:
            d = _delta_into(bufs[i][:L], xs[i][s:e], b)
            p = plans[i]
            if p.lam_lo is not None:
                if p.cut >= e:
                    torch.hardshrink(d, p.lam_lo, out=d)
                elif p.cut <= s:
                    torch.hardshrink(d, p.lam_hi, out=d)
                else:
                    c = p.cut - s
                    torch.hardshrink(d[:c], p.lam_lo, out=d[:c])
                    torch.hardshrink(d[c:], p.lam_hi, out=d[c:])
            if p.mask is not None:
                d.mul_(p.mask[s:e])
            if keep_probs[i] is not None:
                d.div_(keep_probs[i])
            d.mul_(weights[i])
            tot.add_(d)
        # elected sign: +1 where the weighted sum is >= 0 (it is never -0: it starts at +0)
        sg = torch.copysign(ones[:L], tot, out=sgn[:L])
        acc = out[s:e] if accbuf is None else accbuf[:L]
        dv = div[:L] if div is not None else None
        if not live:  # every source dropped: the base
            acc.zero_()
            if dv is not None:
                dv.zero_()
        for j, i in enumerate(live):
            r = bufs[i][:L].mul_(sg).relu_()  # |w_i delta_i| where it agrees with the election
            if j == 0:  # (the sums start from the first term instead of from +0: the same values)
                acc.copy_(r)
                if dv is not None:
                    torch.mul(r.sign_(), weights[i], out=dv)
                continue
            acc.add_(r)
            if dv is not None:
                dv.add_(r.sign_(), alpha=weights[i])
        acc.mul_(sg)
        if dv is not None:
            if clamp_div:
                dv.clamp_min_(tiny)
            else:
                dv.masked_fill_(torch.eq(dv, 0, out=zero_div[:L]), 1.0)
            acc.div_(dv)
        if lam != 1.0:
            acc.mul_(lam)
        acc.add_(b)
        if accbuf is not None:
            out[s:e].copy_(acc)  # one rounding to the output dtype, chunk by chunk
    return out.view(shape)
