"""Our own implementation of The Payne's published fitter (Ting et al. 2019), the speed baseline.

The method, as the reference code runs it (tingyuansen/The_Payne, ``fitting.py``):

* one spectrum at a time, ``scipy.optimize.curve_fit(method="trf")`` with a 2-point
  finite-difference Jacobian, ``ftol = xtol = 5e-4``, ``absolute_sigma=True``;
* parameters: the scaled labels, bounded to [-0.5, 0.5], and the RV, bounded to +-5 km/s; ONE start
  at the centre of the box (scaled labels 0, RV 0);
* the model: the network (float64) on its own grid, Doppler shifted by the relativistic factor and
  linear interpolation on the model grid; spectra pre-normalised (no continuum in the fit);
* masked pixels get an error of 999;
* errors sqrt(diag(pcov)), pcov = (J^T J)^-1 with J the Jacobian weighted by 1/sigma, not rescaled.

When the observed pixels are not the model's (a survey grid), a user of The Payne resamples the
network output each call: the model spectrum is convolved to the instrument's resolving power on
the model grid (a sparse matrix built once) and interpolated linearly at the Doppler-shifted
observed wavelengths. That is what ``ReferencePayne(..., resolution=R)`` does. ``folded=True``
instead folds that (linear) resampling into the network's last layer once, as if the network had
been trained on the survey's pixels: the reference at its most favourable.

Pure numpy/scipy, float64, one thread when the caller sets OMP/MKL/OPENBLAS_NUM_THREADS=1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

C_KMS = 299792.458
ERR_MASKED = 999.0


@dataclass
class ReferenceResult:
    labels: np.ndarray      # (n, n_labels) physical
    errors: np.ndarray      # (n, n_labels)
    rv: np.ndarray          # (n,) km/s
    rv_err: np.ndarray
    n_eval: np.ndarray      # network evaluations per star
    seconds: np.ndarray     # wall time per star
    at_bound: np.ndarray    # (n,) bool: a label or the RV on its bound


class ReferencePayne:
    """The Payne's fitter for one emulator and one observed grid.

    weights, biases: the MLP's layers (torch (out, in) layout), LeakyReLU(0.01) between them;
    x_min, x_max: label scaling; model_wavelength_vac: (n_model,) vacuum Angstrom;
    obs_wavelength_vac: (n_pix,) or None (the data are on the model grid); resolution: R of the
    data when they are not at the model's resolution (a Gaussian LSF on the model grid).
    """

    def __init__(self, weights, biases, x_min, x_max, model_wavelength_vac, obs_wavelength_vac=None,
                 resolution: float | None = None, folded: bool = False, negative_slope: float = 0.01,
                 rv_bound_kms: float = 5.0, tol: float = 5e-4):
        self.w = [np.ascontiguousarray(np.asarray(w, np.float64)) for w in weights]
        self.b = [np.asarray(b, np.float64) for b in biases]
        self.x_min, self.x_max = np.asarray(x_min, np.float64), np.asarray(x_max, np.float64)
        self.lam_m = np.asarray(model_wavelength_vac, np.float64)
        self.lam_o = None if obs_wavelength_vac is None else np.asarray(obs_wavelength_vac, np.float64)
        self.slope = float(negative_slope)
        self.rv_bound, self.tol = float(rv_bound_kms), float(tol)
        self.conv = None
        if resolution:
            from distlabels.mock import lsf_matrix   # a plain Gaussian convolution matrix on the model grid

            self.conv = lsf_matrix(self.lam_m, resolution).tocsr()
        self.folded = bool(folded) and self.lam_o is not None
        if self.folded:
            # Resampling at zero velocity folded into the last layer: out = M (W h + b). The RV then
            # moves the observed spectrum on its own grid, as The Payne does on the model grid.
            m = self._interp_matrix(self.lam_o)
            if self.conv is not None:
                m = m @ self.conv
            self.w[-1] = np.ascontiguousarray(m @ self.w[-1])
            self.b[-1] = m @ self.b[-1]
            self.conv = None
        self.n_eval = 0

    def _interp_matrix(self, at):
        import scipy.sparse as sp

        j = np.clip(np.searchsorted(self.lam_m, at) - 1, 0, len(self.lam_m) - 2)
        t = np.clip((at - self.lam_m[j]) / (self.lam_m[j + 1] - self.lam_m[j]), 0, 1)
        rows = np.repeat(np.arange(len(at)), 2)
        return sp.csr_matrix((np.stack([1 - t, t], 1).ravel(), (rows, np.stack([j, j + 1], 1).ravel())),
                             shape=(len(at), len(self.lam_m)))

    def network(self, x: np.ndarray) -> np.ndarray:
        """Scaled labels (n_labels,) -> flux on the model grid (or the folded observed grid)."""
        self.n_eval += 1
        h = x
        for w, b in zip(self.w[:-1], self.b[:-1]):
            z = w @ h + b
            h = np.where(z > 0, z, self.slope * z)
        return self.w[-1] @ h + self.b[-1]

    def model(self, x: np.ndarray, rv: float) -> np.ndarray:
        """Model on the observed pixels at scaled labels x and RV (km/s)."""
        f = self.network(x)
        doppler = np.sqrt((1 - rv / C_KMS) / (1 + rv / C_KMS))
        if self.folded:
            return np.interp(self.lam_o * doppler, self.lam_o, f)
        if self.conv is not None:
            f = self.conv @ f
        if self.lam_o is None:
            return np.interp(self.lam_m * doppler, self.lam_m, f)
        return np.interp(self.lam_o * doppler, self.lam_m, f)

    def fit_one(self, flux: np.ndarray, err: np.ndarray):
        """popt (scaled labels + RV), pcov for one pre-normalised spectrum with per-pixel errors."""
        n_lab = len(self.x_min)
        p0 = np.zeros(n_lab + 1)
        lo = np.full(n_lab + 1, -0.5)
        hi = np.full(n_lab + 1, 0.5)
        lo[-1], hi[-1] = -self.rv_bound, self.rv_bound

        def f(_, *p):
            return self.model(np.asarray(p[:-1]), p[-1])

        popt, pcov = curve_fit(f, xdata=[], ydata=flux, sigma=err, p0=p0, bounds=(lo, hi), ftol=self.tol,
                               xtol=self.tol, absolute_sigma=True, method="trf")
        return popt, pcov

    def fit(self, flux: np.ndarray, ivar: np.ndarray, mask=None, progress=None) -> ReferenceResult:
        """Fit each row of flux, ivar (n, n_pix); mask True = bad. Labels in physical units."""
        n, n_lab = len(flux), len(self.x_min)
        span = self.x_max - self.x_min
        out = ReferenceResult(np.full((n, n_lab), np.nan), np.full((n, n_lab), np.nan), np.full(n, np.nan),
                              np.full(n, np.nan), np.zeros(n, int), np.zeros(n), np.zeros(n, bool))
        for i in range(n):
            bad = ~np.isfinite(flux[i]) | ~(ivar[i] > 0)
            if mask is not None:
                bad |= mask[i]
            err = np.where(bad, ERR_MASKED, 1.0 / np.sqrt(np.where(bad, 1.0, ivar[i])))
            y = np.where(bad, 1.0, flux[i])
            self.n_eval = 0
            t0 = time.perf_counter()
            popt, pcov = self.fit_one(y, err)
            out.seconds[i] = time.perf_counter() - t0
            out.n_eval[i] = self.n_eval
            sd = np.sqrt(np.clip(np.diag(pcov), 0, None))
            out.labels[i] = (popt[:-1] + 0.5) * span + self.x_min
            out.errors[i] = sd[:-1] * span
            out.rv[i], out.rv_err[i] = popt[-1], sd[-1]
            out.at_bound[i] = np.any(np.abs(popt[:-1]) >= 0.5 - 1e-6) or abs(popt[-1]) >= self.rv_bound - 1e-6
            if progress:
                progress(1)
        return out


def from_model(model, obs_wavelength_aa=None, obs_medium: str = "vacuum", resolution=None, folded=False):
    """A ReferencePayne from a distlabels PayneMLP (weights, scaling and grid)."""
    from distlabels.io.wavelength import to_vacuum

    lam_m = to_vacuum(model.wavelength, model.wavelength_medium)
    lam_o = None if obs_wavelength_aa is None else to_vacuum(np.asarray(obs_wavelength_aa), obs_medium)
    return ReferencePayne([w.detach().cpu().numpy() for w in model.weights],
                          [b.detach().cpu().numpy() for b in model.biases], model.x_min.cpu().numpy(),
                          model.x_max.cpu().numpy(), lam_m, lam_o, resolution=resolution, folded=folded,
                          negative_slope=model.negative_slope)
