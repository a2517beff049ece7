"""Mock surveys: emulator spectra made to look observed, with the truth kept beside them.

For each star: labels drawn from the model's own training labels; the emulator spectrum (air or
vacuum, model grid) moved to vacuum, optionally broadened by rotation (vsini, linear limb
darkening; a sampled kernel convolved on a fine uniform velocity grid), convolved with a Gaussian
line-spread function of the survey's resolving power on the model's own grid, Doppler shifted by
an RV in +-rv_max and sampled at the survey's pixel centres by a cubic spline (the convolved
spectrum is smooth on the model grid; linear interpolation there would add errors of ~1e-3 of
the continuum, a tenth of the noise at S/N 100), multiplied by a smooth continuum (or 1 for
pre-normalised spectra), and given Gaussian noise of the chosen S/N per pixel (relative to the
continuum). A few pixels are masked at random. On the model's own grid (no line-spread function)
the shifted spectrum is interpolated linearly, as The Payne does.

This path is written independently of the fit kernel (it convolves on the model grid, rotates
with a sampled kernel and interpolates each star with scipy), so a fit that recovers the truth
checks both.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from scipy.interpolate import CubicSpline

from .config import MockConfig
from .io.store import list_column
from .io.wavelength import C_KMS, survey_grid, to_vacuum
from .models.base import Emulator

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def lsf_matrix(wavelength_aa: np.ndarray, resolution: float) -> sp.csr_matrix:
    """(n, n) Gaussian convolution on a (possibly non-uniform) grid, sigma = lambda / (2.355 R)."""
    lam = np.asarray(wavelength_aa, np.float64)
    sigma = lam / (FWHM_PER_SIGMA * resolution)
    dlam = np.gradient(lam)
    half = int(np.ceil(np.max(4 * sigma / dlam)))
    rows, cols, vals = [], [], []
    for k in range(-half, half + 1):
        i = np.arange(max(0, -k), min(len(lam), len(lam) - k))
        j = i + k
        rows.append(i)
        cols.append(j)
        vals.append(np.exp(-0.5 * ((lam[j] - lam[i]) / sigma[i]) ** 2) * dlam[j])
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lam),) * 2)
    norm = np.asarray(m.sum(1)).ravel()
    return sp.diags(1.0 / norm) @ m


def rotate(wavelength_aa: np.ndarray, flux: np.ndarray, vsini_kms: float, limb_darkening: float = 0.6,
           dv_kms: float = 1.0) -> np.ndarray:
    """Rotationally broadened flux on the same grid: the classical profile (Gray) with linear limb
    darkening, sampled every ``dv_kms`` on a uniform ln(lambda) grid and convolved there."""
    if vsini_kms <= 2 * dv_kms:
        return flux
    from scipy.signal import fftconvolve

    lnw = np.log(wavelength_aa)
    step = dv_kms / C_KMS
    fine = np.arange(lnw[0], lnw[-1], step)
    # Cubic, not linear: a piecewise-linear model between pixels would itself broaden the lines
    # (by ~pixel/sqrt(6) in sigma, 10-20 km/s on a 0.5 A grid) and bias vsini high.
    f = CubicSpline(lnw, flux)(fine)
    m = int(np.ceil(vsini_kms / dv_kms))
    u = np.arange(-m, m + 1) * dv_kms / vsini_kms
    inside = np.abs(u) < 1
    eps = limb_darkening
    k = np.where(inside, 2 * (1 - eps) * np.sqrt(np.clip(1 - u * u, 0, None)) + 0.5 * np.pi * eps * (1 - u * u), 0.0)
    k /= k.sum()
    pad = np.pad(f - 1, m, mode="constant")
    broad = fftconvolve(pad, k, mode="same")[m:-m] + 1
    return CubicSpline(fine, broad)(lnw)


def random_sky(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ra_deg, dec_deg) uniform on the sphere."""
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return ra, dec


