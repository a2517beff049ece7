"""Pseudo-continuum normalisation that a data-driven model stores, so training and test agree.

The Cannon models *normalised* flux, so its training spectra and every spectrum it is later
fitted to must be normalised by exactly the same procedure. :class:`PseudoContinuum` is that
procedure, stored with the model: a Chebyshev polynomial of ``degree`` per segment (instrument
arm or chip, observed-frame wavelength bounds), fitted by inverse-variance-weighted linear least
squares to the *continuum pixels* only. Continuum pixels are a boolean mask over the model's
rest-frame grid, chosen once from the training set; an observed pixel counts as a continuum pixel
when its rest-frame wavelength (after removing the star's RV) falls within half a model pixel of
one. The fit is linear in the data (no quantiles or medians of the data the model sees).

:func:`rough_continuum` is the crude, clipped upper-envelope fit used only to *choose* continuum
pixels and to prepare a spectrum for the RV cross-correlation; it never normalises what a model
is trained on or fitted to.

All arrays are batched over stars: flux, ivar (n_star, n_pix); wavelengths in Angstrom, vacuum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.wavelength import C_KMS


def chebyshev_design(wavelength_aa: np.ndarray, segments, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """(basis (n_pix, n_seg * (degree + 1)), segment index per pixel (n_pix,), -1 outside all).

    The Chebyshev variable runs from -1 to 1 over each segment's *stated* bounds (not the data's
    extremes), so two spectra on one grid always share one basis.
    """
    lam = np.asarray(wavelength_aa, np.float64)
    k = degree + 1
    basis = np.zeros((len(lam), len(segments) * k))
    seg_of = np.full(len(lam), -1)
    for s, (lo, hi) in enumerate(segments):
        inside = (lam >= lo) & (lam <= hi) & (seg_of < 0)
        seg_of[inside] = s
        x = 2 * (lam[inside] - lo) / max(hi - lo, 1e-12) - 1
        basis[inside, s * k:(s + 1) * k] = np.polynomial.chebyshev.chebvander(x, degree)
    return basis, seg_of


def _packed_outer(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n_pix, K*K) products B_i B_j of a basis, with the (i, j) index vectors."""
    K = basis.shape[1]
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    return basis[:, i] * basis[:, j], i, j


def weighted_polyfit(flux: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-10,
                     return_cov: bool = False):
    """Per-star weighted least squares of flux ~ basis @ c: coefficients (n, K) float64 (and, with
    return_cov, their covariance (n, K, K) for inverse-variance weights).

    One matrix product builds every star's normal equations: (n, n_pix) @ (n_pix, K*K).
    A tiny ridge keeps a segment without weight from making the system singular (its
    coefficients then come out 0; the caller checks coverage).
    """
    bb, _, _ = _packed_outer(basis)
    K = basis.shape[1]
    lhs = (weight @ bb).reshape(-1, K, K)
    rhs = (weight * flux) @ basis
    scale = lhs.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-30)
    lhs = lhs + ridge * scale[:, None, None] * torch.eye(K, dtype=lhs.dtype, device=lhs.device)
    coeffs = torch.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]
    return (coeffs, torch.linalg.inv(lhs)) if return_cov else coeffs


def rough_continuum(flux, ivar, wavelength_aa, segments, degree: int = 3, n_iter: int = 8,
                    clip_sigma: float = 1.0):
    """Clipped upper-envelope Chebyshev fit per segment: continuum (n, n_pix) float64 torch.

    Points more than ``clip_sigma`` noise sigmas below the current fit (absorption lines) are
    dropped and the fit repeated. Used only to choose continuum pixels and to prepare spectra for
    a cross-correlation.
    """
    f = torch.as_tensor(np.asarray(flux), dtype=torch.float64)
    w0 = torch.as_tensor(np.asarray(ivar), dtype=torch.float64)
    w0 = torch.where(torch.isfinite(f) & torch.isfinite(w0) & (w0 > 0), w0, torch.zeros_like(w0))
    f = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    basis_np, seg_of = chebyshev_design(wavelength_aa, segments, degree)
    basis = torch.as_tensor(basis_np)
    w = w0.clone()
    cont = torch.ones_like(f)
    for _ in range(n_iter):
        c = weighted_polyfit(f, w, basis)
        cont = c @ basis.T
        keep = f >= cont - clip_sigma / torch.sqrt(w0.clamp_min(1e-30))
        w = torch.where(keep, w0, torch.zeros_like(w0))
    cont = torch.where(torch.as_tensor(seg_of >= 0)[None], cont, torch.ones_like(cont))
    return cont


