"""The methods mergekit 0.1.5 has beyond the first twelve (nuslerp, multislerp, karcher, nearswap,
sce, arcee_fusion, ram, ramplus_tl): kernels against independent float64 references (numpy, plain
loops), their edge cases, declarations, recipes, the mergekit importer/exporter, search spaces,
`evomerge merge` against in-memory materialization, and (slow, with the mergekit venv) mergekit
itself."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.errors import ConfigError, MergeError
from evomerge.mergekit_compat import SHARED_METHODS, from_mergekit, to_mergekit
from evomerge.methods import get_method, method_names
from evomerge.recipe import MergeRecipe, parse_recipe
from evomerge.resident import FAST_METHODS, ResidentSources
from evomerge.tiny import build_tiny_family

REPO = Path(__file__).resolve().parents[1]
NEW = ["nuslerp", "multislerp", "karcher", "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"]
SHAPES = [(7,), (6, 9), (3, 4, 5)]


def rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def family(shape, n=3, seed=0, noise=0.1):
    base = rand(shape, seed)
    return base, [base + rand(shape, seed + 1 + i, noise) for i in range(n)]


def np64(t):
    return t.double().numpy().copy()


def check(out, ref, atol=1e-5, rtol=1e-5):
    assert out.dtype == torch.float32
    ref = np.asarray(ref, dtype=np.float64)
    assert tuple(out.shape) == ref.shape
    got = out.double().numpy()
    err = np.abs(got - ref).max() if ref.size else 0.0
    assert np.allclose(got, ref, atol=atol, rtol=rtol), f"max |diff| {err}"


# ---------------------------------------------------------------- float64 references


def ref_slerp_vec(t, a, b):
    """SLERP of two 1-D vectors (mergekit's nuslerp rule), element by element."""
    na = max(math.sqrt(sum(x * x for x in a)), 1e-7)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-7)
    cos = sum((x / na) * (y / nb) for x, y in zip(a, b))
    cos = min(1.0, max(-1.0, cos))
    if 1.0 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    th = math.acos(cos)
    return [(math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th) for x, y in zip(a, b)]


def ref_nuslerp(xs, base, weights, flatten=True, row_wise=False):
    w1, w2 = weights
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = np64(xs[0]), np64(xs[1])
    if base is not None:
        v0, v1 = v0 - np64(base), v1 - np64(base)
    out = np.zeros_like(v0)
    if flatten or v0.ndim == 0:
        out = np.array(ref_slerp_vec(t, v0.ravel(), v1.ravel())).reshape(v0.shape)
    elif row_wise:  # vectors along dim 0, one per index of the other dims
        for idx in np.ndindex(*v0.shape[1:]):
            sl = (slice(None),) + idx
            out[sl] = ref_slerp_vec(t, v0[sl], v1[sl])
    else:  # one vector per row (last dim)
        for idx in np.ndindex(*v0.shape[:-1]):
            out[idx] = ref_slerp_vec(t, v0[idx], v1[idx])
    return out + (np64(base) if base is not None else 0.0)


