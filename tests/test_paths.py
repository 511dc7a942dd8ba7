"""The attention-path registry, the reference paths and every kernel hazard of DESIGN §2."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from driftscope import paths
from driftscope.paths import sage_emulate as emu

HAS_TRITON = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("sageattention") is not None
needs_interp = pytest.mark.skipif(not HAS_TRITON, reason="needs triton>=3.9 and sageattention (the 'interpret' extra)")
SAGE_CPU_IMPLS = ["emulate", pytest.param("interpret", marks=needs_interp)]


def qkv(B=1, Hq=3, Hkv=1, Tq=70, Tk=70, D=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, D, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * 1.5 + torch.randn(D, generator=g) * 3).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    return q, k, v


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def naive(q, k, v, causal):
    """float64 attention with a bottom-right aligned causal mask."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        Tq, Tk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq), float("-inf"))
    return s.softmax(-1) @ v


# ---- registry ----
def test_registry_names():
    assert paths.PATH_NAMES[:4] == ("fp32", "fp16", "sage8", "sage8-nosmooth")  # the 2.x paths follow
    assert paths.SAGE_IMPLS == ("auto", "kernel", "interpret", "emulate")
    assert paths.SUPPORTED_HEAD_DIMS == (64, 96, 128)
    assert paths.get_path("fp16").impl == "sdpa" and paths.get_path("fp32", "interpret").impl == "sdpa"
    assert paths.get_path("sage8", "interpret").impl == "interpret"
    assert paths.get_path("sage8", device="cpu").impl == "emulate"
    assert paths.get_path("sage8", device="cuda").impl == "kernel"


def test_unknown_names_list_known_ones():
    with pytest.raises(paths.UnknownPathError, match="fp32, fp16, sage8, sage8-nosmooth") as e:
        paths.get_path("sage9")
    assert isinstance(e.value, ValueError) and "sage9" in str(e.value)
    with pytest.raises(paths.UnknownPathError, match="auto, kernel, interpret, emulate"):
        paths.get_path("sage8", "cuda-graph")


def test_auto_resolves_per_call_on_cpu():
    p = paths.get_path("sage8")
    p(*qkv(Tq=10, Tk=10), causal=True)
    assert p.impl == "emulate"


# ---- reference paths ----
@pytest.mark.parametrize("Tq,Tk,causal", [(40, 40, True), (1, 40, True), (7, 40, True), (40, 40, False), (5, 9, False)])
@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_reference_paths_match_float64(name, Tq, Tk, causal):
    q, k, v = qkv(Hq=6, Hkv=2, Tq=Tq, Tk=Tk, dtype=torch.float16)
    out = paths.get_path(name)(q, k, v, causal=causal)
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert rel(out, naive(q, k, v, causal)) < 2e-3  # chunked prefill: bottom-right aligned mask


