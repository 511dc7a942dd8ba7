"""Known-value tests of driftscope.measure (one test file per module's statistics, nanodo style)."""
import math

import numpy as np
import pytest
import torch

from driftscope.measure import drift, outliers
from driftscope.measure.logits import first_divergence, perplexity


def test_orthogonal_inputs_have_cosine_zero():
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    x = torch.tensor([[0.0, 3.0, 0.0, -1.0]])
    assert drift.drift(x, r)["cosine"].item() == 0.0


def test_twice_the_reference_has_relative_l2_one_and_cosine_one():
    r = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    m = drift.drift(2 * r, r)
    assert torch.allclose(m["rel_l2"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(m["rel_l1"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(m["cosine"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(m["max_abs"], r.abs().amax(1).double())


def test_identical_inputs_give_exactly_zero_drift():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        r = (torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
        m = drift.drift(r, r.clone())
        assert (m["cosine"] == 1).all() and all((m[k] == 0).all() for k in ("rel_l2", "rel_l1", "rmse", "max_abs"))


def test_chunked_sums_equal_unchunked():
    g = torch.Generator().manual_seed(2)
    r, x = torch.randn(2, 1000, generator=g), torch.randn(2, 1000, generator=g)
    whole, chunked = drift.drift_sums(x, r), drift.drift_sums(x, r, chunk=77)
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=0)


def test_per_head_sums_pooled_equal_the_flat_statistics():
    g = torch.Generator().manual_seed(3)
    r, x = torch.randn(5, 8, 16, generator=g), torch.randn(5, 8, 16, generator=g)
    pooled = drift.drift_from_sums(drift.pool(drift.drift_sums(x, r)), r.numel())
    flat = drift.drift(x.reshape(1, -1), r.reshape(1, -1))
    for k in drift.DRIFT_METRICS:
        assert torch.allclose(pooled[k], flat[k], rtol=1e-12, atol=0), k


def test_rel_l2_by_position_of_a_constant_error_is_flat():
    r = torch.ones(2, 10, 4)
    starts, curve = drift.rel_l2_by_position(r * 1.5, r, bins=5)
    assert starts.tolist() == [0, 2, 4, 6, 8]
    assert torch.allclose(curve, torch.full((5,), 0.5, dtype=torch.float64))


def test_outlier_statistics_of_known_tensors():
    x = torch.zeros(1, 4, 3)
    x[0, 2, 1] = -8.0
    o = outliers.outliers(x)
    assert o["absmax"].item() == 8.0
    # Pearson kurtosis of one spike in 12 values, from its definition (the centring is float32: rel 1e-6)
    v = x.flatten().double()
    c = v - v.mean()
    assert o["kurtosis"].item() == pytest.approx(((c ** 4).mean() / (c ** 2).mean() ** 2).item(), rel=1e-6)
    gauss = torch.randn(1, 4000, 16, generator=torch.Generator().manual_seed(4))
    assert outliers.outliers(gauss)["kurtosis"].item() == pytest.approx(3.0, abs=0.1)
    assert outliers.outliers(gauss)["frac_6sigma"].item() == 0.0
    assert torch.equal(outliers.channel_absmax(x)[0], torch.tensor([0.0, 8.0, 0.0]))
    values, tok, ch = outliers.massive_activations(x[0], 1)
    assert (values.item(), tok.item(), ch.item()) == (8.0, 2, 1)


def test_perplexity_and_first_divergence():
    assert perplexity([math.log(4) * 10], [10]) == pytest.approx(4.0)
    assert first_divergence(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == 2
    assert first_divergence(torch.tensor([1, 2]), torch.tensor([1, 2])) == 2