def ref_multislerp(xs, base, weights, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return np64(xs[0])
    vs = [np64(x).ravel() - (np64(base).ravel() if base is not None else 0.0) for x in xs]
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.sqrt(np.sum(v * v)) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    mn = np.sqrt(np.sum(m * m))
    if mn < eps:
        assert len(xs) == 2
        r = w[0] * vs[0] + w[1] * vs[1]
    else:
        mu = m / mn
        g = sum(wi * (u - np.dot(u, mu) * mu) for wi, u in zip(w, units))
        n = np.sqrt(np.sum(g * g)) + eps
        r = (np.cos(n) * mu + np.sin(n) / n * g) * sum(nrm * wi for nrm, wi in zip(norms, w))
    r = r.reshape(xs[0].shape)
    return r + (np64(base) if base is not None else 0.0)


def ref_karcher(xs, weights=None, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return np64(xs[0])
    w = np.ones(len(xs)) if weights is None else np.array(weights, dtype=np.float64)
    alphas = w / w.sum()
    vs = [np64(x).ravel() for x in xs]
    norms = [float(np.linalg.norm(v)) for v in vs]
    keep = [i for i in range(len(vs)) if norms[i] > tol]
    if not keep:
        return np.zeros(xs[0].shape)
    a = np.array([alphas[i] for i in keep])
    a = a / a.sum()
    units = [vs[i] / norms[i] for i in keep]
    mu = sum(ai * u for ai, u in zip(a, units))
    mu = units[0].copy() if np.linalg.norm(mu) < tol else mu / np.linalg.norm(mu)
    for _ in range(max_iter):
        g = np.zeros_like(mu)
        for ai, u in zip(a, units):
            c = min(1.0, max(-1.0, float(np.dot(mu, u))))
            th = math.acos(c)
            if th < tol:
                continue
            g += ai * th / math.sin(th) * (u - c * mu)
        gn = float(np.linalg.norm(g))
        if gn < tol:
            break
        mu = math.cos(gn) * mu + math.sin(gn) * g / gn
        mu = mu / np.linalg.norm(mu)
    return (sum(ai * n for ai, n in zip(alphas, norms)) * mu).reshape(xs[0].shape)


def ref_nearswap(x, base, t):
    a, b = np64(base).ravel(), np64(x).ravel()
    out = []
    for ai, bi in zip(a, b):
        w = min(1.0, max(0.0, t / max(abs(ai - bi), 1e-6)))
        out.append(w * bi + (1 - w) * ai)
    return np.array(out).reshape(base.shape)


def ref_sce(xs, base, topk=1.0):
    b = np64(base).ravel()
    tvs = [np64(x).ravel() - b for x in xs]
    n, numel = len(tvs), len(b)
    if topk < 1:
        var = [sum((tv[j] - sum(t2[j] for t2 in tvs) / n) ** 2 for tv in tvs) / n for j in range(numel)]
        nnz = sum(1 for v in var if v != 0)
        k = int(np.float32(nnz) * np.float32(topk)) if topk > 0 else 0
        order = sorted(range(numel), key=lambda j: (-var[j], j))
        keep = set(order[:k])
        tvs = [np.array([tv[j] if j in keep else 0.0 for j in range(numel)]) for tv in tvs]
    energy = [sum(v * v for v in tv) / numel for tv in tvs]
    total = sum(energy)
    w = [e / total for e in energy] if abs(total) >= 1e-6 else [1.0 / n] * n
    out = []
    for j in range(numel):
        s = sum(tv[j] for tv in tvs)
        sign = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for tv, wi in zip(tvs, w):
            if tv[j] != 0 and math.copysign(1.0, tv[j]) == sign:
                num += wi * tv[j]
                den += wi
        out.append(b[j] + num / max(den, 1e-6))
    return np.array(out).reshape(base.shape)


def ref_arcee_fusion(x, base):
    shape = base.shape
    cols = shape[-1] if len(shape) else 1
    bb, xx = np64(base).reshape(-1, cols), np64(x).reshape(-1, cols)
    imp = np.zeros_like(xx)
    for r in range(xx.shape[0]):
        p = np.exp(xx[r] - xx[r].max()); p = p / p.sum() + 1e-8
        q = np.exp(bb[r] - bb[r].max()); q = q / q.sum() + 1e-8
        kl = float(np.sum(p * np.log(p / q)))
        imp[r] = np.abs(xx[r] - bb[r]) * kl
    s = sorted(imp.ravel())
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    out = np.where(imp >= thr, xx, bb)
    return out.reshape(shape), imp, thr


def ref_ram(xs, base, eps=1e-5, r=0.0, alpha=0.0):
    b = np64(base).ravel()
    tvs = [np64(x).ravel() - b for x in xs]
    changed = [[abs(v) > eps for v in tv] for tv in tvs]
    count = [sum(c[j] for c in changed) for j in range(len(b))]
    lams = []
    for c in changed:
        shared = sum(1 for j, cj in enumerate(c) if cj and count[j] > 1)
        unique = sum(1 for j, cj in enumerate(c) if cj and count[j] == 1)
        lams.append(1.0 + r * min(max(shared / max(unique, eps), 0.0), alpha))
    out = []
    for j in range(len(b)):
        v = b[j]
        for tv, c, lam in zip(tvs, changed, lams):
            if c[j]:
                v += tv[j] * lam if count[j] == 1 else tv[j] / count[j]
        out.append(v)
    return np.array(out).reshape(base.shape)


# ---------------------------------------------------------------- kernels against the references


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True), (True, True)])
def test_nuslerp_matches_reference(shape, with_base, flatten, row_wise):
    base, xs = family(shape)
    b = base if with_base else None
    for weights in ([0.3, 0.7], [2.0, 6.0], [1.0, -0.4], [1.0, -1.0]):  # not summing to 1; sum 0: t = 0.5
        out = get_method("nuslerp")(xs[:2], b, weight=weights, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
        check(out, ref_nuslerp(xs[:2], b, weights, flatten, row_wise))


def test_nuslerp_edge_cases():
    v = rand((5, 8), 1)
    ns = get_method("nuslerp")
    # colinear (parallel and antiparallel): linear interpolation, no NaN
    for other in (2.5 * v, -v):
        out = ns([v, other], None, weight=[0.6, 0.4])
        check(out, 0.6 * np64(v) + 0.4 * np64(other))
    # row-wise colinear in some rows only
    w = rand((5, 8), 2)
    w[1] = 3 * v[1]
    out = ns([v, w], None, weight=[0.5, 0.5], nuslerp_flatten=False)
    check(out, ref_nuslerp([v, w], None, [0.5, 0.5], False, False))
    check(out[1:2], 0.5 * np64(v[1:2]) + 0.5 * np64(w[1:2]))
    # a zero vector: a quarter turn, sin((1 - t) pi/2) v0 + sin(t pi/2) v1
    z = torch.zeros(5, 8)
    check(ns([z, v], None, weight=[0.5, 0.5]), math.sin(math.pi / 4) * np64(v))
    check(ns([z, z], None), np.zeros((5, 8)))
    # with a base equal to one model: that model's task vector is zero
    base, xs = family((5, 8))
    check(ns([base, xs[0]], base, weight=[1, 3]), np64(base) + math.sin(0.75 * math.pi / 2) * (np64(xs[0]) - np64(base)))
    # endpoints
    check(ns(xs[:2], base, weight=[1.0, 0.0]), np64(xs[0]))
    check(ns(xs[:2], base, weight=[0.0, 1.0]), np64(xs[1]), atol=1e-5)
    with pytest.raises(ConfigError, match="exactly 2"):
        ns(xs[:1], base)
    # a scalar tensor is one vector whatever the options
    s0, s1 = torch.tensor(2.0), torch.tensor(-3.0)
    for fl in (True, False):
        check(ns([s0, s1], None, nuslerp_flatten=fl), ref_nuslerp([s0, s1], None, [1.0, 1.0]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(shape, with_base, normalize):
    base, xs = family(shape, n=4)
    b = base if with_base else None
    for n, weights in ((2, [0.3, 0.9]), (3, [0.5, 0.3, 0.4]), (4, [1.0, 2.0, 0.5, 0.25])):
        out = get_method("multislerp")(xs[:n], b, weight=weights, normalize_weights=normalize)
        check(out, ref_multislerp(xs[:n], b, weights, normalize))


def test_multislerp_edge_cases():
    ms = get_method("multislerp")
    base, xs = family((6, 5))
    # one source: that source, unchanged (weight and base unused)
    check(ms(xs[:1], base, weight=0.3), np64(xs[0]))
    # identical sources: the source itself
    check(ms([xs[0], xs[0]], None, weight=[0.2, 0.8]), np64(xs[0]), atol=1e-5)
    # colinear sources of different norms: same direction, weighted mean norm
    v = rand((6, 5), 3)
    check(ms([v, 3 * v], None, weight=[1.0, 1.0]), 2 * np64(v), atol=1e-5)
    # a zero vector among the sources
    z = torch.zeros(6, 5)
    check(ms([z, v, xs[1]], None, weight=[1, 1, 1]), ref_multislerp([z, v, xs[1]], None, [1, 1, 1]))
    # antipodal with balancing weights: two sources fall back to the linear mix
    check(ms([v, -v], None, weight=[1.0, 1.0]), np.zeros((6, 5)), atol=1e-6)
    check(ms([v, -v], None, weight=[0.5, 0.5], normalize_weights=False), np.zeros((6, 5)), atol=1e-6)
    with pytest.raises(MergeError, match="zero"):
        ms([v, -v, v, -v], None)
    with pytest.raises(ConfigError, match="cannot normalize"):
        ms(xs[:2], None, weight=[1.0, -1.0])


@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_matches_reference(shape):
    _, xs = family(shape, n=4, noise=0.8)
    for n, weights in ((2, None), (3, None), (4, None), (3, [0.2, 0.5, 1.3]), (4, [3.0, 1.0, 0.0, 2.0])):
        kw = {} if weights is None else {"weight": weights}
        out = get_method("karcher")(xs[:n], None, **kw)
        check(out, ref_karcher(xs[:n], weights), atol=1e-5, rtol=1e-4)
    # fewer iterations than convergence needs: the reference's iterate
    out = get_method("karcher")(xs, None, max_iter=1)
    check(out, ref_karcher(xs, max_iter=1), atol=1e-5, rtol=1e-4)


def test_karcher_edge_cases():
    kc = get_method("karcher")
    v = rand((4, 6), 5)
    check(kc([v], None), np64(v))  # one source
    # colinear: the common direction with the mean norm (2 v)
    check(kc([v, 3 * v], None), 2 * np64(v), atol=1e-5)
    # a zero vector: left out of the direction, counted in the mean norm
    z = torch.zeros(4, 6)
    w = rand((4, 6), 6)
    ref = ref_karcher([z, v, w])
    check(kc([z, v, w], None), ref, atol=1e-5, rtol=1e-4)
    check(kc([z, z], None), np.zeros((4, 6)))
    # only the weights' ratios matter
    a = kc([v, w], None, weight=[0.3, 0.9])
    check(kc([v, w], None, weight=[1.0, 3.0]), np64(a), atol=1e-6)
    # equal weights of any size give mergekit's equal-weight mean
    check(kc([v, w], None, weight=[5.0, 5.0]), np64(kc([v, w], None)), atol=1e-6)
    with pytest.raises(ConfigError, match="sum to 0"):
        kc([v, w], None, weight=[0.0, 0.0])
    with pytest.raises(ConfigError, match="outside its valid range"):
        kc([v, w], None, weight=[-1.0, 1.0])
    with pytest.raises(ConfigError, match="takes no base|unknown"):
        parse_recipe({"method": "karcher", "base": "b", "sources": [{"model": "x"}, {"model": "y"}]})


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_matches_reference(shape):
    base, xs = family(shape, noise=0.05)
    for t in (0.0, 1e-4, 0.02, 0.05, 10.0):
        check(get_method("nearswap")(xs[:1], base, t=t), ref_nearswap(xs[0], base, t))


def test_nearswap_edge_cases():
    base, xs = family((5, 5))
    ns = get_method("nearswap")
    check(ns(xs[:1], base, t=0.0), np64(base))       # t = 0: the base
    check(ns(xs[:1], base, t=1e9), np64(xs[0]))      # everything close: the source
    check(ns([base.clone()], base), np64(base))      # identical models (|diff| floored at 1e-6)
    with pytest.raises(ConfigError, match="needs a base"):
        ns(xs[:1], None)
    with pytest.raises(ConfigError, match="exactly 1"):
        ns(xs[:2], base)
    with pytest.raises(ConfigError, match="outside its valid range"):
        ns(xs[:1], base, t=-1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.7, 0.3, 0.05, 0.0])
def test_sce_matches_reference(shape, topk):
    base, xs = family(shape, n=3)
    check(get_method("sce")(xs, base, select_topk=topk), ref_sce(xs, base, topk))


def test_sce_edge_cases():
    base, xs = family((6, 7))
    sce = get_method("sce")
    # one source: all of its task vector (topk 1), or nothing (no variance to select by)
    check(sce(xs[:1], base), np64(xs[0]))
    check(sce(xs[:1], base, select_topk=0.5), np64(base))
    # sources equal to the base: energies 0, equal weights, nothing agrees: the base
    check(sce([base.clone(), base.clone()], base), np64(base))
    # tiny task vectors: energies sum below 1e-6, so equal weights (mergekit's rule)
    small = [base + rand((6, 7), 10 + i, 1e-4) for i in range(3)]
    check(sce(small, base), ref_sce(small, base))
    # opposite task vectors: the elected sign keeps one side per entry
    d = rand((6, 7), 20, 0.1)
    out = sce([base + d, base - 2 * d], base)
    check(out, ref_sce([base + d, base - 2 * d], base))
    # ties in the variance (repeated columns): lowest flat index first
    col = rand((6, 1), 30, 0.1)
    tied = [base + col.expand(6, 7) * (i + 1) for i in range(3)]
    check(sce(tied, base, select_topk=0.5), ref_sce(tied, base, 0.5))


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_reference(shape):
    base, xs = family(shape, noise=0.3)
    ref, imp, thr = ref_arcee_fusion(xs[0], base)
    assert not np.any(np.isclose(imp, thr, rtol=1e-5, atol=0))  # no entry at the decision boundary
    check(get_method("arcee_fusion")(xs[:1], base), ref)


def test_arcee_fusion_edge_cases():
    base, xs = family((8, 16), noise=0.3)
    af = get_method("arcee_fusion")
    check(af([base.clone()], base), np64(base))  # no change: the base
    out = af(xs[:1], base)
    taken = (out == xs[0]) & (xs[0] != base)
    assert 0 < int(taken.sum()) < out.numel() // 2  # only the outliers of importance are taken
    assert torch.all((out == xs[0]) | (out == base))
    check(af([torch.tensor(1.5)], torch.tensor(0.5)), ref_arcee_fusion(torch.tensor(1.5), torch.tensor(0.5))[0])
    with pytest.raises(ConfigError, match="unknown parameter"):
        af(xs[:1], base, t=0.5)


def sparse_family(shape, n=3, seed=0):
    """Task vectors with many exact zeros and entries near the threshold, so that unique,
    shared and unchanged entries all occur."""
    base = rand(shape, seed)
    xs = []
    for i in range(n):
        d = rand(shape, seed + 10 + i, 0.1)
        keep = rand(shape, seed + 20 + i) > 0.3
        xs.append(base + d * keep)
    return base, xs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram_matches_reference(shape, n):
    base, xs = sparse_family(shape, n)
    for eps in (1e-5, 0.05):
        check(get_method("ram")(xs, base, epsilon=eps), ref_ram(xs, base, eps))
        for r, alpha in ((0.1, 0.2), (0.5, 1.0), (0.0, 0.2)):
            out = get_method("ramplus_tl")(xs, base, r=r, alpha=alpha, epsilon=eps)
            check(out, ref_ram(xs, base, eps, r, alpha))


def test_ram_edge_cases():
    base, xs = sparse_family((6, 6))
    ram, rp = get_method("ram"), get_method("ramplus_tl")
    # sources equal to the base: the base
    check(ram([base.clone(), base.clone()], base), np64(base))
    # the same task vector twice: every change shared, averaged: that model
    check(ram([xs[0], xs[0].clone()], base), np64(xs[0]))
    check(rp([xs[0], xs[0].clone()], base), np64(xs[0]))
    # disjoint task vectors: unique everywhere, summed (no dilution); RAM+ has no overlap to boost by
    d = rand((6, 6), 40, 0.1)
    m = rand((6, 6), 41) > 0
    a, b = base + d * m, base + d * ~m
    check(ram([a, b], base), np64(base) + np64(d))
    check(rp([a, b], base, r=0.5, alpha=1.0), np64(base) + np64(d))
    # ramplus defaults (r 0.1, alpha 0.2) equal the reference's
    check(rp(xs, base), ref_ram(xs, base, 1e-5, 0.1, 0.2))


# method -> (sources, with a base) of a typical call
CALLS = {"nuslerp": (2, True), "multislerp": (3, True), "karcher": (3, False), "nearswap": (1, True),
         "sce": (3, True), "arcee_fusion": (1, True), "ram": (3, True), "ramplus_tl": (3, True)}


def test_inputs_not_modified_and_dtypes():
    base, xs = family((5, 6), n=3)
    for dtype in (torch.float32, torch.bfloat16):
        b, srcs = base.to(dtype), [x.to(dtype) for x in xs]
        keep = [b.clone()] + [s.clone() for s in srcs]
        extra = [("nuslerp", 2, False), ("multislerp", 1, False), ("karcher", 1, False)]
        for name, n, with_base in [(m, *CALLS[m]) for m in NEW] + extra:
            out = get_method(name)(srcs[:n], b if with_base else None)
            assert out.dtype == torch.float32 and out.shape == b.shape
            assert out.data_ptr() not in {t.data_ptr() for t in [b, *srcs]}, name
            assert get_method(name)(srcs[:n], b if with_base else None, out_dtype=dtype).dtype == dtype
        assert all(torch.equal(k, t) for k, t in zip(keep, [b, *srcs]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NEW)
def test_cuda_matches_cpu(name):
    base, xs = sparse_family((64, 48))
    n, with_base = CALLS[name]
    kw = {"select_topk": 0.4} if name == "sce" else {}
    b = base.bfloat16() if with_base else None
    srcs = [x.bfloat16() for x in xs[:n]]
    gpu = get_method(name)([x.cuda() for x in srcs], b.cuda() if b is not None else None, **kw)
    assert gpu.is_cuda and gpu.dtype == torch.float32
    cpu = get_method(name)(srcs, b, **kw)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5), (gpu.cpu() - cpu).abs().max()


# ---------------------------------------------------------------- declarations and recipes


def test_registered_documented_declared():
    assert set(NEW) <= set(method_names())
    for name in NEW:
        spec = get_method(name)
        assert spec.doc and "Parameters" in spec.doc and "mergekit" in spec.doc, name
        assert any(k in spec.doc for k in ("arXiv", "Shoemake", "Karcher", "goddard", "alchemonaut", "Arcee")), name
        for p in spec.params:
            assert f"``{p.name}``" in spec.doc, (name, p.name)
            assert p.default is not None and p.check(p.default, "default") == [], (name, p.name)
            if p.kind == "bool":
                assert not p.searchable
            if p.searchable:
                assert p.search_low < p.search_high
                assert p.check(p.search_low, "s") == [] and p.check(p.search_high, "s") == []
        assert not spec.stochastic and name not in FAST_METHODS
    takes = {n: (get_method(n).needs_base, get_method(n).optional_base) for n in NEW}
    assert takes == {"nuslerp": (False, True), "multislerp": (False, True), "karcher": (False, False),
                     "nearswap": (True, False), "sce": (True, False), "arcee_fusion": (True, False),
                     "ram": (True, False), "ramplus_tl": (True, False)}


def test_recipes_validate_base_and_sources():
    for method in ("nuslerp", "multislerp"):  # optional base: both forms are valid
        two = [{"model": "x"}, {"model": "y"}]
        assert parse_recipe({"method": method, "sources": two}).base is None
        assert parse_recipe({"method": method, "base": "b", "sources": two}).base == "b"
    with pytest.raises(ConfigError, match="needs a base"):
        parse_recipe({"method": "sce", "sources": [{"model": "x"}]})
    with pytest.raises(ConfigError, match="exactly 2"):
        parse_recipe({"method": "nuslerp", "sources": [{"model": "x"}]})
    with pytest.raises(ConfigError, match="has no parameter 'r'"):
        parse_recipe({"method": "ram", "base": "b", "sources": [{"model": "x"}], "params": {"r": 0.1}})
    r = parse_recipe({"method": "ramplus_tl", "base": "b", "sources": [{"model": "x"}, {"model": "y"}],
                      "params": {"r": [0.1, 0.3], "alpha": 0.5}})  # a layer gradient on r
    assert r.params["r"] == [0.1, 0.3]


# ---------------------------------------------------------------- mergekit configs


def test_mergekit_import_and_export():
    assert set(NEW) <= set(SHARED_METHODS)
    two = [{"model": "m1", "parameters": {"weight": 0.3}}, {"model": "m2", "parameters": {"weight": 0.7}}]
    # optional base: kept when given; a models entry equal to the base is the base, not a source
    r = from_mergekit({"merge_method": "nuslerp", "base_model": "b", "models": [{"model": "b"}, *two],
                       "parameters": {"nuslerp_flatten": False}})
    assert isinstance(r, MergeRecipe) and r.base == "b" and [s.model for s in r.sources] == ["m1", "m2"]
    assert r.params == {"nuslerp_flatten": False} and r.sources[1].params == {"weight": 0.7}
    assert from_mergekit({"merge_method": "multislerp", "models": two}).base is None
    back = to_mergekit(r)
    assert back["merge_method"] == "nuslerp" and back["base_model"] == "b" and from_mergekit(back) == r
    # karcher ignores the base in mergekit: the base model is one more input, as mergekit does
    k = from_mergekit({"merge_method": "karcher", "base_model": "b", "models": [{"model": "m1"}, {"model": "m2"}],
                       "parameters": {"max_iter": 20}})
    assert k.base is None and [s.model for s in k.sources] == ["m1", "m2", "b"] and k.params == {"max_iter": 20}
    k2 = from_mergekit({"merge_method": "karcher", "base_model": "b", "models": [{"model": "b"}, {"model": "m1"}]})
    assert [s.model for s in k2.sources] == ["b", "m1"]
    assert from_mergekit(to_mergekit(k)) == k
    with pytest.raises(ConfigError, match="equally"):
        to_mergekit(parse_recipe({"method": "karcher", "sources": [
            {"model": "m1", "params": {"weight": 1.0}}, {"model": "m2", "params": {"weight": 2.0}}]}))
    # the base-requiring ones; int8_mask (a memory switch of sce) is dropped
    for method, params in (("nearswap", {"t": 0.001}), ("sce", {"select_topk": 0.4, "int8_mask": True}),
                           ("arcee_fusion", {}), ("ram", {"epsilon": 1e-4}),
                           ("ramplus_tl", {"r": 0.2, "alpha": 0.3, "epsilon": 1e-5})):
        models = [{"model": "m1"}] if method in ("nearswap", "arcee_fusion") else [{"model": "m1"}, {"model": "m2"}]
        r = from_mergekit({"merge_method": method, "base_model": "b", "models": models,
                           **({"parameters": params} if params else {})})
        assert r.method == method and r.base == "b" and "int8_mask" not in r.params
        assert r.params == {k: v for k, v in params.items() if k != "int8_mask"}
        assert from_mergekit(to_mergekit(r)) == r
    # one output slice with layer ranges
    s = from_mergekit({"merge_method": "sce", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [2, 4]},
        {"model": "m2", "layer_range": [1, 3]}]}]})
    assert s.base_layers == (0, 2) and [src.layers for src in s.sources] == [(2, 4), (1, 3)]