def test_fp16_path_on_fp32_inputs_computes_in_fp32():
    q, k, v = qkv(dtype=torch.float32)
    assert torch.equal(paths.get_path("fp16")(q, k, v, causal=True), paths.get_path("fp32")(q, k, v, causal=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Tq,Tk", [(200, 200), (1, 200), (30, 200)])
@pytest.mark.parametrize("name", paths.PATH_NAMES)
def test_batch_rows_bitwise_equal_batch_one(name, Tq, Tk, dtype):
    """The lockstep capture's null-drift test needs each batch row to be computed exactly as if alone."""
    if name.startswith("sage") and 1 < Tq < Tk:
        pytest.skip("chunked prefill is an error on the sage paths")
    if name.startswith("sage2") and dtype == torch.float32:
        pytest.skip("SageAttention 2.x takes fp16 and bf16 only")
    q, k, v = qkv(B=1, Hq=9, Hkv=3, Tq=Tq, Tk=Tk, dtype=dtype)
    q2, k2, v2 = qkv(B=1, Hq=9, Hkv=3, Tq=Tq, Tk=Tk, dtype=dtype, seed=1)
    p = paths.get_path(name)
    one = p(q, k, v, causal=True)
    batch = p(torch.cat([q, q, q2]), torch.cat([k, k, k2]), torch.cat([v, v, v2]), causal=True)
    assert torch.equal(batch[0], one[0]) and torch.equal(batch[1], one[0])


# ---- sage hazards ----
@pytest.mark.parametrize("impl", SAGE_CPU_IMPLS)
@pytest.mark.parametrize("name", ["sage8", "sage8-nosmooth", "fp16", "fp32"])
@pytest.mark.parametrize("Tq,Tk", [(70, 70), (1, 70)])
def test_inputs_never_modified(name, impl, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    paths.get_path(name, impl)(q, k, v, causal=True)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)  # sageattn smooths k in place


@pytest.mark.parametrize("impl", SAGE_CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 96, 128])
def test_sage_dtypes_and_head_dims(impl, dtype, D):
    q, k, v = qkv(Hq=2, Hkv=2, Tq=130, Tk=130, D=D, dtype=dtype)
    out = paths.get_path("sage8", impl)(q, k, v, causal=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, naive(q, k, v, True)) < 0.05


@pytest.mark.parametrize("impl", SAGE_CPU_IMPLS)
def test_decode_goes_through_the_non_causal_kernel(impl):
    q, k, v = qkv(Tq=1, Tk=128)  # a multiple of 64: no padded keys, so the output is close to exact
    p = paths.get_path("sage8", impl)
    out = p(q, k, v, causal=True)
    assert torch.equal(out, p(q, k, v, causal=False))
    assert rel(out, naive(q, k, v, False)) < 0.05


@pytest.mark.parametrize("impl", SAGE_CPU_IMPLS)
@pytest.mark.parametrize("name", ["sage8", "sage8-nosmooth"])
def test_chunked_prefill_raises_naming_shapes(name, impl):
    q, k, v = qkv(Tq=5, Tk=40)
    with pytest.raises(paths.ChunkedPrefillError, match=r"\(1, 3, 5, 64\).*\(1, 1, 40, 64\)"):
        paths.get_path(name, impl)(q, k, v, causal=True)


@pytest.mark.parametrize("D", [32, 80, 256])
def test_unsupported_head_dim(D):
    with pytest.raises(paths.UnsupportedHeadDimError, match=rf"{D}.*64, 96, 128"):
        paths.get_path("sage8", "emulate")(*qkv(D=D), causal=True)
    with pytest.raises(paths.UnsupportedHeadDimError, match=rf"'gemma-2b' has head_dim {D}"):
        paths.check_head_dim(D, "gemma-2b")
    assert paths.get_path("fp16")(*qkv(D=D), causal=True).shape[-1] == D  # SDPA takes any head_dim
    paths.check_head_dim(96)


@pytest.mark.parametrize("bad", [
    lambda q, k, v: (q[0], k, v),  # rank
    lambda q, k, v: (q, k.float(), v),  # dtype mismatch
    lambda q, k, v: (q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)),  # dtype
    lambda q, k, v: (q[:, :2], k, v.expand(1, 2, 70, 64)),  # k/v shape mismatch
    lambda q, k, v: (q[:, :2], torch.cat([k, k, k], 1), torch.cat([v, v, v], 1)),  # Hq % Hkv
])
@pytest.mark.parametrize("name", ["sage8", "fp16"])
def test_bad_inputs_get_typed_errors(name, bad):
    with pytest.raises(paths.AttentionInputError):
        paths.get_path(name, "emulate")(*bad(*qkv()), causal=True)


def test_causal_q_longer_than_kv_is_an_error():
    with pytest.raises(paths.AttentionInputError, match="q_len <= kv_len"):
        paths.get_path("fp16")(*qkv(Tq=50, Tk=40), causal=True)


