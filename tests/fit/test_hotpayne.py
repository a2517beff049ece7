"""HotPayne (Xiang et al. 2022) in the kernel: vsini from 0 to 300 km/s on emulator spectra broadened
by the mock's own (independently sampled) rotation kernel, its bound and limb darkening, a model with
a microturbulence label, and kinds whose fitter cannot broaden refusing clearly.

Truths: the vsini injected by ``distlabels.mock`` (rotation on the model grid, scipy convolution),
the labels it drew, and c / (2 R) for the resolution limit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import Flag, SpectrumFitter, fit_spectra
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock

C_KMS = 299792.458
LADDER_KMS = np.array([0.0, 20.0, 40.0, 60.0, 100.0, 150.0, 200.0, 250.0, 300.0])


def _arrays(table, meta):
    n = len(meta["wavelength_aa"])
    return list_to_numpy(table["flux"], n), list_to_numpy(table["ivar"], n), list_to_numpy(table["mask"], n, np.bool_)


def _stars(model, n, seed):
    rng = np.random.default_rng(seed)
    return model.training_labels[rng.choice(len(model.training_labels), n, replace=False)]


def _check_ladder(true_v, res, limit_kms):
    """Above the limit: |dv| < max(5 km/s, 10 %). Below: an upper limit, |dv| < limit / 2."""
    dv = res.vsini - true_v
    above = true_v >= limit_kms
    assert above.sum() >= 4 and (~above).sum() >= 2
    tol = np.maximum(5.0, 0.1 * true_v)
    assert np.all(np.abs(dv[above]) < tol[above]), (true_v, res.vsini, res.vsini_err)
    assert np.all(np.abs(dv[~above]) < 0.5 * limit_kms), (true_v, res.vsini, res.vsini_err)
    assert np.all((res.vsini >= 0) & (res.vsini <= 500))
    assert np.all(np.isfinite(res.vsini_err) & (res.vsini_err > 0))


@pytest.fixture(scope="module")
def lamost_ladder(bossbrain_model):
    """LAMOST-like mocks (R 1800, S/N 100) of 9 training stars rotating at 0-300 km/s."""
    lab = _stars(bossbrain_model, len(LADDER_KMS), 31)
    return make_mock(bossbrain_model, MockConfig(n=len(LADDER_KMS), seed=31, snr_min=100, snr_max=100),
                     labels=lab, vsini_kms=LADDER_KMS)


def test_vsini_0_to_300_kms_at_lamost_resolution(bossbrain_model, lamost_ladder):
    table, meta = lamost_ladder
    flux, ivar, mask = _arrays(table, meta)
    fitter = SpectrumFitter(bossbrain_model, meta["wavelength_aa"], resolution=meta["resolution"],
                            segments=meta["segments"], config=FitConfig(fit_vsini=True))
    limit = C_KMS / (2 * 1800.0)                             # half the instrumental FWHM: 83 km/s
    assert fitter.vsini_limit_kms == pytest.approx(limit)
    res = fitter.fit(flux, ivar, mask)
    np.testing.assert_array_equal(table["true_vsini"].to_numpy(), LADDER_KMS.astype(np.float32))
    _check_ladder(LADDER_KMS, res, limit)
    assert not np.any(res.flags & Flag.BROADENING_AT_BOUND)


def test_vsini_beyond_its_bound_is_flagged(bossbrain_model, lamost_ladder):
    """vsini_max_kms 200: stars at 250 and 300 km/s end on the bound, flagged; slower ones are not."""
    table, meta = lamost_ladder
    flux, ivar, mask = _arrays(table, meta)
    pick = np.flatnonzero(np.isin(LADDER_KMS, [100.0, 150.0, 250.0, 300.0]))
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux[pick], ivar[pick], mask=mask[pick],
                      resolution=meta["resolution"], segments=meta["segments"],
                      config=FitConfig(fit_vsini=True, vsini_max_kms=200.0))
    fast = LADDER_KMS[pick] > 200
    at_bound = (res.flags & Flag.BROADENING_AT_BOUND) != 0
    np.testing.assert_array_equal(at_bound, fast)
    np.testing.assert_allclose(res.vsini[fast], 200.0, atol=0.01)
    assert np.all(np.abs(res.vsini[~fast] - LADDER_KMS[pick][~fast]) < 0.1 * LADDER_KMS[pick][~fast])


def test_vsini_0_to_300_kms_on_the_model_grid(bossbrain_model):
    """The model's own 0.5 A pixels (no LSF), 4500-5500 A: the limit is one pixel, ~30 km/s."""
    vs = np.array([0.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0])
    lab = _stars(bossbrain_model, len(vs), 32)
    table, meta = make_mock(bossbrain_model, MockConfig(n=len(vs), seed=32, snr_min=100, snr_max=100, grid="model"),
                            labels=lab, vsini_kms=vs)
    flux, ivar, mask = _arrays(table, meta)
    wave = np.asarray(meta["wavelength_aa"])
    sel = (wave > 4500) & (wave < 5500)
    fitter = SpectrumFitter(bossbrain_model, wave[sel], wavelength_medium=meta["wavelength_medium"], resolution=None,
                            config=FitConfig(fit_vsini=True))
    limit = fitter.vsini_limit_kms
    assert limit == pytest.approx(C_KMS * 0.5 / 5000, rel=0.1)    # one 0.5 A pixel at ~5000 A
    res = fitter.fit(flux[:, sel], ivar[:, sel], mask[:, sel])
    _check_ladder(vs, res, limit)


