"""driftscope's vectorized model of SageAttention 2.2.0's CUDA kernels (sage2-fp8*, sage2-fp8-ada, sage2-fp16-ampere).

It models the kernels as shipped (upstream thu-ml/SageAttention at d1a57a5), quirks included: `sageattention/core.py`
(`sageattn_qk_int8_pv_fp8_cuda_sm90`, `sageattn_qk_int8_pv_fp8_cuda`, `sageattn_qk_int8_pv_fp16_cuda`, with the
arguments `sageattn` passes), `sageattention/triton/quant_per_thread.py`, `sageattention/quant.py` with
`csrc/fused/fused.cu` (`per_channel_fp8`), `csrc/qattn/qk_int_sv_f8_cuda_sm90.cu`,
`csrc/qattn/qk_int_sv_f8_cuda_sm89.cuh`, `csrc/qattn/qk_int_sv_f16_cuda_sm80.cu` and `csrc/qattn/attn_utils.cuh`.
For q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (upstream zero-pads head_dim to 64 or 128, which changes no number of the first
D output channels, so it is not materialized):

1. smooth-K: `k - k.mean(tokens)` in the input dtype (the quantizer's `k = k - km`; the caller's k is untouched).
2. per-thread INT8 (`quantize_per_thread`): one scale per group of tokens that one GPU thread holds in the MMA
   layout. Q: in each WARP_Q-token slice, the tokens with equal index mod 8; K: in each WARP_K-token slice, the
   tokens whose index mod 8 is 2g or 2g+1. scale = absmax/127 + 1e-7 over the group and all channels, x/scale
   rounded half away from zero (divisions are the GPU's, `gpu_arith`). sm_scale is not folded into Q.
3. scores: exact int32 q8.k8^T. The exp2 argument is fmaf(x, c, -m) with one rounding (update_mdo): before the last
   iteration(s) x = int and c = fp32(sm_scale*log2e*q_scale*k_scale); in the last one (sm90) or two (sm89, sm80,
   the iterations that mask) x = fp32(int*q_scale*k_scale) and c = sm_scale*log2e. This ulp matters: p sometimes
   lands exactly on an E4M3 rounding tie. Causal and past-kv_len keys are masked (p = 0).
4. online softmax over CTA_K-key blocks with a running max m (cummax of block maxima); the FP8 kernels subtract an
   extra 8.807 from m, so p = exp2(s - m + 8.807) <= 448 fills the E4M3 range.
5. P.V per block: sm90 and sm89 round P to FP8 E4M3 and V per channel to E4M3 (scale = absmax/448, or absmax/2.25
   for sm89's fp16 accumulator so a 64-key sum stays finite); sm90 sums a 128-key block in the FP8 tensor core's
   accumulator (`fp22_bits` mantissa bits kept, truncated, after each `fp22_chunk` keys) and adds it to fp32; sm89
   sums a 64-key block in fp16 (two 32-key MMAs; each rounds its 32-product sum to fp16, then the sum with the fp16
   accumulator: this double rounding matches the reference better than one rounding) and adds it to fp32; sm80
   rounds P to fp16 and accumulates P.V in fp32 (V cast to fp16 for bf16 inputs).
6. denominator: fp32 sum of the unrounded p (sm90, sm89) or of the fp16 P (sm80's tensor-core row sum);
   out = acc * rcp(l) (times the V scale for FP8), rounded to the input dtype.

Measured against the kernels' own outputs (tests/test_sage2_fidelity.py, experiments/results/
sa2_emulator_fidelity.json): rel-L2(emulator, kernel) is at most 3.7% of rel-L2(kernel, fp32) over the 68 reference
cases (median 0.02% to 0.9% by kernel), and within 4.2% on 180 random decode/prefill inputs on an H100. The sm89
and sm80 kernels were compiled for sm90 and ran on Hopper; on Ada or Ampere their accumulators may round
differently. Known kernel defect NOT modelled: sm80 loads V rows past kv_len from
uninitialised shared memory and returns NaN for some inputs (decode against <= 8 keys, 6-token prefill; upstream
PR #377).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from . import gpu_arith

LOG2E = np.float32(1.44269504088896340736)  # math::log2e in csrc/math.cuh, an fp32 constant
FP8_OFFSET = float(np.float32(8.807))  # S_FP8_OFFSET in csrc/qattn/attn_utils.cuh: exp2(8.807) ~ 448
MAX_SCORES = 1 << 23  # scores held at once (bounds the emulator's memory at long contexts)


@dataclass(frozen=True)
class CudaKernel:
    """The numerics of one upstream CUDA kernel as `sageattn` calls it."""

    function: str  # the upstream entry point (sageattention.core)
    pv_accum_dtype: str  # the pv_accum_dtype that sageattn passes
    cta_q: int  # query rows per thread block
    warp_q: int  # query rows per warp: the Q quantization slice
    cta_k: int  # keys per iteration of the main loop: the online-softmax block
    warp_k: int  # keys per warp: the K quantization slice
    pv: str  # "fp8": P and V in E4M3, exp2 offset 8.807; "fp16": P and V in fp16
    v_scale_max: float  # FP8 V: per-channel scale = absmax / v_scale_max
    block_accum: str  # one block's P.V sum: "fp22" (FP8 tensor core), "fp16" or "fp32"
    dequant_tail: int  # the last iterations, which dequantize the scores before scaling (the mask iterations)


SM90 = CudaKernel("sageattn_qk_int8_pv_fp8_cuda_sm90", "fp32+fp32", 64, 16, 128, 128, "fp8", 448.0, "fp22", 1)
SM89 = CudaKernel("sageattn_qk_int8_pv_fp8_cuda", "fp32+fp16", 128, 32, 64, 64, "fp8", 2.25, "fp16", 2)
SM80 = CudaKernel("sageattn_qk_int8_pv_fp16_cuda", "fp32", 128, 32, 64, 64, "fp16", 0.0, "fp32", 2)


def quantize_per_thread(x: torch.Tensor, warp: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_per_thread.py's INT8: x [B,H,T,D] -> (int8 [B,H,T,D], fp32 scale of each token [B,H,T]).

    which="q": a group is the tokens of one `warp`-token slice with equal index mod 8; which="k": the tokens of one
    slice whose index mod 8 is 2g or 2g+1. scale = absmax/127 + 1e-7; x/scale + 0.5*sign, truncated toward zero.
    """
    B, H, T, D = x.shape
    n = -(-T // warp)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, 0, 0, n * warp - T))
    if which == "q":
        g = xf.view(B, H, n, warp // 8, 8, 1, D)  # token = slice*warp + row*8 + group
    else:
        g = xf.view(B, H, n, warp // 8, 4, 2, D)  # token = slice*warp + row*8 + group*2 + pair
    amax = g.abs().amax(dim=(3, 5, 6), keepdim=True)  # [B,H,n,1,groups,1,1]
    scale = gpu_arith.div(amax, torch.tensor(127.0)) + np.float32(1e-7)
    xi = g * gpu_arith.rcp(scale)
    xi = (xi + torch.where(xi >= 0, 0.5, -0.5)).trunc_()
    x8 = xi.to(torch.int8).reshape(B, H, n * warp, D)[:, :, :T]
    scale_t = scale.expand(g.shape[:-1] + (1,)).reshape(B, H, n * warp)[:, :, :T]
    return x8, scale_t.contiguous()


def quantize_v_fp8(v: torch.Tensor, scale_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """per_channel_fp8 (fused.cu, smooth_v off): v [B,H,T,D] -> (E4M3 values as fp32, scale [B,H,1,D])."""
    vf = v.to(torch.float32)
    amax = vf.abs().amax(dim=2, keepdim=True)
    smax = torch.tensor(np.float32(scale_max))
    v8 = (vf * (smax * gpu_arith.rcp(amax))).to(torch.float8_e4m3fn)  # cvt.rn.satfinite.e4m3x2.f32
    return v8.to(torch.float32), gpu_arith.div(amax, smax)


def sage2_cuda_emulate(q, k, v, *, causal: bool, scale: float | None = None, smooth_k: bool = True,
                       kernel: CudaKernel = SM90, fp22_bits: int = 13, fp22_chunk: int = 32) -> torch.Tensor:
    """One upstream CUDA kernel emulated: q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (validated; causal needs Tq == Tk).

    `fp22_bits`/`fp22_chunk` (sm90 only): the FP8 tensor core keeps `fp22_bits` mantissa bits (truncated) of its
    accumulator after every `fp22_chunk` keys (upstream calls it 22 valid bits: sign, 8 exponent, 13 mantissa).
    """
    with gpu_arith.float32_matmul("highest"):  # TF32 would round the operands of the exact integer and FP8 products
        return _emulate(q, k, v, causal, scale, smooth_k, kernel, fp22_bits, fp22_chunk)


def _emulate(q, k, v, causal, scale, smooth_k, kn, fp22_bits, fp22_chunk):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    sm_scale = D ** -0.5 if scale is None else scale
    c0 = float(np.float32(sm_scale) * LOG2E)  # the kernel's `sm_scale *= math::log2e`, in fp32
    ks = k - k.mean(dim=2, keepdim=True) if smooth_k else k

    q8, q_scale = quantize_per_thread(q, kn.warp_q, "q")  # [B,Hq,Tq,D], [B,Hq,Tq]
    k8, k_scale = quantize_per_thread(ks, kn.warp_k, "k")  # [B,Hkv,Tk,D], [B,Hkv,Tk]
    if kn.pv == "fp8":
        vq, v_scale = quantize_v_fp8(v, kn.v_scale_max)  # [B,Hkv,Tk,D], [B,Hkv,1,D]
    else:
        vq, v_scale = v.to(torch.float16).to(torch.float32), None
    ck = kn.cta_k
    nk = -(-Tk // ck)
    pad = nk * ck - Tk
    # key blocks as batch entries (k transposed for QKᵀ), keys padded to whole blocks
    k8_blk = rearrange(torch.nn.functional.pad(k8.to(torch.float32), (0, 0, 0, pad)),
                       "b h (n t) d -> b h n d t", t=ck)  # [B,Hkv,nk,D,ck]
    v_blk = rearrange(torch.nn.functional.pad(vq, (0, 0, 0, pad)), "b h (n t) d -> b h n t d", t=ck)  # [B,Hkv,nk,ck,D]
    ks_blk = rearrange(torch.nn.functional.pad(k_scale, (0, pad)), "b h (n t) -> b h n 1 t", t=ck)  # [B,Hkv,nk,1,ck]
    q8f = q8.to(torch.float32).view(B, Hkv, G, Tq, D)
    q_scale = q_scale.view(B, Hkv, G, Tq)

    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=q.device)
    # causal: one thread block (CTA_Q query rows) at a time, visiting its key blocks only; else all rows share them
    step = kn.cta_q if causal else max(kn.cta_q, MAX_SCORES // max(1, G * nk * ck) // kn.cta_q * kn.cta_q)
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        n_iter = -(-min(Tk, r0 + kn.cta_q) // ck) if causal else nk  # the kernel's num_iterations
        out[:, :, :, r0:r1] = _rows(q8f[:, :, :, r0:r1], q_scale[:, :, :, r0:r1], r0, k8_blk[:, :, :n_iter],
                                    ks_blk[:, :, :n_iter], v_blk[:, :, :n_iter], v_scale, Tk, causal, c0, kn,
                                    fp22_bits, fp22_chunk)
    return out.view(B, Hq, Tq, D).to(q.dtype)


def _rows(q8, q_scale, r0, k8_blk, ks_blk, v_blk, v_scale, Tk, causal, c0, kn, fp22_bits, fp22_chunk):
    """Query rows q8 [B,Hkv,G,R,D] (tokens r0..r0+R) against their key blocks [B,Hkv,nk,..] -> [B,Hkv,G,R,D]."""
    B, Hkv, G, R, D = q8.shape
    nk, ck = k8_blk.shape[2], k8_blk.shape[-1]
    N = G * R
    s = torch.matmul(q8.reshape(B, Hkv, 1, N, D), k8_blk)  # [B,Hkv,nk,N,ck]: exact integers (|s| < 2^24)
    dq = q_scale.reshape(B, Hkv, 1, N, 1) * ks_blk  # dequant_scale = q_scale * k_scale, fp32
    # update_mdo's exp2 argument is fmaf(x, c, -m), one rounding: before the last `dequant_tail` iterations
    # x = int and c = fp32(sm_scale*log2e*dequant); in them x = fp32(int*dequant) and c = sm_scale*log2e
    h = max(0, nk - kn.dequant_tail)
    xc = torch.empty(s.shape, dtype=torch.float64, device=s.device)
    xc[:, :, :h] = s[:, :, :h].double() * (dq[:, :, :h] * c0).double()
    tail = xc[:, :, h:]
    tail.copy_(s[:, :, h:] * dq[:, :, h:]).mul_(c0)
    key = torch.arange(h * ck, nk * ck, device=s.device).view(nk - h, 1, ck)
    masked = key >= Tk  # past kv_len: only in the last block
    if causal:  # the diagonal lies in the tail blocks
        row = (torch.arange(R, device=s.device) + r0).repeat(G).view(1, N, 1)
        masked = masked | (key > row)
    tail.masked_fill_(masked, float("-inf"))
    m = xc.amax(dim=-1)  # [B,Hkv,nk,N]
    m = (m - float(FP8_OFFSET) if kn.pv == "fp8" else m).float()  # fmaf(max, sm_scale, -8.807), one rounding
    m = torch.cummax(m, dim=2).values  # the running max after each block
    p = xc.sub_(m.double()[..., None]).float().exp2_()  # [B,Hkv,nk,N,ck]: ex2(fmaf(x, c, -m))
    del xc, tail, s, dq
    if kn.pv == "fp8":
        l_blk = p.sum(dim=-1)
        p = p.to(torch.float8_e4m3fn).to(torch.float32)  # RS_32_to_8: cvt.rn.satfinite.e4m3x2.f32
    else:
        p = p.to(torch.float16).to(torch.float32)  # RS_32_to_16
        l_blk = p.sum(dim=-1)
    pv = _block_pv(p, v_blk, kn.block_accum, fp22_bits, fp22_chunk)  # [B,Hkv,nk,N,D]
    w = torch.exp2(m - m[:, :, -1:])  # each block's rescaling to the final max (the product of the o_scales)
    acc = (pv * w[..., None]).sum(dim=2)  # [B,Hkv,N,D]
    l = (l_blk * w).sum(dim=2)  # [B,Hkv,N]
    o = acc * gpu_arith.rcp(l)[..., None]  # normalize_d: rcp.approx
    if v_scale is not None:
        o = o * v_scale
    return o.view(B, Hkv, G, R, D)


def _block_pv(p, v_blk, accum, bits, chunk):
    """sum_k p[.., k] v[k, :] inside each key block, in the block's accumulator -> [B,Hkv,nk,N,D]."""
    if accum == "fp32":
        return torch.matmul(p, v_blk)
    step = 32 if accum == "fp16" else chunk  # fp16: one m16n8k32 MMA per 32 keys, fp16 in and out
    acc = None
    for c in range(0, p.shape[-1], step):
        part = torch.matmul(p[..., c:c + step], v_blk[..., c:c + step, :])
        if accum == "fp16":  # the MMA's 32-product sum is rounded to fp16 before the fp16 accumulator is added
            part = part.to(torch.float16).to(torch.float32)
        acc = part if acc is None else acc.add_(part)
        if accum == "fp16":
            acc = acc.to(torch.float16).to(torch.float32)
        else:
            acc = gpu_arith.truncate_mantissa(acc, bits)
    return acc
