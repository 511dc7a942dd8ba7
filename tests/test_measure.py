"""Known-value tests of driftscope.measure (one test file per module's statistics, nanodo style); fused's float64
reference and backend tests are in test_fused_stats.py."""
import math

import pytest
import torch

from driftscope.measure import fused, outliers, smoothing
from driftscope.measure.logits import first_divergence, perplexity


def test_orthogonal_inputs_have_cosine_zero():
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0]])  # [tokens, channels]: one head
    x = torch.tensor([[0.0, 3.0, 0.0, -1.0]])
    # fused forms the cosine by the law of cosines, 1 + ((|x| - |r|)^2 - |x - r|^2) / (2 |x| |r|), from fp32 sums:
    # at orthogonal inputs that is 1 + (-1 + fp32 rounding), ~1e-7 off 0 (it keeps 1 - cos accurate, not cos)
    assert fused.drift(fused.site_stats(x, r))["cosine"].item() == pytest.approx(0.0, abs=1e-6)


def test_twice_the_reference_has_relative_l2_one_and_cosine_one():
    r = torch.randn(3, 1, 50, generator=torch.Generator().manual_seed(0))  # [heads, tokens, channels]
    m = fused.drift(fused.site_stats(2 * r, r))
    assert torch.allclose(m["rel_l2"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(m["rel_l1"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(m["cosine"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(m["max_abs"], r.abs().flatten(1).amax(1).double())


def test_identical_inputs_give_exactly_zero_drift():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        r = (torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
        m = fused.drift(fused.site_stats(r, r.clone()))
        assert (m["cosine"] == 1).all() and all((m[k] == 0).all() for k in ("rel_l2", "rel_l1", "rmse", "max_abs"))


def test_chunked_sums_equal_unchunked():
    g = torch.Generator().manual_seed(2)
    r, x = torch.randn(2, 100, 10, generator=g), torch.randn(2, 100, 10, generator=g)
    whole = fused.drift_sums(fused.site_stats(x, r, backend="torch"))
    chunked = fused.drift_sums(fused.site_stats(x, r, backend="torch", chunk_elems=2 * 10 * 7))  # 7 tokens a chunk
    # each chunk's sums are fp32 (only their merge is float64), so the two differ by fp32 summation order
    assert torch.allclose(whole, chunked, rtol=1e-6, atol=0)


def test_per_head_sums_pooled_equal_the_flat_statistics():
    g = torch.Generator().manual_seed(3)
    r, x = torch.randn(5, 8, 16, generator=g), torch.randn(5, 8, 16, generator=g)
    pooled = fused.drift(fused.site_stats(x, r), pooled=True)
    flat = fused.drift(fused.site_stats(x.reshape(1, 1, -1), r.reshape(1, 1, -1)))
    for k in fused.DRIFT_METRICS:
        # per-head fp32 sums merged in float64 vs one fp32 sum over all values: fp32 summation order; the cosine of
        # these independent x and r is ~0, so it gets an absolute tolerance (1 - cos is what is kept accurate)
        assert torch.allclose(pooled[k], flat[k], rtol=1e-6, atol=1e-6 if k == "cosine" else 0), k


def test_rel_l2_by_position_of_a_constant_error_is_flat():
    r = torch.ones(2, 10, 4)
    starts, curve = fused.rel_l2_by_position(fused.site_stats(r * 1.5, r, positions=True), bins=5)
    assert starts.tolist() == [0, 2, 4, 6, 8]
    assert torch.allclose(curve, torch.full((5,), 0.5, dtype=torch.float64))


def test_outlier_statistics_of_known_tensors():
    x = torch.zeros(1, 4, 3)  # [heads, tokens, channels]
    x[0, 2, 1] = -8.0
    s = fused.site_stats(x, stats_of="x")
    o = fused.outliers(s, "x")
    assert o["absmax"].item() == 8.0
    # Pearson kurtosis of one spike in 12 values, from its definition (fp32 sums of centred powers: rel 1e-6)
    v = x.flatten().double()
    c = v - v.mean()
    assert o["kurtosis"].item() == pytest.approx(((c ** 4).mean() / (c ** 2).mean() ** 2).item(), rel=1e-6)
    gauss = fused.outliers(fused.site_stats(torch.randn(1, 4000, 16, generator=torch.Generator().manual_seed(4))))
    assert gauss["kurtosis"].item() == pytest.approx(3.0, abs=0.1)
    assert gauss["frac_6sigma"].item() == 0.0
    assert torch.equal(fused.channel_absmax(s, "x")[0], torch.tensor([0.0, 8.0, 0.0]))
    values, tok, ch = outliers.massive_activations(x[0], 1)
    assert (values.item(), tok.item(), ch.item()) == (8.0, 2, 1)


def test_perplexity_and_first_divergence():
    assert perplexity([math.log(4) * 10], [10]) == pytest.approx(4.0)
    assert first_divergence(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == 2
    assert first_divergence(torch.tensor([1, 2]), torch.tensor([1, 2])) == 2


# -- smoothing-K statistics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantized_sample_rows_are_the_kernels_quantizer_at_those_rows(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 300, 64).to(dtype)  # 300: a partial last block
    x[1, 5, 7] = 900  # an outlier sets its block's scale
    x[2, 128:256] = 0  # an all-zero block: scale 0, values 0
    rows = torch.tensor([0, 5, 127, 128, 200, 299])
    full = smoothing._dequant(x, 128, 0.125 * smoothing.LOG2E)
    sampled = smoothing._dequant_sampled(x[:, rows], fused.block_absmax(x, 128), rows, 128, 0.125 * smoothing.LOG2E)
    assert torch.equal(sampled, full[:, rows])


def test_score_rows_keep_a_fixed_budget_of_score_entries():
    assert [smoothing.score_rows(keys) for keys in (8, 300, 512, 2048, 8192)] == [256, 256, 256, 64, 16]


def test_key_sample_is_whole_blocks_evenly_spaced_from_first_to_last():
    assert smoothing.key_sample(2048) is None and smoothing.key_sample(100) is None
    keys = smoothing.key_sample(8197)  # 129 blocks, the last one of 5 tokens
    blocks = keys.div(64, rounding_mode="floor").unique()
    assert len(blocks) == 32 and blocks[0] == 0 and blocks[-1] == 128 and keys[-1] == 8196
    assert len(keys) == 31 * 64 + 5 and (keys.diff() > 0).all() and (keys[:-5] % 64).view(31, 64).eq(
        torch.arange(64)).all()


def test_sampled_smoothing_statistics_stay_near_the_full_ones():
    """4,096 tokens: 32 of 64 K blocks and 32 query rows instead of all blocks and 256 rows."""
    torch.manual_seed(3)
    T, D = 4096, 64
    q = torch.randn(4, T, D).half()
    k = (torch.randn(2, T, D) + 4 * torch.randn(2, 1, D)).half()
    full = smoothing.smoothing_stats(q, k, key_blocks=64)
    sampled = smoothing.smoothing_stats(q, k)
    assert sampled[("k_tokens", None)].tolist() == [2048, 2048] and full[("k_tokens", None)].tolist() == [T, T]
    for key, values in full.items():
        if key[0] in ("k_quant_err", "qk_quant_err", "channel_bias"):
            assert torch.allclose(sampled[key], values, rtol=0.05), (key, sampled[key], values)


def test_smoothing_of_several_layers_at_once_equals_one_at_a_time():
    """The capture finishes several layers' samples together (stacked along KV heads): the same statistics."""
    torch.manual_seed(4)
    qs = [torch.randn(4, 700, 64).half() for _ in range(3)]
    ks = [(torch.randn(2, 700, 64) + 5 * torch.randn(2, 1, 64)).half() for _ in range(3)]
    together = smoothing.finish([smoothing.sample(q, k) for q, k in zip(qs, ks)])
    for q, k, got in zip(qs, ks, together):
        alone = smoothing.smoothing_stats(q, k)
        assert got.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(got[key], alone[key], rtol=1e-6, atol=0, msg=str(key))


def test_smoothing_stats_against_a_float64_reference():
    """Every statistic against a direct float64 computation on all query rows (a short prompt samples them all),
    on K with a per-channel offset that smoothing removes."""
    torch.manual_seed(1)
    T, D = 96, 64
    q = torch.randn(4, T, D).half()
    k = (torch.randn(2, T, D) + 8 * torch.randn(2, 1, D)).half()  # a shared offset per channel
    got = smoothing.smoothing_stats(q, k)
    assert got[("qk_rows", None)].tolist() == [T, T]
    sm = D ** -0.5 * smoothing.LOG2E
    q64, k64 = q.double(), k.double()
    mask = torch.ones(T, T).tril().bool()

    def centred_sq(s):  # per KV head (2 query heads each), over causal entries
        s = torch.where(mask, s, torch.nan)
        return ((s - s.nanmean(-1, keepdim=True)) ** 2).nansum((1, 2)).view(2, 2).sum(1)

    exact = (q64 * sm) @ k64.repeat_interleave(2, 0).transpose(1, 2)
    q_hat = smoothing._dequant(q, 128, sm).double()
    mean_bias = k64.mean(1).norm(dim=-1) / k64.norm(dim=-1).mean(1)
    assert torch.allclose(got[("channel_bias", None)], mean_bias, rtol=1e-5)
    for variant, smooth in smoothing.VARIANTS.items():
        k_in = k - k.mean(1, keepdim=True) if smooth else k
        k_hat = smoothing._dequant(k_in, 64, 1.0).double()
        k_err = ((k_hat - k_in.double()) ** 2).sum((1, 2)).sqrt() / (k64 ** 2).sum((1, 2)).sqrt()
        assert torch.allclose(got[("k_quant_err", variant)], k_err, rtol=1e-5)
        s_var = (q64 * sm) @ k_in.double().repeat_interleave(2, 0).transpose(1, 2)
        s_hat = q_hat @ k_hat.repeat_interleave(2, 0).transpose(1, 2)
        qk_err = (centred_sq(s_hat - s_var) / centred_sq(exact)).sqrt()
        assert torch.allclose(got[("qk_quant_err", variant)], qk_err, rtol=1e-4)
    # the effect itself: smoothing removes the offset that dominates K's INT8 error
    assert (got[("k_quant_err", "sage8")] < got[("k_quant_err", "sage8-nosmooth")] / 4).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_massive_activations_are_the_top_k_of_all_values(dtype):
    torch.manual_seed(2)
    x = torch.randn(50, 40).to(dtype)
    x[3, 7], x[3, 9], x[3, 11], x[40, 0] = 300, -250, 200, 90  # three of the top values in one token
    values, tok, ch = outliers.massive_activations(x, 8)
    flat = x.abs().float().reshape(-1).topk(8)
    assert torch.equal(values, flat.values.double())
    assert torch.equal(x[tok, ch].abs().float(), flat.values)
    assert (tok[:4].tolist(), ch[:4].tolist()) == ([3, 3, 3, 40], [7, 9, 11, 0])
    batch = torch.stack([x, x.flip(0)])  # rows of a lockstep batch at once: each row's own top k
    for i, row in enumerate(batch):
        for a, b in zip(outliers.massive_activations(batch, 8), outliers.massive_activations(row, 8)):
            assert torch.equal(a[i], b)
