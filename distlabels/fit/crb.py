"""The Cramer-Rao bound: the best precision any unbiased fit of these spectra could reach.

For a star with labels ``x`` the Fisher information of the fit's parameters is ``F = J^T W J``
(J: derivatives of the model spectrum on the observed pixels, W: inverse variances), and no
unbiased estimator does better than ``sqrt(diag(F^-1))``. Here ``F`` is built by the same forward
model as the fit, with the same nuisance parameters (RV, continuum per segment, broadening when
fitted), the same fitted/fixed/tied labels and the same pixel masks, so it is the bound *for this
fit*: HotPayne and DD-Payne compare their scatter to it, and the benchmark checks that our scatter
reaches it.

S/N is per pixel, relative to the continuum: sigma_p = continuum_p / snr, as in the mocks.

:func:`crb_grid` is HotPayne's survey analysis (Xiang et al. 2022): the bound of every label over a
grid of stars at one S/N, summarised per label, and which labels that survey can measure.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import CRBConfig, FitConfig
from ..errors import DistlabelsError
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
    if fitter is None:
        from .kernel import SpectrumFitter

        fitter = SpectrumFitter(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution,
                                segments=segments, config=config, device=device)
    lab_sd, rv_sd, _ = crb_parameters(fitter, labels, snr, rv_kms=rv_kms, vsini_kms=vsini_kms, mask=mask)
    if return_rv:
        return lab_sd, rv_sd
    return lab_sd


def crb_parameters(fitter, labels, snr, *, rv_kms=0.0, vsini_kms=None, mask=None, progress=None):
    """Bounds of labels (n, n_labels), RV (n,) km/s and vsini (n,) km/s (None unless the fitter fits
    vsini) for stars with physical ``labels`` (n, n_labels), through an existing SpectrumFitter.

    The vsini bound is given as the fit reports its error: sqrt(q + sigma_q) - sqrt(q) with
    q = vsini^2, i.e. sigma_q / (2 vsini) well above the resolution limit and sqrt(sigma_q) at 0.
    progress: optional callable(n_done) called after each batch.
    """
    lab = np.atleast_2d(np.asarray(labels, np.float64))
    n = len(lab)
    snr = np.broadcast_to(np.asarray(snr, np.float64), (n,))
    rv = np.broadcast_to(np.asarray(rv_kms, np.float64), (n,))
    vs = None if vsini_kms is None else np.broadcast_to(np.asarray(vsini_kms, np.float64), (n,))
    bad = None if mask is None else np.broadcast_to(np.asarray(mask, bool), (n, fitter.n_pix))
    sd = np.empty((n, fitter.n_labels + 1))
    i_q = fitter.fwd.i_q
    sd_v = np.full(n, np.nan) if i_q is not None else None
    step = max(int(fitter.config.batch_size), 1)
    with torch.no_grad():
        for lo in range(0, n, step):
            sl = slice(lo, min(lo + step, n))
            p = fitter.params_from(lab[sl], rv[sl], vsini_kms=None if vs is None else vs[sl])
            ivar = torch.as_tensor(np.repeat(snr[sl, None] ** 2, fitter.n_pix, 1), dtype=fitter.dtype,
                                   device=fitter.device)          # continuum 1: sigma = 1 / snr
            usable = None if bad is None else ~torch.as_tensor(bad[sl].copy(), device=fitter.device)
            cov, cov_lv = fitter.covariance(fitter.fisher(p, ivar, usable))
            sd[sl] = cov_lv.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().cpu().numpy()
            if i_q is not None:
                q, var_q = p[:, i_q].clamp_min(0), cov[:, i_q, i_q].clamp_min(0)
                sd_v[sl] = ((q + var_q.sqrt()).sqrt() - q.sqrt()).cpu().numpy()
            if progress is not None:
                progress(sl.stop - sl.start)
    return sd[:, :-1], sd[:, -1], sd_v


PERCENTILES = (16.0, 50.0, 84.0)


@dataclass
class CRBGrid:
    """The Cramer-Rao bounds of a grid of stars at one S/N (:func:`crb_grid`).

    stars: (n, n_labels) physical labels at which the bound was evaluated (held labels at the
    training median); sigma: (n, n_labels) bounds (0 for held labels); sigma_rv: (n,) km/s;
    sigma_vsini: (n,) km/s when vsini was fitted; threshold: (n_labels,) the sigma under which a
    label counts as measurable; fitted: (n_labels,) bool.
    """

    config: CRBConfig
    label_names: tuple[str, ...]
    stars: np.ndarray
    sigma: np.ndarray
    sigma_rv: np.ndarray
    sigma_vsini: np.ndarray | None
    threshold: np.ndarray
    fitted: np.ndarray
    wavelength_range_aa: tuple[float, float]
    n_pix: int
    resolution: float | None
    vsini_limit_kms: float | None = None

    def percentiles(self, q=PERCENTILES) -> np.ndarray:
        """(len(q), n_labels) percentiles of sigma over the stars."""
        return np.percentile(self.sigma, q, axis=0)

    def measurable(self) -> np.ndarray:
        """(n_labels,) bool: fitted and the median bound below the threshold."""
        return self.fitted & (np.median(self.sigma, axis=0) < self.threshold)

    def table_rows(self) -> list[dict]:
        """One dict per label: name, p16/median/p84 of sigma, threshold, measurable (fitted labels only)."""
        pc = self.percentiles()
        meas = self.measurable()
        return [{"label": name, "sigma_p16": pc[0, j], "sigma_median": pc[1, j], "sigma_p84": pc[2, j],
                 "threshold": self.threshold[j], "measurable": bool(meas[j])}
                for j, name in enumerate(self.label_names) if self.fitted[j]]


def crb_stars(model: Emulator, cfg: CRBConfig) -> np.ndarray:
    """(n, n_labels) physical labels of the stars ``cfg.stars`` names.

    training: ``cfg.n`` stars drawn (seeded, without replacement) from the model's training labels;
    teff-logg: a regular grid of round(sqrt(n)) x round(sqrt(n)) points spanning the inner 90 % of
    the model's Teff and log g box, every other label at the training median.
    """
    rng = np.random.default_rng(cfg.seed)
    tl = np.asarray(model.training_labels, np.float64)
    lo, hi = model.label_bounds.T
    med = np.median(tl, axis=0) if len(tl) else (lo + hi) / 2
    n = int(cfg.n)
    if cfg.stars == "training":
        if len(tl) == 0:
            return lo + (hi - lo) * rng.uniform(0.05, 0.95, (n, model.n_labels))
        return tl[rng.choice(len(tl), size=min(n, len(tl)), replace=False)]
    if cfg.stars == "teff-logg":
        names = list(model.label_names)
        missing = [x for x in ("teff", "logg") if x not in names]
        if missing:
            raise DistlabelsError(f"--stars teff-logg needs labels teff and logg; the model has no {missing[0]}.")
        k = max(int(round(np.sqrt(n))), 1)
        it, ig = names.index("teff"), names.index("logg")
        t = np.linspace(lo[it] + 0.05 * (hi[it] - lo[it]), hi[it] - 0.05 * (hi[it] - lo[it]), k)
        g = np.linspace(lo[ig] + 0.05 * (hi[ig] - lo[ig]), hi[ig] - 0.05 * (hi[ig] - lo[ig]), k)
        tt, gg = np.meshgrid(t, g, indexing="ij")
        out = np.repeat(med[None], k * k, 0)
        out[:, it], out[:, ig] = tt.ravel(), gg.ravel()
        return out
    raise DistlabelsError(f"--stars must be training or teff-logg, not {cfg.stars!r}.")


def check_crb_config(model: Emulator, cfg: CRBConfig):
    """Refuse, in one sentence, settings :func:`crb_grid` cannot run; returns (wave, resolution,
    segments, medium, FitConfig) of the observed grid."""
    from ..io.wavelength import survey_grid
    from .registry import check_fit_options

    if not (np.isfinite(cfg.snr) and cfg.snr > 0):
        raise DistlabelsError(f"--snr must be a positive number, not {cfg.snr}.")
    if cfg.vsini_kms is not None and not (0 <= cfg.vsini_kms <= 500):
        raise DistlabelsError(f"--vsini-kms must be within 0-500 km/s, not {cfg.vsini_kms}.")
    if cfg.stars not in ("training", "teff-logg"):
        raise DistlabelsError(f"--stars must be training or teff-logg, not {cfg.stars!r}.")
    if int(cfg.n) < 1:
        raise DistlabelsError(f"crb needs n >= 1 stars, not {cfg.n}.")
    crb_stars(model, cfg)                       # refuses --stars teff-logg without teff and logg
    if cfg.grid == "model":
        wave, res, seg, medium = model.wavelength, None, None, model.wavelength_medium
    else:
        try:
            wave, res, seg = survey_grid(cfg.grid)
        except KeyError:
            raise DistlabelsError(f"--grid must be lamost, desi or model, not {cfg.grid!r}.") from None
        medium = "vacuum"
        if cfg.resolution is not None:
            res = float(cfg.resolution)
    fit_cfg = FitConfig(labels=cfg.labels, fit_vsini=cfg.vsini_kms is not None, limb_darkening=cfg.limb_darkening,
                        masks=cfg.masks, continuum_degree=cfg.continuum_degree, batch_size=cfg.batch_size,
                        library_size=8)
    check_fit_options(model.kind, fit_cfg)
    if model.kind == "cannon":
        raise DistlabelsError("crb needs an emulator fitted by the general kernel; a Cannon's errors come from "
                              "its own test step (distlabels fit).")
    names = list(model.label_names)
    for name in list(cfg.labels or ()) + [a for a, _ in cfg.max_sigma]:
        if name not in names:
            raise DistlabelsError(f"unknown label {name!r} (labels: {', '.join(names)}).")
    return wave, res, seg, medium, fit_cfg


def crb_grid(model: Emulator, cfg: CRBConfig | None = None, *, device="cpu", progress=None) -> CRBGrid:
    """Cramer-Rao bound of every fitted label for the stars of ``cfg`` on a survey's pixels at one S/N.

    The bound is that of the kernel's own fit (:func:`crb`): the same labels (``cfg.labels``; the
    others held at the training median), RV, a Chebyshev continuum per segment and, with
    ``cfg.vsini_kms``, vsini are free, default pixel masks applied, S/N per pixel relative to the
    continuum. A label is measurable when the median bound over the stars is below
    ``cfg.max_fraction`` x its range in the model (the label box), or below ``cfg.max_sigma[label]``
    where given. progress: optional callable(n_done).
    """
    from .kernel import SpectrumFitter

    cfg = cfg or CRBConfig()
    wave, res, seg, medium, fit_cfg = check_crb_config(model, cfg)
    names = list(model.label_names)
    fitter = SpectrumFitter(model, wave, wavelength_medium=medium, resolution=res, segments=seg, config=fit_cfg,
                            device=device)
    stars = crb_stars(model, cfg)
    # The labels the bound is evaluated at: held labels take the value the fit holds them at.
    lm = fitter.lmap
    x = model.scale(torch.as_tensor(stars)).numpy()
    stars = model.unscale(torch.as_tensor(lm.to_x(lm.from_x(x)))).numpy()
    sig, sig_rv, sig_v = crb_parameters(fitter, stars, cfg.snr, vsini_kms=cfg.vsini_kms, progress=progress)
    threshold = cfg.max_fraction * np.asarray(model.label_span, np.float64)
    for name, value in cfg.max_sigma:
        threshold[names.index(name)] = float(value)
    lam = np.asarray(wave, np.float64)
    return CRBGrid(cfg, tuple(names), stars, sig, sig_rv, sig_v, threshold, lm.fitted.copy(),
                   (float(lam.min()), float(lam.max())), len(lam), res,
                   fitter.vsini_limit_kms if cfg.vsini_kms is not None else None)
