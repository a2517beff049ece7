"""The fitting kernel on a real trained emulator (bossbrain) and on analytic cases."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import Flag, SpectrumFitter, fit_spectra
from distlabels.fit.forward import RUNS_MIN_ROWS
from distlabels.fit.lm import pinv_hermitian
from distlabels.fit.working_grid import build_working_grid
from distlabels.io.store import list_to_numpy
from distlabels.io.wavelength import survey_grid
from distlabels.mock import make_mock


def _arrays(table, meta):
    n_pix = len(meta["wavelength_aa"])
    return (list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix),
            list_to_numpy(table["mask"], n_pix, np.bool_))


def test_lsf_width_matches_resolving_power():
    """A line narrower than a model pixel comes out of the projection with FWHM = lambda / R."""
    lam_model = np.linspace(4990, 5010, 40001)            # 0.0005 A pixels
    obs = 5000 * 10 ** (1e-5 * np.arange(-300, 301))      # fine log grid around 5000 A
    g = build_working_grid(lam_model, obs, resolution=5000, oversample=4, v_max_kms=10)
    spike = np.zeros_like(lam_model)
    spike[20000] = 1.0                                     # at 5000 A
    prof = g.projection @ spike
    lam_w = 10 ** g.log10_wavelength
    half = prof >= prof.max() / 2
    fwhm = lam_w[half].max() - lam_w[half].min()
    step = lam_w[1] - lam_w[0]
    assert abs(fwhm - 5000 / 5000) < 1.5 * step            # 1.0 A within the working-grid sampling
    np.testing.assert_allclose((g.projection @ np.ones_like(lam_model))[g.covered], 1.0, rtol=1e-12)


def test_jacobian_matches_finite_differences(bossbrain_model):
    """Analytic Jacobian of the full forward model (network, Doppler interpolation, continuum)."""
    # A float64 copy: converting the session's shared model and back leaves its weights in another memory
    # layout, which changes float32 rounding (and so the mock spectra) of every later test.
    model = copy.deepcopy(bossbrain_model).double()
    wave, res, seg = survey_grid("lamost")
    f = SpectrumFitter(model, wave, resolution=res, segments=seg, config=FitConfig(library_size=8))
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.uniform(-0.3, 0.3, (2, model.n_labels)))
    v = torch.tensor([[13.3], [-41.7]], dtype=torch.float64)
    c = torch.as_tensor(rng.normal(0, 0.1, (2, f.n_cont)))
    c[:, 0] += 1.0
    p = torch.cat([x, v, c], 1)
    _, jac = f.fwd.evaluate(p, jac=True)
    for k in list(range(0, model.n_labels, 5)) + [model.n_labels, model.n_labels + 2]:
        h = 1e-6 if k != model.n_labels else 1e-4   # RV: stay inside one interpolation segment
        dp = torch.zeros_like(p)
        dp[:, k] = h
        fd = (f.fwd.evaluate(p + dp, jac=False)[0] - f.fwd.evaluate(p - dp, jac=False)[0]) / (2 * h)
        np.testing.assert_allclose(jac[:, k].numpy(), fd.numpy(), atol=1e-6 * float(fd.abs().max()) + 1e-9)


def test_noiseless_spectra_recover_truth(bossbrain_model):
    """No noise, RV 0, flat continuum: labels come back to a small fraction of the S/N 50 errors."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=40, seed=3, noiseless=True, snr_min=50, snr_max=50))
    flux, ivar, mask = _arrays(table, meta)
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask,
                      resolution=meta["resolution"], segments=meta["segments"])
    inside = (res.flags & Flag.AT_LABEL_BOUND) == 0
    assert inside.sum() >= 5
    for j, name in enumerate(["teff", "logg", "mh"]):
        dev = (res.labels[:, j] - table[f"true_{name}"].to_numpy()) / res.errors[:, j]
        assert np.median(np.abs(dev[inside])) < 0.3, name
    assert np.all(np.abs(res.rv) < 0.5 * np.median(res.rv_err) + 0.5)
    assert np.median(res.chi2_red) < 0.05        # no noise: the model reproduces the data


