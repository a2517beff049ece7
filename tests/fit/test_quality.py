"""The kernel at production quality: broadening, resolution mismatch, CRB, label options, flags, a real
spectrum outside the emulator, and CPU vs CUDA. All against independent truths (mock labels made by
distlabels.mock, finite differences, repeated noise realisations, a real BOSS spectrum)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import Flag, SpectrumFitter, crb, fit_spectra
from distlabels.fit.masks import mask_windows, pixel_mask
from distlabels.io.store import list_to_numpy
from distlabels.io.wavelength import survey_grid
from distlabels.mock import make_mock

LAMOST = survey_grid("lamost")


def _arrays(table, meta):
    n = len(meta["wavelength_aa"])
    return list_to_numpy(table["flux"], n), list_to_numpy(table["ivar"], n), list_to_numpy(table["mask"], n, np.bool_)


def _truth(table, names):
    return np.stack([table[f"true_{n}"].to_numpy().astype(float) for n in names], 1)


def _with_training_labels(model, labels):
    """A shallow copy of the model whose training set (what make_mock draws from) is ``labels``."""
    m = copy.copy(model)
    m.training_labels = np.asarray(labels, np.float64)
    return m


def _inner_star(model, rng, margin=0.3):
    """Training labels of a star whose every scaled label lies within +-margin of the box centre."""
    x = model.scale(torch.as_tensor(model.training_labels)).numpy()
    ok = np.flatnonzero(np.all(np.abs(x) < margin, axis=1))
    if len(ok) == 0:   # 22 uniform labels: build one from the box instead
        lo, hi = model.label_bounds.T
        return lo + (hi - lo) * (0.5 + rng.uniform(-margin, margin, model.n_labels))
    return model.training_labels[ok[0]]


def test_broadening_jacobian_matches_finite_differences(bossbrain_model):
    """Analytic derivatives with vsini (q = vsini^2) and an extra LSF width (s = sigma^2) fitted."""
    # A float64 copy: converting the session's shared model and back changes its weights' memory layout
    # and so the float32 rounding of every later test.
    model = copy.deepcopy(bossbrain_model).double()
    wave, res, seg = LAMOST
    f = SpectrumFitter(model, wave, resolution=res, segments=seg,
                       config=FitConfig(fit_vsini=True, fit_lsf=True, library_size=16, cpu_matmul="torch"))
    fwd = f.fwd
    p = f.params_from(model.training_labels[:2], [13.3, -41.7], vsini_kms=[120.0, 35.0])
    p[:, fwd.i_s] = torch.tensor([900.0, 2500.0], dtype=torch.float64)
    p[:, fwd.i_c + 1] = 0.05
    _, jac = fwd.evaluate(p, jac=True)
    for k, h in [(0, 1e-6), (2, 1e-6), (fwd.i_v, 1e-4), (fwd.i_q, 1.0), (fwd.i_s, 1.0), (fwd.i_c + 1, 1e-6)]:
        dp = torch.zeros_like(p)
        dp[:, k] = h
        fd = (fwd.evaluate(p + dp, jac=False)[0] - fwd.evaluate(p - dp, jac=False)[0]) / (2 * h)
        np.testing.assert_allclose(jac[:, k].numpy(), fd.numpy(), atol=1e-6 * float(fd.abs().max()), rtol=0)
    # At vsini = 0 the q-derivative is finite and right (one-sided difference).
    p[:, fwd.i_q] = 0.0
    _, jac0 = fwd.evaluate(p, jac=True)
    dp = torch.zeros_like(p)
    dp[:, fwd.i_q] = 1.0
    fd = fwd.evaluate(p + dp, jac=False)[0] - fwd.evaluate(p, jac=False)[0]
    assert float(fd.abs().max()) > 0
    np.testing.assert_allclose(jac0[:, fwd.i_q].numpy(), fd.numpy(), atol=0.02 * float(fd.abs().max()), rtol=0)


def test_vsini_recovered_on_rotating_mocks(bossbrain_model):
    """Mocks broadened by an independently sampled rotation kernel: vsini 80-300 km/s comes back."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=8, seed=11, snr_min=100, snr_max=100, vsini_max_kms=300))
    flux, ivar, mask = _arrays(table, meta)
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, resolution=meta["resolution"],
                      segments=meta["segments"], config=FitConfig(fit_vsini=True))
    true_v = table["true_vsini"].to_numpy()
    fast = true_v > 80
    assert fast.sum() >= 4
    dev = (res.vsini - true_v)[fast]
    assert np.all(np.abs(dev) < np.maximum(4 * res.vsini_err[fast], 0.04 * true_v[fast])), (res.vsini, true_v)
    assert np.all(res.vsini >= 0) and np.all(res.vsini <= 500)


