"""The approximate J^T W J of stage 2 (distlabels.fit.forward.ApproxCurvature) on the real emulator.

Everything but the label-label block must equal the exact normal equations (gradient, chi^2, the
RV and continuum blocks), and a fit that steps on the approximation must reach the exact fit's
minimum with the exact errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import SpectrumFitter
from distlabels.fit.forward import ApproxCurvature
from distlabels.fit.lm import weighted_normal_equations
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock


def _fitter_and_data(model, grid, n, snr, seed, **cfg):
    table, meta = make_mock(model, MockConfig(n=n, snr_min=snr, snr_max=snr, seed=seed, grid=grid,
                                              normalized=cfg.get("continuum_degree", 3) < 0, rv_max_kms=30.0))
    n_pix = len(meta["wavelength_aa"])
    flux = list_to_numpy(table["flux"], n_pix)
    ivar = list_to_numpy(table["ivar"], n_pix)
    mask = list_to_numpy(table["mask"], n_pix, np.bool_)
    f = SpectrumFitter(model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                       resolution=meta["resolution"], segments=meta["segments"],
                       config=FitConfig(library_size=64, **cfg))
    return f, table, flux, ivar, mask


def test_gradient_and_nuisance_blocks_are_exact(bossbrain_model):
    """On the model grid (native, linear taps) and a LAMOST-like grid (cubic taps, fitted continuum):
    J^T W r, chi^2 and every block touching RV or continuum equal the full Jacobian's; the label block
    is close (it only steers the steps)."""
    for grid, cfg in (("model", dict(continuum_degree=-1, masks="none")), ("lamost", {})):
        f, table, flux, ivar, mask = _fitter_and_data(bossbrain_model, grid, 6, 50, 11, **cfg)
        good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & ~mask & f.usable.numpy()[None]
        d = torch.as_tensor(np.where(good, flux, 0), dtype=torch.float32)
        w = torch.as_tensor(np.where(good, ivar, 0), dtype=torch.float32)
        labels = np.stack([table[f"true_{c}"].to_numpy() for c in bossbrain_model.label_names], 1)
        cont = None
        if f.fit_continuum:
            cont = np.zeros((len(d), f.n_cont))
            cont[:, :: cfg.get("continuum_degree", 3) + 1] = 1.0
        with torch.no_grad():
            p = f.params_from(labels, table["true_rv"].to_numpy() + 0.7, cont)   # off the truth: r != noise
            p[:, 0] += 0.01
            sw = w.sqrt()
            A, g, chi2 = weighted_normal_equations(f.fwd, p, sw, d)
            Aa, ga, chi2a = ApproxCurvature(f.fwd, w).normal_equations(p, sw, d)
        k, end = f.lmap.n_theta, f.n_par if f.fit_continuum else f.lmap.n_theta + 1
        np.testing.assert_allclose(chi2a.numpy(), chi2.numpy(), rtol=1e-5)
        np.testing.assert_allclose(ga[:, :end].numpy(), g[:, :end].numpy(), rtol=2e-3,
                                   atol=2e-3 * float(g[:, :end].abs().max()))
        np.testing.assert_allclose(Aa[:, :end, k:end].numpy(), A[:, :end, k:end].numpy(), rtol=2e-3,
                                   atol=1e-4 * float(A[:, :end, k:end].abs().max()))
        ratio = (Aa[:, :k, :k].diagonal(dim1=1, dim2=2) / A[:, :k, :k].diagonal(dim1=1, dim2=2)).numpy()
        assert np.all((ratio > 0.5) & (ratio < 2.0)), grid
        assert np.median(np.abs(ratio - 1)) < 0.1, grid


def test_fit_reaches_the_exact_fits_minimum(bossbrain_model):
    """Mocks at S/N 100 on the model grid: labels agree with the all-exact fit to a fraction of the errors
    (both stop within chi^2 tolerance 1 of the minimum) and the errors, from the exact matrix at the end,
    agree where the labels do."""
    f, table, flux, ivar, mask = _fitter_and_data(bossbrain_model, "model", 24, 100, 5,
                                                  continuum_degree=-1, masks="none")
    ref = SpectrumFitter(bossbrain_model, f.wavelength_vac, resolution=None,
                         config=FitConfig(library_size=64, continuum_degree=-1, masks="none", approx_curvature=False))
    ours, exact = f.fit(flux, ivar, mask), ref.fit(flux, ivar, mask)
    dz = (ours.labels - exact.labels) / exact.errors
    same = np.abs(ours.chi2_red - exact.chi2_red) * (f.n_pix - 23) < 5     # the same minimum
    assert same.mean() >= 0.9
    assert np.all(np.abs(dz[same][:, :3]) < 1.0)
    assert np.sqrt(np.mean(dz[same][:, :3] ** 2)) < 0.35
    np.testing.assert_allclose(ours.errors[same][:, :3], exact.errors[same][:, :3], rtol=0.05)
    truth = np.stack([table[f"true_{c}"].to_numpy() for c in ("teff", "logg", "mh")], 1)
    pull = (ours.labels[:, :3] - truth) / ours.errors[:, :3]
    assert np.all(np.abs(pull) < 5)


def test_auto_uses_the_approximation_only_without_a_fitted_continuum(bossbrain_model):
    """approx_curvature="auto" (the default) is the approximate path for a pre-normalised fit and the
    exact one with the LAMOST-like grid's two continuum segments (10 pulled-back rows against a
    23-row Jacobian): the same numbers as forcing that path, other numbers than forcing the other
    one; a bad value is refused."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=4, snr_min=50, snr_max=50, seed=5, grid="lamost",
                                                        rv_max_kms=30.0))
    n_pix = len(meta["wavelength_aa"])
    flux, ivar = list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix)

    def fitter(**cfg):
        return SpectrumFitter(bossbrain_model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                              resolution=meta["resolution"], segments=meta["segments"],
                              config=FitConfig(library_size=64, cpu_matmul="torch", **cfg))   # not timed: same BLAS

    for cfg, expect in ((dict(continuum_degree=-1, masks="none"), True), ({}, False)):
        auto = fitter(**cfg)
        assert auto.use_approx_curvature is expect
        got = auto.fit(flux, ivar)
        same = fitter(approx_curvature=expect, **cfg).fit(flux, ivar)
        other = fitter(approx_curvature=not expect, **cfg).fit(flux, ivar)
        np.testing.assert_array_equal(got.labels, same.labels)
        np.testing.assert_array_equal(got.n_iter, same.n_iter)
        assert not (np.array_equal(got.labels, other.labels) and np.array_equal(got.n_iter, other.n_iter))
    with pytest.raises(DistlabelsError, match="approx_curvature"):
        fitter(approx_curvature="sometimes")
