"""driftscope.measure.fused against a float64 reference, on adversarial inputs, for both backends.

Tolerances (relative unless said; the reference is float64 on the same half/fp32 input values):
- sums behind rel_l2, rel_l1, rmse and the per-position rel-L2 curve, and drift_sums: 1e-5 (sum x*r, derived
  from the others: 1e-5 of (sum x^2 + sum r^2) / 2)
- cosine: |cos - cos_ref| <= 1e-6 * rel_l2_ref + 1e-12  (1 - cos is kept accurate, not just cos)
- max_abs: 1e-6 (exact for fp16/bf16 inputs; fp32 inputs round d = x - r once)
- absmax, per-channel absmax, channel_max_median: exact
- mean: 1e-6 of (|mean| + std); variance: 1e-5; kurtosis: 1e-4
- smoothed channel absmax (K - mean_t K): 1e-5 of the channel absmax
- frac_6sigma: at most one value per head off (rounding at the threshold)
- null drift (x == ref): exactly cosine 1, rel_l2 = rel_l1 = rmse = max_abs = 0, per head, pooled and per position

The Triton kernel runs compiled on CUDA tensors where a GPU is present, else under Triton's interpreter on the CPU
(TRITON_INTERPRET=1 must be set before triton is imported: conftest.py does it for the session, and so does this
module when run alone). Interpreter cases are kept tiny: the interpreter runs each program in numpy.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from driftscope.measure import fused  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- float64 reference --------------------------------------------------------------------------------------------
def ref_drift(x, r):
    """Per head and pooled drift metrics, float64, from the definitions."""
    H = x.shape[0]
    x64, r64 = x.double().reshape(H, -1), r.double().reshape(H, -1)

    def metrics(a, b):
        d = a - b
        xr, xx, rr, dd = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1), (d * d).sum(1)
        return {"cosine": xr / (xx * rr).sqrt(), "rel_l2": (dd / rr).sqrt(), "rel_l1": d.abs().sum(1) / b.abs().sum(1),
                "rmse": (dd / a.shape[1]).sqrt(), "max_abs": d.abs().amax(1)}

    return metrics(x64, r64), metrics(x64.reshape(1, -1), r64.reshape(1, -1))


def ref_sums(x, r):
    """drift_sums' layout [7, heads], float64: sum x*r, x^2, r^2, d^2, |d|, |r|, max |d|."""
    x64, r64 = x.double().flatten(1), r.double().flatten(1)
    d = x64 - r64
    return torch.stack([(x64 * r64).sum(1), x64.square().sum(1), r64.square().sum(1), d.square().sum(1),
                        d.abs().sum(1), r64.abs().sum(1), d.abs().amax(1)])