def test_resolution_mismatch_is_flagged_or_absorbed(bossbrain_model):
    """Mocks at R = 1350 fitted as R = 1800: flagged CHI2_HIGH; with fit_lsf the fitted R is 1350 and the
    labels are as good as their errors say (with 1800 * 1.3 = 2340 as the grid's own width, the fit can go
    both ways)."""
    table, meta = make_mock(bossbrain_model, MockConfig(n=8, seed=12, snr_min=120, snr_max=120, resolution=1350))
    flux, ivar, mask = _arrays(table, meta)
    kw = dict(resolution=1800.0, segments=meta["segments"])
    plain = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, **kw)
    assert np.mean((plain.flags & Flag.CHI2_HIGH) != 0) >= 0.85
    fitted = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, config=FitConfig(fit_lsf=True), **kw)
    assert np.mean((fitted.flags & Flag.CHI2_HIGH) != 0) == 0
    assert abs(np.median(fitted.resolution) - 1350) < 30
    assert np.all(np.abs(fitted.resolution - 1350) < 4 * fitted.resolution_err + 15)
    truth = _truth(table, bossbrain_model.label_names)
    inside = (fitted.labels_at_bound & 0b111) == 0          # teff, logg, mh not on a bound
    pull = (fitted.labels[inside, :3] - truth[inside, :3]) / fitted.errors[inside, :3]
    assert inside.sum() >= 4 and np.all(np.abs(pull) < 4.5), (pull, fitted.flags)


def test_crb_matches_scatter_of_repeated_fits(bossbrain_model):
    """One star, 160 noise realisations at S/N 50: the scatter of teff, logg, mh equals the CRB within 15 %."""
    rng = np.random.default_rng(3)
    star = _inner_star(bossbrain_model, rng)
    model = _with_training_labels(bossbrain_model, star[None])
    table, meta = make_mock(model, MockConfig(n=1, seed=4, noiseless=True))
    clean = list_to_numpy(table["flux"], len(meta["wavelength_aa"]))[0]
    n_real, snr = 160, 50.0
    flux = clean[None] + rng.normal(size=(n_real, len(clean))) / snr
    ivar = np.full_like(flux, snr**2)
    ok = np.isfinite(flux)
    wave, kw = meta["wavelength_aa"], dict(resolution=meta["resolution"], segments=meta["segments"])
    # Fit the labels this S/N measures to better than 0.07 of their range (as HotPayne chooses its labels
    # from the CRB); the others are held at the truth, so no fit ends on a bound.
    sd = crb(bossbrain_model, star, snr, wave, config=FitConfig(library_size=8), **kw)[0] / bossbrain_model.label_span
    names = bossbrain_model.label_names
    cfg = FitConfig(labels=tuple(n for n, s in zip(names, sd) if s < 0.07),
                    fix=tuple((n, float(v)) for n, v, s in zip(names, star, sd) if s >= 0.07))
    assert {"teff", "logg", "mh"} <= set(cfg.labels) and len(cfg.labels) >= 8
    fitter = SpectrumFitter(bossbrain_model, wave, config=cfg, **kw)
    res = fitter.fit(np.where(ok, flux, 0), np.where(ok, ivar, 0))
    bound = crb(bossbrain_model, star, snr, wave, fitter=fitter)[0]
    inside = (res.flags & Flag.AT_LABEL_BOUND) == 0
    assert inside.mean() > 0.95
    for j in range(3):
        scatter = np.std(res.labels[inside, j])
        assert abs(scatter / bound[j] - 1) < 0.15, (bossbrain_model.label_names[j], scatter, bound[j])
        # the formal errors are the bound evaluated at the fitted labels
        assert abs(np.median(res.errors[inside, j]) / bound[j] - 1) < 0.1


