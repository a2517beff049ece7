"""The working grid: where the emulator is evaluated during a fit.

The emulator's own grid (e.g. 14,001 pixels, 0.5 A, air) is mapped once onto a uniform grid in
log10(wavelength) in vacuum that covers the observed pixels with room for a Doppler shift of
``v_max``, oversampling the observed pixels ``oversample`` times, convolved with the instrument's
line-spread function (Gaussian in ln(lambda), i.e. constant resolving power R). That linear map
``P`` (n_work, n_model) is folded into the emulator (an MLP's last layer becomes ``P @ W``), so
each fit iteration evaluates the network directly on ~2 x n_obs pixels instead of 14,001.

On a uniform log-lambda grid a radial velocity is a constant shift, so placing the model on the
observed pixels is one interpolation per pixel (cubic, 4 taps) with an offset shared by the whole
star, and broadening kernels (rotation, extra instrumental width) are convolutions
(:mod:`.broadening`). When no line-spread function is needed (the data are at the model's
resolution) the grid can instead be the model's own pixels (:func:`build_native_grid`), with linear
interpolation as on the model's grid. The observed data are never resampled (that would correlate
their noise).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..io.wavelength import C_KMS

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
LSF_HALF_WIDTH_SIGMA = 4.0


def log10_doppler(v_kms):
    """log10 of the relativistic Doppler factor sqrt((1 + b) / (1 - b)), b = v / c."""
    b = np.asarray(v_kms, dtype=np.float64) / C_KMS
    return 0.5 * (np.log10(1 + b) - np.log10(1 - b))


@dataclass(frozen=True)
class WorkingGrid:
    log10_start: float          # log10(Angstrom) of working pixel 0 (vacuum, rest frame)
    step_dex: float             # uniform step in log10(wavelength); for a native grid, the median step
    n_work: int
    covered: np.ndarray         # (n_work,) bool: the model fully covers this pixel's LSF
    projection: sp.csr_matrix   # (n_work, n_model) float64: model pixels -> working pixels
    sigma_ln: float | None      # Gaussian LSF sigma in ln(lambda); None: no broadening
    native: np.ndarray | None = None  # (n_work,) log10 wavelengths when the grid is the model's own pixels
    v_max_kms: float = 500.0    # |RV| the margins allow

    @property
    def uniform(self) -> bool:
        return self.native is None

    @property
    def log10_wavelength(self) -> np.ndarray:
        if self.native is not None:
            return self.native
        return self.log10_start + self.step_dex * np.arange(self.n_work)

    @property
    def dv_kms(self) -> float:
        """Velocity width of one working pixel (km/s); for a native grid, of the median pixel."""
        return float(C_KMS * np.log(10.0) * self.step_dex)

    def position(self, log10_wavelength_obs: np.ndarray) -> np.ndarray:
        """Fractional working-grid index of observed pixels at zero velocity: (n_pix,) float64."""
        lw = np.asarray(log10_wavelength_obs, dtype=np.float64)
        if self.native is not None:
            return np.interp(lw, self.native, np.arange(self.n_work), left=-1.0, right=self.n_work)
        return (lw - self.log10_start) / self.step_dex


def build_native_grid(model_wavelength_vac_aa: np.ndarray, obs_wavelength_vac_aa: np.ndarray, *,
                      v_max_kms: float = 500.0) -> WorkingGrid:
    """The model's own pixels (those within reach of the observed range at |v| <= v_max) as the grid.

    Used when no line-spread function has to be applied: the model is then interpolated linearly
    at each (Doppler-shifted) observed pixel, exactly as on its native grid.
    """
    lam_m = np.asarray(model_wavelength_vac_aa, dtype=np.float64)
    lam_o = np.asarray(obs_wavelength_vac_aa, dtype=np.float64)
    ok = np.isfinite(lam_o) & (lam_o > 0)
    if ok.sum() < 2:
        raise ValueError("the observed wavelength grid has fewer than two valid pixels")
    if np.any(np.diff(lam_m) <= 0):
        raise ValueError("the model wavelength grid must increase strictly")
    lm = np.log10(lam_m)
    margin = float(log10_doppler(v_max_kms))
    lo = max(int(np.searchsorted(lm, np.log10(lam_o[ok].min()) - margin)) - 3, 0)
    hi = min(int(np.searchsorted(lm, np.log10(lam_o[ok].max()) + margin)) + 3, len(lm))
    if hi - lo < 2:
        raise ValueError("the observed wavelength grid does not overlap the model's")
    rows = np.arange(hi - lo)
    proj = sp.csr_matrix((np.ones(hi - lo), (rows, rows + lo)), shape=(hi - lo, len(lm)))
    native = lm[lo:hi]
    step = float(np.median(np.diff(native)))
    return WorkingGrid(float(native[0]), step, hi - lo, ~gap_edges(native), proj, None, native, float(v_max_kms))


def gap_edges(log10_wavelength: np.ndarray, factor: float = 3.0) -> np.ndarray:
    """(n,) bool: pixels on either side of a gap in a model grid (a step over ``factor`` x the median).

    A grid with gaps (APOGEE's three chips) must not be interpolated across them: marking both
    edge pixels as not covered makes every observed pixel whose taps straddle a gap unusable.
    """
    lw = np.asarray(log10_wavelength, np.float64)
    out = np.zeros(len(lw), bool)
    if len(lw) < 3:
        return out
    d = np.diff(lw)
    big = np.flatnonzero(d > factor * np.median(d))
    out[big] = True
    out[big + 1] = True
    return out


def build_working_grid(model_wavelength_vac_aa: np.ndarray, obs_wavelength_vac_aa: np.ndarray, *,
                       resolution: float | None, model_resolution: float | None = None,
                       oversample: float = 2, v_max_kms: float = 500.0, pad_kms: float = 0.0) -> WorkingGrid:
    """Working grid and model->working projection for one observed grid.

    resolution: the observed spectra's resolving power R = lambda / FWHM (None: the model is
    already at the data's resolution, so only interpolate). model_resolution: the model's own R
    (None: effectively infinite); the LSF applied is the quadrature difference. pad_kms: extra
    margin on both ends (room for a broadening kernel).
    """
    lam_m = np.asarray(model_wavelength_vac_aa, dtype=np.float64)
    lam_o = np.asarray(obs_wavelength_vac_aa, dtype=np.float64)
    ok = np.isfinite(lam_o) & (lam_o > 0)
    if ok.sum() < 2:
        raise ValueError("the observed wavelength grid has fewer than two valid pixels")
    if np.any(np.diff(lam_m) <= 0):
        raise ValueError("the model wavelength grid must increase strictly")
    log_o = np.log10(lam_o[ok])
    steps = np.diff(np.sort(log_o))
    step_obs = float(np.median(steps[steps > 0]))
    step = step_obs / max(float(oversample), 1.0)

    sigma_ln = None
    if resolution is not None and np.isfinite(resolution) and resolution > 0:
        var = (1.0 / (FWHM_PER_SIGMA * resolution)) ** 2
        if model_resolution:
            var -= (1.0 / (FWHM_PER_SIGMA * model_resolution)) ** 2
        if var > 0:
            sigma_ln = float(np.sqrt(var))
    ln_m = np.log(lam_m)
    # The Gaussian must be resolved by the model's sampling to be summed on it.
    if sigma_ln is not None:
        sigma_ln = max(sigma_ln, float(np.max(np.diff(ln_m))))

    margin = float(log10_doppler(v_max_kms)) + float(log10_doppler(pad_kms)) + 4 * step
    start = float(log_o.min() - margin)
    n_work = int(np.ceil((log_o.max() + margin - start) / step)) + 2
    ln_w = (start + step * np.arange(n_work)) * np.log(10)

    if sigma_ln is None:
        # Linear interpolation of the model at each working pixel.
        j = np.clip(np.searchsorted(ln_m, ln_w) - 1, 0, len(ln_m) - 2)
        t = (ln_w - ln_m[j]) / (ln_m[j + 1] - ln_m[j])
        covered = (ln_w >= ln_m[0]) & (ln_w <= ln_m[-1])
        edge = gap_edges(ln_m)                                        # no interpolation across model gaps
        covered &= ~(edge[j] & edge[j + 1])
        t = np.clip(t, 0, 1)
        rows = np.repeat(np.arange(n_work), 2)
        cols = np.stack([j, j + 1], 1).ravel()
        vals = np.stack([1 - t, t], 1).ravel()
    else:
        half = LSF_HALF_WIDTH_SIGMA * sigma_ln
        lo = np.searchsorted(ln_m, ln_w - half)
        hi = np.searchsorted(ln_m, ln_w + half)
        covered = (ln_w - half >= ln_m[0]) & (ln_w + half <= ln_m[-1])
        width = int(max(np.max(hi - lo), 1))
        k = lo[:, None] + np.arange(width)[None]                     # (n_work, width) model indices
        valid = k < hi[:, None]
        kc = np.clip(k, 0, len(ln_m) - 1)
        dln = np.gradient(ln_m)                                       # quadrature weights in ln(lambda)
        w = np.exp(-0.5 * ((ln_m[kc] - ln_w[:, None]) / sigma_ln) ** 2) * dln[kc] * valid
        norm = w.sum(1, keepdims=True)
        w = np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)
        covered &= norm[:, 0] > 0
        rows = np.repeat(np.arange(n_work), width)[valid.ravel()]
        cols = kc.ravel()[valid.ravel()]
        vals = w.ravel()[valid.ravel()]
    proj = sp.csr_matrix((vals, (rows, cols)), shape=(n_work, len(lam_m)))
    return WorkingGrid(start, step, n_work, covered, proj, sigma_ln, None, float(v_max_kms))


def chebyshev_basis(wavelength_aa: np.ndarray, segments, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuum basis: Chebyshev T_0..T_degree on each segment, zero outside it.

    Returns (basis (n_pix, n_seg * (degree + 1)) float64, segment index per pixel (n_pix,), -1 if
    a pixel is in no segment). Pixels in no segment get no continuum and so weight 0 in the fit.
    """
    lam = np.asarray(wavelength_aa, dtype=np.float64)
    if degree < 0:
        return np.ones((len(lam), 1)), np.zeros(len(lam), dtype=int)
    if not segments:
        finite = lam[np.isfinite(lam)]
        segments = ((finite.min(), finite.max()),)
    seg_of = np.full(len(lam), -1, dtype=int)
    basis = np.zeros((len(lam), len(segments) * (degree + 1)))
    for s, (a, b) in enumerate(segments):
        inside = (lam >= a) & (lam <= b) & (seg_of < 0)
        seg_of[inside] = s
        if not inside.any():
            continue
        lo, hi = lam[inside].min(), lam[inside].max()
        x = 2 * (lam[inside] - lo) / max(hi - lo, 1e-12) - 1
        basis[inside, s * (degree + 1):(s + 1) * (degree + 1)] = np.polynomial.chebyshev.chebvander(x, degree)
    return basis, seg_of
