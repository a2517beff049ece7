"""Doppler taps on aligned log-uniform grids: the batched (GPU) path against explicit sums, the adjoint
identity, the per-star slices of the CPU path, and the torch.compile-fused kernels on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import SpectrumFitter
from distlabels.fit.aligned import FusedTaps, interp_aligned, spread_aligned
from distlabels.fit.forward import cubic_weights, cubic_weights_per_star
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock


def _explicit(rows, base, w, m, n_pix, scale):
    n, r, _ = rows.shape
    out = np.zeros((n, r, n_pix))
    for s in range(n):
        for p in range(n_pix):
            for t in range(w.shape[0]):
                out[s, :, p] += w[t, s] * rows[s, :, base[s] + t + m * p]
    return out * scale[:, None, :]


def test_interp_and_spread_against_explicit_sums():
    """The batched taps equal the defining sum (loops over stars, pixels and taps), and the spread is
    its exact transpose: <interp(x), u> == <x, spread(u)>."""
    rng = np.random.default_rng(4)
    n, r, n_pix, m = 6, 3, 40, 2
    n_work = m * n_pix + 9
    rows = rng.normal(size=(n, r, n_work))
    base = rng.integers(0, 6, size=n)
    w = rng.normal(size=(4, n))
    scale = rng.uniform(0.5, 2.0, size=(n, n_pix))
    t = lambda a: torch.as_tensor(a)                                    # noqa: E731
    got = interp_aligned(t(rows), t(base), t(w), m, n_pix, t(scale)).numpy()
    np.testing.assert_allclose(got, _explicit(rows, base, w, m, n_pix, scale), rtol=1e-12, atol=1e-12)
    u = rng.normal(size=(n, r, n_pix))
    lhs = float((t(got) * t(u)).sum())
    rhs = float((t(rows) * spread_aligned(t(u), t(base), t(w), m, n_work, t(scale))).sum())
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)
    # Written into a strided view of a larger buffer, as the Jacobian assembly does.
    buf = torch.zeros(n, r + 2, n_pix, dtype=torch.float64)
    interp_aligned(t(rows), t(base), t(w), m, n_pix, t(scale), out=buf[:, 1:1 + r])
    np.testing.assert_allclose(buf[:, 1:1 + r].numpy(), got)
    assert float(buf[:, 0].abs().max()) == 0 and float(buf[:, -1].abs().max()) == 0


@pytest.fixture(scope="module")
def lamost_fitter_pair(bossbrain_model):
    """Two LAMOST-grid fitters (continuum fitted): per-star slices (the CPU path) and batched taps (the
    GPU path, here on the CPU), plus 12 mock spectra with |RV| up to 300 km/s."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=12, snr_min=50, snr_max=50, seed=9, rv_max_kms=300.0))
    kw = dict(wavelength_medium=meta["wavelength_medium"], resolution=meta["resolution"], segments=meta["segments"])
    slices = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], config=FitConfig(fused_kernels=False), **kw)
    batched = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], config=FitConfig(fused_kernels=False), **kw)
    for fw in (batched.fwd, batched.fwd_main):
        fw.batched_taps = True
    return slices, batched, table, meta


