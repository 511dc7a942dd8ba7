"""The 2.x emulators against SageAttention 2.2.0's own kernel outputs (driftscope/paths/sage2_reference.py).

Data: the full reference set at ../shared/data/sa2-reference (68 cases, computed on an H200) when present, else the
committed subset tests/data/sa2_ref_subset.h5 (44 cases: decode against <= 130 keys and 6-token prefill for both
head_dims and dtypes, 64-token prefill for head_dim 64), made with
    sage2_reference.write_subset(REF, "tests/data/sa2_ref_subset.h5",
        lambda a: (a["tq"] == 1 and a["tk"] <= 130) or a["tq"] == 6 or (a["tq"] == 64 and a["d"] == 64))
Tolerance per case with a finite kernel output: rel-L2(emulator, kernel) <= 0.10 x rel-L2(kernel, fp32) (goal 0.03).
The kernel's NaN outputs are findings, asserted to be exactly the known ones. On the full set, the last test writes
the worst and median ratio per variant to experiments/results/sa2_emulator_fidelity.json (run with -s to see them).
"""
from pathlib import Path

import pytest

from driftscope.paths import sage2_reference as ref

REPO = Path(__file__).resolve().parents[1]
FULL = REPO.parent / "shared" / "data" / "sa2-reference"
SUBSET = REPO / "tests" / "data" / "sa2_ref_subset.h5"
SOURCE = FULL if FULL.is_dir() and any(FULL.glob("sa2_ref_*.h5")) else SUBSET
RESULTS = REPO / "experiments" / "results" / "sa2_emulator_fidelity.json"
TOL, GOAL = 0.10, 0.03

# Kernel findings in the reference data (an H200, SageAttention 2.2.0 built for sm90):
# - sm80 (sageattn_qk_int8_pv_fp16_cuda) returns NaN for decode against 8 keys and for 6-token prefill, every
#   head_dim and dtype: it reads V rows past kv_len from uninitialised shared memory (upstream PR #377).
# - the Triton causal kernel returned NaN for the heads of one KV head in the head_dim-64 fp16 64-token prefill
#   without K bias: it reads one k_scale past its buffer when kv_len mod 128 is in (0, 64] (the same defect as
#   1.0.6's), and there the garbage was not finite.
KNOWN_NONFINITE = sorted(
    [(f"sa2_ref_d{d}_{t}/{c}", "sm80") for d in (64, 128) for t in ("float16", "bfloat16")
     for c in ("case002", "case003", "case010", "case011")]
    + [("sa2_ref_d64_float16/case012", "triton")])

CASES = ref.read_cases(SOURCE)
PARAMS = [(c, v) for c in CASES for v in ref.VARIANT_PATHS if (c["id"], v) not in KNOWN_NONFINITE]
SCORES: list[dict] = []


def test_reference_data_is_there():
    assert len(CASES) == (68 if SOURCE == FULL else 44), SOURCE
    assert {v for c in CASES for v in c["out"]} == set(ref.VARIANT_PATHS)


def test_nonfinite_kernel_outputs_are_exactly_the_known_findings():
    ids = {c["id"] for c in CASES}
    assert ref.nonfinite(CASES) == [f for f in KNOWN_NONFINITE if f[0] in ids]


@pytest.mark.parametrize("case,variant", PARAMS, ids=[f"{c['id']}-{v}" for c, v in PARAMS])
def test_emulator_matches_kernel(case, variant):
    s = ref.score(case, variant)
    SCORES.append(s)
    assert s["ratio"] <= TOL, s


def test_zz_report_worst_ratio_per_variant():
    if len(SCORES) != len(PARAMS):
        pytest.skip("run the whole module to get the summary")
    summary = ref.summarize(SCORES, source=str(SOURCE.relative_to(REPO.parent)))
    print(f"\nemulator vs SageAttention 2.2.0 kernel over {len(SCORES)} case-variants ({SOURCE.name}):")
    for variant, row in summary["variants"].items():
        print(f"  {variant:16s} worst {row['worst_ratio']:.4f} ({row['worst_case']}), "
              f"median {row['median_ratio']:.4f}, bitwise-equal in {row['bitwise_cases']}/{row['cases']} cases")
    if SOURCE == FULL:
        ref.write_summary(summary, RESULTS)
    worst = max(row["worst_ratio"] for row in summary["variants"].values())
    assert worst <= TOL