# ---------------------------------------------------------------- search spaces


def test_search_space_params_and_optional_base(tmp_path):
    from test_search_support import family as tiny_family

    from evomerge.search.space import parse_space

    fam = tiny_family(tmp_path / "fam", n_experts=2, noise=0.1)

    def space(method, n=2, **params):
        sources = [{"name": "a", "model": fam["expert1"]}, {"name": "b", "model": fam["expert2"]}][:n]
        return {"kind": "ps", "evaluation": {"kind": "weights", "target": fam["base"]},
                "ps": {"base": fam["base"], "method": method, "params": params, "sources": sources}}

    ps = parse_space(space("multislerp")).ps
    assert {d.name for d in ps.dims()} == {"weight.a", "weight.b"}  # switches are not searched
    rec = ps.decode(ps.default_params())
    assert rec.method == "multislerp" and rec.base == fam["base"]  # optional base: the space's base
    parse_recipe(rec.model_dump())
    ps = parse_space(space("nearswap", n=1, t={"low": 0.0, "high": 0.05})).ps
    t = next(d for d in ps.dims() if d.name == "t")
    assert (t.low, t.high) == (0.0, 0.05)
    with pytest.raises(ConfigError, match=r"takes exactly 1 source model\(s\) \(the base not counted\), got 2"):
        parse_space(space("nearswap"))  # two sources for a one-source method
    ps = parse_space(space("ramplus_tl")).ps
    assert {d.name for d in ps.dims()} == {"r", "alpha"}
    ps = parse_space(space(["karcher", "sce"])).ps
    dims = {d.name: d for d in ps.dims()}
    assert {"method", "weight.a", "weight.b", "select_topk"} <= set(dims)
    rec = ps.decode({**ps.default_params(), "method": "karcher"})
    assert rec.base is None and rec.method == "karcher"  # karcher takes no base
    assert ps.decode({**ps.default_params(), "method": "sce"}).base == fam["base"]
    # one name, two scopes (della's per-source epsilon, ram's global one): refused when searched
    with pytest.raises(ConfigError, match="per source in some methods and global"):
        parse_space(space(["della", "ram"]))
    ps = parse_space(space(["della", "ram"], epsilon=0.1)).ps  # a fixed value serves both
    assert ps.decode({**ps.default_params(), "method": "ram"}).params["epsilon"] == 0.1


