"""Resident in-place materialization (evomerge.resident) against the reference path
(evomerge.materialize.materialize_state_dict): same tensors, buffers reused, exact top-k thresholds."""

import gc
import warnings

import numpy as np
import pytest
import torch

from evomerge.errors import MergeError
from evomerge.materialize import materialize_state_dict
from evomerge.methods import sparsify as sp
from evomerge.recipe import parse_recipe
from evomerge.methods import native
from evomerge.resident import ResidentSources
from evomerge.resident.stats import rank_order, top_cut
from evomerge.tiny import build_tiny_family

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module", params=list(DTYPES))
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"res-{request.param}")
    paths = build_tiny_family(root, n_experts=3, noise=0.05, seed=1, dtype=DTYPES[request.param],
                              num_layers=4, hidden_size=48, intermediate_size=96)
    paths = {k: str(v) for k, v in paths.items()}
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=False)
    return paths, rs


def recipes(f):
    b, e = f["base"], [f["expert1"], f["expert2"], f["expert3"]]

    def srcs(*params):
        return [{"model": m, "params": p} for m, p in zip(e, params)]

    return {
        "linear": {"method": "linear", "sources": srcs({"weight": 0.3}, {"weight": [0.1, 0.9]}, {"weight": 0.0})},
        "task_arithmetic": {"method": "task_arithmetic", "base": b, "params": {"lambda": 0.9},
                            "sources": srcs({"weight": [0.3, 0.7]}, {"weight": 0.5}, {"weight": -0.2})},
        "ties": {"method": "ties", "base": b, "sources": srcs(
            {"weight": 0.3, "density": 0.37}, {"weight": 0.5, "density": 0.61},
            {"weight": 0.2, "density": [{"filter": "mlp", "value": 0.02}, {"value": [0.1, 0.9]}]})},
        "ties_rescale": {"method": "ties", "base": b, "params": {"normalize": False, "rescale": True, "lambda": 1.2},
                         "sources": srcs({"weight": 0.3, "density": 0.37}, {"weight": 0.5, "density": 1.0},
                                         {"weight": 0.2, "density": 0.0})},
        "dare_ties": {"method": "dare_ties", "base": b, "seed": 7, "sources": srcs(
            {"weight": 0.3, "density": 0.37}, {"weight": 0.5, "density": 0.61}, {"weight": 0.2, "density": 1.0})},
        "dare_linear": {"method": "dare_linear", "base": b, "seed": 3, "params": {"normalize": True},
                        "sources": srcs({"weight": 0.3, "density": 0.37}, {"weight": 0.5, "density": 0.61},
                                        {"weight": 0.2, "density": 0.5})},
        "breadcrumbs": {"method": "breadcrumbs", "base": b, "sources": srcs(
            {"weight": 0.3, "density": 0.37, "gamma": 0.05}, {"weight": 0.5, "density": 0.61},
            {"weight": 0.2, "density": 0.9, "gamma": 0.2})},
        "breadcrumbs_ties": {"method": "breadcrumbs_ties", "base": b, "sources": srcs(
            {"weight": 0.3, "density": 0.37, "gamma": 0.05}, {"weight": 0.5, "density": 0.61},
            {"weight": 0.2, "density": 0.9, "gamma": 0.2})},
        "slerp": {"method": "slerp", "base": b, "params": {"t": [0.2, 0.8]}, "sources": [{"model": e[0]}]},
        "della_fallback": {"method": "della", "base": b, "seed": 5, "sources": srcs(
            {"weight": 0.3, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {"weight": 0.2, "density": 0.4})},
        "ties_ranged": {"method": "ties", "base": b, "base_layers": [1, 3], "sources": [
            {"model": e[0], "layers": [0, 2], "params": {"weight": 0.6, "density": 0.4}},
            {"model": e[1], "layers": [2, 4], "params": {"weight": 0.4, "density": 0.7}}]},
        "stack": {"kind": "stack", "slices": [{"model": e[0], "layers": [0, 3]}, {"model": e[1], "layers": [1, 4]}]},
        "dataflow": {"kind": "dataflow", "embed": e[0], "head": e[2], "path": [
            {"model": e[0], "layer": 0, "scale": 0.8}, {"model": e[2], "layer": 2, "scale": 1.3},
            {"model": e[1], "layer": 1}]},
    }


def assert_same(got: dict, want: dict):
    assert want, "empty reference"
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), f"{name}: max |diff| {(g.float() - w.float()).abs().max()}"