def test_bad_input_flagged_and_bounds_hold(bossbrain_model):
    """NaN flux, zero ivar and too few pixels are flagged, not fitted; labels stay in the box; a
    star hotter than the model's range ends at the bound, flagged."""
    wave, res_r, seg = survey_grid("lamost")
    table, meta = make_mock(bossbrain_model, MockConfig(n=6, seed=5, snr_min=80, snr_max=80))
    flux, ivar, mask = _arrays(table, meta)
    flux[0] = np.nan
    ivar[1] = 0
    ivar[2, 30:] = 0
    # Star 3: an emulator spectrum at Teff 5400 K, outside the 4000-5000 K box (extrapolated).
    lab = bossbrain_model.training_labels[:1].copy()
    lab[0, 0] = 5400.0
    hot = bossbrain_model.predict(lab, wavelength_aa=None)
    from distlabels.mock import lsf_matrix
    from distlabels.io.wavelength import to_vacuum
    lam_m = to_vacuum(bossbrain_model.wavelength, "air")
    hot = (lsf_matrix(lam_m, res_r) @ hot[0])
    flux[3] = np.interp(wave, lam_m, hot)
    ivar[3] = 80.0**2
    mask[3] = False
    res = fit_spectra(bossbrain_model, wave, flux, ivar, mask=mask, resolution=res_r, segments=seg)
    assert res.flags[0] & Flag.BAD_INPUT and res.flags[1] & Flag.BAD_INPUT
    assert res.flags[2] & Flag.FEW_PIXELS
    assert np.isnan(res.labels[:3]).all()
    assert res.flags[3] & Flag.AT_LABEL_BOUND and res.labels[3, 0] == pytest.approx(5000, abs=1)
    lo, hi = bossbrain_model.label_bounds.T
    fitted = np.isfinite(res.labels).all(1)
    assert fitted.sum() == 3
    assert np.all(res.labels[fitted] >= lo - 1e-3) and np.all(res.labels[fitted] <= hi + 1e-3)


def test_fixed_labels_stay_put(bossbrain_model, mock_snr50):
    table, meta = mock_snr50
    flux, ivar, mask = _arrays(table.slice(0, 8), meta)
    cfg = FitConfig(fix=(("cm", 0.0), ("nm", 0.1)))
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, config=cfg,
                      resolution=meta["resolution"], segments=meta["segments"])
    names = list(res.label_names)
    np.testing.assert_allclose(res.labels[:, names.index("cm")], 0.0, atol=1e-5)
    np.testing.assert_allclose(res.labels[:, names.index("nm")], 0.1, atol=1e-5)
    assert np.all(res.errors[:, names.index("cm")] == 0)
    assert np.all(np.isfinite(res.labels[:, 0]))