# ---------------------------------------------------------------- evomerge merge == in-memory


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-extra")
    paths = build_tiny_family(root, n_experts=3, noise=0.05, seed=3, dtype=torch.float32, num_layers=2,
                              hidden_size=32, intermediate_size=64)
    return {k: str(v) for k, v in paths.items()}


def new_recipes(f):
    b, e1, e2, e3 = f["base"], f["expert1"], f["expert2"], f["expert3"]
    three = [{"model": e1}, {"model": e2}, {"model": e3}]
    return {
        "nuslerp": {"method": "nuslerp", "base": b, "sources": [{"model": e1, "params": {"weight": 0.3}},
                                                               {"model": e2, "params": {"weight": [0.2, 0.9]}}]},
        "nuslerp_rows": {"method": "nuslerp", "params": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "sources": [{"model": e1}, {"model": e3, "params": {"weight": 2.0}}]},
        "multislerp": {"method": "multislerp", "base": b, "sources": [
            {"model": e1, "params": {"weight": 0.5}}, {"model": e2, "params": {"weight": 0.2}},
            {"model": e3, "params": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]}}]},
        "multislerp_nobase": {"method": "multislerp", "params": {"normalize_weights": False}, "sources": three[:2]},
        "karcher": {"method": "karcher", "sources": [*three[:2], {"model": e3, "params": {"weight": 2.0}}]},
        "nearswap": {"method": "nearswap", "base": b, "params": {"t": [0.01, 0.05]}, "sources": three[:1]},
        "sce": {"method": "sce", "base": b, "params": {"select_topk": 0.4}, "sources": three},
        "arcee_fusion": {"method": "arcee_fusion", "base": b, "sources": [{"model": e2}]},
        "ram": {"method": "ram", "base": b, "params": {"epsilon": 0.04}, "sources": three},
        "ramplus_tl": {"method": "ramplus_tl", "base": b, "params": {"epsilon": 0.04, "r": 0.5, "alpha": 0.5},
                       "sources": three},
    }