# what computes a recipe's tensors with the native kernel available and fused=False (the rule of
# evomerge.methods.backends.choose_backend): planned merges natively, the others as named
PLANNED_BY = {"slerp": {"torch"}, "della_fallback": {"reference"}, "stack": {"copy"}, "dataflow": {"copy", "torch"}}


@pytest.mark.parametrize("which", list(recipes({"base": "b", "expert1": "1", "expert2": "2", "expert3": "3"})))
def test_matches_reference_bit_exact(fam, which):
    paths, rs = fam
    recipe = parse_recipe(recipes(paths)[which])
    _, want = materialize_state_dict(recipe)
    res = rs.materialize(recipe)
    model = res.target
    assert model.config.num_hidden_layers == {"ties_ranged": 2, "stack": 6, "dataflow": 3}.get(which, 4)
    assert_same(model.state_dict(), want)
    assert set(res.backends) == set(want)
    expected = PLANNED_BY.get(which, {"native"})
    if native.available():
        assert set(res.backends.values()) == expected, res.backends
    # the eager torch kernels alone (no native C kernel) give the same bits
    torch_only = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=False,
                                      native=False)
    res = torch_only.materialize(recipe)
    assert_same(res.target.state_dict(), want)
    assert set(res.backends.values()) == {"torch" if b == "native" else b for b in expected}, res.backends
    # a dict target, in another dtype's output (recipe dtype) too
    recipe32 = recipe.model_copy(update={"dtype": "float32"})
    _, want32 = materialize_state_dict(recipe32)
    out = rs.empty_state_dict(recipe32)
    assert rs.materialize_into(recipe32, out) is out
    assert_same(out, want32)


def test_candidates_reuse_buffers(fam):
    paths, rs = fam
    rec = recipes(paths)
    r1, r2 = parse_recipe(rec["ties"]), parse_recipe(rec["dare_ties"])
    model = rs.materialize_into(r1)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    rs.materialize_into(r2, model)  # warm every buffer once

    def live():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on some torch module objects warns
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live()
    for i in range(4):
        r = r1 if i % 2 else r2
        assert rs.materialize_into(r) is model  # cached model of the same depth
    assert live() <= before
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    _, want = materialize_state_dict(r2)
    rs.materialize_into(r2, model)
    assert_same(model.state_dict(), want)
    # a different depth gets its own model; going back reuses the first one
    deep = rs.materialize_into(parse_recipe(rec["stack"]))
    assert deep is not model and rs.materialize_into(r1) is model


@pytest.mark.parametrize("seed", range(6))
def test_rank_order_gives_exact_top_k(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (1,), generator=g))
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    # coarse steps: many ties in |x - base|, also at the threshold
    x = (base.float() + torch.randint(-3, 4, (n,), generator=g) * 0.01).to(torch.bfloat16)
    order = rank_order(x, base)
    a = (x.float() - base.float()).abs()
    for density in [1e-4, *torch.rand(8, generator=g).tolist(), 0.999]:
        k = sp.keep_count(n, density)
        if not 0 < k < n:
            continue
        cut = top_cut(order, x, base, k)
        idx = torch.arange(n)
        mask = (a > cut.thr) | ((a == cut.thr) & (idx <= cut.last))
        assert int(mask.sum()) == k
        assert torch.equal(mask, sp.top_k_mask(a, k)), (n, density)