def ref_position(x, r, bins):
    d = x.double() - r.double()
    num, den = d.square().sum((0, 2)), r.double().square().sum((0, 2))
    T = num.numel()
    width = -(-T // bins)
    return torch.stack([(num[i:i + width].sum() / den[i:i + width].sum()).sqrt() for i in range(0, T, width)])


def ref_outliers(t):
    t64 = t.double()
    H, T, C = t.shape
    flat = t64.reshape(H, -1)
    mean = flat.mean(1)
    c = flat - mean[:, None]
    var = c.square().mean(1)
    ch = t64.abs().amax(1)
    smoothed = (t64 - t64.mean(1, keepdim=True)).abs().amax(1)
    return {"mean": mean, "var": var, "kurtosis": c.pow(4).mean(1) / var.square(), "absmax": flat.abs().amax(1),
            "count": (c.abs() > 6 * var.sqrt()[:, None]).sum(1).double(), "channel": ch, "smoothed": smoothed,
            "channel_max_median": ch.amax(1) / ch.median(1).values}


def cpu(d):
    return {k: v.cpu() for k, v in d.items()}


def check_against_reference(s, x, r, stats_of, bins=5):
    """s (on any device) against the float64 reference of the CPU tensors x and r."""
    if r is not None:
        per_head, pooled = ref_drift(x, r)
        for got, want in ((cpu(fused.drift(s)), per_head), (cpu(fused.drift(s, pooled=True)), pooled)):
            for k in ("rel_l2", "rel_l1", "rmse"):
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-30, msg=k)
            torch.testing.assert_close(got["max_abs"], want["max_abs"], rtol=1e-6, atol=0)
            err = (got["cosine"] - want["cosine"]).abs()
            assert bool((err <= 1e-6 * want["rel_l2"] + 1e-12).all()), (got["cosine"], want["cosine"])
        got, want = fused.drift_sums(s).cpu(), ref_sums(x, r)
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-30)
        # sum x*r = (sum x^2 + sum r^2 - sum d^2) / 2: accurate relative to (sum x^2 + sum r^2) / 2, not to itself
        assert bool(((got[0] - want[0]).abs() <= 1e-5 * (want[1] + want[2]) / 2).all()), (got[0], want[0])
        if s.position is not None:
            curve = fused.rel_l2_by_position(s, bins)[1].cpu()
            torch.testing.assert_close(curve, ref_position(x, r, bins), rtol=1e-5, atol=0)
    for which in stats_of:
        t = x if which == "x" else r
        want, m, got = ref_outliers(t), getattr(s, which), cpu(fused.outliers(s, which))
        mean, var, count = m.mean.cpu(), m.var.cpu(), m.count_6sigma.cpu()
        scale = want["mean"].abs() + want["var"].sqrt()
        assert bool(((mean - want["mean"]).abs() <= 1e-6 * scale).all()), (which, mean, want["mean"])
        torch.testing.assert_close(var, want["var"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["kurtosis"], want["kurtosis"], rtol=1e-4, atol=0)
        assert torch.equal(got["absmax"], want["absmax"])
        assert torch.equal(fused.channel_absmax(s, which).cpu().double(), want["channel"])
        assert torch.equal(got["channel_max_median"], want["channel_max_median"].float().double())
        smoothed = fused.channel_absmax(s, which, smoothed=True).cpu().double()
        assert bool(((smoothed - want["smoothed"]).abs() <= 1e-5 * want["channel"] + 1e-30).all()), which
        assert bool(((count - want["count"]).abs() <= 1).all()), (which, count, want["count"])
        torch.testing.assert_close(got["frac_6sigma"], count / (t.shape[1] * t.shape[2]))


# -- adversarial inputs ---------------------------------------------------------------------------------------------
def make(kind, shape, dtype, seed=0):
    """(x, ref) of `shape` in `dtype`: x is ref plus a small drift."""
    g = torch.Generator().manual_seed(seed)
    H, T, C = shape
    r = torch.randn(shape, generator=g)
    if kind == "offset":  # a large common offset: raw power sums would cancel catastrophically
        r = 1e3 + r
    elif kind == "massive":  # one massive channel, as in LLM residual streams and K
        r[..., C // 3] = 1e4 + r[..., C // 3]
    elif kind == "spikes":  # rare 20-sigma values: a non-zero 6-sigma fraction
        spikes = torch.rand(shape, generator=g) < 0.01
        r = torch.where(spikes, 20 * torch.sign(r), r)
    elif kind == "scaled":
        r = r * torch.logspace(-3, 3, H)[:, None, None]
    x = r + 1e-2 * r.abs().mean() * torch.randn(shape, generator=g)
    return x.to(dtype), r.to(dtype)


CASES = [("normal", (3, 37, 20)), ("offset", (2, 64, 64)), ("massive", (4, 33, 64)), ("spikes", (2, 200, 48)),
         ("scaled", (5, 17, 9)), ("normal", (1, 1, 7)), ("normal", (40, 3, 8)), ("massive", (1, 19, 300))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,shape", CASES, ids=lambda v: str(v))
def test_torch_backend_matches_float64_reference(kind, shape, dtype):
    x, r = make(kind, shape, dtype)
    s = fused.site_stats(x, r, stats_of=("x", "ref"), positions=True, backend="torch")
    assert s.backend == "torch"
    check_against_reference(s, x, r, ("x", "ref"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_fallback_matches_reference(dtype):
    """Tokens in many chunks: moments merged across chunks (with M3), the 6-sigma count re-reads the chunks."""
    x, r = make("spikes", (3, 101, 24), dtype, seed=3)
    x[1, 50:, 5] += 300  # a shift inside one head: chunk means differ
    s = fused.site_stats(x, r, stats_of=("x", "ref"), positions=True, backend="torch", chunk_elems=3 * 24 * 7)
    check_against_reference(s, x, r, ("x", "ref"))
    whole = fused.site_stats(x, r, stats_of=("x", "ref"), positions=True, backend="torch")
    assert torch.equal(s.x.count_6sigma, whole.x.count_6sigma)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_null_drift_is_exact_torch(dtype):
    x, _ = make("massive", (6, 45, 64), dtype)
    assert_null_drift(fused.site_stats(x, x.clone(), positions=True, backend="torch"))
    assert_null_drift(fused.site_stats(x, x, positions=True, backend="torch"))


def assert_null_drift(s):
    for m in (fused.drift(s), fused.drift(s, pooled=True)):
        assert torch.equal(m["cosine"], torch.ones_like(m["cosine"])), m["cosine"]
        for k in ("rel_l2", "rel_l1", "rmse", "max_abs"):
            assert torch.equal(m[k], torch.zeros_like(m[k])), (k, m[k])
    curve = fused.rel_l2_by_position(s, 7)[1]
    assert torch.equal(curve, torch.zeros_like(curve))


def test_known_values():
    r = torch.tensor([[[1.0, 0.0, 2.0, 0.0]]])
    orth = fused.drift(fused.site_stats(torch.tensor([[[0.0, 3.0, 0.0, -1.0]]]), r))
    assert abs(orth["cosine"].item()) <= 1e-6  # fp32 sums: ~1e-7 absolute where 1 - cos is of order 1
    twice = fused.drift(fused.site_stats(2 * r, r))
    assert twice["cosine"].item() == 1.0
    assert twice["rel_l2"].item() == pytest.approx(1.0, abs=1e-12)
    assert twice["rel_l1"].item() == pytest.approx(1.0, abs=1e-12)
    zero = fused.drift(fused.site_stats(torch.zeros(1, 1, 4), r))  # a zero vector: cosine 0, as <x,r>/tiny was
    assert zero["cosine"].item() == 0.0 and zero["rel_l2"].item() == 1.0
    const = fused.outliers(fused.site_stats(torch.full((2, 5, 3), 0.1)), "x")
    assert torch.equal(const["frac_6sigma"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(const["kurtosis"], torch.zeros(2, dtype=torch.float64))


def test_two_d_input_is_one_head_and_inputs_are_not_modified():
    x, r = make("offset", (1, 30, 40), torch.float32)
    x2, r2 = x[0].clone(), r[0].clone()
    s = fused.site_stats(x2, r2, stats_of=("x", "ref"), positions=True, backend="torch")
    assert s.shape == (1, 30, 40) and fused.drift(s)["rel_l2"].shape == (1,)
    assert torch.equal(x2, x[0]) and torch.equal(r2, r[0])  # fp32 inputs are never centred in place
    check_against_reference(s, x, r, ("x", "ref"))
    fused.site_stats(x2, backend="torch", chunk_elems=40 * 4)
    assert torch.equal(x2, x[0])


def test_bad_inputs_raise_with_the_offending_values():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        fused.site_stats(x, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="stats_of"):
        fused.site_stats(x, x, stats_of=("y",))
    with pytest.raises(ValueError, match="need ref"):
        fused.site_stats(x, positions=True)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        fused.site_stats(x.double())
    with pytest.raises(ValueError, match="stats_of=\\('ref',\\)"):
        fused.outliers(fused.site_stats(x, x), "ref")
    with pytest.raises(ValueError, match="backend"):
        fused.site_stats(x, backend="cuda")


# -- Triton: compiled on CUDA, interpreted on the CPU ------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_device():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton is not importable: {e}")
    k = fused._triton_kernels()
    if isinstance(k, str):
        pytest.skip(k)
    if not k.interpreted and not torch.cuda.is_available():
        pytest.skip("triton was imported compiled before TRITON_INTERPRET=1 was set, and there is no GPU")
    return "cpu" if k.interpreted else "cuda"


def small_tiles(monkeypatch):
    """Tiles of 64 values and few programs: several tiles per program (the in-kernel Chan merge), masked tails."""
    monkeypatch.setattr(fused, "TILE", 64)
    monkeypatch.setattr(fused, "PROGRAMS", 4)


TRITON_CASES = [("massive", (3, 21, 20), torch.bfloat16, True), ("offset", (2, 9, 300), torch.float32, False),
                ("spikes", (2, 40, 16), torch.float16, True), ("normal", (4, 1, 7), torch.float16, False),
                ("massive", (1, 6, 300), torch.float16, False)]  # one head: Triton specializes H == 1


@pytest.mark.parametrize("kind,shape,dtype,small", TRITON_CASES, ids=lambda v: str(v))
def test_triton_matches_fallback_and_reference(triton_device, monkeypatch, kind, shape, dtype, small):
    if small:
        small_tiles(monkeypatch)
    x, r = make(kind, shape, dtype, seed=1)
    x, r = x.to(triton_device), r.to(triton_device)
    if small:  # a strided view, as the capture passes k[:, :, -Tq:] of the cache
        x = torch.cat([x, x[:, :3]], 1)[:, : shape[1]]
    s = fused.site_stats(x, r, stats_of=("x", "ref"), positions=True, backend="triton")
    assert s.backend == "triton"
    check_against_reference(s, x.cpu(), r.cpu(), ("x", "ref"))
    t = fused.site_stats(x, r, stats_of=("x", "ref"), positions=True, backend="torch")
    for a, b in ((fused.drift(s), fused.drift(t)), (fused.outliers(s, "x"), fused.outliers(t, "x")),
                 (fused.outliers(s, "ref"), fused.outliers(t, "ref"))):  # the same device: assert_close checks it
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9, msg=k)
    for which in ("x", "ref"):
        assert torch.equal(fused.channel_absmax(s, which), fused.channel_absmax(t, which))
        assert torch.equal(getattr(s, which).count_6sigma, getattr(t, which).count_6sigma)


def test_triton_null_drift_is_exact_and_flags_select_work(triton_device, monkeypatch):
    small_tiles(monkeypatch)
    for dtype in DTYPES:
        x, _ = make("massive", (2, 9, 40), dtype, seed=2)
        x = x.to(triton_device)
        assert_null_drift(fused.site_stats(x, x.clone(), positions=True, backend="triton"))
    s = fused.site_stats(x, backend="triton")  # outliers of x alone
    assert s.sums is None and s.ref is None
    check_against_reference(s, x.cpu(), None, ("x",))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_counts_are_exact_in_both_backends(triton_device, monkeypatch, dtype):
    """NaN, +inf and -inf in some heads of x and of ref are counted per head; finite heads count 0, also where a
    head's sum of squares overflows (bf16 1e30: the count then looks at that head and finds nothing)."""
    small_tiles(monkeypatch)
    x, r = make("normal", (4, 9, 40), dtype, seed=5)
    x[0, 3, 5], x[0, 8, 39], x[2, 0, 0] = float("nan"), float("inf"), float("-inf")
    r[3, 4, 4] = float("nan")
    if dtype != torch.float16:
        x[1, 2, 2] = 1e30  # finite, but its square is not (in fp32)
    want_x = torch.tensor([2, 0, 1, 0], dtype=torch.int32)
    want_r = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    for backend, device in (("torch", "cpu"), ("triton", triton_device)):
        s = fused.site_stats(x.to(device), r.to(device), nonfinite=True, backend=backend)
        assert torch.equal(s.nonfinite.cpu(), torch.stack([want_x, want_r])), backend
        alone = fused.site_stats(x.to(device), nonfinite=True, backend=backend)  # flags from the variance
        assert torch.equal(alone.nonfinite.cpu(), want_x[None]), backend
        finite = fused.site_stats(r[:3].to(device), x[1:2].expand(3, -1, -1).to(device), nonfinite=True,
                                  backend=backend)
        assert finite.nonfinite.sum() == 0 and fused.site_stats(x.to(device), r.to(device)).nonfinite is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_absmax_is_exact_in_both_backends(triton_device, dtype):
    """The INT8 block scales' absmax (smoothing's Q blocks): equal to max |x| per head and block of 128 tokens in
    both backends, on a strided [H, T, D] view with a partial last block; NaN where a block holds one."""
    g = torch.Generator().manual_seed(7)
    for T, D in ((300, 64), (128, 80), (5, 128)):
        x = (torch.randn(T, 4, D, generator=g) * 3).to(dtype)
        x[T // 2, 1, 3] = -1000
        x = x.transpose(0, 1)  # [H, T, D] over [T, H, D] memory, as the attention's q
        want = torch.nn.functional.pad(x.abs().float().amax(-1), (0, -T % 128)).view(4, -1, 128).amax(-1).to(dtype)
        x[2, 0, 1] = float("nan")
        want[2, 0] = float("nan")
        for backend, device in (("torch", "cpu"), ("triton", triton_device)):
            got = fused.block_absmax(x.to(device), 128, backend=backend).cpu()
            assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan()), (backend, T)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (backend, T)


def test_prefix_centred_sq_matches_float64_in_both_backends(triton_device):
    """Smoothing's score spreads: per row, the centred sum of squares of its first kept[r] entries, within 1e-5 of
    float64 on rows with a large offset (1e3 + noise), down to a single kept entry (0)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 1500, generator=g) * 2 + 1e3
    kept = torch.tensor([1, 7, 1024, 1500, 1499], dtype=torch.int32)
    x64 = x.double()
    want = torch.stack([((x64[..., r, :n] - x64[..., r, :n].mean(-1, keepdim=True)) ** 2).sum(-1)
                        for r, n in enumerate(kept.tolist())], -1)
    for backend, device in (("torch", "cpu"), ("triton", triton_device)):
        got = fused.prefix_centred_sq(x.to(device), kept.to(device), backend=backend).cpu()
        assert got.shape == (2, 3, 5) and torch.all(got[..., 0] == 0), backend
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0, msg=backend)
