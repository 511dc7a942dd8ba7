"""driftscope's vectorized PyTorch model of SageAttention 1.0.6's numerics (the `emulate` implementation).

It models the kernels as shipped (`sageattention/core.py`, `quant_per_block*.py`, `attn_qk_int8_per_block*.py`),
quirks included; it is an instrument, not a fix. Step by step, for q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]:

1. smooth-K: `k - k.mean(tokens)` in the input dtype (sageattn: `k -= km`); v cast to fp16 for bf16/fp32 inputs.
2. per-block INT8 (`quantize_per_block`): q in 128-token blocks with sm_scale*1.44269504 folded in, k in 64-token
   blocks; scale = absmax(block)/127 over all channels, x/scale rounded half away from zero, truncated to int8.
3. scores: int8 q.k^T (exact: |sum| <= 127*127*128 < 2^24, so an fp32 matmul of the integers is exact), then
   `(qk * q_scale) * k_scale` in fp32, in the kernel's order.
4. masks: causal (Tq == Tk) excludes keys after the query (the kernel adds -1e6 on diagonal blocks and skips blocks
   past the diagonal; exp2 of the masked scores is exactly 0, so -inf is the same). The NON-causal kernel loads the
   keys past Tk inside the last 64-key block masked *without* `other=`: they are zeros, score exactly 0, and enter
   the running max and the softmax denominator (their v is 0). Decode (Tq == 1) runs this kernel, so for
   Tk % 64 != 0 the output is scaled down by l / (l + n_pad * 2^-m). Modelled by default (`pad_keys=True`).
5. online softmax over 64-key blocks, per query row: m_j = max(m_{j-1}, rowmax_j) (a cummax), p = exp2(s - m_j),
   alpha_j = exp2(m_{j-1} - m_j), l_j = l_{j-1}*alpha_j + sum(p) (l starts at 1.0, killed by alpha_0 = 0),
   acc_j = acc_{j-1}*alpha_j + fp16(fp16(p) @ v_j). Scores, exp2 and sums are vectorized; the running recurrence is
   one cheap elementwise loop over the 64-key blocks (that is where the kernel's rounding order lives).
6. out = acc / l, cast to the input dtype.

Where the interpreter and the GPU differ (`flavor`):
- P.V with `out_dtype=fp16`: Triton's interpreter does numpy's fp16 matmul, i.e. an fp32 sum rounded once to fp16
  (modelled exactly). Tensor cores accumulate in fp16 along k; `pv_chunk=16` models a rounding every 16 keys.
- fp32 -> bf16 of the output: the interpreter truncates (`_convert_float` with no rounding mode), the GPU rounds to
  nearest even. `flavor="interpret"` truncates, `flavor="kernel"` (the default) rounds to nearest.
- exp2: numpy/torch libm vs the GPU's ex2.approx; fma contraction on the GPU. Both at the fp32 ulp level.
- fp32 division: exact in the interpreter, x * rcp.approx(y) on the GPU (`gpu_div`, off by default here).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange

from . import gpu_arith

LOG2E = 1.44269504  # the constant sageattention folds into q's scale
BLOCK_Q = 128
BLOCK_K = 64


def quantize_per_block(x: torch.Tensor, block: int, scale_mul: float,
                       gpu_div: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-block INT8 quantizer: x [B,H,T,D] -> (int8 [B,H,T,D], fp32 scales [B,H,ceil(T/block)]).

    Per block of `block` tokens x all channels: x*scale_mul in fp32, scale = absmax/127, x/scale + 0.5*sign (sign of
    0 is +), truncated toward zero. Q uses block 128 and scale_mul = sm_scale*1.44269504; K uses block 64 and 1.0.
    An all-zero block (e.g. a single smoothed key) has scale 0 and int8 values 0 (the kernel computes 0/0 -> NaN,
    cast to int8 as 0 by both the GPU and numpy).
    """
    B, H, T, D = x.shape
    nblk = -(-T // block)
    xf = x.to(torch.float32) * torch.tensor(np.float32(scale_mul))  # the kernel multiplies by an fp32 argument
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nblk * block - T)).view(B, H, nblk, block, D)
    if gpu_div:  # the GPU's division: x * rcp.approx(y) (gpu_arith)
        scale = gpu_arith.div(xf.abs().amax(dim=(3, 4)), torch.tensor(127.0))  # [B,H,nblk]
        xi = xf * gpu_arith.rcp(scale)[..., None, None]
    else:  # exact division, as Triton's interpreter computes it
        scale = xf.abs().amax(dim=(3, 4)) / 127.0  # [B,H,nblk]
        xi = xf / scale[..., None, None]
    xi = xi + torch.where(xi >= 0, 0.5, -0.5)
    xi = torch.where(torch.isnan(xi), 0.0, xi)
    x8 = xi.to(torch.int8).view(B, H, nblk * block, D)[:, :, :T].contiguous()
    return x8, scale