@pytest.mark.parametrize("n", [0, 1, 1000, 65_535, 65_536, 200_003])
def test_native_rank_order_is_torch_stable_sort(n):
    """The native radix rank order equals torch's stable descending sort of |x - base|, index for
    index: every dtype pair, heavy ties (bf16 steps), signed zeros, infinities, one thread or several,
    and a tensor whose keys all share their digits (every radix pass skipped)."""
    from evomerge.methods import native

    if not native.available():
        pytest.skip("no C compiler for the native kernel")
    g = torch.Generator().manual_seed(n)

    def ref(x, b):
        a = torch.sub(x.reshape(-1), b.reshape(-1).float()).abs_()
        return torch.sort(a, descending=True, stable=True).indices.to(torch.int32).numpy()

    b0 = torch.randn(n, generator=g) * 0.02
    x0 = b0 + torch.randint(-3, 4, (n,), generator=g) * 0.002 + torch.randn(n, generator=g) * 1e-4 * (n % 2)
    if n > 10:
        x0[:5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e30])
        b0[:5] = torch.tensor([0.0, -0.0, 0.0, 1.0, -1e30])
    for xd, bd in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
                   (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]:
        x, b = x0.to(xd), b0.to(bd)
        want = ref(x, b)
        for threads in (1, 3):
            got = native.rank_order(x, b, threads=threads)
            assert got.dtype == np.int32 and np.array_equal(got, want), (xd, bd, threads)
    if n > 10:  # nans of different payloads: all first, in index order, as torch orders them
        xn = x0.clone()
        xn[[9, 3, 5]] = torch.tensor([0x7FC00001, 0x7FC00000, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
        assert np.array_equal(native.rank_order(xn, b0), ref(xn, b0))
    same = torch.full((n,), 0.5, dtype=torch.bfloat16)
    assert np.array_equal(native.rank_order(same, same), np.arange(n, dtype=np.int32))
    if n > 1:  # not contiguous: the caller sorts with torch
        assert native.rank_order(x0[::2], b0[::2]) is None


def test_selection_without_stats_matches(fam):
    paths, _ = fam
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=False,
                              stats=False)
    for which in ("ties", "breadcrumbs_ties"):
        recipe = parse_recipe(recipes(paths)[which])
        _, want = materialize_state_dict(recipe)
        assert_same(rs.materialize_into(recipe).state_dict(), want)
    assert rs.stats_nbytes() == 0


def test_non_finite_and_missing_models_raise(fam):
    paths, rs = fam
    bad = parse_recipe({"method": "linear", "params": {"normalize": False},  # 3e38 + 3e38 overflows float32
                        "sources": [{"model": paths["expert1"], "params": {"weight": 3e38}},
                                    {"model": paths["expert2"], "params": {"weight": 3e38}}]})
    with pytest.raises(MergeError, match="non-finite"):
        rs.materialize_into(bad)
    other = parse_recipe({"method": "linear", "sources": [{"model": "/nonexistent/model"}]})
    with pytest.raises(MergeError, match="not resident"):
        rs.materialize_into(other)


def _close(got: dict, want: dict):
    for name, w in want.items():
        g, w32 = got[name].float(), w.float()
        tol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -22}[w.dtype]
        # within one output-dtype rounding step of the reference (fused multiply-adds)
        bad = (g - w32).abs() > tol * w32.abs() + 1e-6
        assert int(bad.sum()) <= max(1, w.numel() // 10_000), name


def _fused_check(rs, paths, names):
    for which in names:
        recipe = parse_recipe(recipes(paths)[which])
        _, want = materialize_state_dict(recipe, device=str(rs.device))
        _close(rs.materialize_into(recipe).state_dict(), want)


@pytest.mark.slow
def test_fused_cpu_within_rounding(fam):
    from evomerge.resident.kernels import compile_available

    paths, _ = fam
    if not compile_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=True)
    _fused_check(rs, paths, ["linear", "ties", "dare_ties", "dataflow"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_matches_reference(fam, fused):
    paths, _ = fam
    if fused and "bf16" not in paths["base"]:
        pytest.skip("compiled kernels are checked on bf16 sources (compile time)")
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], device="cuda",
                              fused=fused)
    names = list(recipes(paths)) if not fused else ["linear", "ties", "dare_ties", "dataflow"]
    for which in names:
        recipe = parse_recipe(recipes(paths)[which])
        _, want = materialize_state_dict(recipe, device="cuda")
        got = rs.materialize_into(recipe).state_dict()
        if fused or which == "slerp":  # slerp's coefficients are computed on the host
            _close(got, want)
        else:
            assert_same(got, want)