def test_label_subset_fix_and_ties(bossbrain_model):
    """Mock stars obeying the constraints: fitted labels recover the truth, tied labels share one value,
    held labels stay at their values with zero error, bounds hold."""
    rng = np.random.default_rng(5)
    names = list(bossbrain_model.label_names)
    base = bossbrain_model.training_labels[rng.choice(len(bossbrain_model.training_labels), 12)].copy()
    tie = ["mgm", "sim", "cam", "tim"]
    base[:, [names.index(n) for n in tie]] = base[:, [names.index("mgm")]]
    free = ["teff", "logg", "mh", "cm", "nm"] + tie
    med = np.median(bossbrain_model.training_labels, axis=0)
    for j, n in enumerate(names):
        if n not in free:
            base[:, j] = 0.0 if n in ("bam", "cem") else med[j]
    model = _with_training_labels(bossbrain_model, base)
    table, meta = make_mock(model, MockConfig(n=12, seed=6, snr_min=80, snr_max=80))
    flux, ivar, mask = _arrays(table, meta)
    cfg = FitConfig(labels=tuple(free), fix=(("bam", 0.0), ("cem", 0.0)), ties=(tuple(tie),))
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, config=cfg,
                      resolution=meta["resolution"], segments=meta["segments"])
    truth = _truth(table, names)
    ti = [names.index(n) for n in tie]
    np.testing.assert_allclose(res.labels[:, ti], res.labels[:, ti[:1]].repeat(len(ti), 1), atol=1e-4)
    np.testing.assert_allclose(res.errors[:, ti], res.errors[:, ti[:1]].repeat(len(ti), 1), rtol=1e-3)
    for n in ("bam", "cem"):
        np.testing.assert_allclose(res.labels[:, names.index(n)], 0.0, atol=1e-5)
        assert np.all(res.errors[:, names.index(n)] == 0)
    held = [j for j, n in enumerate(names) if n not in free and n not in ("bam", "cem")]
    np.testing.assert_allclose(res.labels[:, held], np.repeat(med[None, held], 12, 0), rtol=1e-4, atol=1e-4)
    inside = (res.flags & Flag.AT_LABEL_BOUND) == 0
    for n in ("teff", "logg", "mh", "mgm"):
        j = names.index(n)
        pull = (res.labels[inside, j] - truth[inside, j]) / res.errors[inside, j]
        assert np.all(np.abs(pull) < 4), (n, pull)
    lo, hi = bossbrain_model.label_bounds.T
    assert np.all(res.labels >= lo - 1e-6) and np.all(res.labels <= hi + 1e-6)
    with pytest.raises(DistlabelsError, match="unknown label"):
        SpectrumFitter(bossbrain_model, LAMOST[0], resolution=LAMOST[1], config=FitConfig(ties=(("mgm", "xx"),)))


def test_bounds_hold_at_low_snr(bossbrain_model):
    table, meta = make_mock(bossbrain_model, MockConfig(n=16, seed=8, snr_min=8, snr_max=8))
    flux, ivar, mask = _arrays(table, meta)
    res = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, resolution=meta["resolution"],
                      segments=meta["segments"])
    lo, hi = bossbrain_model.label_bounds.T
    assert np.all(np.isfinite(res.labels))
    assert np.all(res.labels >= lo - 1e-6) and np.all(res.labels <= hi + 1e-6)
    assert np.all(np.abs(res.rv) <= 500)
    at = (res.flags & Flag.AT_LABEL_BOUND) != 0
    assert np.array_equal(at, res.labels_at_bound != 0)
    # every label flagged on its bound really sits there
    for i in np.flatnonzero(at):
        for j in range(bossbrain_model.n_labels):
            if res.labels_at_bound[i] >> j & 1:
                assert min(abs(res.labels[i, j] - lo[j]), abs(res.labels[i, j] - hi[j])) < 1e-5 * (hi[j] - lo[j])


def test_default_masks_remove_sky_and_telluric_pixels(bossbrain_model):
    wave, res, seg = LAMOST
    windows = mask_windows("default", res)
    masked = pixel_mask(wave, windows)
    a_band = (wave > 7600) & (wave < 7690)
    na_d = (wave > 5891) & (wave < 5898)
    assert masked[a_band].all() and masked[na_d].all()
    assert 0.01 < masked.mean() < 0.06
    f_def = SpectrumFitter(bossbrain_model, wave, resolution=res, segments=seg, config=FitConfig(library_size=8))
    f_none = SpectrumFitter(bossbrain_model, wave, resolution=res, segments=seg,
                            config=FitConfig(library_size=8, masks="none"))
    assert not f_def.usable.numpy()[masked].any()
    assert f_none.usable.numpy()[masked].all()
    with pytest.raises(DistlabelsError, match="unknown mask"):
        mask_windows(("o2_a", "nonsense"))