@dataclass(frozen=True)
class PseudoContinuum:
    """The stored normalisation of a data-driven model (see the module docstring).

    model_wavelength_vac_aa: (n_model,) the model's rest-frame grid in vacuum, increasing;
    mask: (n_model,) bool, True at continuum pixels; segments: ((lo_aa, hi_aa), ...) observed-frame
    vacuum bounds of each independently fitted segment; degree: Chebyshev degree per segment.
    """

    model_wavelength_vac_aa: np.ndarray
    mask: np.ndarray
    segments: tuple[tuple[float, float], ...]
    degree: int = 3
    min_pixels_per_segment: int = 10

    @property
    def n_coeff(self) -> int:
        return len(self.segments) * (self.degree + 1)

    def to_meta(self) -> dict:
        return {"method": "chebyshev-continuum-pixels", "degree": int(self.degree),
                "segments_vac_aa": [list(map(float, s)) for s in self.segments],
                "n_continuum_pixels": int(np.sum(self.mask)),
                "min_pixels_per_segment": int(self.min_pixels_per_segment)}

    def continuum_pixels(self, wavelength_vac_aa: np.ndarray, rv_kms) -> torch.Tensor:
        """(n, n_pix) bool: observed pixels that are continuum pixels at each star's RV (n,) km/s."""
        lam = torch.as_tensor(np.asarray(wavelength_vac_aa, np.float64))
        rv = torch.as_tensor(np.atleast_1d(np.asarray(rv_kms, np.float64)))
        b = rv / C_KMS
        dop = torch.sqrt((1 + b) / (1 - b))
        rest = lam[None] / dop[:, None]                                          # (n, n_pix)
        grid = torch.as_tensor(self.model_wavelength_vac_aa)
        pos = fractional_index(grid, rest)
        k = pos.round().long().clamp(0, len(grid) - 1)
        inside = (pos > -0.5) & (pos < len(grid) - 0.5)
        return inside & torch.as_tensor(self.mask)[k]

    def fit(self, flux, ivar, wavelength_vac_aa, rv_kms, good=None, return_cov: bool = False):
        """Continuum of each star: (cont (n, n_pix) float64, coeffs (n, K), ok (n, n_pix) bool).

        ``ok`` is False for pixels outside every segment and in segments with fewer than
        ``min_pixels_per_segment`` usable continuum pixels for that star (those pixels cannot be
        normalised and must get weight 0).
        """
        f = torch.as_tensor(np.asarray(flux), dtype=torch.float64)
        w = torch.as_tensor(np.asarray(ivar), dtype=torch.float64)
        usable = torch.isfinite(f) & torch.isfinite(w) & (w > 0)
        if good is not None:
            usable &= torch.as_tensor(np.asarray(good), dtype=torch.bool)
        cpix = self.continuum_pixels(wavelength_vac_aa, rv_kms).expand_as(f) & usable
        basis_np, seg_of = chebyshev_design(wavelength_vac_aa, self.segments, self.degree)
        basis = torch.as_tensor(basis_np)
        seg_t = torch.as_tensor(seg_of)
        wc = torch.where(cpix, w, torch.zeros_like(w))
        coeffs, cov = weighted_polyfit(torch.where(usable, f, torch.zeros_like(f)), wc, basis, return_cov=True)
        cont = coeffs @ basis.T
        ok = (seg_t >= 0)[None].expand_as(f).clone()
        for s in range(len(self.segments)):
            in_s = seg_t == s
            enough = (cpix & in_s[None]).sum(1) >= max(self.min_pixels_per_segment, self.degree + 1)
            ok &= ~(in_s[None] & ~enough[:, None])
        ok &= cont > 0
        return (cont, coeffs, ok, cov) if return_cov else (cont, coeffs, ok)

    def normalise(self, flux, ivar, wavelength_vac_aa, rv_kms, good=None, full: bool = False):
        """(flux / cont, ivar * cont^2, coeffs, ok): normalised spectra, float64 torch; ivar 0 where not ok.

        full: also return the continuum itself (n, n_pix) and its coefficients' covariance
        (n, K, K), to carry the normalisation's own uncertainty into fitted labels.
        """
        cont, coeffs, ok, cov = self.fit(flux, ivar, wavelength_vac_aa, rv_kms, good, return_cov=True)
        f = torch.as_tensor(np.asarray(flux), dtype=torch.float64)
        w = torch.as_tensor(np.asarray(ivar), dtype=torch.float64)
        fn = torch.where(ok, f / torch.where(ok, cont, torch.ones_like(cont)), torch.ones_like(f))
        wn = torch.where(ok & torch.isfinite(w) & torch.isfinite(f), w * cont * cont, torch.zeros_like(w))
        if full:
            return fn, wn, coeffs, ok, cont, cov
        return fn, wn, coeffs, ok


def fractional_index(grid: torch.Tensor, wavelength: torch.Tensor) -> torch.Tensor:
    """Fractional position of ``wavelength`` (any shape) on an increasing ``grid`` (n,): linear
    between neighbours, extrapolated linearly outside (callers test the range)."""
    if wavelength.device.type == "cpu":
        # numpy's interp is several times faster than torch.searchsorted on CPU.
        g = grid.double().numpy()
        x = wavelength.double().numpy()
        n = len(g)
        pos = np.interp(x, g, np.arange(n, dtype=np.float64))
        lo, hi = x < g[0], x > g[-1]
        pos = np.where(lo, (x - g[0]) / (g[1] - g[0]), pos)
        pos = np.where(hi, n - 1 + (x - g[-1]) / (g[-1] - g[-2]), pos)
        return torch.from_numpy(pos).to(wavelength.dtype)
    k = torch.searchsorted(grid, wavelength.contiguous()).clamp(1, len(grid) - 1) - 1
    lo, hi = grid[k], grid[k + 1]
    return k.to(wavelength.dtype) + (wavelength - lo) / (hi - lo)