@pytest.fixture(scope="module")
def tie_family(tmp_path_factory):
    """Task vectors on a coarse grid (few distinct magnitudes): thresholds fall inside tie groups."""
    from safetensors.torch import load_file, save_file

    paths = build_tiny_family(tmp_path_factory.mktemp("ties"), n_experts=3, noise=0.05, seed=4,
                              dtype=torch.bfloat16, num_layers=2, hidden_size=32, intermediate_size=64)
    paths = {k: str(v) for k, v in paths.items()}
    base_sd = load_file(f"{paths['base']}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in (1, 2, 3):
        f = f"{paths[f'expert{i}']}/model.safetensors"
        sd = {k: (base_sd[k].float() + torch.randint(-3, 4, v.shape, generator=g) * 0.01).to(v.dtype)
              for k, v in load_file(f).items()}
        save_file(sd, f, metadata={"format": "pt"})
    # the case under test happens: some threshold splits a tie group
    name = "model.layers.0.mlp.up_proj.weight"
    x, b = load_file(f"{paths['expert1']}/model.safetensors")[name], base_sd[name]
    k = sp.keep_count(x.numel(), 0.37)
    assert top_cut(rank_order(x, b), x, b, k).last < x.numel() - 1
    return paths


@pytest.mark.parametrize("fused,use_native", [(False, False), (False, True),
                                              pytest.param(True, False, marks=pytest.mark.slow)])
def test_partial_tie_groups_are_cut_exactly(tie_family, fused, use_native):
    """Thresholds inside tie groups: the torch kernels (eager or compiled) cut the tensor into
    segments at the tie cut, the native kernel into sub-ranges; the kept sets stay the reference's top-k."""
    paths = tie_family
    if (fused and not _compiles()) or (use_native and not native.available()):
        pytest.skip("no compiler for this backend")
    e = [paths[f"expert{i}"] for i in (1, 2, 3)]
    variants = [
        {"method": "ties", "base": paths["base"], "sources": [
            {"model": m, "params": {"weight": w, "density": d}} for m, w, d in zip(e, (0.3, 0.5, 0.2), (0.37, 0.13, 0.71))]},
        {"method": "breadcrumbs_ties", "base": paths["base"], "sources": [
            {"model": m, "params": {"weight": w, "density": d, "gamma": 0.1}}
            for m, w, d in zip(e, (0.3, 0.5, 0.2), (0.37, 0.5, 0.6))]},
    ]
    rs = ResidentSources.load(e, base=paths["base"], fused=fused, native=use_native)
    for v in variants:
        recipe = parse_recipe(v)
        _, want = materialize_state_dict(recipe)
        res = rs.materialize(recipe)
        assert set(res.backends.values()) == {"native" if use_native else "compiled" if fused else "torch"}
        (_close if fused and not use_native else assert_same)(res.target.state_dict(), want)


def _compiles() -> bool:
    from evomerge.resident.kernels import compile_available

    return compile_available(torch.device("cpu"))


needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler for the native CPU kernel")
TASK_VECTOR_RECIPES = ["task_arithmetic", "ties", "ties_rescale", "dare_ties", "dare_linear", "breadcrumbs",
                       "breadcrumbs_ties", "ties_ranged"]


@needs_native
@pytest.mark.parametrize("which", TASK_VECTOR_RECIPES)
def test_native_cpu_kernel_bit_exact(fam, which):
    """fused=True on CPU sends every task-vector tensor to native.c: the reference's bits, in the
    recipe's dtype and in float32."""
    paths, _ = fam
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=True)
    recipe = parse_recipe(recipes(paths)[which])
    for r in (recipe, recipe.model_copy(update={"dtype": "float32"})):
        _, want = materialize_state_dict(r)
        out = rs.empty_state_dict(r)
        assert rs.materialize(r, out).count("native") == len(want)
        assert_same(out, want)


@needs_native
def test_native_kernel_flags_non_finite_outputs(fam):
    paths, _ = fam
    rs = ResidentSources.load([paths[f"expert{i}"] for i in (1, 2, 3)], base=paths["base"], fused=True)
    recipe = parse_recipe({"method": "task_arithmetic", "base": paths["base"], "params": {"lambda": 1e30},
                           "sources": [{"model": paths["expert1"], "params": {"weight": 1e30}}]})
    assert rs.materialize(recipe, check_finite=False).count("native") > 0  # the native kernel flags it
    with pytest.raises(MergeError, match="non-finite"):
        rs.materialize_into(recipe)
