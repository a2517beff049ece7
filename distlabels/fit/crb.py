"""The Cramer-Rao bound: the best precision any unbiased fit of these spectra could reach.

For a star with labels ``x`` the Fisher information of the fit's parameters is ``F = J^T W J``
(J: derivatives of the model spectrum on the observed pixels, W: inverse variances), and no
unbiased estimator does better than ``sqrt(diag(F^-1))``. Here ``F`` is built by the same forward
model as the fit, with the same nuisance parameters (RV, continuum per segment, broadening when
fitted), the same fitted/fixed/tied labels and the same pixel masks, so it is the bound *for this
fit*: HotPayne and DD-Payne compare their scatter to it, and the benchmark checks that our scatter
reaches it.

S/N is per pixel, relative to the continuum: sigma_p = continuum_p / snr, as in the mocks.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import FitConfig
from ..models.base import Emulator


def crb(model: Emulator, labels, snr, wavelength_aa, *, wavelength_medium: str = "vacuum",
        resolution: float | None = None, segments=None, config: FitConfig | None = None, rv_kms=0.0,
        vsini_kms=None, mask=None, device="cpu", fitter=None, return_rv: bool = False):
    """Cramer-Rao bound on each label (physical units) for stars with ``labels`` (n, n_labels).

    snr: S/N per pixel, scalar or (n,); rv_kms, vsini_kms: scalars or (n,); mask: (n_pix,) or
    (n, n_pix) bool, True = pixel not used. Labels the fit holds (fixed, excluded) get 0. Pass an
    existing ``fitter`` (a SpectrumFitter) to reuse its grid. Returns (n, n_labels), and the RV
    bound (n,) too when ``return_rv``.
    """
    from .kernel import SpectrumFitter

    if fitter is None:
        fitter = SpectrumFitter(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution,
                                segments=segments, config=config, device=device)
    lab = np.atleast_2d(np.asarray(labels, np.float64))
    n = len(lab)
    snr = np.broadcast_to(np.asarray(snr, np.float64), (n,))
    rv = np.broadcast_to(np.asarray(rv_kms, np.float64), (n,))
    vs = None if vsini_kms is None else np.broadcast_to(np.asarray(vsini_kms, np.float64), (n,))
    bad = None if mask is None else np.broadcast_to(np.asarray(mask, bool), (n, fitter.n_pix))
    sd = np.empty((n, fitter.n_labels + 1))
    step = max(int(fitter.config.batch_size), 1)
    with torch.no_grad():
        for lo in range(0, n, step):
            sl = slice(lo, min(lo + step, n))
            p = fitter.params_from(lab[sl], rv[sl], vsini_kms=None if vs is None else vs[sl])
            ivar = torch.as_tensor(np.repeat(snr[sl, None] ** 2, fitter.n_pix, 1), dtype=fitter.dtype,
                                   device=fitter.device)          # continuum 1: sigma = 1 / snr
            usable = None if bad is None else ~torch.as_tensor(bad[sl].copy(), device=fitter.device)
            _, cov_lv = fitter.covariance(fitter.fisher(p, ivar, usable))
            sd[sl] = cov_lv.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().cpu().numpy()
    if return_rv:
        return sd[:, :-1], sd[:, -1]
    return sd[:, :-1]