def test_fast_doppler_taps_equal_float64_path(bossbrain_model):
    """On the model's own pixels the Doppler interpolation indices and weights are computed in the
    network's precision around integer pixel positions; they must equal the float64 path (same
    taps, weights within 1e-5 pixel) from a few m/s to the edge of the RV range."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=2, snr_min=50, snr_max=50, seed=3, grid="model",
                                                        normalized=True))
    f = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                       resolution=meta["resolution"], config=FitConfig(continuum_degree=-1, masks="none"))
    fw = f.fwd
    assert fw._taylor_fast is not None
    v = torch.tensor([-499.0, -61.3, -0.004, 0.0, 3.7, 250.0, 499.0], dtype=torch.float64)
    i_fast, w_fast, dw_fast = fw.taps_at(v)
    saved, fw._taylor_fast = fw._taylor_fast, None
    try:
        i_ref, w_ref, dw_ref = fw.taps_at(v)
    finally:
        fw._taylor_fast = saved
    assert torch.equal(i_fast, i_ref)
    assert float((w_fast[1] - w_ref[1]).abs().max()) < 1e-5
    ref = dw_ref[1].numpy()
    np.testing.assert_allclose(dw_fast[1].numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # Stage 1 runs on every other pixel of the model's grid, still on its own pixels.
    assert f.stage1_pixels == slice(None, None, 2) and f.fwd_main.native_offset is not None


@pytest.mark.parametrize("n_rows", [1, 2, 23])
def test_native_grid_interpolation_and_its_transpose(bossbrain_model, n_rows):
    """On the model's own pixels the CPU interpolates few rows (a model, a gradient) with gather/scatter and
    many (a Jacobian) run by run: both give linear interpolation at the Doppler-shifted positions that
    numpy finds on the float64 log-wavelength grid, and the transpose is the adjoint (<Ax, u> = <x, A^T u>)."""
    _, meta = make_mock(bossbrain_model, MockConfig(n=2, snr_min=50, snr_max=50, seed=3, grid="model", normalized=True))
    f = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                       resolution=meta["resolution"], config=FitConfig(continuum_degree=-1, masks="none"))
    fw = f.fwd
    assert fw.native_offset is not None and (n_rows >= RUNS_MIN_ROWS) == (n_rows == 23)
    v = torch.tensor([-4.6, -0.3, 0.0, 2.2, 4.9], dtype=torch.float64)
    rng = np.random.default_rng(n_rows)
    rows = torch.as_tensor(rng.normal(size=(len(v), n_rows, fw.n_work)), dtype=torch.float32)
    i, w, _ = fw.taps_at(v)
    got = fw._interp(rows, i, w).numpy()
    native = fw.native.numpy()
    for s_, vs in enumerate(v.numpy()):
        b = vs / 299792.458
        pos = np.interp(fw.log10_obs.numpy() - 0.5 * np.log10((1 + b) / (1 - b)), native, np.arange(len(native)))
        inside = (pos > 1) & (pos < len(native) - 2)
        for r in range(n_rows):
            want = np.interp(pos, np.arange(len(native)), rows[s_, r].numpy())
            np.testing.assert_allclose(got[s_, r, inside], want[inside], atol=2e-4)
    u = torch.as_tensor(rng.normal(size=got.shape), dtype=torch.float32)
    back = fw.interp_t(u, i, w)
    lhs, rhs = float((torch.as_tensor(got) * u).double().sum()), float((rows * back).double().sum())
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_jacobian_chunks_change_nothing(bossbrain_model, mock_snr50):
    """Full Jacobians taken a few stars at a time (the memory bound of GPU batches) give the fit of the
    whole batch at once: same flags, labels within 1e-3 sigma, same errors; a bad chunk size is refused."""
    table, meta = mock_snr50
    flux, ivar, mask = _arrays(table.slice(0, 12), meta)
    kw = dict(resolution=meta["resolution"], segments=meta["segments"])
    whole = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask,
                        config=FitConfig(batch_size=12), **kw)
    chunked = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask,
                          config=FitConfig(batch_size=12, jacobian_chunk=5), **kw)
    np.testing.assert_array_equal(chunked.flags, whole.flags)
    assert float(np.max(np.abs(chunked.labels - whole.labels)[:, :3] / whole.errors[:, :3])) < 1e-3
    np.testing.assert_allclose(chunked.errors[:, :3], whole.errors[:, :3], rtol=1e-3)
    with pytest.raises(DistlabelsError, match="jacobian_chunk"):
        SpectrumFitter(bossbrain_model, meta["wavelength_aa"], config=FitConfig(jacobian_chunk=0), **kw)


def test_pinv_in_batches_equals_numpy():
    """Pseudo-inverses taken a few matrices per call (cuSOLVER's batched eigensolver failed on 65,536 at
    once) equal numpy's, for full-rank and rank-deficient symmetric matrices alike."""
    rng = np.random.default_rng(4)
    b = rng.normal(size=(10, 6, 4))
    A = b @ b.transpose(0, 2, 1)                        # rank 4 of 6
    A[::2] += 3 * np.eye(6)                             # every other one full rank
    got = pinv_hermitian(torch.as_tensor(A), batch=3).numpy()
    np.testing.assert_allclose(got, np.linalg.pinv(A, hermitian=True), rtol=1e-8, atol=1e-10)


def test_failing_batches_are_fitted_in_halves(bossbrain_model, mock_snr50):
    """A batch that raises is fitted in halves, recursively: a failure that comes with the batch's size
    costs one try per level; a star that breaks every batch it is in ends alone, flagged FIT_ERROR with NaN
    labels; every other star gets the fit it gets in one batch (the approximate curvature is shared by a
    batch, so paths differ: labels within 0.01 sigma)."""
    table, meta = mock_snr50
    flux, ivar, mask = _arrays(table.slice(0, 12), meta)
    kw = dict(resolution=meta["resolution"], segments=meta["segments"])
    whole = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask,
                        config=FitConfig(batch_size=12), **kw)
    fitter = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], config=FitConfig(batch_size=12), **kw)
    real, sizes = fitter._fit_batch, []

    def fragile(idx, d, w, res):                        # a solver that takes at most 3 stars, and star 5 breaks it
        sizes.append(len(idx))
        if len(idx) > 3 or 5 in idx:
            raise RuntimeError("injected: batched solver failed")
        real(idx, d, w, res)

    fitter._fit_batch = fragile
    with pytest.warns(RuntimeWarning, match="batch of 12 stars failed .*injected.*halves"):
        res = fitter.fit(flux, ivar, mask)
    assert sizes == [12, 6, 3, 3, 1, 2, 1, 1, 6, 3, 3]   # halves of halves, not 12 single-star tries
    assert res.flags[5] & Flag.FIT_ERROR and np.isnan(res.labels[5]).all() and np.isnan(res.errors[5]).all()
    ok = np.arange(12) != 5
    assert not np.any(res.flags[ok] & Flag.FIT_ERROR)
    np.testing.assert_array_equal(res.flags[ok], whole.flags[ok])
    dev = np.abs(res.labels - whole.labels)[ok, :3] / whole.errors[ok, :3]
    assert float(dev.max()) < 0.01, dev.max()
    np.testing.assert_allclose(res.errors[ok, :3], whole.errors[ok, :3], rtol=0.005)
