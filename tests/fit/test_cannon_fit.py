"""The Cannon's test step (CannonFitter): fast path against the explicit per-pixel fit, RV and
normalisation on shifted spectra with a continuum, bad input, and a real fit run on a LocalCluster."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from distlabels import paths
from distlabels.config import FitConfig, RunConfig
from distlabels.fit import Flag
from distlabels.fit.cannon import CannonFitter
from distlabels.fit.registry import make_fitter
from distlabels.io.store import open_store
from distlabels.models import CannonModel, load
from distlabels.models.continuum import PseudoContinuum
from tests.conftest import (CANNON_LABELS, draw_labels, quadratic_continuum_mask, quadratic_flux_shifted,
                            quadratic_truth)

N_PIX = 600
SEGMENTS = ((4999.0, 5450.0), (5450.0, 6001.0))


def _truth_model(normalised: bool):
    """The known quadratic model as a CannonModel (no training): s^2 small, its own continuum mask."""
    theta, pivot, scale, wave = quadratic_truth(N_PIX)
    tl = draw_labels(300, np.random.default_rng(9))
    pc = None if normalised else PseudoContinuum(wave, quadratic_continuum_mask(N_PIX), SEGMENTS, degree=2)
    return CannonModel(torch.as_tensor(theta), pivot=pivot, scale=scale, continuum=pc, label_names=CANNON_LABELS,
                       x_min=tl.min(0), x_max=tl.max(0), wavelength_aa=wave, wavelength_medium="vacuum",
                       training_labels=tl, model_variance=np.full(N_PIX, 1e-6)), wave


def _observe(n, seed, rv_max, snr, continuum):
    rng = np.random.default_rng(seed)
    lab = draw_labels(n, rng, ((4200, 4800), (1.3, 2.7), (-0.9, -0.1)))
    rv = rng.uniform(-rv_max, rv_max, n)
    flux = quadratic_flux_shifted(lab, rv, N_PIX)
    _, _, _, wave = quadratic_truth(N_PIX)
    if continuum:
        x = (wave - wave.mean()) / np.ptp(wave)
        cont = rng.uniform(0.5, 2, (n, 1)) * (1 + rng.normal(0, 0.1, (n, 1)) * x + rng.normal(0, 0.05, (n, 1)) * x**2)
    else:
        cont = np.ones((n, 1))
    sigma = cont / snr
    return lab, rv, (cont * flux + rng.normal(size=flux.shape) * sigma), 1 / sigma**2 * np.ones_like(flux)


@pytest.mark.parametrize("case", ["rest-frame", "shifted-with-continuum"])
def test_fast_path_equals_full_fit(case):
    rest = case == "rest-frame"
    model, wave = _truth_model(normalised=rest)
    lab, rv, flux, ivar = _observe(40, 1, 0 if rest else 80, 80, continuum=not rest)
    cfg = FitConfig(v_max_kms=0 if rest else 300, chi2_tol=1e-9)      # both converged fully
    fast = CannonFitter(model, wave, config=cfg, segments=SEGMENTS).fit(flux, ivar)
    full = CannonFitter(model, wave, config=cfg, segments=SEGMENTS, fast_path=False).fit(flux, ivar)
    assert np.all(fast.flags == full.flags)
    np.testing.assert_array_less(np.abs(fast.labels - full.labels), 1e-3 * full.errors)
    np.testing.assert_allclose(fast.errors, full.errors, rtol=1e-3)
    np.testing.assert_allclose(fast.rv, full.rv, atol=1e-3 * np.nanmedian(full.rv_err) if not rest else 0)
    np.testing.assert_allclose(fast.chi2_red, full.chi2_red, rtol=1e-3)


def test_shifted_spectra_with_continuum_recover_truth():
    """RV from the cross-correlation and refinement, the stored normalisation (its own noise carried
    into the errors), cubic model shift: labels and RV come back with pulls ~1 on spectra observed
    at +-150 km/s with a continuum."""
    model, wave = _truth_model(normalised=False)
    lab, rv, flux, ivar = _observe(150, 2, 150, 60, continuum=True)
    res = make_fitter(model, wave, segments=SEGMENTS, config=FitConfig()).fit(flux, ivar)
    assert isinstance(make_fitter(model, wave), CannonFitter)
    ok = res.flags == 0
    assert ok.mean() > 0.9
    for j in range(3):
        pull = (res.labels[ok, j] - lab[ok, j]) / res.errors[ok, j]
        assert abs(pull.mean()) < 0.25 and 0.8 < pull.std() < 1.25, (j, pull.mean(), pull.std())
    # The cubic shift of a model sampled at ~3.5 pixels per line FWHM leaves a little RV scatter.
    pull_rv = (res.rv[ok] - rv[ok]) / res.rv_err[ok]
    assert abs(pull_rv.mean()) < 0.25 and 0.8 < pull_rv.std() < 1.35, (pull_rv.mean(), pull_rv.std())
    assert abs(np.median(res.chi2_red[ok]) - 1) < 0.1


def test_bad_input_is_flagged_and_the_rest_fitted():
    model, wave = _truth_model(normalised=True)
    lab, _, flux, ivar = _observe(6, 3, 0, 80, continuum=False)
    flux[0] = np.nan
    ivar[1] = 0
    ivar[2, 30:] = 0
    mask = np.zeros(flux.shape, bool)
    mask[3, ::2] = True                       # half the pixels masked: still fitted
    res = CannonFitter(model, wave, config=FitConfig(v_max_kms=0)).fit(flux, ivar, mask)
    assert res.flags[0] & Flag.BAD_INPUT and res.flags[1] & Flag.BAD_INPUT and res.flags[2] & Flag.FEW_PIXELS
    assert np.isnan(res.labels[:3]).all() and np.isfinite(res.labels[3:]).all()
    assert np.all(np.abs(res.labels[3:] - lab[3:]) < 5 * res.errors[3:])


def test_failing_block_is_fitted_in_halves():
    """A block that raises is fitted in halves down to single stars: the star that breaks every block it is in
    ends flagged FIT_ERROR with NaN labels, the others get the labels of the unbroken fit."""
    model, wave = _truth_model(normalised=False)
    _, _, flux, ivar = _observe(8, 5, 40, 60, continuum=True)
    whole = CannonFitter(model, wave).fit(flux, ivar)
    fitter = CannonFitter(model, wave)
    real, sizes = fitter._fit_block, []

    def fragile(idx, parts, res):                       # star 6 breaks any block it is in
        sizes.append(len(idx))
        if 6 in idx:
            raise torch.linalg.LinAlgError("injected")
        real(idx, parts, res)

    fitter._fit_block = fragile
    with pytest.warns(RuntimeWarning, match="block of 8 stars failed .*injected"):
        res = fitter.fit(flux, ivar)
    assert sizes == [8, 4, 4, 2, 2, 1, 1]
    assert res.flags[6] & Flag.FIT_ERROR and np.isnan(res.labels[6]).all()
    ok = np.arange(8) != 6
    assert not np.any(res.flags[ok] & Flag.FIT_ERROR)
    np.testing.assert_allclose(res.labels[ok], whole.labels[ok], atol=1e-3 * np.nanmin(whole.errors))
    np.testing.assert_allclose(res.rv[ok], whole.rv[ok], atol=1e-3 * np.nanmin(whole.rv_err))


def test_cannon_fits_held_out_stars_through_distlabels_fit(cannon_model_dir, cannon_mock_stores, tmp_path):
    """Trained on one mock survey (bossbrain spectra, RV, continuum, noise), the Cannon model fits
    another through the ordinary pipeline on a LocalCluster: every star once, labels near the truth."""
    from distlabels.pipeline import run_fit

    model = load(cannon_model_dir)
    assert model.kind == "cannon" and model.continuum is not None
    out = tmp_path / "catalog"
    summary = run_fit(cannon_model_dir, cannon_mock_stores["test"], out,
                      RunConfig(workers=2, task_rows=30, progress=False))
    assert summary.n_failed == 0
    df = pd.read_parquet(out / paths.DATASET_DIR)
    ids = sorted(open_store(cannon_mock_stores["test"]).source_ids())
    assert sorted(df.source_id) == ids and df.source_id.is_unique
    assert df.model_id.iloc[0] == model.model_id
    good = df[(df["flags"] & int(Flag.AT_LABEL_BOUND | Flag.NOT_CONVERGED)) == 0]
    assert len(good) >= 0.85 * len(df)
    for name, tol in (("teff", 60.0), ("logg", 0.15), ("mh", 0.06), ("rv", 3.0)):
        d = good[name] - good[f"true_{name}"]
        assert abs(d.median()) < tol / 3 and d.abs().median() < tol, (name, d.median(), d.abs().median())
        assert np.mean(np.abs(d / good[f"{name}_err"]) < 3) > 0.75, name