def make_mock(model: Emulator, cfg: MockConfig, *, chunk: int = 500, progress=None, labels=None, vsini_kms=None):
    """(pyarrow.Table, store meta dict) of a mock survey from ``model``.

    progress: optional callable(n_done) for a progress bar. labels: optional (n, n_labels)
    physical labels to use instead of drawing them (e.g. a few labels varied, the rest fixed).
    vsini_kms: optional (n,) rotational velocities (km/s) instead of drawing them from
    ``cfg.vsini_max_kms`` (e.g. a chosen ladder of vsini; kept as ``true_vsini``).
    """
    rng = np.random.default_rng(cfg.seed)
    n = int(cfg.n)
    tl = model.training_labels
    if labels is not None:
        labels = np.asarray(labels, np.float64)
        if labels.shape != (n, model.n_labels):
            raise ValueError(f"labels must be (n={n}, {model.n_labels}); got {labels.shape}")
    elif cfg.labels_from == "uniform":
        lo, hi = model.label_bounds.T
        labels = rng.uniform(lo, hi, size=(n, model.n_labels))
    elif len(tl) == 0:
        lo, hi = model.label_bounds.T
        labels = rng.uniform(lo, hi, size=(n, model.n_labels))
    else:
        labels = tl[rng.choice(len(tl), size=n, replace=len(tl) < n)]
    if cfg.grid == "model":
        wave, resolution, segments, medium = model.wavelength, None, None, model.wavelength_medium
    else:
        wave, resolution, segments = survey_grid(cfg.grid)
        medium = "vacuum"
    wave_vac = to_vacuum(wave, medium)
    lam_m = to_vacuum(model.wavelength, model.wavelength_medium)
    if cfg.resolution is not None and cfg.grid != "model":
        resolution = float(cfg.resolution)
    conv = lsf_matrix(lam_m, resolution) if resolution else None
    rv = np.zeros(n) if cfg.noiseless else rng.uniform(-cfg.rv_max_kms, cfg.rv_max_kms, n)
    snr = rng.uniform(cfg.snr_min, cfg.snr_max, n)
    vsini = rng.uniform(0, cfg.vsini_max_kms, n) if cfg.vsini_max_kms > 0 else np.zeros(n)
    if vsini_kms is not None:
        vsini = np.broadcast_to(np.asarray(vsini_kms, np.float64), (n,)).copy()
        if not np.all(np.isfinite(vsini) & (vsini >= 0)):
            raise ValueError("vsini_kms must be finite and >= 0")
    rotating = bool(np.any(vsini > 0))
    beta = rv / C_KMS
    doppler = np.sqrt((1 + beta) / (1 - beta))
    x = 2 * (wave_vac - wave_vac.min()) / (wave_vac.max() - wave_vac.min()) - 1
    n_pix = len(wave)
    flux = np.empty((n, n_pix), np.float32)
    ivar = np.empty((n, n_pix), np.float32)
    mask = np.zeros((n, n_pix), bool)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        spec = model.predict(labels[lo:hi])                                 # (m, n_model)
        if rotating:
            spec = np.stack([rotate(lam_m, sp, v, cfg.limb_darkening) for sp, v in zip(spec, vsini[lo:hi])])
        if conv is not None:
            spec = (conv @ spec.T).T
            coef = CubicSpline(lam_m, spec.T, axis=0).c                     # (4, n_model - 1, m)
        for k, s in enumerate(range(lo, hi)):
            at = wave_vac / doppler[s]
            if conv is not None:
                inside = (at >= lam_m[0]) & (at <= lam_m[-1])
                j = np.clip(np.searchsorted(lam_m, at[inside]) - 1, 0, len(lam_m) - 2)
                t = at[inside] - lam_m[j]
                f = np.full(n_pix, np.nan)
                f[inside] = ((coef[0, j, k] * t + coef[1, j, k]) * t + coef[2, j, k]) * t + coef[3, j, k]
            else:
                f = np.interp(at, lam_m, spec[k], left=np.nan, right=np.nan)
            if cfg.noiseless:
                cont = np.ones(n_pix)
            else:
                a = rng.normal(0, [0.15, 0.05][: cfg.continuum_degree] + [0.02] * max(cfg.continuum_degree - 2, 0))
                cont = rng.uniform(0.5, 2.0) * (1 + np.polynomial.chebyshev.chebval(x, np.concatenate([[0], a])))
                if cfg.normalized:
                    cont = np.ones(n_pix)
            sigma = cont / snr[s]
            obs = cont * f
            if not cfg.noiseless:
                obs = obs + rng.normal(size=n_pix) * sigma
            iv = 1.0 / sigma**2
            bad = ~np.isfinite(obs)
            if cfg.masked_fraction > 0 and not cfg.noiseless:
                bad |= rng.random(n_pix) < cfg.masked_fraction
            iv[bad] = 0.0
            flux[s], ivar[s], mask[s] = obs, iv, bad
        if progress:
            progress(hi - lo)
    ra, dec = random_sky(n, rng)
    cols = {
        "source_id": pa.array([f"mock:{cfg.seed}:{i:08d}" for i in range(n)]),
        "survey": pa.array(["mock"] * n),
        "ra": pa.array(ra),
        "dec": pa.array(dec),
        "snr": pa.array(snr.astype(np.float32)),
        "flux": list_column(flux),
        "ivar": list_column(ivar),
        "mask": list_column(mask, pa.bool_()),
    }
    for j, name in enumerate(model.label_names):
        cols[f"true_{name}"] = pa.array(labels[:, j].astype(np.float32))
    cols["true_rv"] = pa.array(rv.astype(np.float32))
    if rotating or cfg.vsini_max_kms > 0:
        cols["true_vsini"] = pa.array(vsini.astype(np.float32))
    meta = {
        "survey": "mock",
        "wavelength_aa": np.asarray(wave, np.float64).tolist(),
        "wavelength_medium": medium,
        "rv_frame": "observed",
        "resolution": resolution,
        "segments": [list(s) for s in segments] if segments else None,
        "label_names": list(model.label_names),
        "mock": {"model_id": model.model_id, "grid": cfg.grid, "n": n, "snr_range": [cfg.snr_min, cfg.snr_max],
                 "seed": cfg.seed, "rv_max_kms": cfg.rv_max_kms, "noiseless": cfg.noiseless,
                 "normalized": cfg.normalized, "resolution": resolution, "vsini_max_kms": cfg.vsini_max_kms,
                 "limb_darkening": cfg.limb_darkening},
    }
    return pa.table(cols), meta