# ---- the quantizer and the kernel's quirks ----
def test_quantize_per_block_rounding_and_scales():
    x = torch.tensor([0.5, -0.5, 1.49, -1.5, 127.0, 63.5, 0.0, -127.0]).view(1, 1, 8, 1).expand(1, 1, 8, 4)
    x8, scale = paths.quantize_per_block(x, 64, 1.0)
    assert x8.dtype == torch.int8 and scale.shape == (1, 1, 1) and scale.item() == pytest.approx(1.0)
    assert x8[0, 0, :, 0].tolist() == [1, -1, 1, -2, 127, 64, 0, -127]  # half away from zero
    q8, qs = paths.quantize_per_block(torch.randn(2, 3, 300, 64), 128, 0.125 * emu.LOG2E)
    assert qs.shape == (2, 3, 3) and q8.abs().max() == 127
    z8, zs = paths.quantize_per_block(torch.zeros(1, 1, 5, 64), 64, 1.0)  # a smoothed single key
    assert (z8 == 0).all() and zs.item() == 0


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 96, 128])
def test_quantizer_bitwise_equals_the_kernels(dtype, D):
    from driftscope.paths import sage_triton
    q, k, _ = qkv(Tq=200, Tk=200, D=D, dtype=dtype)
    fns = sage_triton.load("interpret")
    quant = fns.per_block_int8_hd96 if D == 96 else fns.per_block_int8
    q8, qs, k8, ks = quant(q, k, sm_scale=None, tensor_layout="HND")
    e8, es = paths.quantize_per_block(q, 128, D ** -0.5 * emu.LOG2E)
    f8, fs = paths.quantize_per_block(k, 64, 1.0)
    assert torch.equal(q8, e8) and torch.equal(qs[..., 0], es) and torch.equal(k8, f8) and torch.equal(ks[..., 0], fs)


@pytest.mark.parametrize("impl", SAGE_CPU_IMPLS)
def test_non_causal_kernel_counts_padded_keys(impl):
    """Keys past kv_len in the last 64-key block load as 0, score 0 and join the softmax denominator.

    With one smoothed key (k - mean(k) = 0) every score is 0, so the kernel returns v / 64 instead of v.
    """
    q, k, v = qkv(Tq=1, Tk=1)
    out = paths.get_path("sage8", impl)(q, k, v, causal=True)
    assert rel(out * 64, v.expand_as(out)) < 2e-3
    out_nosmooth = paths.get_path("sage8-nosmooth", impl)(q, k, v, causal=True)
    assert rel(out_nosmooth, v.expand_as(out)) > 0.05  # max score != 0: still inflated, by exp2(-m) per pad key
    exact = emu.sage_emulate(q, k, v, causal=False, pad_keys=False)
    assert rel(exact, v.expand_as(out)) < 2e-3


# ---- the interpreter's import mode ----
def _run(code, **env):
    e = {**os.environ, **env}
    e.pop("TRITON_INTERPRET", None) if "TRITON_INTERPRET" not in env else None
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=300)


@needs_interp
def test_interpret_after_compiled_import_is_a_clear_error():
    r = _run("""
        import torch, sageattention  # compiled mode: TRITON_INTERPRET unset
        from driftscope.paths import sage_triton
        try:
            sage_triton.load("interpret")
        except sage_triton.SageModeError as e:
            print("OK", e)
    """)
    assert "OK sageattention was already imported compiled" in r.stdout, r.stderr


@needs_interp
def test_old_triton_is_refused_for_interpret():
    r = _run("""
        import triton
        triton.__version__ = "3.6.0"
        from driftscope.paths import sage_triton
        try:
            sage_triton.load("interpret")
        except sage_triton.SageUnavailableError as e:
            print("OK", e)
    """)
    assert "OK" in r.stdout and "3.9" in r.stdout and "3.6.0" in r.stdout, r.stderr


# ---- CUDA ----
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or getattr(paths.installed_sage(), "family", None) != "1.0.6",
                    reason="needs a CUDA GPU and the compiled sageattention 1.0.6 kernel")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Tq,Tk", [(300, 300), (1, 300), (1, 128)])
