"""The merge kernels, one matrix: backend x method x dtype x size, each against a float64 oracle.

The oracle below is written out in numpy from the methods' documented formulas and calls nothing
under test: task vectors ``d_i = x_i - base`` rounded to float32 (the kernels' one documented
float32 step before any trim), top-k sets by (|d| descending, flat index ascending), DARE masks
from a plain-integer hash, DELLA's rank ladder in float32 with Bernoulli draws from the seeded
generator in source order; everything else in float64.

Tolerance, from the one-rounding rule (kernels compute in float32 and round once to the output
dtype): ``|out - exact| <= E + ulp_out(|exact| + E) / 2`` with ``E = C * 2^-24 * M``, where ``M``
bounds the magnitudes the float32 arithmetic goes through (``|base| + |lambda| * sum_i |w_i d_i'| /
divisor``) and ``C`` counts its roundings. A backend that rounded an intermediate to the output dtype
would be off by up to a whole output ulp and fail. Entries where the TIES election is decided by a
sum within float32 rounding of zero are left out (at most a few per tensor). The deterministic
backends (reference, torch, native) must also agree with the reference bit for bit.

Sizes straddle every threshold: the native kernel's 256-entry blocks and 32K-entry work items, the
single-tensor fused floor (32K), the torch chunk (128K), the radix selection floor (64K) and the
counting pass chunk (512K; that size only for the methods with magnitude cuts). Compiled kernels
(``torch.compile``) are slow to build: marked slow.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from evomerge.methods import native
from evomerge.methods.backends import CHUNK, FUSED_MIN, BackendUnavailable, merge
from evomerge.methods.kernels import compile_available
from evomerge.methods.plan import COUNT_CHUNK
from test_methods import ref_splitmix64 as splitmix64  # the documented key derivation in plain integers

SHAPES = [(3, 4, 5), (1000,), (129, 257), (513, 257), (2041, 257)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DARE_SEED = 541158  # source 0's mask key wraps past 2^32 at flat index 15905 (checked below)
OTHER_SEED = 11

# method -> (trim, sign election); the documented structure, restated independently here
STRUCTURE = {
    "linear": (None, False), "task_arithmetic": ("none", False), "ties": ("magnitude", True),
    "dare_ties": ("dare", True), "dare_linear": ("dare", False), "breadcrumbs": ("band", False),
    "breadcrumbs_ties": ("band", True), "della": ("della", True), "della_linear": ("della", False),
}
W1, W2 = [0.5, -0.3, 0.2], [1.0, 0.0, 0.7]  # weights of the sums
E1, E2 = [0.5, -0.375, 0.25], [0.75, -0.5, 1.125]  # of the elections: dyadic, so sign elections on
# grid data are exact in float32 too (the oracle can decide them)
PARAMS = {  # two explicit variants per method: negative / zero weights, densities 0 and 1, switches
    "linear": [dict(weight=W1, normalize=True), dict(weight=W2, normalize=False)],
    "task_arithmetic": [dict(weight=W1, normalize=True, **{"lambda": 0.8}),
                        dict(weight=W2, normalize=False, **{"lambda": 1.3})],
    "ties": [dict(weight=E1, density=[0.3, 0.55, 1.0], normalize=True, rescale=True, **{"lambda": 0.8}),
             dict(weight=[1.0, 0.0, -0.375], density=[0.0, 0.5, 0.2], normalize=False, rescale=False,
                  **{"lambda": 1.0})],
    "dare_ties": [dict(weight=[0.5, 0.25, 0.125], density=[0.3, 0.55, 1.0], normalize=True, rescale=True,
                       **{"lambda": 1.0}),
                  dict(weight=E2, density=[0.5, 0.7, 0.0], normalize=False, rescale=False, **{"lambda": 1.2})],
    "dare_linear": [dict(weight=W1, density=[0.3, 0.55, 0.9], normalize=True, rescale=True, **{"lambda": 1.0}),
                    dict(weight=W2, density=[0.5, 1.0, 0.25], normalize=False, rescale=False, **{"lambda": 0.7})],
    "breadcrumbs": [dict(weight=W1, density=[0.3, 0.55, 0.9], gamma=[0.01, 0.0, 0.3], normalize=False,
                         rescale=True, **{"lambda": 1.0}),
                    dict(weight=W2, density=[1.0, 0.4, 0.2], gamma=[0.1, 0.2, 0.9], normalize=True,
                         rescale=False, **{"lambda": 0.9})],
    "breadcrumbs_ties": [dict(weight=E1, density=[0.3, 0.55, 0.9], gamma=[0.01, 0.0, 0.3], normalize=True,
                              rescale=False, **{"lambda": 1.0}),
                         dict(weight=[0.375, 0.625, 0.25], density=[1.0, 0.4, 0.2], gamma=[0.1, 0.2, 0.9],
                              normalize=False, rescale=True, **{"lambda": 1.1})],
    "della": [dict(weight=[0.5, 0.25, 0.125], density=[0.5, 0.6, 0.3], epsilon=[0.1, 0.2, 0.05],
                   normalize=True, rescale=True, **{"lambda": 1.0}),
              dict(weight=E2, density=[0.4, 1.0, 0.7], epsilon=[0.3, 0.1, 0.2], normalize=False,
                   rescale=True, **{"lambda": 0.9})],
    "della_linear": [dict(weight=W1, density=[0.5, 0.6, 0.3], epsilon=[0.1, 0.2, 0.05], normalize=True,
                          rescale=True, **{"lambda": 1.0}),
                     dict(weight=W2, density=[0.4, 1.0, 0.7], epsilon=[0.3, 0.1, 0.2], normalize=False,
                          rescale=False, **{"lambda": 1.0})],
}
PLANNED = [m for m in STRUCTURE if STRUCTURE[m][0] != "della"]


# ---------------------------------------------------------------- data


def family(shape, dtype, kind: str, seed: int):
    """A base and three sources: ``grid`` (|d| takes 4 values: every threshold inside a huge tie
    group) or ``smooth`` (random, rounded to the dtype: ties only from rounding)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "grid":
        base = torch.randint(-50, 51, (n,), generator=g) * 2.0 ** -8
        srcs = [base + torch.randint(-3, 4, (n,), generator=g) * 2.0 ** -10 for _ in range(3)]
    else:
        base = torch.randn(n, generator=g) * 0.05
        srcs = [base + torch.randn(n, generator=g) * 0.004 * (i + 1) for i in range(3)]
    return base.reshape(shape).to(dtype), [s.reshape(shape).to(dtype) for s in srcs]