def smooth(k: torch.Tensor) -> torch.Tensor:
    """k minus its mean over tokens, in k's dtype, as sageattn's `k -= k.mean(dim=seq, keepdim=True)` (not in place)."""
    return k - k.mean(dim=2, keepdim=True)


def _round_out(out: torch.Tensor, dtype: torch.dtype, flavor: str) -> torch.Tensor:
    if dtype == torch.bfloat16 and flavor == "interpret":
        # the interpreter's fp32 -> bf16 truncates toward zero
        return (out.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return out.to(dtype)


def sage_emulate(q, k, v, *, causal: bool, scale: float | None = None, smooth_k: bool = True,
                 flavor: str = "kernel", pv_chunk: int | None = None, pad_keys: bool = True,
                 pv_accum: str = "fp16", out_dtype: torch.dtype | None = None, gpu_div: bool = False) -> torch.Tensor:
    """SageAttention 1.0.6 emulated: q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (validated; causal needs Tq == Tk) -> [B,Hq,Tq,D].

    `causal` selects the kernel (decode must already be resolved to causal=False). `flavor` "kernel" (GPU rounding)
    or "interpret" (the Triton interpreter's); `pv_chunk` rounds the fp16 P.V accumulator every that many keys
    (None: 16 keys for flavor "kernel", as the H100's tensor cores do; once per 64-key block for "interpret",
    as the interpreter's numpy matmul does); `pad_keys=False` drops the non-causal kernel's padded keys
    (what the kernel presumably intends, not what it does). Diagnostic variants for the GPU comparison
    (experiments/gpu_fidelity.py), off by default: `pv_accum="fp16-rz"` rounds the fp16 P.V accumulator toward zero
    instead of to nearest, `pv_accum="fp32"` keeps P.V in fp32 (no fp16 rounding at all); `out_dtype` overrides
    the output dtype (torch.float32: the value before the final cast). `gpu_div=True` divides as the compiled
    kernel does, x * rcp.approx(y) (`gpu_arith`), in the quantizer and in acc / l; off by default, which keeps
    this 1.0.6 model bit-exact against the interpreter (the 2.x Triton path, `sage2_triton_emulate`, turns it on).
    """
    if pv_chunk is None and flavor == "kernel":
        # Measured on an H100 (experiments/results/gpu_fidelity.json): the tensor cores round the fp16 P.V
        # accumulator every 16 keys; this variant is the closest to the compiled kernel in 365 of 448 cases.
        pv_chunk = 16
    if pv_accum not in ("fp16", "fp16-rz", "fp32"):
        raise ValueError(f"pv_accum must be 'fp16', 'fp16-rz' or 'fp32'; got {pv_accum!r}")
    with gpu_arith.float32_matmul("highest"):  # TF32 would round fp16 P to 10 mantissa bits in P.V
        return _emulate(q, k, v, causal, scale, smooth_k, flavor, pv_chunk, pad_keys, pv_accum, out_dtype, gpu_div)


def _to_fp16(x: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 -> fp16, to nearest even ("fp16") or toward zero ("fp16-rz")."""
    r = x.to(torch.float16)
    if mode == "fp16-rz":
        over = (r.to(torch.float32).abs() > x.abs()) & (r != 0)  # rounded away from zero: one fp16 ulp back
        r = torch.where(over, (r.view(torch.int16) - 1).view(torch.float16), r)
    return r


def _emulate(q, k, v, causal, scale, smooth_k, flavor, pv_chunk, pad_keys, pv_accum="fp16", out_dtype=None,
             gpu_div=False):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dtype = q.dtype
    sm_scale = D ** -0.5 if scale is None else scale
    ks = smooth(k) if smooth_k else k
    v16 = v.to(torch.float16)

    q8, q_scale = quantize_per_block(q, BLOCK_Q, sm_scale * LOG2E, gpu_div)  # [B,Hq,Tq,D], [B,Hq,nq]
    k8, k_scale = quantize_per_block(ks, BLOCK_K, 1.0, gpu_div)  # [B,Hkv,Tk,D], [B,Hkv,nk]
    nq, nk = q_scale.shape[-1], k_scale.shape[-1]
    Tkp = nk * BLOCK_K
    # key blocks as batch entries (k transposed for QKᵀ), keys padded to whole blocks
    k8_blk = rearrange(torch.nn.functional.pad(k8.to(torch.float32), (0, 0, 0, Tkp - Tk)),
                       "b h (n t) d -> b h n d t", t=BLOCK_K)  # [B,Hkv,nk,D,64]
    v_blk = rearrange(torch.nn.functional.pad(v16.to(torch.float32), (0, 0, 0, Tkp - Tk)),
                      "b h (n t) d -> b h n t d", t=BLOCK_K)  # [B,Hkv,nk,64,D]
    ks_blk = k_scale.view(B, Hkv, nk, 1, 1)  # a scale per key block
    q8f = q8.to(torch.float32).view(B, Hkv, G, Tq, D)
    q_scale = q_scale.view(B, Hkv, G, nq)
    if causal:
        # diag_mask [128, 128]: query row r of a 128-query block vs key column c of its diagonal block
        diag_mask = torch.arange(BLOCK_Q, device=q.device)[None, :] > torch.arange(BLOCK_Q, device=q.device)[:, None]
    pad_mask = not causal and not pad_keys and Tkp > Tk

    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=q.device)
    for qb in range(nq):  # one 128-query block at a time, as the kernel's program_id(0)
        r0, r1 = qb * BLOCK_Q, min((qb + 1) * BLOCK_Q, Tq)
        R = r1 - r0
        nkb = min(2 * (qb + 1), nk) if causal else nk  # causal: blocks past the diagonal are never visited
        rows = q8f[:, :, :, r0:r1].reshape(B, Hkv, 1, G * R, D)
        s = torch.matmul(rows, k8_blk[:, :, :nkb])  # [B,Hkv,nkb,G*R,64] exact integer scores
        s *= q_scale[..., qb].repeat_interleave(R, dim=-1).view(B, Hkv, 1, G * R, 1)
        s *= ks_blk[:, :, :nkb]  # (qk * q_scale) * k_scale, the kernel's order
        if causal:
            d0 = 2 * qb  # first diagonal key block
            m = diag_mask[:R].reshape(R, 2, BLOCK_K).transpose(0, 1)[: nkb - d0]  # [nd,R,64]
            s[:, :, d0:].view(B, Hkv, nkb - d0, G, R, BLOCK_K).masked_fill_(m[:, None], float("-inf"))
        elif pad_mask:
            s[:, :, -1, :, Tk - (nk - 1) * BLOCK_K:] = float("-inf")
        m = torch.cummax(s.amax(dim=-1), dim=2).values  # [B,Hkv,nkb,G*R] running max after each block
        m_prev = torch.nn.functional.pad(m[:, :, :-1], (0, 0, 1, 0), value=float("-inf"))
        alpha = torch.exp2(m_prev - m)  # block 0: exp2(-inf) = 0 kills l's initial 1.0
        s -= m[..., None]
        p = s.exp2_()
        l_blk = p.sum(dim=-1)  # [B,Hkv,nkb,G*R]
        p = p.to(torch.float16)
        if pv_accum == "fp32":  # diagnostic: no fp16 rounding of P.V
            x = torch.matmul(p.to(torch.float32), v_blk[:, :, :nkb])
        elif pv_chunk is None:  # numpy's fp16 matmul (the interpreter): fp32 sum, one rounding
            x = _to_fp16(torch.matmul(p.to(torch.float32), v_blk[:, :, :nkb]), pv_accum)
        else:  # tensor cores: fp16 accumulator rounded every pv_chunk keys
            x = torch.zeros(B, Hkv, nkb, G * R, D, dtype=torch.float16, device=q.device)
            for c in range(0, BLOCK_K, pv_chunk):
                part = torch.matmul(p[..., c:c + pv_chunk].to(torch.float32), v_blk[:, :, :nkb, c:c + pv_chunk])
                x = _to_fp16(x.to(torch.float32) + part, pv_accum)
        x = x.to(torch.float32)  # [B,Hkv,nkb,G*R,D]
        acc = x[:, :, 0]  # alpha_0 = 0: acc_0 = 0*0 + x_0
        l = l_blk[:, :, 0]  # l_0 = 1.0*0 + l_blk_0
        for j in range(1, nkb):
            acc = acc * alpha[:, :, j, :, None] + x[:, :, j]
            l = l * alpha[:, :, j] + l_blk[:, :, j]
        norm = acc * gpu_arith.rcp(l)[..., None] if gpu_div else acc / l[..., None]
        out[:, :, :, r0:r1] = norm.view(B, Hkv, G, R, D)
    return _round_out(out.view(B, Hq, Tq, D), dtype if out_dtype is None else out_dtype, flavor)


# ---- the fidelity grid (tests/test_emulator_fidelity.py on the CPU, experiments/gpu_fidelity.py on a GPU) ----
PREFILL_LENS = (1, 63, 64, 65, 127, 128, 300, 1000)
DECODE_KV_LENS = (1, 50, 64, 100, 130, 1000)


def fidelity_cases() -> list[dict]:
    """Every case of the grid: head_dim x heads x (causal prefill | decode) x dtype x K bias x smooth-K."""
    cases = []
    for D in (64, 128):
        for hq, hkv in ((1, 1), (3, 1)):
            for phase, lens in (("prefill", PREFILL_LENS), ("decode", DECODE_KV_LENS)):
                for n in lens:
                    for dtype in ("float16", "bfloat16"):
                        for bias in (False, True):
                            for smooth in (True, False):
                                cid = (f"d{D}-h{hq}x{hkv}-{phase}{n}-{'fp16' if dtype == 'float16' else 'bf16'}"
                                       f"-{'bias' if bias else 'nobias'}-{'smooth' if smooth else 'nosmooth'}")
                                cases.append(dict(id=cid, D=D, hq=hq, hkv=hkv, phase=phase, n=n, dtype=dtype,
                                                  bias=bias, smooth=smooth))
    return cases


def fidelity_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded CPU inputs for a case: scores of std ~2 (peaked, not uniform); K bias ~4 sigma per channel if asked."""
    import zlib
    g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    D, tk = case["D"], case["n"]
    tq = tk if case["phase"] == "prefill" else 1
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(1, case["hq"], tq, D, generator=g) * 1.5
    k = torch.randn(1, case["hkv"], tk, D, generator=g) * 1.5
    if case["bias"]:
        k = k + torch.randn(D, generator=g) * 6.0
    v = torch.randn(1, case["hkv"], tk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)
