"""Building blocks shared by the task-vector methods (TIES, DARE, breadcrumbs, DELLA).

Everything here works on one float32 task vector ``delta = source - base`` of one tensor, in
place where the caller owns the tensor, on the tensor's device, with no Python loops over
elements.

Magnitude trimming is split in two steps so that a threshold computed elsewhere (e.g. from cached
per-source magnitude statistics) can be passed in later::

    k = keep_count(delta.numel(), density)          # floor(density * numel), as mergekit
    thr = magnitude_threshold(delta.abs(), k)       # the k-th largest |delta|
    mask = keep_mask(delta.abs(), thr, k=k)         # exactly k entries

Tie rule: with ``k`` given, ``keep_mask`` keeps exactly ``k`` entries: every entry with
``|delta| > thr`` and, among the entries equal to ``thr``, those with the lowest flat (row-major)
index. That is, entries are ranked by (magnitude descending, flat index ascending), which makes the
top-k sets nested (``top(k1) ⊆ top(k2)`` for ``k1 <= k2``). mergekit's ``argsort``/``topk`` breaks
such ties arbitrarily; ties matter mostly for bf16 task vectors, whose magnitudes take few distinct
values. With ``k=None`` every entry ``>= thr`` is kept (the cheap path for a precomputed threshold).
"""

from __future__ import annotations

import math

import torch

from evomerge.errors import MergeError
from evomerge.methods.common import F32

L1_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this


# ---------------------------------------------------------------- magnitude selection


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: ``int(density * numel)`` (floor, computed in double precision
    like mergekit, so e.g. 0.29 * 100 keeps 28), clipped to ``[0, numel]``; ``density >= 1`` keeps all."""
    if density >= 1.0:
        return numel
    return max(0, min(numel, int(density * numel)))


def magnitude_threshold(delta_abs: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of ``delta_abs`` as a 0-d tensor on its device (``+inf`` for k = 0)."""
    n = delta_abs.numel()
    if k <= 0:
        return torch.tensor(math.inf, dtype=delta_abs.dtype, device=delta_abs.device)
    k = min(k, n)
    values = delta_abs.reshape(-1)
    if values.device.type == "cpu":
        if values.dtype == F32 and n >= _RADIX_MIN:
            return _kth_largest_radix(values, k)
        return torch.kthvalue(values, n - k + 1).values
    # on accelerators kthvalue is ~100x slower than topk; select from the smaller side
    if k <= n - k + 1:
        return torch.topk(values, k, sorted=False).values.min()
    return torch.topk(values, n - k + 1, largest=False, sorted=False).values.max()


_RADIX_MIN = 1 << 16  # below this, kthvalue on the whole tensor is as cheap
_RADIX_SHIFT = 16  # bucket key: sign + exponent + 7 mantissa bits of the float32 magnitude


