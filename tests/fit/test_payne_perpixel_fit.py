"""Fitting per-pixel Payne networks: spectra made by the network itself (noise, RV, a raw continuum)
give back their labels within the errors; the stored mask and pseudo-continuum follow the RV."""
from __future__ import annotations

import numpy as np
import pytest

from distlabels.config import FitConfig
from distlabels.fit import Flag
from distlabels.fit.payne_perpixel import PerPixelFitter, model_segments
from distlabels.fit.registry import make_fitter
from distlabels.io.loaders.apogee import aspcap_wavelength
from distlabels.io.wavelength import C_KMS
from distlabels.models import load
from distlabels.models.importers import import_payne_npz


def _observe(model, labels, rv_kms, wave_obs, snr, rng, continuum=None):
    """Model spectra shifted by rv (linear interpolation on the model grid, as the kernel reads a native
    grid), times a continuum, with Gaussian noise of S/N ``snr``: (flux, ivar) (n, n_pix)."""
    flux = model.predict(labels)
    out = np.empty((len(labels), len(wave_obs)))
    for i, (f, v) in enumerate(zip(flux, rv_kms)):
        dop = np.sqrt((1 + v / C_KMS) / (1 - v / C_KMS))
        out[i] = np.interp(wave_obs / dop, model.wavelength, f)
    if continuum is not None:
        out *= continuum
    sigma = np.abs(out) / snr
    return out + rng.normal(size=out.shape) * sigma, 1 / sigma**2


def test_synthetic_per_pixel_network_recovers_labels_and_rv(tmp_path):
    """A random 4-label per-pixel network on a 2-chip log-lambda grid (no shared data needed)."""
    rng = np.random.default_rng(7)
    lw = 4.18 + 6e-6 * np.concatenate([np.arange(0, 700), np.arange(900, 1600)])
    wave = 10**lw
    P, H, L = len(wave), 5, 4
    arr = {"w_array_0": rng.normal(0, 2.0, (P, H, L)), "b_array_0": rng.normal(0, 0.5, (P, H)),
           "w_array_1": rng.normal(0, 0.08, (P, H)), "b_array_1": 1 + rng.normal(0, 0.02, P),
           "x_min": np.array([4000.0, 1.0, -1.0, 0.0]), "x_max": np.array([6000.0, 5.0, 0.5, 20.0])}
    np.savez(tmp_path / "net.npz", **arr)
    model = load(import_payne_npz(tmp_path / "net.npz", tmp_path / "m", wavelength=wave, resolution=22500))
    truth = np.array([[4500.0, 2.0, -0.5, 5.0], [5600.0, 4.2, 0.1, 12.0], [5000.0, 3.0, -0.2, 8.0]])
    rv = np.array([0.0, 33.0, -41.0])
    flux, ivar = _observe(model, truth, rv, wave, 80.0, rng)
    fitter = make_fitter(model, wave, resolution=22500, segments=model_segments(wave),
                         config=FitConfig(continuum_degree=-1))
    assert isinstance(fitter, PerPixelFitter) and fitter.grid.native is not None   # no LSF on top of R = 22,500
    res = fitter.fit(flux, ivar)
    pull = (res.labels - truth) / res.errors
    assert np.all(np.abs(pull) < 4.5), pull
    assert np.all(np.abs(res.rv - rv) < 4.5 * res.rv_err + 0.05), (res.rv, res.rv_err)
    assert np.all(res.chi2_red < 1.2) and np.all(res.flags & (Flag.NOT_CONVERGED | Flag.CHI2_HIGH) == 0)