def test_limb_darkening_is_a_config_value(bossbrain_model):
    """Mocks without limb darkening (eps 0): fitted with eps 0 the vsini comes back; fitted with the
    default 0.6 it comes out high by about sqrt(<u^2>_0 / <u^2>_0.6) = sqrt(0.25 / 0.225) = 1.054 (the
    profiles' second moments: a darkened disc's profile is narrower for the same vsini; the line
    shapes add ~1 %)."""
    vs = np.array([150.0, 200.0, 250.0])
    lab = _stars(bossbrain_model, len(vs), 33)
    table, meta = make_mock(bossbrain_model, MockConfig(n=3, seed=33, snr_min=150, snr_max=150, limb_darkening=0.0),
                            labels=lab, vsini_kms=vs)
    flux, ivar, mask = _arrays(table, meta)
    kw = dict(mask=mask, resolution=meta["resolution"], segments=meta["segments"])
    same = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar,
                       config=FitConfig(fit_vsini=True, limb_darkening=0.0), **kw)
    dflt = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, config=FitConfig(fit_vsini=True), **kw)
    assert np.all(np.abs(same.vsini - vs) < 0.05 * vs), same.vsini
    ratio = dflt.vsini / same.vsini
    assert np.all(np.abs(ratio - np.sqrt(0.25 / 0.225)) < 0.02), ratio     # measured 1.061-1.064


def test_every_kind_broadens_or_refuses_clearly(cannon_model_dir, cannon_mock_stores, tmp_path):
    """Each registered kind either goes through the general kernel (vsini and LSF width for any kind) or
    its fitter refuses the option in one sentence, before a run starts a cluster."""
    from distlabels.config import RunConfig
    from distlabels.fit.kernel import SpectrumFitter as General
    from distlabels.fit.registry import check_fit_options, fitter_class
    from distlabels.models import load
    from distlabels.models.base import registered_kinds
    from distlabels.pipeline import run_fit

    # Contract for fitters other than the general kernel: declare fit_vsini unsupported, or FITS_VSINI = True.
    assert "cannon" in registered_kinds()
    for kind in registered_kinds():
        cls = fitter_class(kind)
        unsupported = getattr(cls, "UNSUPPORTED_OPTIONS", {})
        assert cls is General or "fit_vsini" in unsupported or getattr(cls, "FITS_VSINI", False), kind
        if "fit_vsini" in unsupported:
            with pytest.raises(DistlabelsError, match="does not support fit_vsini"):
                check_fit_options(kind, FitConfig(fit_vsini=True))
        else:
            check_fit_options(kind, FitConfig(fit_vsini=True, fit_lsf=True))
    model = load(cannon_model_dir)
    with pytest.raises(DistlabelsError, match="vsini as a label"):
        from distlabels.fit.registry import make_fitter

        make_fitter(model, np.linspace(5000, 6000, 300), config=FitConfig(fit_vsini=True))
    with pytest.raises(DistlabelsError, match="fit_vsini"):
        run_fit(cannon_model_dir, cannon_mock_stores["test"], tmp_path / "cat",
                RunConfig(fit=FitConfig(fit_vsini=True), progress=False))
    assert not (tmp_path / "cat").exists()                     # refused before anything was written