# ---------------------------------------------------------------- the float64 oracle

M32 = 0xFFFFFFFF


def dare_key(seed: int, source: int) -> int:
    return splitmix64(splitmix64(seed) + source) & M32


def dare_keep(seed: int, source: int, n: int, density: float) -> np.ndarray:
    """Entry j kept when (mix32((j + key) mod 2^32) >> 8) < round(density * 2^24)."""
    x = ((np.arange(n, dtype=np.uint64) + np.uint64(dare_key(seed, source))) & np.uint64(M32)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return (x >> np.uint32(8)) < round(density * 2 ** 24)


def top_positions(absd: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Positions ranked start .. stop - 1 by (|d| descending, flat index ascending)."""
    order = np.lexsort((np.arange(absd.size), -absd))
    return order[start:stop]


def della_probs(d: np.ndarray, shape, density: float, eps: float) -> np.ndarray:
    """MAGPRUNE keep probabilities: ranks along dim 1 (a 1-D tensor is one row), ascending by |d|
    (ties by index), mapped to the float32 ladder linspace(density - eps, density + eps)."""
    a = np.abs(d).reshape(shape if len(shape) >= 2 else (1, -1))
    rows = np.moveaxis(a, 1, -1)
    flat_rows = rows.reshape(-1, rows.shape[-1])
    n = flat_rows.shape[1]
    ladder = torch.linspace(density - eps, density + eps, n, dtype=torch.float32).double().numpy()
    probs = np.empty_like(flat_rows)
    for r, row in enumerate(flat_rows):
        probs[r, np.argsort(row, kind="stable")] = ladder if n > 1 else density
    return np.moveaxis(probs.reshape(rows.shape), -1, 1).reshape(-1)


@functools.lru_cache(maxsize=2)
def oracle(method: str, dtype: torch.dtype, shape: tuple, variant: int, kind: str, device: str = "cpu"):
    """(exact result, tolerance, entries compared) in float64 for one case (``device``: where DELLA's
    Bernoulli draws come from, as the merge draws them)."""
    trim, elect = STRUCTURE[method]
    p = PARAMS[method][variant]
    base_t, srcs_t = family(shape, dtype, kind, seed=len(shape) * 1000 + shape[0])
    b = base_t.double().numpy().reshape(-1)
    xs = [s.double().numpy().reshape(-1) for s in srcs_t]
    n, w = b.size, p["weight"]
    if method == "linear":
        total = sum(w)
        ws = [wi / total for wi in w] if p["normalize"] else list(w)
        terms = [wi * x for wi, x in zip(ws, xs)]
        exact = np.sum(terms, axis=0)
        mag = np.sum(np.abs(terms), axis=0)
        return exact, _tol(exact, 3 * len(xs) + 2, mag, dtype), np.ones(n, bool)
    gen = torch.Generator(device=device).manual_seed(DARE_SEED if trim == "dare" else OTHER_SEED)
    wds = []
    for i, x in enumerate(xs):
        d = (x - b).astype(np.float32).astype(np.float64)  # the float32 task vector
        dens = p.get("density", [1.0] * 3)[i]
        keep, div = np.ones(n, bool), np.ones(n)
        if trim != "none" and dens < 1.0:
            if trim == "magnitude":
                keep = np.zeros(n, bool)
                keep[top_positions(np.abs(d), 0, int(dens * n))] = True
            elif trim == "band":
                n_keep, n_top = int(dens * n), int(p["gamma"][i] * n)
                n_top = max(0, min(n_top, n - n_keep))
                keep = np.zeros(n, bool)
                keep[top_positions(np.abs(d), n_top, n_top + n_keep)] = True
            elif trim == "dare":
                keep = dare_keep(DARE_SEED, i, n, dens)
            else:  # della: draws in source order from the seeded generator
                probs = della_probs(d, shape, dens, p["epsilon"][i])
                p32 = torch.from_numpy(probs).float().reshape(shape).to(device)
                keep = torch.bernoulli(p32, generator=gen).bool().cpu().numpy().reshape(-1)
                div = probs if p["rescale"] else div
            if p["rescale"] and trim != "della" and dens > 0:
                div = np.full(n, dens)
        wds.append(w[i] * np.where(keep, d, 0.0) / div)
    wd = np.stack(wds)
    mag = np.abs(wd).sum(0)
    compared = np.ones(n, bool)
    if elect:
        total = wd.sum(0)
        positive = total >= 0
        agree = np.where(positive, wd > 0, wd < 0)
        merged = np.where(agree, wd, 0.0).sum(0)
        # the election is decided when the sum is beyond float32 rounding of 0, or when the float32
        # terms and their float32 sum (in source order) are exact
        terms32 = wd.astype(np.float32)
        sum32 = np.zeros(n, np.float32)
        for t in terms32:
            sum32 = sum32 + t
        exact32 = (terms32.astype(np.float64) == wd).all(0) & (sum32.astype(np.float64) == total)
        compared = exact32 | (np.abs(total) > 8 * 2.0 ** -24 * mag)
        if p["normalize"]:
            div = np.where(agree, np.array(w)[:, None], 0.0).sum(0)
            div = np.where(div == 0, 1.0, div)
            merged, mag = merged / div, mag / np.abs(div)
    else:
        merged = wd.sum(0)
        if p["normalize"] and abs(sum(w)) >= 1e-8:
            merged, mag = merged / sum(w), mag / abs(sum(w))
    exact = b + p["lambda"] * merged
    return exact, _tol(exact, 4 * len(xs) + 6, np.abs(b) + abs(p["lambda"]) * mag, dtype), compared


def _tol(exact: np.ndarray, roundings: int, mag: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``E + ulp_out(|exact| + E) / 2`` with ``E = roundings * 2^-24 * mag`` (module doc)."""
    e = roundings * 2.0 ** -24 * mag
    mant, lowest = {torch.float32: (23, -149), torch.bfloat16: (7, -133), torch.float16: (10, -24)}[dtype]
    _, ex = np.frexp(np.abs(exact) + e)  # |v| in [2^(ex-1), 2^ex)
    ulp = np.exp2(np.maximum(ex - 1 - mant, lowest).astype(np.float64))
    return e + ulp / 2


# ---------------------------------------------------------------- the matrix


def _marks(backend: str, device: str):
    marks = []
    if backend == "compiled":
        marks.append(pytest.mark.slow)
    if device == "cuda":
        marks += [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    return marks


def _cases():
    """Ordered so that one (shape, dtype, method) runs all its backends in a row (cached oracle)."""
    cases = []
    for si, shape in enumerate(SHAPES):
        for di, dtype in enumerate(DTYPES):
            for method in STRUCTURE:
                if math.prod(shape) > COUNT_CHUNK and STRUCTURE[method][0] not in ("magnitude", "band"):
                    continue  # only magnitude cuts run the counting pass this size straddles
                backends = ["reference"] if method not in PLANNED else ["reference", "torch", "native", "compiled"]
                for device in ("cpu", "cuda"):
                    for backend in backends:
                        if device == "cuda" and backend == "native":
                            continue
                        ident = f"{device}-{backend}-{method}-{str(dtype)[6:]}-{math.prod(shape)}"
                        cases.append(pytest.param(device, backend, method, dtype, si, di, id=ident,
                                                  marks=_marks(backend, device)))
    return cases


@functools.lru_cache(maxsize=2)
def _reference(method, dtype, si, di, device):
    return _run(method, dtype, si, di, "reference", device)


def _run(method, dtype, si, di, backend, device):
    shape = SHAPES[si]
    base, srcs = family(shape, dtype, "grid" if si % 2 == 0 else "smooth", seed=len(shape) * 1000 + shape[0])
    trim = STRUCTURE[method][0]
    g = torch.Generator(device=device).manual_seed(DARE_SEED if trim == "dare" else OTHER_SEED)
    base_arg = None if method == "linear" else base.to(device)
    return merge(method, [s.to(device) for s in srcs], base_arg, generator=g, out_dtype=dtype, backend=backend,
                 **PARAMS[method][di % 2])


@pytest.mark.filterwarnings("error:torch.compile failed:RuntimeWarning")  # no silent eager fallback
@pytest.mark.parametrize("device,backend,method,dtype,si,di", _cases())
def test_kernel_matrix(device, backend, method, dtype, si, di):
    if backend == "native" and not native.available():
        pytest.skip("no C compiler for the native kernel")
    if backend == "compiled" and not compile_available(torch.device(device)):
        pytest.skip("torch.compile cannot build kernels here")
    shape = SHAPES[si]
    got = _reference(method, dtype, si, di, device) if backend == "reference" else _run(method, dtype, si, di,
                                                                                      backend, device)
    assert got.backend == backend  # no silent fallback on finite data
    out = got.tensor
    assert out.dtype == dtype and tuple(out.shape) == shape and out.device.type == device
    exact, tol, compared = oracle(method, dtype, shape, di % 2, "grid" if si % 2 == 0 else "smooth", device)
    assert (~compared).sum() <= max(2, compared.size // 100), "too many elections within rounding of zero"
    err = np.abs(out.double().cpu().numpy().reshape(-1) - exact)
    bad = compared & ~(err <= tol)
    assert not bad.any(), (f"{int(bad.sum())} entries off; worst at {int(np.argmax(np.where(bad, err / tol, 0)))}: "
                           f"error {err[bad].max():.3g}, tolerance {tol[bad].min():.3g}")
    if backend in ("torch", "native"):  # the reference's float32 operations in its order: the same bits
        want = _reference(method, dtype, si, di, device).tensor
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


def test_matrix_straddles_every_threshold():
    """The sizes sit on both sides of each threshold, just above the chunk and fused ones (so the
    matrix exercises every path), and the DARE counter wraps past 2^32 inside the tensors >= 32K."""
    sizes = sorted(math.prod(s) for s in SHAPES)
    for threshold in (256, 1 << 16, FUSED_MIN, CHUNK, COUNT_CHUNK):
        assert any(s < threshold for s in sizes) and any(s > threshold for s in sizes), threshold
    for threshold in (FUSED_MIN, CHUNK, COUNT_CHUNK):
        assert any(threshold < s < 1.02 * threshold for s in sizes), threshold
    assert dare_key(DARE_SEED, 0) + 15905 == 2 ** 32


# ---------------------------------------------------------------- behaviour around the matrix


def _needs_native():
    if not native.available():
        pytest.skip("no C compiler for the native kernel")


def test_backend_rule(monkeypatch):
    """The one rule (evomerge.methods.backends.choose_backend), seen through the backends reported."""
    from evomerge.methods.backends import KernelRequest, choose_backend

    _needs_native()
    big_b, big = family((129, 257), torch.bfloat16, "smooth", 1)  # above the fused floor
    small_b, small = family((1000,), torch.bfloat16, "smooth", 2)
    gen = torch.Generator().manual_seed(0)
    assert merge("ties", big, big_b, density=0.5).backend == "native"
    assert merge("linear", big).backend == "native"
    assert merge("ties", small, small_b, density=0.5).backend == "reference"  # below the floor
    assert merge("della", big, big_b, generator=gen, density=0.5).backend == "reference"  # no planned form
    assert merge("ties", big, big_b, density=0.5, rescale=True, rescale_l1=True).backend == "reference"
    assert merge("slerp", big[:1], big_b).backend == "reference"
    assert merge("ties", [big[0]] * 9, big_b, density=0.5).backend == "torch"  # native takes 1..8 sources
    with pytest.raises(BackendUnavailable):
        merge("della", big, big_b, generator=gen, density=0.5, backend="torch")
    with pytest.raises(BackendUnavailable):
        merge("model_stock", big, big_b, backend="native")
    strided = [x.t() for x in big]  # not contiguous: native.c cannot read them in place
    with pytest.raises(BackendUnavailable):
        merge("ties", strided, big_b.t(), density=0.5, backend="native")
    assert merge("ties", strided, big_b.t(), density=0.5).backend == "torch"
    # resident candidates: planned kernels at any size; compiled when the caller compiles
    req = dict(kind="task_vector", tensors=(small_b, *small), sources=3, batched=True)
    assert choose_backend(KernelRequest(**req, compile=True)) == "native"
    assert choose_backend(KernelRequest(**req, compile=False, native=False)) == "torch"
    if compile_available(torch.device("cpu")):
        assert choose_backend(KernelRequest(**req, compile=True, native=False)) == "compiled"
    assert choose_backend(KernelRequest("scale", (small_b, small[0]), 1, batched=True)) == "torch"
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    assert merge("ties", big, big_b, density=0.5).backend == "torch"
    with pytest.raises(BackendUnavailable):
        merge("ties", big, big_b, density=0.5, backend="native")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "task_arithmetic"])
def test_mixed_dtypes_same_bits_on_every_backend(method):
    """Base, sources and output in different dtypes (the native kernel's per-tensor loads): the
    planned backends give the reference's bits."""
    _needs_native()
    g = torch.Generator().manual_seed(3)
    n = FUSED_MIN + 1234
    base = torch.randn(n, generator=g)
    srcs = [(base + torch.randint(-3, 4, (n,), generator=g) * 0.01).to(dt)
            for dt in (torch.bfloat16, torch.float16, torch.float32)]
    kw = dict(weight=[0.5, -0.375, 0.25], generator=torch.Generator().manual_seed(9))
    if method != "task_arithmetic":
        kw["density"] = [0.37, 0.61, 0.5]
    for out_dtype in (torch.float16, torch.float32):
        want = merge(method, srcs, base, out_dtype=out_dtype, backend="reference", **kw).tensor
        for backend in ("torch", "native"):
            got = merge(method, srcs, base, out_dtype=out_dtype, backend=backend, **kw)
            assert got.backend == backend and torch.equal(got.tensor.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "mixed"])
def test_linear_keeps_signed_zeros_on_every_backend(dtype):
    """Where every source is zero, ``-0 * w`` and ``-0 + -0`` keep their sign: every backend gives the
    reference's bits, signed zeros included, across chunk boundaries."""
    _needs_native()
    g = torch.Generator().manual_seed(3)
    dts = [torch.bfloat16, torch.float32, torch.float16] if dtype == "mixed" else [dtype] * 3
    xs = [torch.randn(2, CHUNK + 777, generator=g).to(dt) for dt in dts]
    for x in xs:
        x[0, :64] = -0.0
        x[1, :64] = 0.0
    xs[0][0, 64:96] = -0.0
    for w, normalize in (([0.3, 0.0, 0.9], True), ([1.0, -0.7, 0.25], False), ([-2.0, 1.5, 1.0], False)):
        for out_dtype in (torch.float32, torch.bfloat16):
            want = merge("linear", xs, weight=w, normalize=normalize, out_dtype=out_dtype, backend="reference").tensor
            for backend in ("torch", "native"):
                got = merge("linear", xs, weight=w, normalize=normalize, out_dtype=out_dtype, backend=backend)
                assert torch.equal(got.tensor.view(torch.uint8), want.view(torch.uint8)), (backend, w)
            if min(w) >= 0:  # -0 * w >= 0 and their sums stay -0: the case is there to be got wrong
                assert bool(torch.signbit(want[0, :64]).all()) and not bool(torch.signbit(want[1, :64]).any())
