"""The GPU's approximate fp32 reciprocal and division, for the emulators of kernels compiled for NVIDIA GPUs; and
`float32_matmul`, which fixes whether cuBLAS may use TF32 tensor cores for fp32 matmuls.

Triton compiles an fp32 `x / y` to `div.full.f32`, and nvcc's `--use_fast_math` (SageAttention 2.x's build flags,
`setup.py`) compiles it to `div.approx.f32`; both compute x * rcp(y), where rcp is the special-function unit's
`rcp.approx.ftz.f32`. That reciprocal is faithfully rounded but not correctly rounded: it differs from round-to-
nearest(1/y) by one ulp for 13.2% of mantissas. Quantizers round x/scale to integers, so near half-integers the
ulp decides the integer, and it matters (bf16 inputs put many values exactly on a tie).

`rcp_approx_f32.i8.xz` (112 kB, lzma) holds, for each of the 2^23 mantissas m of y = 1.m in [1, 2), the difference
in ulps (-1, 0 or +1, int8) between rcp.approx.ftz.f32(y) and round-to-nearest(1/y). It was measured on an NVIDIA
H100 and an H200 (identical, triton 3.6, CUDA 13): Triton's `1.0 / y`, nvcc fast-math `1.0f / y` and inline
`rcp.approx.ftz.f32` agreed bit for bit on every mantissa, and `x / y` equalled x * rcp(y) bit for bit on 2^18 random
pairs (Triton and fast-math alike), as did `x / 127.` and `448.0f / y`. For a normal y the exponent only shifts the
result, so the table covers every normal fp32; zero, subnormals (flushed) and infinities follow IEEE's 1/y.
Without the table file (an install that dropped package data) `rcp` falls back to round-to-nearest with one warning.
"""
from __future__ import annotations

import contextlib
import functools
import lzma
import warnings
from pathlib import Path

import numpy as np
import torch

TABLE = Path(__file__).with_name("rcp_approx_f32.i8.xz")


@functools.lru_cache(maxsize=None)
def _delta_table(device: str = "cpu") -> torch.Tensor | None:
    """int32 [2^23] on `device`: rcp.approx(1.m) minus round-to-nearest(1/1.m), in ulps; None without the file."""
    if device != "cpu":
        table = _delta_table("cpu")
        return None if table is None else table.to(device)
    try:
        raw = lzma.decompress(TABLE.read_bytes())
    except OSError:
        warnings.warn(f"{TABLE.name} is missing: the GPU reciprocal is modelled as round-to-nearest, so emulated "
                      "integer quantization may differ from the GPU's near ties", stacklevel=3)
        return None
    return torch.from_numpy(np.frombuffer(raw, dtype=np.int8).astype(np.int32))


def rcp(y: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of every element of fp32 `y`, bit for bit (see the module docstring)."""
    y = y.to(torch.float32)
    exact = torch.ones_like(y) / y
    table = _delta_table(str(y.device))
    if table is None:
        return exact
    bits = exact.view(torch.int32)
    yb = y.view(torch.int32)
    mant = (yb & 0x7FFFFF).long()
    # 1/y for a power-of-two y (mantissa 0) is exact; otherwise the table's ulp step applies to 1/y's own bits
    # (1/(1.m * 2^e) = (1/1.m) * 2^-e: same mantissa, so the same step), for normal results only
    normal = torch.isfinite(exact) & (exact != 0) & (exact.abs() >= torch.finfo(torch.float32).tiny)
    stepped = (bits + table[mant]).view(torch.float32)
    return torch.where(normal, stepped, exact)


def div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x / y as the GPU's div.full.f32 / div.approx.f32 compute it: x * rcp(y), each rounded to fp32."""
    return x.to(torch.float32) * rcp(y)


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 x with all but `bits` explicit mantissa bits dropped (rounded toward zero)."""
    return (x.view(torch.int32) & (-1 << (23 - bits))).view(torch.float32)


@contextlib.contextmanager
def float32_matmul(precision: str):
    """torch's float32 matmul precision inside the block, whatever the caller set: "highest" (no TF32: products of
    operands with more than 11 significant bits stay exact to fp32), or "high" (TF32 tensor cores: exact only
    where every operand fits 11 significant bits, e.g. fp16 and bf16 values and small integers, but ~10x faster)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