def _kth_largest_radix(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest of non-negative float32 ``values`` by one radix pass.

    For non-negative IEEE floats the int32 bit pattern orders like the value, so a histogram of the
    top bits finds the bucket holding the k-th largest; ``kthvalue`` then runs on that bucket only
    (a small fraction of the tensor). Exact, and ~5x faster than a full ``kthvalue`` on CPU.
    """
    keys = values.view(torch.int32) >> _RADIX_SHIFT
    counts = torch.bincount(keys, minlength=1 << (31 - _RADIX_SHIFT))
    from_top = counts.flip(0).cumsum(0)  # from_top[j]: entries with key >= len - 1 - j
    j = int(torch.searchsorted(from_top, k))
    key = counts.numel() - 1 - j
    above = int(from_top[j]) - int(counts[key])  # entries with a larger key
    bucket = values[keys == key]
    return torch.kthvalue(bucket, bucket.numel() - (k - above) + 1).values


def keep_mask(delta_abs: torch.Tensor, threshold: torch.Tensor | float, k: int | None = None) -> torch.Tensor:
    """Boolean mask of the entries to keep: ``delta_abs >= threshold``; with ``k``, ties at the
    threshold are resolved to keep exactly ``k`` entries (lowest flat index first, see module doc)."""
    if k is not None and k <= 0:
        return torch.zeros_like(delta_abs, dtype=torch.bool)
    mask = delta_abs >= threshold
    if k is None:
        return mask
    surplus = int(mask.sum()) - k
    if surplus > 0:
        ties = (delta_abs == threshold).reshape(-1)
        n_ties = int(ties.sum())
        idx_dtype = torch.int32 if ties.numel() < 2**31 else torch.int64
        order = ties.cumsum(0, dtype=idx_dtype)  # 1-based position among the ties
        mask.view(-1).masked_fill_(ties & (order > n_ties - surplus), False)
    return mask


def top_k_mask(delta_abs: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries of ``delta_abs`` (ties: lowest flat index first)."""
    n = delta_abs.numel()
    if k >= n:
        return torch.ones_like(delta_abs, dtype=torch.bool)
    return keep_mask(delta_abs, magnitude_threshold(delta_abs, k), k=k)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs counts ``(n_top, n_keep)``: drop the ``n_top = int(gamma * numel)`` largest,
    keep the next ``n_keep = int(density * numel)``, drop the rest. When ``n_top + n_keep`` exceeds
    ``numel``, fewer large entries are dropped so the density is met (mergekit's rule)."""
    n_keep = keep_count(numel, density)
    n_top = int(gamma * numel)
    n_top = max(0, min(n_top, numel - n_keep))
    return n_top, n_keep


def outlier_mask(delta_abs: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: the entries ranked ``n_top .. n_top + n_keep - 1`` by magnitude (descending)."""
    n_top, n_keep = outlier_counts(delta_abs.numel(), density, gamma)
    mask = top_k_mask(delta_abs, n_top + n_keep)
    if n_top > 0:
        mask &= ~top_k_mask(delta_abs, n_top)
    return mask


# ---------------------------------------------------------------- random drops


# DARE's random drops come from a counter-based generator: entry ``j`` of a tensor is kept when
#
#     u24(j) = mix32((j + key) mod 2^32) >> 8   <   cutoff(density) = round(density * 2^24)
#
# ``mix32`` is a two-round multiply / xor-shift integer hash (C. Wellons' hash-prospector constants,
# both below 2^31); ``key`` is a 32-bit key per (tensor seed, source), see :func:`dare_key`. The keep
# probability is ``cutoff / 2^24`` (within 3e-8 of ``density``). A mask is a pure function of
# (seed, source, flat index): any device, any chunking, any kernel (the reference below, the chunked
# disk pipeline, the fused resident kernels, CUDA) draws the same mask, and a fused kernel computes
# it in registers instead of reading a random stream. ``int32`` arithmetic wraps modulo 2^32 on every
# torch backend (two's complement); logical shifts are an arithmetic shift and a mask.

HASH_M1 = 0x21F0AAAD
HASH_M2 = 0x735A2D97
DARE_BITS = 24
_MASK_CHUNK = 1 << 18  # entries per chunk of the reference mask (int32 temporaries stay in L2)


def dare_cutoff(density: float) -> int:
    """Keep an entry when its 24-bit uniform is below this: ``round(density * 2^24)`` in ``[0, 2^24]``."""
    return max(0, min(1 << DARE_BITS, round(float(density) * (1 << DARE_BITS))))


def _splitmix64(z: int) -> int:
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def dare_key(seed: int, source: int) -> int:
    """The 32-bit mask key (in ``[0, 2^32)``) of ``source`` for a tensor whose seed is ``seed``."""
    return _splitmix64(_splitmix64(int(seed) & ((1 << 64) - 1)) + int(source)) & 0xFFFFFFFF


def dare_mask(shape: torch.Size, density: float, key: int, device: torch.device | str,
              start: int = 0) -> torch.Tensor:
    """DARE keep mask (bool, ``shape``) of entries ``start .. start + numel - 1`` for ``key`` (see above).

    Computed in chunks of 256K entries, so the temporaries stay small whatever the tensor's size.
    """
    n = math.prod(shape)
    if start < 0 or start + n > 1 << 32:
        raise MergeError(f"DARE masks address at most 2^32 entries per tensor (got entries {start} .. "
                         f"{start + n}); use ties or task_arithmetic for a tensor this large")
    out = torch.empty(n, dtype=torch.bool, device=device)
    cut = dare_cutoff(density)
    m = min(n, _MASK_CHUNK)
    idx = torch.arange(m, dtype=torch.int64, device=device)
    wide = torch.empty(m, dtype=torch.int64, device=device)
    x = torch.empty(m, dtype=torch.int32, device=device)
    t = torch.empty_like(x)
    for s in range(0, n, _MASK_CHUNK):
        e = min(n, s + _MASK_CHUNK)
        L = e - s
        xs, ts = x[:L], t[:L]
        xs.copy_(torch.add(idx[:L], start + s + key, out=wide[:L]))  # the counter, mod 2^32
        torch.lt(dare_uniform24_(xs, ts), cut, out=out[s:e])
    return out.view(shape)


def _lsr_(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of an int32 tensor, in place (an arithmetic shift and a mask)."""
    return x.bitwise_right_shift_(s).bitwise_and_((1 << (32 - s)) - 1)


def _mix32_(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mix32`` (the hash above) in place on ``x`` (``t``: a scratch tensor like ``x``)."""
    x.bitwise_xor_(_lsr_(t.copy_(x), 16)).mul_(HASH_M1)
    x.bitwise_xor_(_lsr_(t.copy_(x), 15)).mul_(HASH_M2)
    return x.bitwise_xor_(_lsr_(t.copy_(x), 15))


def dare_uniform24_(counter: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``mix32(counter) >> 8`` (logical) in place on the int32 ``counter`` (``scratch``: an int32 tensor
    like it): 24 uniform bits per entry, as int32 in ``[0, 2^24)``."""
    return _lsr_(_mix32_(counter, scratch), 32 - DARE_BITS)


def generator_seed(generator: torch.Generator) -> int:
    """The seed a stochastic method draws its masks from: the generator's ``initial_seed()``
    (materialization seeds one generator per tensor; see :mod:`evomerge.materialize`)."""
    return int(generator.initial_seed())


def rank_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MAGPRUNE keep probabilities, shape of ``delta``.

    Within each row (dim 1 after turning a 1-D tensor into one row; mergekit's convention), entries
    are ranked by magnitude (ascending, ties by index) and the rank ``r = 0 .. n-1`` is mapped
    linearly to ``p = density - epsilon + 2 * epsilon * r / (n - 1)``: the smallest entry gets
    ``density - epsilon``, the largest ``density + epsilon``; the mean is ``density``. A row of one
    entry gets ``density``.
    """
    x = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    n = x.shape[1]
    if n == 1:
        return torch.full_like(delta, density, dtype=F32)
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ladder = torch.linspace(density - epsilon, density + epsilon, n, dtype=F32, device=x.device)
    ladder = ladder.view(1, n, *([1] * (x.dim() - 2))).expand_as(order)
    probs = torch.empty_like(x, dtype=F32).scatter_(1, order, ladder)
    return probs.view(delta.shape)


# ---------------------------------------------------------------- masking + rescale


def apply_mask_(
    delta: torch.Tensor,
    mask: torch.Tensor,
    *,
    rescale: bool = False,
    rescale_l1: bool = False,
    keep_prob: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero the dropped entries of ``delta`` in place and optionally rescale the kept ones.

    * ``rescale`` and not ``rescale_l1``: divide by ``keep_prob`` (scalar or per-entry tensor), so
      that the expectation over random masks equals ``delta`` (DARE / DELLA papers).
    * ``rescale`` and ``rescale_l1``: multiply by ``||delta||_1 / ||masked||_1`` (whole tensor), skipped
      when either norm is below 1e-7 (mergekit's current ``rescale``).
    """
    if rescale and rescale_l1:
        before = delta.abs().sum()
        delta.mul_(mask)
        after = delta.abs().sum()
        ok = (before >= L1_EPS) & (after >= L1_EPS)
        return delta.mul_(torch.where(ok, before / after.clamp_min(L1_EPS), torch.ones_like(before)))
    delta.mul_(mask)
    if rescale and keep_prob is not None:
        if isinstance(keep_prob, torch.Tensor):
            # dropped entries are 0; guard their (possibly 0) probability against 0/0
            delta.div_(keep_prob.clamp_min(torch.finfo(F32).tiny))
        elif keep_prob > 0:
            delta.div_(keep_prob)
    return delta


# ---------------------------------------------------------------- sign election, disjoint merge


def elect_sign(weighted_deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: boolean tensor, True where the elected sign is positive, i.e. where
    ``sum_i w_i * delta_i >= 0`` (the total mass of each sign decides; a zero sum elects +)."""
    total = torch.zeros_like(weighted_deltas[0])
    for wd in weighted_deltas:
        total.add_(wd)
    return total.ge_(0).to(torch.bool)


def disjoint_merge(
    weighted_deltas: list[torch.Tensor], weights: list[float], *, normalize: bool
) -> torch.Tensor:
    """TIES disjoint merge (consumes ``weighted_deltas`` in place).

    ``agree_i = sign(w_i * delta_i) == elected sign`` (zeros never agree);
    ``merged = sum_i agree_i * w_i * delta_i``, divided, when ``normalize``, by
    ``sum_i agree_i * w_i`` per entry (1 where that is 0). With equal weights this is the paper's
    mean over agreeing sources.
    """
    positive = elect_sign(weighted_deltas)
    merged = torch.zeros_like(weighted_deltas[0])
    divisor = torch.zeros_like(merged) if normalize else None
    for wd, w in zip(weighted_deltas, weights):
        agree = torch.where(positive, wd > 0, wd < 0)
        merged.add_(wd.mul_(agree))
        if divisor is not None:
            divisor.add_(agree, alpha=w)
        del agree
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        merged.div_(divisor)
    return merged
