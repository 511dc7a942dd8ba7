"""The emulator against SageAttention's own Triton kernels run by Triton's interpreter, over the issue's grid.

Tolerance per case: rel-L2(emulate, interpret) <= 0.10 x rel-L2(interpret, fp32) (goal 0.03). The emulator runs
with flavor="interpret" (the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest; the kernel flavor's
distance is recorded too). Run with -s to see the worst ratios. The interpreter really runs: nothing here is skipped
when triton and sageattention are installed.
"""
import importlib.util

import pytest
import torch

from driftscope import paths
from driftscope.paths import sage_emulate as emu

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("sageattention") is None,
    reason="needs triton>=3.9 and sageattention (pip install 'driftscope[interpret]')")

TOL, GOAL = 0.10, 0.03
CASES = emu.fidelity_cases()
RESULTS: dict[str, dict] = {}


def rel(a, b):
    """rel-L2 of a against b; 0 when equal (the non-causal kernel can return exact zeros: see sage_emulate)."""
    a, b = a.double(), b.double()
    num, den = (a - b).norm().item(), b.norm().item()
    return 0.0 if num == 0 else num / den if den > 0 else float("inf")


def measure(case):
    q, k, v = emu.fidelity_inputs(case)
    name = "sage8" if case["smooth"] else "sage8-nosmooth"
    interp = paths.get_path(name, "interpret")(q, k, v, causal=True)  # decode resolves to the non-causal kernel
    causal = case["phase"] == "prefill" and case["n"] > 1
    e_int = emu.sage_emulate(q, k, v, causal=causal, smooth_k=case["smooth"], flavor="interpret")
    e_ker = paths.get_path(name, "emulate")(q, k, v, causal=True)
    ref = paths.get_path("fp32")(q, k, v, causal=True)
    d_emu, d_int = rel(e_int, interp), rel(interp, ref)
    return dict(emu_vs_interp=d_emu, interp_vs_fp32=d_int, emu_kernel_flavor_vs_interp=rel(e_ker, interp),
                ratio=d_emu / d_int if d_int > 0 else (0.0 if d_emu == 0 else float("inf")),
                bitwise=float((e_int == interp).float().mean()))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_emulator_matches_interpreter(case):
    r = RESULTS[case["id"]] = measure(case)
    assert r["ratio"] <= TOL, f"{case['id']}: {r}"


def test_zz_report_worst_ratio():
    if not RESULTS:
        pytest.skip("no fidelity case ran")
    worst = sorted(RESULTS.items(), key=lambda kv: -kv[1]["ratio"])[:5]
    print(f"\nemulator fidelity over {len(RESULTS)} cases; worst rel-L2(emulate, interpret) / rel-L2(interpret, fp32):")
    for cid, r in worst:
        print(f"  {cid}: ratio {r['ratio']:.2e} (emu-interp {r['emu_vs_interp']:.2e}, interp-fp32 "
              f"{r['interp_vs_fp32']:.2e}, bitwise {r['bitwise']:.4f})")
    print(f"  bitwise-identical outputs in {sum(r['bitwise'] == 1.0 for r in RESULTS.values())} cases")
    assert worst[0][1]["ratio"] <= GOAL, f"within tolerance but above the 3% goal: {worst[0]}"
