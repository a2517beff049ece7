"""The robust start (:mod:`distlabels.fit.start`): RV by cross-correlation against a brute-force reference
and against the mocks' true velocities, and library starts near the true labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.fit import SpectrumFitter
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock


@pytest.fixture(scope="module")
def start_case(bossbrain_model):
    """Pre-normalised LAMOST-like mocks at S/N 50 with |RV| up to 400 km/s, and a fitter for them."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=24, snr_min=50, snr_max=50, seed=12, normalized=True,
                                                        rv_max_kms=400.0))
    f = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                       resolution=meta["resolution"], config=FitConfig(continuum_degree=-1, masks="none"))
    n_pix = len(meta["wavelength_aa"])
    d = torch.as_tensor(list_to_numpy(table["flux"], n_pix))
    w = torch.as_tensor(list_to_numpy(table["ivar"], n_pix))
    return f, table, d, w


def test_cross_correlation_peak_matches_brute_force(start_case):
    """The integer-shift peak over all templates equals an explicit loop over templates and shifts of
    (sum num * t)^2 / sum den * t^2 (positive correlations only), computed in float64 with numpy."""
    f, _, d, w = start_case
    st = f.start
    with torch.no_grad():
        v, gain = st.rv(d, w)
        num, den = st._bin(d, w, torch.zeros(len(d), dtype=torch.float64))
    num, den = num.double().numpy(), den.double().numpy()
    tpl = st.templates.double().numpy()
    k, W = st.max_shift, tpl.shape[1]
    best = np.full(len(d), -np.inf)
    best_shift = np.zeros(len(d))
    for t in tpl:
        for s in range(-k, k + 1):
            ts = np.zeros(W)
            if s >= 0:
                ts[s:] = t[: W - s]
            else:
                ts[:s] = t[-s:]
            c = num @ ts
            crit = np.where(c > 0, c * c / np.maximum(den @ (ts * ts), 1e-20), 0.0)
            better = crit > best
            best = np.where(better, crit, best)
            best_shift = np.where(better, s, best_shift)
    np.testing.assert_allclose(gain.numpy(), best, rtol=1e-4)
    r = 10.0 ** (2 * best_shift * st.grid.step_dex)
    v_int = 299792.458 * (r - 1) / (r + 1)
    px_kms = 299792.458 * np.log(10) * st.grid.step_dex
    # The parabola moves the peak by at most one grid pixel from the integer shift.
    assert np.all(np.abs(v.numpy() - v_int) <= px_kms * 1.0001)


def test_cross_correlation_finds_the_true_velocity(start_case):
    """Start RVs within a few km/s of the truth (S/N 50, R ~ 1800, working pixels of ~35 km/s), and the
    best library entry's Teff near the true Teff."""
    f, table, d, w = start_case
    with torch.no_grad():
        v, _ = f.start.rv(d, w)
        cand = f.start.library(d, w, v, 1)[:, 0]
    err = np.abs(v.numpy() - table["true_rv"].to_numpy())
    assert np.median(err) < 3.0 and err.max() < 15.0, err
    th = f.lib_theta[cand].numpy()
    x = f.lmap.offset[None] + th @ f.lmap.matrix.T
    teff = f.model.unscale(torch.as_tensor(x)).numpy()[:, 0]
    dt = np.abs(teff - table["true_teff"].to_numpy())
    assert np.median(dt) < 150 and np.mean(dt < 300) >= 0.9, dt