# ----- a model with a microturbulence label ---------------------------------------------------------
def _vmic_emulator():
    """An analytic emulator kind with labels (teff, logg, vmic): 20 lines of Gaussian opacity profiles
    with Doppler width b = sqrt(b_thermal^2 + vmic^2), flux exp(-tau) (strong lines saturate, so vmic
    changes their equivalent width), line strengths depending on teff and logg."""
    from distlabels.models.base import Emulator

    class Lines(Emulator):
        kind = "test-vmic-lines"

        def __init__(self, centres, s0, s_t, s_g, **common):
            super().__init__(**common)
            self.register_buffer("lam", torch.as_tensor(self.wavelength))
            for name, v in (("centres", centres), ("s0", s0), ("s_t", s_t), ("s_g", s_g)):
                self.register_buffer(name, torch.as_tensor(v))

        def forward(self, x):
            x = x.to(self.lam.dtype)
            phys = self.unscale(x)
            teff, logg, vmic = phys[:, :1], phys[:, 1:2], phys[:, 2:3]
            b = torch.sqrt(1.5**2 + vmic**2)                                   # km/s, (n, 1)
            strength = 10 ** (self.s0 + self.s_t * (teff - 4500) / 500 + self.s_g * (logg - 2))   # (n, n_line)
            dv = (self.lam[None, :, None] / self.centres[None, None, :] - 1) * C_KMS   # (1, n_pix, n_line)
            tau = (strength[:, None, :] / b[:, :, None] * torch.exp(-(dv / b[:, :, None]) ** 2)).sum(-1)
            return torch.exp(-tau)

    rng = np.random.default_rng(41)
    lam = np.linspace(5000.0, 5050.0, 5001)                    # vacuum, 0.01 A = 0.6 km/s pixels
    n_line = 20
    centres = np.sort(rng.uniform(5003, 5047, n_line))
    s0 = rng.uniform(-0.5, 1.5, n_line)                         # weak to strongly saturated lines
    s_t = rng.normal(0, 0.4, n_line)
    s_g = rng.normal(0, 0.3, n_line)
    train = rng.uniform([4000, 1.0, 0.5], [5000, 3.0, 3.0], size=(400, 3))
    return Lines(centres, s0, s_t, s_g, label_names=("teff", "logg", "vmic"), x_min=[4000, 1.0, 0.5],
                 x_max=[5000, 3.0, 3.0], wavelength_aa=lam, wavelength_medium="vacuum", training_labels=train)


def test_microturbulence_label_is_fitted_with_vsini(monkeypatch):
    """A model with a vmic label: vmic is fitted as a label, beside vsini, and both come back (S/N 100).

    Above S/N ~150 the mock's rotation (sampled kernel on the 0.6 km/s model grid) and the kernel's
    (Fourier, on its working grid) differ by ~1/300 of the continuum for these barely resolved lines
    (reduced chi^2 1.5-3.4 at S/N 300, vmic off by up to 5 sigma); at S/N 100 that is below the noise."""
    import distlabels.io.wavelength as wl

    model = _vmic_emulator()
    assert "vmic" in model.label_names
    # R 20000 sampled at 4.8 km/s pixels, 5005-5045 A
    monkeypatch.setitem(wl.SURVEY_GRIDS, "test-vmic", dict(kind="loglam", start_aa=5005.0, step_dex=7e-6,
                                                           n_pix=500, resolution=20000.0,
                                                           segments=((5000.0, 5050.0),)))
    truth = np.array([[4300.0, 1.6, 1.2], [4650.0, 2.4, 2.2], [4800.0, 1.8, 0.9], [4500.0, 2.7, 2.6]])
    vs = np.array([30.0, 45.0, 60.0, 25.0])
    table, meta = make_mock(model, MockConfig(n=4, seed=42, snr_min=100, snr_max=100, grid="test-vmic", rv_max_kms=20,
                                              continuum_degree=1), labels=truth, vsini_kms=vs)
    flux, ivar, mask = _arrays(table, meta)
    wave = np.asarray(meta["wavelength_aa"])
    res = fit_spectra(model, wave, flux, ivar, mask=mask, resolution=20000.0,
                      segments=meta["segments"], config=FitConfig(fit_vsini=True, masks="none", continuum_degree=1,
                                                                  library_size=32))
    pull = (res.labels - truth) / res.errors
    assert np.all(np.abs(pull) < 5), (res.labels, res.errors)
    assert np.all(np.abs(res.labels[:, 2] - truth[:, 2]) < 0.3), res.labels[:, 2]
    assert np.all(np.abs(res.vsini - vs) < np.maximum(5.0, 0.1 * vs)), res.vsini