def test_far_from_training_flag(bossbrain_model):
    """A model whose training set covers only Teff < 4400 K flags a 4900 K star; a 4200 K star is not."""
    tl = bossbrain_model.training_labels
    cool = _with_training_labels(bossbrain_model, tl[tl[:, 0] < 4400])
    pick = np.concatenate([np.flatnonzero(tl[:, 0] > 4850)[:3], np.flatnonzero((tl[:, 0] > 4150) & (tl[:, 0] < 4250))[:3]])
    table, meta = make_mock(_with_training_labels(bossbrain_model, tl[pick]), MockConfig(n=12, seed=9, snr_min=80,
                                                                                           snr_max=80))
    flux, ivar, mask = _arrays(table, meta)
    res = fit_spectra(cool, meta["wavelength_aa"], flux, ivar, mask=mask, resolution=meta["resolution"],
                      segments=meta["segments"])
    far = (res.flags & Flag.FAR_FROM_TRAINING) != 0
    hot = table["true_teff"].to_numpy() > 4800
    assert far[hot].mean() > 0.9
    assert far[~hot].mean() < 0.1


def test_real_boss_dwarf_is_flagged(bossbrain_model):
    """bossbrain's BOSS spectrum of a G1V dwarf lies outside the 4000-5000 K giant emulator: flagged, with the
    labels that hit the box named, and still a fit (finite labels, RV within the search range)."""
    bossbrain = pytest.importorskip("bossbrain")
    fits = pytest.importorskip("astropy.io.fits")
    path = os.path.join(os.path.dirname(bossbrain.__file__), "data", "spec-3586-55181-0500.fits")
    with fits.open(path) as hdul:
        coadd = hdul["COADD"].data
        wave = 10 ** coadd["loglam"].astype(np.float64)           # vacuum
        flux = coadd["flux"].astype(np.float32)[None]
        ivar = coadd["ivar"].astype(np.float32)[None]
        bad = (coadd["and_mask"] != 0)[None]
    res = fit_spectra(bossbrain_model, wave, flux, ivar, mask=bad, resolution=2000.0,
                      segments=((3550.0, 6300.0), (6300.0, 10400.0)))
    flags = int(res.flags[0])
    assert flags & Flag.AT_LABEL_BOUND and flags & Flag.CHI2_HIGH, Flag.describe(flags)
    assert res.labels_at_bound[0] & 1                 # teff: the dwarf is hotter than 5000 K
    assert np.all(np.isfinite(res.labels[0])) and abs(res.rv[0]) < 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_give_the_same_answer(bossbrain_model, mock_snr50):
    """Same spectra on CPU and CUDA, TF32 off, converged tightly (chi2_tol 0.01: with the default 1.0 the
    stopping point may differ by a few tenths of a sigma between two rounding paths through a piecewise-
    linear network). Tolerance: labels within 0.02 sigma at the median and 0.2 sigma for 95 % of the
    stars; errors within 0.5 % at the median, 2 % for 90 % of the stars and 25 % for every star. A
    LeakyReLU emulator's minimum often sits on a kink, where J (hence the errors) jumps: on the H100 three
    of 48 stars ended within 0.01 sigma of the CPU's labels with Teff errors 6-17 % apart, and the CPU's own
    Fisher matrix 0.001-0.01 sigma from its minimum gives exactly those other values
    (benchmarks/gpu_agree.py; RESULTS.md)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    table, meta = mock_snr50
    flux, ivar, mask = _arrays(table.slice(0, 48), meta)
    kw = dict(resolution=meta["resolution"], segments=meta["segments"], config=FitConfig(chi2_tol=0.01, max_iter=60))
    cpu = fit_spectra(bossbrain_model, meta["wavelength_aa"], flux, ivar, mask=mask, device="cpu", **kw)
    try:
        gpu = fit_spectra(bossbrain_model.to("cuda"), meta["wavelength_aa"], flux, ivar, mask=mask, device="cuda", **kw)
    finally:
        bossbrain_model.to("cpu")
    same = (cpu.flags == gpu.flags) & ((cpu.labels_at_bound & 0b111) == 0)
    assert same.mean() > 0.8
    d = (np.abs(cpu.labels[same] - gpu.labels[same]) / cpu.errors[same].clip(1e-12))[:, :3]
    assert np.median(d) < 0.02 and np.percentile(d, 95) < 0.2, d
    ratio = np.abs(gpu.errors[same][:, :3] / cpu.errors[same][:, :3] - 1)
    assert np.median(ratio) < 0.005 and (ratio.max(1) < 0.02).mean() >= 0.9 and ratio.max() < 0.25, ratio
    np.testing.assert_allclose(gpu.rv[same], cpu.rv[same], atol=0.2 * float(np.median(cpu.rv_err)))


def _quadratic_emulator():
    """A stand-in emulator kind with no fast paths: quadratic in 3 labels (a Cannon-like model)."""
    from distlabels.models.base import Emulator

    class Quadratic(Emulator):
        kind = "test-quadratic"

        def __init__(self, coef, **common):
            super().__init__(**common)
            self.register_buffer("coef", coef)

        def forward(self, x):
            x = x.to(self.coef.dtype)
            v = torch.cat([torch.ones_like(x[:, :1]), x, x * x, x[:, :1] * x[:, 1:2]], 1)   # (n, 8)
            return v @ self.coef.T

    rng = np.random.default_rng(21)
    lam = np.linspace(5000.0, 5200.0, 4001)                      # vacuum, 0.05 A
    lines = rng.uniform(5005, 5195, size=(40, 1))
    prof = np.exp(-0.5 * ((lam[None] - lines) / 0.12) ** 2)        # unresolved at R = 5000
    coef = np.zeros((len(lam), 8))
    coef[:, 0] = 1 - 0.3 * prof[:20].sum(0)
    coef[:, 1] = -0.2 * prof[20:30].sum(0)
    coef[:, 2] = -0.2 * prof[30:].sum(0)
    coef[:, 3] = -0.1 * prof[:10].sum(0)
    coef[:, 4:] = -0.05 * prof[10:14].sum(0)[:, None]
    train = rng.uniform([4000, 1, -1], [5000, 3, 0.5], size=(500, 3))
    return Quadratic(torch.as_tensor(coef, dtype=torch.float64), label_names=("teff", "logg", "mh"),
                     x_min=[4000, 1, -1], x_max=[5000, 3, 0.5], wavelength_aa=lam, wavelength_medium="vacuum",
                     training_labels=train)


def test_any_emulator_kind_fits_through_the_generic_paths():
    """A kind with only ``forward`` (autograd Jacobian, wrapped projection and label map) fits, with vsini."""
    model = _quadratic_emulator()
    model_mock = _with_training_labels(model, model.training_labels[:6])
    wave = 5010 * 10 ** (2e-5 * np.arange(7500))                    # log-uniform, 5010-5183 A
    wave = wave[wave < 5190]
    from distlabels.config import MockConfig as MC
    import distlabels.io.wavelength as wl
    grid = dict(kind="loglam", start_aa=5010.0, step_dex=2e-5, n_pix=len(wave), resolution=5000.0,
                segments=((5000.0, 5200.0),))
    wl.SURVEY_GRIDS["test-quad"] = grid
    try:
        table, meta = make_mock(model_mock, MC(n=6, seed=23, snr_min=200, snr_max=200, grid="test-quad",
                                               rv_max_kms=30, vsini_max_kms=60))
    finally:
        del wl.SURVEY_GRIDS["test-quad"]
    flux, ivar, mask = _arrays(table, meta)
    res = fit_spectra(model, meta["wavelength_aa"], flux, ivar, mask=mask, resolution=5000.0, segments=meta["segments"],
                      config=FitConfig(fit_vsini=True, library_size=256, masks="none"))
    truth = _truth(table, model.label_names)
    pull = (res.labels - truth) / res.errors
    assert np.all(np.abs(pull) < 5), pull
    assert np.all(np.abs(res.rv - table["true_rv"].to_numpy()) < 5 * res.rv_err + 0.2)
