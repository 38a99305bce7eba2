"""Merge kernels against independent, deliberately naive references (Python loops over the
entries of small tensors, float64), plus identities, determinism, statistics and declarations. The
task-vector methods and linear, on every backend, dtype and size: tests/test_kernel_matrix.py."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import ConfigError, MergeError
from evomerge.methods import get_method, method_names
from evomerge.methods import sparsify as sp

SHAPES = [(7,), (6, 9), (3, 4, 5)]
ALL = [
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def family(shape, n=3, dtype=torch.float32, seed=0):
    base = rand(shape, seed, dtype)
    srcs = [(base.double() + rand(shape, seed + 1 + i, scale=0.1).double()).to(dtype) for i in range(n)]
    return base, srcs


def flat(t):
    return [float(v) for v in t.double().reshape(-1)]


def close(out, ref, shape, atol=1e-5, rtol=1e-5):
    assert out.dtype == torch.float32
    assert tuple(out.shape) == tuple(shape)
    ref_t = torch.tensor(ref, dtype=torch.float64).reshape(shape)
    assert torch.allclose(out.double(), ref_t, atol=atol, rtol=rtol), (out.double() - ref_t).abs().max()


# ---------------------------------------------------------------- naive references


def ref_top_positions(a, k):
    """Indices of the k largest |values|; ties by lowest index (the documented rule)."""
    order = sorted(range(len(a)), key=lambda i: (-abs(a[i]), i))
    return set(order[:k])


def ref_breadcrumbs_positions(a, density, gamma):
    n = len(a)
    keep, top = int(density * n), int(gamma * n)
    if top + keep > n:
        top = n - keep
    order = sorted(range(n), key=lambda i: (-abs(a[i]), i))
    return set(order[top:top + keep])


def ref_slerp(t, v0, v1):
    a, b = flat(v0), flat(v1)
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    ua = [x / na for x in a] if na > 1e-8 else a
    ub = [x / nb for x in b] if nb > 1e-8 else b
    dot = sum(x * y for x, y in zip(ua, ub))
    if abs(dot) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    th = math.acos(dot)
    s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return [s0 * x + s1 * y for x, y in zip(a, b)]


def ref_model_stock(base, srcs, filter_wise):
    shape = base.shape
    cols = shape[-1] if filter_wise else base.numel()
    b = flat(base)
    ds = [[x - y for x, y in zip(flat(s), b)] for s in srcs]
    n = len(srcs)
    out = []
    for r in range(len(b) // cols):
        rows = [d[r * cols:(r + 1) * cols] for d in ds]
        coss = []
        for i in range(n):
            for j in range(i + 1, n):
                dot = sum(x * y for x, y in zip(rows[i], rows[j]))
                ni = math.sqrt(sum(x * x for x in rows[i]))
                nj = math.sqrt(sum(x * x for x in rows[j]))
                coss.append(min(1.0, max(-1.0, dot / max(ni * nj, 1e-6))))
        c = sum(coss) / len(coss)
        t = n * c / (1 + (n - 1) * c)
        for e in range(cols):
            mean = sum(flat(s)[r * cols + e] for s in srcs) / n
            out.append(t * mean + (1 - t) * b[r * cols + e])
    return out


def ref_della_probs(delta, density, eps):
    x = delta.double()
    if x.dim() == 1:
        x = x.reshape(1, -1)
    probs = torch.empty_like(x)
    n = x.shape[1]
    # walk every fibre along dim 1
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in (x.shape[0], *x.shape[2:])]).reshape(-1, x.dim() - 1):
        lead, rest = int(idx[0]), [int(v) for v in idx[1:]]
        vals = [abs(float(x[(lead, j, *rest)])) for j in range(n)]
        order = sorted(range(n), key=lambda j: (vals[j], j))
        for r, j in enumerate(order):
            probs[(lead, j, *rest)] = density - eps + 2 * eps * r / (n - 1)
    return probs.reshape(delta.shape)


# ---------------------------------------------------------------- sparsify helpers


def test_keep_mask_exact_k_with_ties_and_nested():
    a = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 5.0])
    for k in range(0, 9):
        m = sp.top_k_mask(a, k)
        assert int(m.sum()) == k
        assert set(torch.nonzero(m).reshape(-1).tolist()) == ref_top_positions(a.tolist(), k)
    # precomputed threshold without k keeps every tie
    assert int(sp.keep_mask(a, torch.tensor(2.0)).sum()) == 6
    assert sp.keep_count(100, 0.29) == 28 and sp.keep_count(10, 1.0) == 10 and sp.keep_count(10, 0.0) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_breadcrumbs_mask_matches_reference(shape):
    a = rand(shape, 3).abs().to(torch.bfloat16).float()  # bf16 magnitudes: plenty of ties
    for density, gamma in [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (1.0, 0.05), (0.2, 0.9)]:
        m = sp.outlier_mask(a, density, gamma)
        want = ref_breadcrumbs_positions(a.reshape(-1).tolist(), density, gamma)
        assert set(torch.nonzero(m.reshape(-1)).reshape(-1).tolist()) == want


@pytest.mark.parametrize("shape", SHAPES)
def test_della_probs_match_reference(shape):
    d = rand(shape, 4)
    p = sp.rank_keep_probs(d, 0.4, 0.1)
    assert torch.allclose(p.double(), ref_della_probs(d, 0.4, 0.1), atol=1e-6)


# ---------------------------------------------------------------- methods vs references


M64 = (1 << 64) - 1


def ref_splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_dare_keep(seed, source, j, density):
    """The documented DARE mask in plain Python integers (unsigned 32-bit arithmetic)."""
    key = ref_splitmix64(ref_splitmix64(seed) + source) & 0xFFFFFFFF
    x = (j + key) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x ^= x >> 15
    return (x >> 8) < round(density * 2 ** 24)


def test_dare_masks_law_and_chunking():
    """Keep rate within 5 standard errors of the density, sources independent (joint rate ~ product),
    the same mask whatever the chunking, the plain-Python hash at scattered positions."""
    from evomerge.methods.sparsify import dare_key, dare_mask

    n = 1 << 20
    for d in (0.05, 0.3, 0.9):
        m = [dare_mask((n,), d, dare_key(123, i), "cpu") for i in range(2)]
        se = (d * (1 - d) / n) ** 0.5
        for mi in m:
            assert abs(mi.double().mean().item() - d) < 5 * se
        joint = (m[0] & m[1]).double().mean().item()
        assert abs(joint - d * d) < 5 * (d * d * (1 - d * d) / n) ** 0.5
        # adjacent entries are independent too
        pair = (m[0][1:] & m[0][:-1]).double().mean().item()
        assert abs(pair - d * d) < 5 * (d * d * (1 - d * d) / n) ** 0.5
    full = dare_mask((n,), 0.4, dare_key(9, 2), "cpu")
    part = dare_mask((1000,), 0.4, dare_key(9, 2), "cpu", start=777_777)
    assert torch.equal(part, full[777_777:778_777])
    for j in (0, 1, 65_535, 262_144, 500_000, n - 1):
        assert bool(full[j]) == ref_dare_keep(9, 2, j, 0.4)


@pytest.mark.parametrize("shape", SHAPES)
def test_slerp_matches_reference(shape):
    base, (src,) = family(shape, n=1)
    src = src + rand(shape, 9)  # a real angle between the two
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        close(get_method("slerp")([src], base, t=t), ref_slerp(t, base, src), shape)
    close(get_method("slerp")([src.bfloat16()], base.bfloat16(), t=0.3),
          ref_slerp(0.3, base.bfloat16(), src.bfloat16()), shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_matches_reference(shape, filter_wise):
    base, srcs = family(shape, n=3, dtype=torch.bfloat16)
    srcs = [(s.float() + 0.05 * srcs[0].float() - 0.05 * base.float()).bfloat16() for s in srcs]
    out = get_method("model_stock")(srcs, base, filter_wise=filter_wise)
    close(out, ref_model_stock(base, srcs, filter_wise), shape, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("shape", SHAPES)
def test_identities(shape):
    base, srcs = family(shape, dtype=torch.bfloat16)
    s = srcs[0]
    assert torch.equal(get_method("linear")([s], None, weight=1.0), s.float())
    assert torch.allclose(get_method("task_arithmetic")([s], base), s.float(), atol=1e-6)
    assert torch.equal(get_method("passthrough")([s], None), s.float())
    assert torch.allclose(get_method("passthrough")([s], None, scale=0.5), s.float() * 0.5)
    # identical sources: model stock returns that source
    assert torch.allclose(get_method("model_stock")([s, s, s], base), s.float(), atol=1e-6)
    # zero task vectors: model stock returns the base
    assert torch.allclose(get_method("model_stock")([base, base], base), base.float())
    # density 1: no trimming, no random draws
    for m in ("dare_linear", "della_linear", "breadcrumbs"):
        out = get_method(m)(srcs, base, generator=gen(), weight=[0.2, 0.3, 0.5])
        assert torch.allclose(out, get_method("task_arithmetic")(srcs, base, weight=[0.2, 0.3, 0.5]), atol=1e-6)


def test_ties_full_density_agreeing_signs_equals_task_arithmetic():
    base = rand((8, 8), 0)
    direction = rand((8, 8), 1)
    srcs = [base + direction * (0.5 + torch.rand(8, 8, generator=gen(i))) for i in range(3)]
    w = [0.3, 0.5, 0.2]
    ties = get_method("ties")(srcs, base, weight=w, density=1.0, normalize=False)
    ta = get_method("task_arithmetic")(srcs, base, weight=w)
    assert torch.allclose(ties, ta, atol=1e-6)
    # and normalize divides by the summed weights (1 here)
    assert torch.allclose(get_method("ties")(srcs, base, weight=w), ta, atol=1e-6)


def test_slerp_endpoints_colinear_and_zero():
    base, (src,) = family((5, 6), n=1)
    src = src + rand((5, 6), 7)
    assert torch.equal(get_method("slerp")([src], base, t=0.0), base)
    assert torch.allclose(get_method("slerp")([src], base, t=1.0), src, atol=1e-6)
    # colinear (same direction, different norm): linear interpolation
    out = get_method("slerp")([base * 3], base, t=0.25)
    assert torch.allclose(out, base * 1.5, atol=1e-6)
    # opposite direction is colinear too
    assert torch.allclose(get_method("slerp")([-base], base, t=0.5), torch.zeros_like(base), atol=1e-6)
    # zero base (mergekit: angle pi/2): sin(t pi / 2) * source; no NaN
    z = torch.zeros_like(base)
    assert torch.allclose(get_method("slerp")([src], z, t=0.5), src * math.sin(math.pi / 4), atol=1e-6)
    assert torch.equal(get_method("slerp")([z], z, t=0.5), z)


def test_inputs_not_modified():
    base, srcs = family((4, 6))
    keep = [base.clone(), *[s.clone() for s in srcs]]
    for m in ALL:
        spec = get_method(m)
        xs = srcs[:1] if spec.max_sources == 1 else srcs
        spec(xs, base, generator=gen(), **({"density": 0.5} if spec.param("density") else {}))
        for a, b in zip([base, *srcs], keep):
            assert torch.equal(a, b), m


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_stochastic_determinism(method):
    base, srcs = family((16, 16))
    kw = dict(density=0.5, epsilon=0.1) if "della" in method else dict(density=0.5)
    a = get_method(method)(srcs, base, generator=gen(1), **kw)
    b = get_method(method)(srcs, base, generator=gen(1), **kw)
    c = get_method(method)(srcs, base, generator=gen(2), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_expected_value_is_task_arithmetic(method):
    """Mean over seeds ~ task arithmetic, within 6 standard errors per entry (variance of
    sum_i w_i m_i d_i / p_i is sum_i w_i^2 d_i^2 (1 - p_i) / p_i)."""
    base, srcs = family((12, 10))
    w, dens, eps = [0.7, 0.4, 1.0], [0.5, 0.3, 0.7], [0.1, 0.1, 0.2]
    kw = dict(weight=w, density=dens) | (dict(epsilon=eps) if "della" in method else {})
    runs = 300
    total = torch.zeros_like(base, dtype=torch.float64)
    for seed in range(runs):
        total += get_method(method)(srcs, base, generator=gen(seed), **kw).double()
    mean = total / runs
    ta = get_method("task_arithmetic")(srcs, base, weight=w).double()
    var = torch.zeros_like(mean)
    for s, wi, d, e in zip(srcs, w, dens, eps):
        delta = s.double() - base.double()
        p = ref_della_probs(delta, d, e) if "della" in method else torch.full_like(delta, d)
        var += wi**2 * delta**2 * (1 - p) / p
    z = (mean - ta).abs() / (var / runs).sqrt().clamp_min(1e-12)
    assert float(z.max()) < 6.0


# ---------------------------------------------------------------- validation


def test_errors_are_clear():
    base, srcs = family((4, 4))
    with pytest.raises(ConfigError, match="exactly 1"):
        get_method("slerp")(srcs, base)
    with pytest.raises(ConfigError, match="at least 2"):
        get_method("model_stock")(srcs[:1], base)
    with pytest.raises(ConfigError, match="needs a base"):
        get_method("ties")(srcs, None)
    with pytest.raises(ConfigError, match="unknown parameter 'densty'"):
        get_method("ties")(srcs, base, densty=0.5)
    with pytest.raises(ConfigError, match="outside its valid range"):
        get_method("ties")(srcs, base, density=1.5)
    with pytest.raises(ConfigError, match="2 values of 'weight' for 3 sources"):
        get_method("ties")(srcs, base, weight=[1.0, 2.0])
    with pytest.raises(ConfigError, match="cannot normalize"):
        get_method("linear")(srcs[:2], None, weight=[1.0, -1.0])
    with pytest.raises(ConfigError, match="epsilon"):
        get_method("della")(srcs, base, generator=gen(), density=0.9, epsilon=0.2)
    with pytest.raises(MergeError, match="Generator"):
        get_method("dare_ties")(srcs, base, density=0.5)
    with pytest.raises(MergeError, match="shape"):
        get_method("linear")([srcs[0], torch.zeros(3)], None)
    with pytest.raises(ConfigError, match="unknown merge method"):
        get_method("tie")
    # several problems are reported together
    with pytest.raises(ConfigError) as info:
        get_method("ties")(srcs, base, density=2.0, weight="x")
    assert len(info.value.problems) >= 2


# ---------------------------------------------------------------- declarations


def test_every_method_registered_and_documented():
    assert set(ALL) <= set(method_names())
    for name in ALL:
        spec = get_method(name)
        assert spec.doc and "Parameters" in spec.doc and any(
            key in spec.doc for key in ("arXiv", "mergekit", "Shoemake")), name
        for p in spec.params:
            assert f"``{p.name}``" in spec.doc, (name, p.name)


@pytest.mark.parametrize("name", ALL)
def test_declarations_consistent(name):
    spec = get_method(name)
    names = [p.name for p in spec.params]
    assert len(names) == len(set(names))
    for p in spec.params:
        assert p.scope in ("source", "global") and p.kind in ("float", "bool", "int")
        assert p.default is not None
        assert p.check(p.default, "default") == [], (name, p.name)
        if p.kind == "bool":
            assert isinstance(p.default, bool) and not p.searchable
            continue
        if p.low is not None and p.high is not None:
            assert p.low <= p.high
        if p.searchable:
            assert p.search_low is not None and p.search_high is not None
            assert p.search_low < p.search_high
            assert p.check(p.search_low, "s") == [] and p.check(p.search_high, "s") == []
    if spec.stochastic:
        assert name in ("dare_ties", "dare_linear", "della", "della_linear")
    assert spec.needs_base == (name not in ("linear", "passthrough"))


# ---------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    base, srcs = family((64, 48), dtype=torch.bfloat16)
    spec = get_method(name)
    xs = srcs[:1] if spec.max_sources == 1 else srcs
    kw = {"density": 0.4} if spec.param("density") else {}
    gpu = spec([x.cuda() for x in xs], base.cuda(), generator=torch.Generator("cuda").manual_seed(0), **kw)
    assert gpu.is_cuda and gpu.dtype == torch.float32
    if not spec.stochastic:
        cpu = spec(xs, base, generator=gen(), **kw)
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_threshold_paths_match_cpu():
    a = rand((50, 40), 2).abs().bfloat16().float()  # many ties
    for k in (0, 1, 300, 1000, 1001, 1999, 2000):
        assert torch.equal(sp.top_k_mask(a.cuda(), k).cpu(), sp.top_k_mask(a, k)), k


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                    (torch.float16, torch.bfloat16)])
def test_native_counting_pass_counts_exactly(dtypes):
    """native.count (the TIES counting pass) against a plain torch count per chunk: a threshold
    inside a huge tie group, infinities counted as above, a nan reported."""
    from evomerge.methods import native

    if not native.available():
        pytest.skip("no C compiler for the native kernel")
    g = gen(5)
    n, chunk = 300_007, 65_536
    base = (torch.randint(-50, 51, (n,), generator=g) * 2.0 ** -8).to(dtypes[1])
    x = (base.float() + torch.randint(-3, 4, (n,), generator=g) * 2.0 ** -10).to(dtypes[0])
    x[7] = float("inf")
    a = (x.float() - base.float()).abs()
    for v in (0.0, 2.0 ** -10, 2.0 ** -9, 1.5 * 2.0 ** -10, 1.0):
        gt, eq = native.count(x, base, v, chunk, threads=3)
        want_gt = [int((a[s:s + chunk] > v).sum()) for s in range(0, n, chunk)]
        want_eq = [int((a[s:s + chunk] == v).sum()) for s in range(0, n, chunk)]
        assert gt.tolist() == want_gt and eq.tolist() == want_eq, v
    x[n - 1] = float("nan")
    assert native.count(x, base, 2.0 ** -10, chunk) == "nan"


@pytest.mark.parametrize("use_native", [True, False])
def test_counting_pass_reports_a_nan_task_vector(use_native, monkeypatch):
    """Both counting passes (native, torch) see a nan in a task vector: no cut, so the tensor goes to
    the reference pipeline (torch's sign() maps nan to 0, so the torch loop checks a sum taken before it)."""
    from evomerge.methods import native
    from evomerge.methods.backends import merge
    from evomerge.methods.plan import COUNT_CHUNK, find_top_cuts

    if use_native and not native.available():
        pytest.skip("no C compiler for the native kernel")
    monkeypatch.setenv("EVOMERGE_NATIVE", "1" if use_native else "0")
    n = COUNT_CHUNK + 1000
    base = torch.randn(n, generator=gen(2)).to(torch.bfloat16)
    x = (base.float() + 0.01 * torch.randn(n, generator=gen(3))).to(torch.bfloat16)
    cut = find_top_cuts([x], base, [(0, n // 2)])[0, n // 2]
    a = (x.float() - base.float()).abs()
    assert int(((a > cut.thr) | ((a == cut.thr) & (torch.arange(n) <= cut.last))).sum()) == n // 2
    x[n - 3] = float("nan")
    assert find_top_cuts([x], base, [(0, n // 2)]) is None
    assert merge("ties", [x, base], base, density=0.5).backend == "reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_all_finite_sees_every_non_finite_value(dtype):
    from evomerge.methods import native

    if not native.available():
        pytest.skip("no C compiler for the native kernel")
    t = torch.randn(100_003, generator=gen(1)).to(dtype)
    assert native.all_finite(t) is True
    for pos in (0, 50_000, 100_002):
        for bad in (float("inf"), float("-inf"), float("nan")):
            u = t.clone()
            u[pos] = bad
            assert native.all_finite(u) is False, (pos, bad)
    assert native.all_finite(torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype))
    assert native.all_finite(t[::2]) is None  # not contiguous: the caller checks another way
