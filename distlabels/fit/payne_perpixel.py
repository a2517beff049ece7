"""Fitting The Payne's per-pixel APOGEE networks: their normalisation and pixel mask, at each star's RV.

The published network (:class:`~distlabels.models.payne_perpixel.PerPixelPayne`) emulates
*pseudo-continuum-normalised* flux: the synthetic spectra it was trained on were divided by a
quadratic per chip fitted to a fixed set of continuum pixels, and the data must be normalised
the same way for model and data to agree. Its publication also ships a mask of pixels the
network models poorly. Both are stored with the model (``continuum_pixels``, ``bad_pixels``),
over its rest-frame grid, so they follow the star's radial velocity onto the observed pixels.

:class:`PerPixelFitter` (registered for kind ``payne-perpixel``) wraps the general kernel:

1. the data are pseudo-continuum normalised (:class:`~distlabels.models.continuum.PseudoContinuum`:
   Chebyshev degree 2 per chip, inverse-variance weighted, continuum pixels only) and the model's
   bad pixels are masked, both at the rest frame (RV = 0);
2. the kernel fits labels and RV (and whatever ``FitConfig`` asks: broadening, a residual
   continuum of ``continuum_degree``);
3. stars whose RV is more than ``RV_REFINE_KMS`` from the velocity used in step 1 are normalised
   and masked again at their fitted RV and refitted (once more if it still moved).

Continuum: because the data are normalised exactly as the network's training spectra were,
the recommended ``continuum_degree`` is -1 (no further continuum; the kernel fits labels and RV
only), as The Payne itself does. A low-order residual continuum (degree 0-1 per chip) is allowed
and costs little; a full continuum would be degenerate with the normalisation already applied.
Already-normalised inputs (ASPCAP-style spectra) are renormalised too: dividing by a quadratic
fitted to continuum pixels that already sit at 1 is a no-op up to noise, and it makes the result
independent of whoever normalised them.

vmacro is one of the network's labels (its broadening is inside the emulated spectra): no rotation
or LSF is applied on top unless ``fit_vsini`` / ``fit_lsf`` are set explicitly.
"""
from __future__ import annotations

import numpy as np

from ..io.wavelength import C_KMS, to_vacuum
from ..models.continuum import PseudoContinuum, fractional_index
from .kernel import FitResult, SpectrumFitter
from .registry import register_fitter

PSEUDO_CONTINUUM_DEGREE = 2     # The Payne / the Cannon's APOGEE normalisation: a quadratic per chip
RV_REFINE_KMS = 1.0             # renormalise and refit when the RV moved by more (a model pixel is 4.1 km/s)
MAX_REFINE = 2


def model_segments(wavelength_vac_aa: np.ndarray, gap_factor: float = 10.0) -> tuple[tuple[float, float], ...]:
    """Chips of a model grid with gaps: ((lo_aa, hi_aa), ...), each bound midway into the gap next to it."""
    lam = np.asarray(wavelength_vac_aa, np.float64)
    d = np.diff(lam)
    cuts = np.flatnonzero(d > gap_factor * np.median(d))
    edges = [lam[0] - 50.0] + [0.5 * (lam[c] + lam[c + 1]) for c in cuts] + [lam[-1] + 50.0]
    return tuple((float(a), float(b)) for a, b in zip(edges[:-1], edges[1:]))


@register_fitter("payne-perpixel")
class PerPixelFitter(SpectrumFitter):
    """The general kernel plus the model's pseudo-continuum normalisation and bad-pixel mask."""

    # The general kernel's broadening applies unchanged (only when asked: vmacro is already a label).
    FITS_VSINI = True

    def __init__(self, model, wavelength_aa, *, wavelength_medium: str = "vacuum", resolution=None, segments=None,
                 config=None, device="cpu"):
        super().__init__(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution,
                         segments=segments, config=config, device=device)
        lam_mod = to_vacuum(model.wavelength, model.wavelength_medium)
        self._lam_model = lam_mod
        cp = getattr(model, "continuum_pixels", None)
        self.pseudo = None if cp is None else PseudoContinuum(lam_mod, np.asarray(cp, bool), model_segments(lam_mod),
                                                              degree=PSEUDO_CONTINUUM_DEGREE)
        bp = getattr(model, "bad_pixels", None)
        self.bad_model = None if bp is None else np.asarray(bp, bool)

    def model_bad_pixels(self, rv_kms) -> np.ndarray:
        """(n, n_pix) bool: observed pixels whose rest wavelength at RV (n,) km/s falls on a bad model pixel."""
        rv = np.atleast_1d(np.asarray(rv_kms, np.float64))
        if self.bad_model is None:
            return np.zeros((len(rv), self.n_pix), bool)
        import torch

        b = rv / C_KMS
        rest = self.wavelength_vac[None] / np.sqrt((1 + b) / (1 - b))[:, None]
        pos = fractional_index(torch.as_tensor(self._lam_model), torch.as_tensor(rest)).numpy()
        k = np.clip(np.round(pos).astype(np.int64), 0, len(self.bad_model) - 1)
        return self.bad_model[k] & (pos > -0.5) & (pos < len(self.bad_model) - 0.5)

    def prepare(self, flux, ivar, mask, rv_kms):
        """Normalised flux, ivar (n, n_pix) float32 and mask at RVs (n,): what the kernel is given."""
        bad = self.model_bad_pixels(rv_kms)
        if mask is not None:
            bad |= np.asarray(mask, bool)
        if self.pseudo is None:
            return flux, ivar, bad
        with np.errstate(invalid="ignore"):
            good = ~bad & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        fn, wn, _, ok = self.pseudo.normalise(flux, ivar, self.wavelength_vac, rv_kms, good=good)
        return fn.numpy().astype(np.float32), wn.numpy().astype(np.float32), bad | ~ok.numpy()

    def fit(self, flux, ivar, mask=None, *, return_covariance=None) -> FitResult:
        flux = np.asarray(flux, np.float32)
        ivar = np.asarray(ivar, np.float32)
        n = len(flux)
        mask = None if mask is None else np.broadcast_to(np.asarray(mask, bool), flux.shape)
        rv_used = np.zeros(n)
        res = SpectrumFitter.fit(self, *self.prepare(flux, ivar, mask, rv_used), return_covariance=return_covariance)
        for _ in range(MAX_REFINE):
            redo = np.flatnonzero(np.isfinite(res.rv) & (np.abs(res.rv - rv_used) > RV_REFINE_KMS))
            if len(redo) == 0:
                break
            rv_used[redo] = res.rv[redo]
            sub = SpectrumFitter.fit(self, *self.prepare(flux[redo], ivar[redo], None if mask is None else mask[redo],
                                                         rv_used[redo]), return_covariance=return_covariance)
            _merge(res, sub, redo)
        return res


def _merge(res: FitResult, sub: FitResult, rows: np.ndarray) -> None:
    """Copy every per-star array of ``sub`` into ``res`` at ``rows``."""
    for name, val in vars(sub).items():
        if isinstance(val, np.ndarray) and val.shape[:1] == (len(rows),):
            getattr(res, name)[rows] = val