def test_kernel_on_cuda(Tq, Tk, dtype):
    q, k, v = (t.cuda() for t in qkv(Hq=9, Hkv=3, Tq=Tq, Tk=Tk, dtype=dtype))
    k0 = k.clone()
    p = paths.get_path("sage8")
    out = p(q, k, v, causal=True)
    assert p.impl == "kernel" and out.dtype == dtype and torch.equal(k, k0)
    ref = paths.get_path("fp32")(q, k, v, causal=True)
    emul = paths.get_path("sage8", "emulate")(q, k, v, causal=True)
    # Against the compiled kernel the emulator's error is a reported figure (DESIGN §2), not the CPU test's 10%:
    # experiments/results/gpu_fidelity.json measured a worst ratio of 0.23 over 444 finite cases (bf16 decode).
    assert rel(emul, out) <= 0.25 * rel(out, ref) + 1e-6
    with pytest.raises(paths.ChunkedPrefillError):
        p(q[:, :, :2], k, v, causal=True) if Tq > 2 else p(q.expand(-1, -1, 2, -1), k, v, causal=True)


# ---- SageAttention 2.x paths (issue 14) ----
SAGE2 = [n for n in paths.PATH_NAMES if n.startswith("sage2")]
FAKE_2X = paths.InstalledSage("2.x", "2.2.0", ("sageattn", "sageattn_qk_int8_pv_fp16_triton",
                                                "sageattn_qk_int8_pv_fp8_cuda_sm90"))
HAS_SA2 = paths.installed_sage() is not None and paths.installed_sage().family == "2.x"


@pytest.fixture
def fake_install(monkeypatch):
    """Pretend that `sage` (an InstalledSage or None) is the installed sageattention."""
    from driftscope.paths import installed

    def use(sage):
        monkeypatch.setattr(installed, "installed_sage", lambda: sage)
    return use


def test_sage2_registry_names_and_families():
    assert SAGE2 == ["sage2-triton", "sage2-triton-nosmooth", "sage2-fp8", "sage2-fp8-nosmooth", "sage2-fp8-ada",
                     "sage2-fp16-ampere"]
    assert set(paths.SAGE_PATHS) == {"sage8", "sage8-nosmooth", *SAGE2}
    for name in paths.PATH_NAMES:
        p = paths.get_path(name, "emulate")
        assert p.is_sage == name.startswith("sage")
        assert p.family == {"sage8": "1.0.6", "sage2": "2.x"}.get(name[:5], "reference")
        assert name in p.description
    assert paths.get_path("sage2-fp8").spec.function == "sageattn_qk_int8_pv_fp8_cuda_sm90"
    assert not paths.get_path("sage2-fp8-nosmooth").spec.smooth_k and paths.get_path("sage2-fp8-ada").spec.smooth_k
    with pytest.raises(paths.UnknownPathError, match="sage2-fp8-ada, sage2-fp16-ampere"):
        paths.get_path("sage3")


@pytest.mark.parametrize("name", SAGE2)
def test_sage2_kernel_with_1_0_6_installed_falls_back_visibly(name, fake_install):
    fake_install(paths.InstalledSage("1.0.6", "1.0.6", ("sageattn",)))
    p = paths.get_path(name, "kernel")
    assert p.impl == "emulate" and "1.0.6" in p.fallback_reason and "fallback" in p.description
    q, k, v = qkv(Hq=4, Hkv=2, Tq=1, Tk=70)
    paths._warned.clear()
    with pytest.warns(paths.KernelFallbackWarning, match=name):
        out = p(q, k, v, causal=True)
    assert p.impl == "emulate" and torch.equal(out, paths.get_path(name, "emulate")(q, k, v, causal=True))
    assert paths.get_path(name, device="cuda").impl == "emulate"  # auto on a CUDA device: the kernel, if it could
    assert paths.get_path(name, device="cpu").fallback_reason is None  # the CPU's emulator is no fallback


def test_sage8_with_2x_installed_falls_back_and_2x_kernels_resolve(fake_install):
    fake_install(FAKE_2X)
    p = paths.get_path("sage8", "kernel")
    assert p.impl == "emulate" and "2.2.0" in p.fallback_reason
    assert paths.get_path("sage2-fp8", "kernel").impl == "kernel"
    assert paths.get_path("sage2-triton", "interpret").impl == "interpret"
    assert paths.get_path("sage2-fp8", "interpret").impl == "emulate"  # a CUDA kernel has no Triton code
    assert "built without" in paths.get_path("sage2-fp8-ada", "kernel").fallback_reason
    fake_install(None)
    assert paths.get_path("sage2-fp8", "kernel").fallback_reason == "sageattention is not installed"