@pytest.mark.parametrize("which", list(new_recipes({"base": "b", "expert1": "1", "expert2": "2", "expert3": "3"})))
def test_evomerge_merge_equals_in_memory(fam, which, tmp_path):
    data = new_recipes(fam)[which]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    assert main(["merge", str(recipe_file), str(tmp_path / "out"), "-q"]) == 0
    streamed = Checkpoint.open(tmp_path / "out")
    recipe = parse_recipe(data)
    refs = [s["model"] for s in data["sources"]]
    rs = ResidentSources.load(refs, base=data.get("base"), fused=False)
    got = rs.materialize_into(recipe, rs.empty_state_dict(recipe))
    assert set(streamed.names) <= set(got)
    for name in streamed.names:
        want = streamed.read(name)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    # and the merge did something other than copying one input
    first = Checkpoint.open(refs[0])
    assert any(not torch.equal(first.read(n), streamed.read(n)) for n in streamed.names)


# ---------------------------------------------------------------- mergekit itself (slow)


def _mergekit_yaml() -> Path | None:
    venv = Path(os.environ.get("MERGEKIT_VENV", Path.home() / ".cache/evomerge/mergekit-venv"))
    mk = venv / "bin/mergekit-yaml"
    return mk if mk.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_mergekit_yaml() is None, reason="no mergekit venv (scripts/setup_mergekit.sh)")
def test_parity_with_mergekit(tmp_path):
    """scripts/compare_mergekit.py on the new methods: every tensor within one bf16 rounding of
    mergekit's (float32 compute)."""
    methods = "nuslerp,nuslerp_rows,multislerp,multislerp_nobase,karcher,nearswap,sce,arcee_fusion,ram,ramplus_tl"
    r = subprocess.run([sys.executable, str(REPO / "scripts/compare_mergekit.py"), "--workdir", str(tmp_path),
                        "--mergekit", str(_mergekit_yaml()), "--methods", methods],
                       capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(methods.split(","))
    for row in rows:
        rel = float(row.split("|")[5])
        assert rel < 1e-5, row
