"""Mock surveys: emulator spectra made to look observed, with the truth kept beside them.

For each star: labels drawn from the model's own training labels; the emulator spectrum (air or
vacuum, model grid) moved to vacuum, convolved with a Gaussian line-spread function of the
survey's resolving power on the model's own grid, Doppler shifted by an RV in +-rv_max, sampled
at the survey's pixel centres, multiplied by a smooth continuum, and given Gaussian noise of the
chosen S/N per pixel (relative to the continuum). A few pixels are masked at random.

This path is written independently of the fit kernel's working grid (it convolves on the model
grid and interpolates each star with numpy), so a fit that recovers the truth checks both.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

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


def random_sky(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ra_deg, dec_deg) uniform on the sphere."""
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return ra, dec


def make_mock(model: Emulator, cfg: MockConfig, *, chunk: int = 500, progress=None, labels=None):
    """(pyarrow.Table, store meta dict) of a mock survey from ``model``.

    progress: optional callable(n_done) for a progress bar. labels: optional (n, n_labels)
    physical labels to use instead of drawing them (e.g. a few labels varied, the rest fixed).
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
    conv = lsf_matrix(lam_m, resolution) if resolution else None
    rv = np.zeros(n) if cfg.noiseless else rng.uniform(-cfg.rv_max_kms, cfg.rv_max_kms, n)
    snr = rng.uniform(cfg.snr_min, cfg.snr_max, n)
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
        if conv is not None:
            spec = (conv @ spec.T).T
        for k, s in enumerate(range(lo, hi)):
            f = np.interp(wave_vac / doppler[s], lam_m, spec[k], left=np.nan, right=np.nan)
            if cfg.noiseless:
                cont = np.ones(n_pix)
            else:
                a = rng.normal(0, [0.15, 0.05][: cfg.continuum_degree] + [0.02] * max(cfg.continuum_degree - 2, 0))
                cont = rng.uniform(0.5, 2.0) * (1 + np.polynomial.chebyshev.chebval(x, np.concatenate([[0], a])))
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
    meta = {
        "survey": "mock",
        "wavelength_aa": np.asarray(wave, np.float64).tolist(),
        "wavelength_medium": medium,
        "rv_frame": "observed",
        "resolution": resolution,
        "segments": [list(s) for s in segments] if segments else None,
        "label_names": list(model.label_names),
        "mock": {"model_id": model.model_id, "grid": cfg.grid, "n": n, "snr_range": [cfg.snr_min, cfg.snr_max],
                 "seed": cfg.seed, "rv_max_kms": cfg.rv_max_kms, "noiseless": cfg.noiseless},
    }
    return pa.table(cols), meta