def test_installed_sage_reads_files_without_importing(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from driftscope.paths import installed_sage; "
                        "s = installed_sage(); print(s); assert 'sageattention' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from driftscope.paths.installed import describe
    pkg = tmp_path / "sageattention"
    pkg.mkdir()
    (pkg / "core.py").write_text("def sageattn(q):\n    pass\ndef sageattn_qk_int8_pv_fp16_triton(q):\n    pass\n"
                                 "def sageattn_qk_int8_pv_fp8_cuda_sm90(q):\n    pass\n"
                                 "def sageattn_qk_int8_pv_fp16_cuda(q):\n    pass\n")
    assert describe(pkg, "2.2.0") == ("2.x", "2.2.0", ())  # no _fused extension: core.py cannot even import
    for ext in ("_fused", "_qattn_sm90"):
        (pkg / f"{ext}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert describe(pkg, "2.2.0").functions == ("sageattn", "sageattn_qk_int8_pv_fp16_triton",
                                                "sageattn_qk_int8_pv_fp8_cuda_sm90")
    assert describe(pkg, "1.0.6").family == "1.0.6"


@pytest.mark.parametrize("cap,expected", [((9, 0), "sage2-fp8"), ((8, 9), "sage2-fp8-ada"),
                                          ((8, 0), "sage2-fp16-ampere"), ((8, 6), "sage2-triton")])
def test_default_quant_path_is_sageattn_dispatch(cap, expected, fake_install, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    fake_install(FAKE_2X)
    assert paths.default_quant_path("cuda") == expected
    assert paths.default_quant_path("cpu") == paths.default_quant_path(None) == "sage8"
    fake_install(paths.InstalledSage("1.0.6", "1.0.6", ("sageattn",)))
    assert paths.default_quant_path("cuda") == "sage8"


def test_default_quant_path_refuses_unmodelled_cards(fake_install, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    fake_install(FAKE_2X)
    with pytest.raises(paths.UnsupportedDeviceError, match="sm120") as e:
        paths.default_quant_path("cuda")
    assert isinstance(e.value, paths.PathError)


@pytest.mark.parametrize("name", SAGE2)
def test_sage2_head_dims_pad_up_to_128(name):
    for D in (32, 80, 96, 128):
        q, k, v = qkv(Hq=2, Hkv=1, Tq=40, Tk=40, D=D, dtype=torch.bfloat16)
        out = paths.get_path(name, "emulate")(q, k, v, causal=True)
        assert out.shape == q.shape and rel(out, naive(q, k, v, True)) < 0.1
    with pytest.raises(paths.UnsupportedHeadDimError, match="up to 128"):
        paths.get_path(name, "emulate")(*qkv(D=256), causal=True)
    paths.check_head_dim(80, "m", path=name)
    with pytest.raises(paths.UnsupportedHeadDimError, match="1.0.6"):
        paths.check_head_dim(80, "m")


@pytest.mark.parametrize("name", SAGE2)
def test_sage2_rules_decode_chunked_prefill_dtype_inputs(name):
    p = paths.get_path(name, "emulate")
    q, k, v = qkv(Hq=4, Hkv=2, Tq=1, Tk=150)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = p(q, k, v, causal=True)
    assert torch.equal(out, p(q, k, v, causal=False))  # decode runs the non-causal kernel
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(paths.ChunkedPrefillError, match=r"\(1, 3, 5, 64\).*\(1, 1, 40, 64\).*2\.x"):
        p(*qkv(Tq=5, Tk=40), causal=True)
    with pytest.raises(paths.AttentionInputError, match="fp16 or bf16"):
        p(*qkv(dtype=torch.float32), causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SAGE2)
def test_sage2_emulators_accuracy_and_gqa(name, dtype):
    q, k, v = qkv(Hq=6, Hkv=2, Tq=300, Tk=300, dtype=dtype)
    p = paths.get_path(name, "emulate")
    out = p(q, k, v, causal=True)
    err = rel(out, naive(q, k, v, True))
    assert err < (0.06 if "fp8" in name or "nosmooth" in name else 0.03), err  # K has a channel bias
    # GQA: every query head uses its KV head's quantization, exactly as with k and v expanded
    assert torch.equal(out, p(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True))


def test_sage2_triton_masks_padded_keys_unlike_1_0_6():
    q, k, v = qkv(Tq=1, Tk=1)  # one smoothed key: 1.0.6 returns v/64, 2.x returns v
    assert rel(paths.get_path("sage8", "emulate")(q, k, v, causal=True) * 64, v.expand(1, 3, 1, 64)) < 2e-3
    for name in SAGE2:
        assert rel(paths.get_path(name, "emulate")(q, k, v, causal=True), v.expand(1, 3, 1, 64)) < 0.01, name


def test_gpu_division_is_measured_reciprocal_times_x():
    """x / y as Triton and nvcc --use_fast_math compute it on an H100/H200 (pairs measured there; RN differs)."""
    from driftscope.paths import gpu_arith
    bits = [(1118984054, 1065465946, 1118829070), (-1030182317, 1059086470, -1024216906),
            (-1029052102, 1070574742, -1034849524), (-1041967816, 1074174757, -1051092418)]
    x, y, gpu = (torch.tensor(col, dtype=torch.int32).view(torch.float32) for col in zip(*bits))
    assert torch.equal(gpu_arith.div(x, y), gpu) and not torch.equal(x / y, gpu)
    assert gpu_arith.rcp(torch.tensor([0.0, float("inf"), 2.0, -4.0])).tolist() == [float("inf"), 0.0, 0.5, -0.25]


needs_sa2_interp = pytest.mark.skipif(not (HAS_SA2 and HAS_TRITON), reason="needs SageAttention 2.x and triton>=3.9")


@needs_sa2_interp
@pytest.mark.parametrize("causal,Tq", [(True, 200), (True, 1), (False, 1)])
def test_sage2_triton_emulator_matches_interpreter(causal, Tq):
    q, k, v = qkv(Hq=4, Hkv=2, Tq=Tq, Tk=200, dtype=torch.bfloat16)
    interp = paths.get_path("sage2-triton", "interpret")(q, k, v, causal=causal)
    emul = paths.get_path("sage2-triton", "emulate")(q, k, v, causal=causal)
    ref = paths.get_path("fp32")(q, k, v, causal=causal)
    assert rel(emul, interp) <= 0.1 * rel(interp, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_SA2,
                    reason="needs a CUDA GPU and SageAttention 2.x built for it")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Tq,Tk", [(300, 300), (1, 300), (1, 130)])
@pytest.mark.parametrize("name", SAGE2)
def test_sage2_kernel_on_cuda(name, Tq, Tk, dtype):
    q, k, v = (t.cuda() for t in qkv(Hq=8, Hkv=2, Tq=Tq, Tk=Tk, dtype=dtype))
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    p = paths.get_path(name)
    before = torch.cuda.current_device()
    out = p(q, k, v, causal=True)
    if p.fallback_reason:
        pytest.skip(p.fallback_reason)  # e.g. sm89's kernel on an A100
    assert p.impl == "kernel" and out.dtype == dtype and out.shape == q.shape
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.cuda.current_device() == before
    exact = paths.get_path("fp32")(q.float(), k.float(), v.float(), causal=True)
    emul = paths.get_path(name, "emulate")(q, k, v, causal=True)
    assert torch.isfinite(out).all() and rel(out, exact) < 0.1
    # the reference data (an H200) put every variant within 5% of the kernel's own error; other cards may round
    # the sm89/sm80 accumulators differently, so 10% here
    assert rel(emul, out) <= 0.10 * rel(out, exact) + 1e-6
    assert paths.default_quant_path(q.device) in paths.PATH_NAMES
