"""Flux-conserving resampling: integrals, constants, propagated variance, masks, upsampling."""
import numpy as np
import pytest

from distlabels.io.resample import Resampler, bin_edges


def test_integral_of_flux_is_conserved_over_whole_output_pixels():
    rng = np.random.default_rng(0)
    lam = 5000 * 10 ** (1e-4 * np.arange(400))                 # log-lambda input
    f = rng.uniform(0.5, 1.5, 400)
    out = np.linspace(5050, 5450, 150)                         # coarser linear output inside it
    r = Resampler(lam, out)
    fo, io, m = r(f[None], np.full((1, 400), 1.0))
    lo, hi = bin_edges(out)
    ilo, ihi = bin_edges(lam)
    # integral of the piecewise-constant input over [lo[0], hi[-1]] computed directly
    ov = np.clip(np.minimum(ihi, hi[-1]) - np.maximum(ilo, lo[0]), 0, None)
    assert np.sum(fo[0] * (hi - lo)) == pytest.approx(np.sum(f * ov), rel=1e-6)
    assert not m.any() and not r.upsampling


def test_constant_stays_constant_and_variance_halves_when_two_pixels_merge():
    lin = np.arange(1000.0, 1100.0)
    out = lin[:-1:2] + 0.5                                     # each output bin = two input bins exactly
    fo, io, m = Resampler(lin, out)(np.full((1, 100), 3.0), np.full((1, 100), 4.0))
    np.testing.assert_allclose(fo, 3.0)
    np.testing.assert_allclose(io, 8.0)                        # var = (1/4 + 1/4) / 2^2 = 1/8
    assert not m.any()


def test_masked_input_and_uncovered_output_are_unusable():
    lin = np.arange(1000.0, 1100.0)
    iv = np.full((1, 100), 1.0)
    iv[0, 50] = 0.0
    out = np.arange(990.0, 1110.0, 2.0) + 0.5
    fo, io, m = Resampler(lin, out)(np.ones((1, 100)), iv)
    lo, hi = bin_edges(out)
    touches_bad = (lo < 1050.5) & (hi > 1049.5)
    outside = (lo < 999.5) | (hi > 1099.5)
    np.testing.assert_array_equal(m[0], touches_bad | outside)
    assert (io[0][m[0]] == 0).all()


def test_upsampling_is_detected_and_gaps_are_not_bridged():
    lam = np.concatenate([np.arange(1000.0, 1050.0), np.arange(1100.0, 1150.0)])   # a 50 A gap
    out = np.arange(1000.0, 1150.0, 0.25)
    r = Resampler(lam, out)
    assert r.upsampling
    fo, io, m = r(np.ones((1, 100)), np.ones((1, 100)))
    in_gap = (out > 1050.0) & (out < 1099.0)
    assert m[0][in_gap].all()
    lo, hi = bin_edges(lam)
    assert hi[49] == pytest.approx(1049.5) and lo[50] == pytest.approx(1099.5)