def test_real_network_spectra_with_raw_continuum_recover_labels(apogee_payne):
    """The published APOGEE network: raw (un-normalised) spectra at S/N 100 with RVs up to 45 km/s on the
    ASPCAP grid; the fitter's pseudo-continuum normalisation and pixel mask follow each RV."""
    rng = np.random.default_rng(3)
    wave = aspcap_wavelength()
    truth = np.array([[4700.0, 4.6, -0.2, 0.05, 4.0], [5800.0, 4.3, 0.1, 0.0, 9.0], [6400.0, 4.2, -0.5, 0.25, 14.0]])
    rv = np.array([0.0, 28.0, -45.0])
    x = (wave - wave.mean()) / np.ptp(wave)
    cont = 800.0 * (1 + 0.3 * x - 0.2 * x**2)
    flux, ivar = _observe(apogee_payne, truth, rv, wave, 100.0, rng, continuum=cont)
    fitter = make_fitter(apogee_payne, wave, resolution=22500, segments=model_segments(wave),
                         config=FitConfig(continuum_degree=-1))
    masked = fitter.model_bad_pixels(np.array([0.0, 45.0]))
    assert masked[0].sum() == apogee_payne.bad_pixels.sum() and masked[1].sum() > 0
    assert not np.array_equal(masked[0], masked[1])               # the mask moves with the star
    res = fitter.fit(flux, ivar)
    # Errors from the fit; a floor for the bias the pseudo-continuum of a noisy spectrum leaves.
    floor = np.array([15.0, 0.03, 0.015, 0.015, 0.6])
    assert np.all(np.abs(res.labels - truth) < 4 * res.errors + floor), (res.labels - truth, res.errors)
    assert np.all(np.abs(res.rv - rv) < 0.3), res.rv
    assert np.all(res.chi2_red < 1.3), res.chi2_red


def test_apstar_pixels_land_on_the_aspcap_model_pixels_and_chip_gaps_get_no_weight():
    """apStar's 8,575-pixel grid holds the network's 7,214 pixels at indices 322:3242, 3648:6048, 6412:8306."""
    from distlabels.fit.working_grid import build_native_grid, build_working_grid

    apstar = 10 ** (4.179 + 6e-6 * np.arange(8575))
    model = aspcap_wavelength()
    g = build_native_grid(model, apstar, v_max_kms=500.0)
    u = g.position(np.log10(apstar))
    sel = np.r_[322:3242, 3648:6048, 6412:8306]
    np.testing.assert_allclose(u[sel], np.arange(7214), atol=1e-6)
    edges = np.flatnonzero(~g.covered)
    np.testing.assert_array_equal(edges, [2919, 2920, 5319, 5320])        # both sides of the two chip gaps
    # The uniform working grid (used when broadening is fitted) does not bridge the gaps either.
    w = build_working_grid(model, apstar, resolution=None, v_max_kms=100.0)
    lw = w.log10_wavelength
    in_gap = (lw > np.log10(model[2919]) + 1e-7) & (lw < np.log10(model[2920]) - 1e-7)
    assert in_gap.any() and not w.covered[in_gap].any()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_per_pixel_model_on_cuda_matches_cpu(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    arr = {"w_array_0": rng.normal(size=(200, 5, 3)), "b_array_0": rng.normal(size=(200, 5)),
           "w_array_1": rng.normal(size=(200, 5)), "b_array_1": rng.normal(size=200),
           "x_min": np.zeros(3), "x_max": np.ones(3)}
    np.savez(tmp_path / "n.npz", **arr)
    out = import_payne_npz(tmp_path / "n.npz", tmp_path / "m", wavelength=np.arange(1.0, 201.0))
    cpu, gpu = load(out), load(out, device="cuda")
    x = torch.rand(7, 3) - 0.5
    np.testing.assert_allclose(gpu.value_and_jacobian_stacked(x.cuda()).cpu().numpy(),
                               cpu.value_and_jacobian_stacked(x).numpy(), atol=1e-5)
    sel = gpu.project(torch.eye(200, dtype=torch.float64)[50:80].to_sparse().cuda())
    np.testing.assert_allclose(sel(x.cuda()).cpu().numpy(), cpu(x).numpy()[:, 50:80], atol=1e-5)