def test_batched_taps_equal_per_star_slices(lamost_fitter_pair):
    """Model, weighted Jacobian and the pull-back of the approximate curvature on the batched path
    equal the per-star slices of the CPU path (float32 rounding), at velocities across the range."""
    slices, batched, _, _ = lamost_fitter_pair
    assert slices.fwd.aligned is not None and not slices.fwd.batched_taps
    rng = np.random.default_rng(2)
    n = 8
    th = np.clip(slices.theta_med + rng.normal(0, 0.05, size=(n, len(slices.theta_med))), slices.lmap.lo, slices.lmap.hi)
    p = torch.zeros(n, slices.n_par, dtype=torch.float64)
    p[:, :slices.lmap.n_theta] = torch.as_tensor(th)
    p[:, slices.fwd.i_v] = torch.tensor([-480.0, -250.0, -33.3, -0.2, 0.0, 12.5, 199.0, 480.0])
    p[:, slices.fwd.i_c:] = slices._unit_cont(n)
    sw = torch.rand(n, slices.n_pix, dtype=slices.dtype) + 0.5
    with torch.no_grad():
        m_a, j_a = slices.fwd.weighted_jacobian(p, sw)
        j_a = j_a.clone()
        m_b, j_b = batched.fwd.weighted_jacobian(p, sw)
        torch.testing.assert_close(m_b, m_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(j_b, j_a, rtol=1e-4, atol=1e-5 * float(j_a.abs().max()))
        i, w, _ = slices.fwd.taps_at(p[:, slices.fwd.i_v])
        u = torch.rand(n, 3, slices.n_pix, dtype=slices.dtype)
        sc = torch.rand(n, slices.n_pix, dtype=slices.dtype)
        torch.testing.assert_close(batched.fwd.interp_t(u, i, w, scale=sc), slices.fwd.interp_t(u, i, w, scale=sc),
                                   rtol=1e-5, atol=1e-6)


def test_batched_taps_fit_like_per_star_slices(lamost_fitter_pair):
    """Whole fits through either path agree to a small fraction of the errors (same flags)."""
    slices, batched, table, meta = lamost_fitter_pair
    n_pix = len(meta["wavelength_aa"])
    flux, ivar = list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix)
    a = slices.fit(flux, ivar)
    b = batched.fit(flux, ivar)
    np.testing.assert_array_equal(a.flags, b.flags)
    d = np.abs(a.labels[:, :3] - b.labels[:, :3]) / a.errors[:, :3]
    assert float(d.max()) < 0.01, d
    np.testing.assert_allclose(b.rv, a.rv, atol=0.01 * float(np.median(a.rv_err)))


def test_fused_kernels_setting_is_checked(bossbrain_model):
    with pytest.raises(DistlabelsError, match="fused_kernels"):
        SpectrumFitter(bossbrain_model, np.linspace(4000.0, 5000.0, 500), config=FitConfig(fused_kernels="yes"))
    off = FusedTaps("auto", torch.device("cpu"))
    assert not off.enabled and "CUDA" in off.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_on_cuda_match_unfused():
    """On CUDA the compiled taps (one kernel each) equal the plain batched ones."""
    fused = FusedTaps("auto", torch.device("cuda"))
    if not fused.enabled:
        pytest.skip(f"no fusion here: {fused.reason}")
    g = torch.Generator(device="cuda").manual_seed(1)
    n, r, n_pix, m = 300, 23, 3909, 2
    rows = torch.randn(n, r, m * n_pix + 40, device="cuda", generator=g)
    base = torch.randint(0, 30, (n,), device="cuda", generator=g)
    w = torch.randn(4, n, device="cuda", generator=g)
    scale = torch.rand(n, n_pix, device="cuda", generator=g)
    buf = torch.zeros(n, r + 1, n_pix, device="cuda")
    got = fused.interp(rows, base, w, m, n_pix, scale, out=buf[:, :r])
    assert fused.enabled, fused.reason
    torch.testing.assert_close(got, interp_aligned(rows, base, w, m, n_pix, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.interp(rows[:, :1], base, w, m, n_pix), interp_aligned(rows[:, :1], base, w, m, n_pix))
    u = torch.randn(n, 3, n_pix, device="cuda", generator=g)
    torch.testing.assert_close(fused.spread(u, base, w, m, rows.shape[2], scale),
                               spread_aligned(u, base, w, m, rows.shape[2], scale), rtol=1e-4, atol=1e-4)
    assert fused.enabled, fused.reason


def test_per_star_cubic_weights_equal_the_elementwise_ones():
    """The polynomial-matrix form of the Keys weights (one fraction per star) equals cubic_weights."""
    f = torch.linspace(0, 1, 11, dtype=torch.float64)
    scale = torch.linspace(-2, 3, 11, dtype=torch.float64)
    w, dw = cubic_weights(f)
    w2, dw2 = cubic_weights_per_star(f, scale)
    for a, b in zip(w, w2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for a, b in zip(dw, dw2):
        torch.testing.assert_close(b, a * scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(w2), torch.ones_like(f))             # a partition of unity
