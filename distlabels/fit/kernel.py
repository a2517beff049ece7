"""The fitting kernel: batched Levenberg-Marquardt over labels, radial velocity, broadening and continuum.

Pure torch, no I/O and no Dask; the same code runs on CPU and CUDA.

Per batch of stars sharing one observed grid:

1. start (:mod:`.start`): polynomial continuum of the data, RV from a cross-correlation with a few
   emulator templates, the ``n_starts`` best spectra of a library of emulator spectra by chi^2;
2. from each start, bounded Levenberg-Marquardt (:mod:`.lm`) on the forward model of
   :mod:`.forward` (analytic Jacobian; J^T W J and solves in float64; converged stars leave the
   batch); per star the start with the lowest chi^2 wins;
3. errors from (J^T W J)^-1 (not rescaled by chi^2), flags (:mod:`.flags`).

Which labels move (subset, fixed values, ties: :mod:`.labels`) is folded into the emulator's first
layer, the resampling onto the working grid and the line-spread function into its last layer
(:mod:`.working_grid`), pixel masks come from :mod:`.masks`, and the emulator's own variance
(``model.model_variance``) is added to the data variance.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..config import FitConfig
from ..errors import DistlabelsError
from ..io.wavelength import C_KMS, to_vacuum
from ..models.base import Emulator
from .broadening import Broadener, vsini_resolution_limit_kms
from .flags import Flag
from .forward import ApproxCurvature, ForwardModel
from .labels import build_label_map
from .lm import levenberg_marquardt, normal_equations, pinv_hermitian
from .masks import mask_windows, pixel_mask
from .start import StartSearch
from .working_grid import FWHM_PER_SIGMA, build_native_grid, build_working_grid, chebyshev_basis

BROADENING_PAD_SIGMA = 5.0   # FFT padding: kernel half-width in Gaussian sigmas
# approx_curvature "auto": the approximation when its pulled-back rows (2 + fitted continuum coefficients)
# are at most this share of a full Jacobian's rows (fitted labels + 1); between the measured 6/23 (faster
# with it) and 10/23 (slower).
APPROX_MAX_ROW_FRACTION = 0.3


@dataclass
class FitResult:
    """Per-star results as numpy arrays (n_star first). Physical units; NaN where not fitted."""

    label_names: tuple[str, ...]
    labels: np.ndarray          # (n, n_labels)
    errors: np.ndarray          # (n, n_labels); 0 for held labels
    rv: np.ndarray              # (n,) km/s
    rv_err: np.ndarray          # (n,) km/s
    chi2_red: np.ndarray        # (n,)
    n_iter: np.ndarray          # (n,) int: LM iterations summed over starts
    flags: np.ndarray           # (n,) int64 bitmask, see distlabels.fit.flags
    continuum: np.ndarray       # (n, n_cont) Chebyshev coefficients
    snr: np.ndarray             # (n,) median S/N per pixel over usable pixels (lower middle value for even counts)
    covariance: np.ndarray | None = field(default=None)  # (n, n_labels + 1, n_labels + 1): labels (physical), RV
    vsini: np.ndarray | None = None        # (n,) km/s, when FitConfig.fit_vsini
    vsini_err: np.ndarray | None = None    # (n,) km/s: sqrt(q + sigma_q) - sqrt(q), q = vsini^2
    resolution: np.ndarray | None = None   # (n,) fitted resolving power, when FitConfig.fit_lsf
    resolution_err: np.ndarray | None = None
    labels_at_bound: np.ndarray | None = None  # (n,) int64 bitmask: bit j set when label j ended on its bound

    def __post_init__(self):
        if self.labels_at_bound is None:
            self.labels_at_bound = np.zeros(len(self.rv), np.int64)

    def __len__(self) -> int:
        return len(self.rv)

    def mark_failed(self, idx) -> None:
        """Rows ``idx`` could not be fitted: FIT_ERROR, and no labels, errors or RV from a failed try."""
        self.flags[idx] |= Flag.FIT_ERROR
        for out in (self.labels, self.errors, self.rv, self.rv_err, self.chi2_red):
            out[idx] = np.nan


def fit_in_halves(fit, take, idx: np.ndarray, data, res: FitResult, *, what: str, device=None,
                  _top: bool = True) -> None:
    """``fit(idx, data)`` for stars ``idx`` (rows of ``res``), and where it raises, each half in turn
    (``take(data, slice)``), down to single stars, which are marked failed (FIT_ERROR, NaN labels).

    A failure that comes with a batch's size (GPU memory, a solver's limit on batched matrices) costs
    one failed try; a star that breaks every batch it is in costs ~2 log2(n) tries (star by star would
    cost n: hours for a GPU batch). One warning, naming ``what`` and the first error.
    """
    try:
        fit(idx, data)
        return
    except (RuntimeError, torch.linalg.LinAlgError) as e:
        err = f"{e.__class__.__name__}: {str(e)[:200]}"
    # Out of the except block, so the failed try's traceback and device tensors are freed first.
    if len(idx) == 1:
        res.mark_failed(idx)
        return
    if _top:
        warnings.warn(f"{what} of {len(idx)} stars failed ({err}); fitting it in halves (a star that fails "
                      "alone is flagged FIT_ERROR)", RuntimeWarning, stacklevel=4)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    h = len(idx) // 2
    for sl in (slice(0, h), slice(h, None)):
        fit_in_halves(fit, take, idx[sl], take(data, sl), res, what=what, device=device, _top=False)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _training_median_x(model: Emulator) -> np.ndarray:
    tl = model.training_labels
    if len(tl) == 0:
        return np.zeros(model.n_labels)
    return model.scale(torch.as_tensor(np.median(tl, axis=0), dtype=torch.float64)).numpy()


class SpectrumFitter:
    """Fits spectra that share one observed wavelength grid with one emulator.

    Building it does the per-grid work once (working grid, folded network, masks, continuum basis,
    template library); :meth:`fit` can then be called on any number of batches.

    wavelength_aa: (n_pix,) observed wavelengths in ``wavelength_medium``; resolution: resolving
    power R of the observations (None: the model is used at its own resolution); segments:
    ((lo_aa, hi_aa), ...) continuum segments (arms, chips).
    """

    def __init__(self, model: Emulator, wavelength_aa, *, wavelength_medium: str = "vacuum",
                 resolution: float | None = None, segments=None, config: FitConfig | None = None,
                 device: str | torch.device | None = "cpu"):
        self.config = cfg = config or FitConfig()
        self.device = dev = resolve_device(device)
        self.model = model
        self.label_names = tuple(model.label_names)
        self.n_labels = L = model.n_labels
        self.resolution = resolution
        lam_obs = to_vacuum(np.asarray(wavelength_aa, np.float64), wavelength_medium)
        self.wavelength_vac = lam_obs
        self.n_pix = len(lam_obs)
        lam_mod = to_vacuum(model.wavelength, model.wavelength_medium)
        with np.errstate(invalid="ignore", divide="ignore"):
            log10_obs = np.log10(np.where(lam_obs > 0, lam_obs, np.nan))

        # Labels: subset, fixed values and ties as x = offset + matrix @ theta.
        self.lmap = lm = build_label_map(self.label_names, model.label_span, model.x_min.cpu().numpy(),
                                         labels=cfg.labels, fix=cfg.fix, ties=cfg.ties,
                                         default_x=_training_median_x(model))
        K = lm.n_theta

        # Working grid: uniform in log(lambda) unless the model's own pixels will do.
        broaden = cfg.fit_vsini or cfg.fit_lsf
        needs_lsf = resolution is not None and np.isfinite(resolution) and resolution > 0 and (
            model.resolution is None or model.resolution > resolution)
        native = cfg.working_grid == "native" or (cfg.working_grid == "auto" and not needs_lsf)
        if broaden and native:
            native = False
        self.sigma_base_kms = None
        if native:
            self.grid = g = build_native_grid(lam_mod, lam_obs, v_max_kms=cfg.v_max_kms)
        else:
            r_grid = resolution
            pad = 0.0
            if cfg.fit_lsf and resolution:
                r_grid = resolution * cfg.lsf_headroom
            if broaden:
                pad = cfg.vsini_max_kms * cfg.fit_vsini + BROADENING_PAD_SIGMA * self._sigma_max_kms(resolution)
            self.grid = g = build_working_grid(lam_mod, lam_obs, resolution=r_grid, model_resolution=model.resolution,
                                               oversample=cfg.oversample, v_max_kms=cfg.v_max_kms, pad_kms=pad)
            if g.sigma_ln is not None:
                self.sigma_base_kms = C_KMS * g.sigma_ln
        proj = _sparse_torch(g.projection)
        base = model.project(proj)
        floats = [t for t in list(base.parameters()) + list(base.buffers()) if t.is_floating_point() and t.dim() >= 1]
        self.dtype = dt = floats[0].dtype if floats else torch.float32      # the network's own precision
        self.work = base.with_inputs(lm.matrix, lm.offset).to(dev).eval()
        broadener = None
        if broaden:
            pad_pix = int(np.ceil((cfg.vsini_max_kms * cfg.fit_vsini + BROADENING_PAD_SIGMA
                                   * self._sigma_max_kms(resolution)) / g.dv_kms)) + 2
            broadener = Broadener(g.n_work, g.dv_kms, pad_pix, limb_darkening=cfg.limb_darkening,
                                  fit_vsini=cfg.fit_vsini, fit_lsf=cfg.fit_lsf, device=dev, dtype=dt)
            # Working pixels whose kernel would reach beyond the model's coverage are not usable.
            cov = g.covered.copy()
            bad = np.flatnonzero(~cov)
            for j in bad:
                cov[max(j - pad_pix, 0): j + pad_pix + 1] = False
            g = type(g)(g.log10_start, g.step_dex, g.n_work, cov, g.projection, g.sigma_ln, g.native, g.v_max_kms)
            self.grid = g

        # Pixels: masks (tellurics, sky, ISM), segments, finite wavelengths.
        self.mask_windows = mask_windows(cfg.masks, resolution)
        basis, seg_of = chebyshev_basis(lam_obs, segments, cfg.continuum_degree)
        self.fit_continuum = cfg.continuum_degree >= 0
        usable = (seg_of >= 0) & np.isfinite(lam_obs) & ~pixel_mask(lam_obs, self.mask_windows)
        self.usable = torch.as_tensor(usable, device=dev)
        self.fwd = ForwardModel(self.work, g, np.nan_to_num(log10_obs, nan=float(np.nanmin(log10_obs))), basis,
                                n_theta=K, fit_continuum=self.fit_continuum, broadener=broadener, device=dev, dtype=dt,
                                fused=cfg.fused_kernels)
        mv = model.model_variance.detach().cpu().double().numpy()
        self.work_var = torch.as_tensor(g.projection @ mv, dtype=dt, device=dev)
        self.n_cont = basis.shape[1]
        self.n_par = P = self.fwd.n_par

        # Parameter bounds and which parameters move.
        lo = np.full(P, -np.inf)
        hi = np.full(P, np.inf)
        lo[:K], hi[:K] = lm.lo, lm.hi
        lo[K], hi[K] = -cfg.v_max_kms, cfg.v_max_kms
        free = np.ones(P, bool)
        if self.fwd.i_q is not None:
            lo[self.fwd.i_q], hi[self.fwd.i_q] = 0.0, cfg.vsini_max_kms ** 2
        if self.fwd.i_s is not None:
            lo[self.fwd.i_s], hi[self.fwd.i_s] = 0.0, self._sigma_max_kms(resolution) ** 2
        if not self.fit_continuum:
            free[self.fwd.i_c:] = False
        self.lo = torch.as_tensor(lo, dtype=torch.float64, device=dev)
        self.hi = torch.as_tensor(hi, dtype=torch.float64, device=dev)
        self.free = torch.as_tensor(free, device=dev)
        self.s_start = 0.0
        if self.fwd.i_s is not None and resolution:
            nominal = C_KMS / (FWHM_PER_SIGMA * resolution)
            self.s_start = max(nominal ** 2 - (self.sigma_base_kms or 0.0) ** 2, 0.0)

        # The library varies the few labels that move the spectrum most ("main"); the others sit at
        # the training median (a library spread over all labels is too sparse to start from).
        self.theta_med = np.clip(lm.from_x(_training_median_x(model)), lm.lo, lm.hi)
        self.main = self._main_labels(cfg.start_labels)
        # Stage 1 of every start fits only these (with RV, broadening, continuum), the others held at the
        # median, through a network with only their inputs (a cheap Jacobian); stage 2 frees the rest.
        # Going straight to all labels lets the weak ones (O, N through molecules) soak up the early
        # misfit of Teff/log g and settle in a wrong minimum that also biases log g.
        others = np.setdiff1d(np.arange(K), self.main)
        off_main = lm.offset + lm.matrix[:, others] @ self.theta_med[others]
        # On the model's own pixels stage 1 runs on every k-th observed pixel and every k-th model
        # pixel (k = start_decimate): it only has to bring the main labels near the minimum, and
        # stage 2 (all pixels, exact interpolation) takes over from there.
        g1, base1, lobs1, basis1 = g, base, log10_obs, basis
        k1 = int(cfg.start_decimate)
        self.stage1_pixels = slice(None)
        self.stage1_step = 1
        if native and k1 > 1 and self.n_pix >= 100 * k1:
            self.stage1_step = k1
            g1 = _decimated_native_grid(lam_mod, lam_obs, k1, cfg.v_max_kms)
            base1 = model.project(_sparse_torch(g1.projection))
            self.stage1_pixels = slice(None, None, k1)
            lobs1, basis1 = log10_obs[::k1], basis[::k1]
        work_main = base1.with_inputs(lm.matrix[:, self.main], off_main).to(dev).eval()
        self.fwd_main = ForwardModel(work_main, g1, np.nan_to_num(lobs1, nan=float(np.nanmin(log10_obs))), basis1,
                                     n_theta=len(self.main), fit_continuum=self.fit_continuum, broadener=broadener,
                                     device=dev, dtype=dt, fused=cfg.fused_kernels)
        self.sel_main = torch.as_tensor(np.concatenate([self.main, np.arange(K, P)]), device=dev)
        if int(cfg.jacobian_chunk) < 1:
            raise DistlabelsError(f"jacobian_chunk must be a positive number of stars, not {cfg.jacobian_chunk!r}.")
        self.fwd.jacobian_chunk = self.fwd_main.jacobian_chunk = int(cfg.jacobian_chunk)

        # Library of emulator spectra: main labels from the training set, the others at the median.
        rng = np.random.default_rng(cfg.seed)
        tl = model.training_labels
        if len(tl) == 0:
            xs = rng.uniform(-0.45, 0.45, size=(cfg.library_size, L))
        else:
            pick = rng.choice(len(tl), size=min(cfg.library_size, len(tl)), replace=False)
            xs = model.scale(torch.as_tensor(tl[pick], dtype=torch.float64)).numpy()
        th = np.repeat(self.theta_med[None], len(xs), 0)
        th[:, self.main] = np.clip(lm.from_x(xs), lm.lo, lm.hi)[:, self.main]
        self.lib_theta = torch.as_tensor(th, dtype=torch.float64, device=dev)
        if g.uniform and not broaden:
            sgrid, snet = g, self.work
        else:
            sgrid = build_working_grid(lam_mod, lam_obs, resolution=resolution, model_resolution=model.resolution,
                                       oversample=1.0 if native else cfg.oversample, v_max_kms=cfg.v_max_kms)
            snet = model.project(_sparse_torch(sgrid.projection)).with_inputs(lm.matrix, lm.offset).to(dev)
        sbasis = None
        if self.fit_continuum:
            sbasis, _ = chebyshev_basis(10 ** sgrid.log10_wavelength, _segments_of(lam_obs, segments), cfg.continuum_degree)
        self.start = StartSearch(sgrid, snet, self.lib_theta, np.nan_to_num(log10_obs, nan=0.0),
                                 n_templates=cfg.n_templates, v_max_kms=cfg.v_max_kms, device=dev, dtype=dt,
                                 continuum_basis=sbasis)

        self.matmul_backend = self._choose_matmul(cfg.cpu_matmul)
        self.use_approx_curvature                           # a bad setting fails here, not in the first batch

        # FAR_FROM_TRAINING: nearest-neighbour distance to the training set in the space of the labels
        # that shape the spectrum most (the start labels, scaled units). Over all 22 labels a uniform
        # training set leaves every point far from its neighbours, and a star outside the set in
        # Teff alone would not stand out.
        self._train_x = None
        self._far_labels = np.unique(np.concatenate([lm.groups[k] for k in self.main]))
        if len(tl):
            sub = tl[rng.choice(len(tl), size=min(len(tl), 20000), replace=False)]
            tx = model.scale(torch.as_tensor(sub, dtype=torch.float64))[:, torch.as_tensor(self._far_labels)]
            self._train_x = tx.to(dev)
            probe = tx[: min(len(tx), 500)]
            dd = torch.cdist(probe, tx)
            dd[torch.arange(len(probe)), torch.arange(len(probe))] = np.inf
            self.nn_ref = float(torch.quantile(dd.min(1).values, 0.99))

    @property
    def use_approx_curvature(self) -> bool:
        """Whether LM steps use :class:`~.forward.ApproxCurvature` (``FitConfig.approx_curvature``).

        It replaces a full Jacobian (n_theta + 1 rows through the last layer) by pulling 2 + n_cont rows
        back (residual, RV, continuum), and it takes a step or two more. "auto" uses it when those
        rows are at most APPROX_MAX_ROW_FRACTION of the Jacobian's: measured on the bossbrain 22-label
        emulator, pre-normalised fits (2 / 23) and the model grid with one continuum segment (6 / 23)
        are faster with it, the LAMOST-like grid with two segments (10 / 23) 3-12 % faster without
        (CPU and H100; benchmarks/RESULTS.md).
        """
        ac = self.config.approx_curvature
        if ac not in ("auto", True, False):
            raise DistlabelsError(f"approx_curvature must be auto, true or false, not {ac!r}.")
        if not self.fwd.supports_approx_curvature or ac is False:
            return False
        rows = 2 + (self.n_cont if self.fit_continuum else 0)
        return ac is True or rows <= APPROX_MAX_ROW_FRACTION * (self.lmap.n_theta + 1)

    def _main_labels(self, names) -> np.ndarray:
        """Indices into theta of the stage-1 labels: ``names``, else the n that change the spectrum most."""
        lm = self.lmap
        if names is not None:
            out = []
            for nme in names:
                if nme not in self.label_names:
                    raise DistlabelsError(f"start_labels names unknown label {nme!r}.")
                i = self.label_names.index(nme)
                k = [j for j, grp in enumerate(lm.groups) if i in grp]
                if not k:
                    raise DistlabelsError(f"start label {nme!r} is not fitted.")
                out.append(k[0])
            return np.unique(np.array(out, int))
        th = torch.as_tensor(self.theta_med[None], dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            rows = self.work.value_and_jacobian_stacked(th)[0, 1:]                      # (K, W)
        ok = torch.as_tensor(self.grid.covered, device=self.device)
        # Influence of a full-range change of each parameter on the spectrum (RMS over pixels).
        width = torch.as_tensor(lm.hi - lm.lo, dtype=rows.dtype, device=self.device)
        infl = ((rows * ok).pow(2).mean(1).sqrt() * width).cpu().numpy()
        n = min(max(int(self.config.n_start_labels), 1), lm.n_theta)
        return np.sort(np.argsort(-infl)[:n])

    def _choose_matmul(self, choice: str) -> str:
        """CPU backend of the big products ("torch" or "numpy"): as configured, or the faster of the two
        on this machine, timed once on a batch-sized Jacobian ("auto")."""
        nets = [net for net in (self.work, self.fwd_main.work)
                if net is not None and hasattr(net, "matmul_backend")]
        if self.device.type != "cpu" or not nets:
            return "torch"
        if choice not in ("auto", "torch", "numpy"):
            raise DistlabelsError(f"cpu_matmul must be auto, torch or numpy, not {choice!r}.")
        if choice == "auto":
            th = torch.as_tensor(self.theta_med[None], dtype=self.dtype).repeat(min(max(int(self.config.batch_size), 1), 16), 1)
            best = None
            with torch.no_grad():
                for name in ("torch", "numpy"):
                    self.work.matmul_backend = name
                    self.work.value_and_jacobian_stacked(th)
                    t0 = time.perf_counter()
                    for _ in range(2):
                        self.work.value_and_jacobian_stacked(th)
                    el = time.perf_counter() - t0
                    if best is None or el < best[1]:
                        best = (name, el)
            choice = best[0]
        for net in nets:
            net.matmul_backend = choice
        return choice

    @property
    def vsini_limit_kms(self) -> float:
        """vsini below which these data do not resolve rotation (km/s; see
        :func:`distlabels.fit.broadening.vsini_resolution_limit_kms`): a fitted vsini under it is an upper limit."""
        lam = self.wavelength_vac[np.isfinite(self.wavelength_vac)]
        pixel_kms = float(np.median(np.diff(np.log(lam)))) * C_KMS if len(lam) > 1 else 0.0
        r = self.resolution
        if r is None and self.model.resolution is not None:
            r = self.model.resolution
        return vsini_resolution_limit_kms(r, pixel_kms)

    def _sigma_max_kms(self, resolution) -> float:
        """Upper bound of the fitted extra Gaussian sigma (km/s): 3x the nominal LSF sigma, else 100 km/s."""
        if not self.config.fit_lsf:
            return 0.0
        if resolution:
            return 3.0 * C_KMS / (FWHM_PER_SIGMA * resolution)
        return 100.0

    # ------------------------------------------------------------------ public API
    def fit(self, flux, ivar, mask=None, *, return_covariance: bool | None = None) -> FitResult:
        """Fit spectra: flux, ivar (n, n_pix) (any float dtype), mask (n, n_pix) bool, True = bad.

        The spectra travel to the fit's device one batch at a time and are screened there (usable
        pixels, median S/N): on a GPU the host only slices and copies.
        """
        flux = np.asarray(flux, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float32)
        if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != self.n_pix:
            raise ValueError(f"flux and ivar must both be (n_star, {self.n_pix}); got {flux.shape} and {ivar.shape}")
        if mask is not None:
            try:                                          # (n_pix,) masks every star alike
                mask = np.broadcast_to(np.asarray(mask, dtype=bool), flux.shape)
            except ValueError:
                raise ValueError(f"mask must be {flux.shape} like flux (or ({self.n_pix},)); "
                                 f"got {np.shape(mask)}") from None
        cfg = self.config
        cov_out = cfg.covariance if return_covariance is None else return_covariance
        n, L = len(flux), self.n_labels
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        res = FitResult(self.label_names, nan(n, L), nan(n, L), nan(n), nan(n), nan(n), np.zeros(n, np.int64),
                        np.zeros(n, np.int64), nan(n, self.n_cont), nan(n),
                        nan(n, L + 1, L + 1) if cov_out else None)
        if cfg.fit_vsini:
            res.vsini, res.vsini_err = nan(n), nan(n)
        if cfg.fit_lsf:
            res.resolution, res.resolution_err = nan(n), nan(n)
        bs = max(int(cfg.batch_size), 1)
        with torch.no_grad():
            for lo in range(0, n, bs):
                rows = np.arange(lo, min(lo + bs, n))
                d, w, n_good, snr = self._screen(flux[rows], ivar[rows], None if mask is None else mask[rows])
                res.snr[rows] = snr
                res.flags[rows[n_good == 0]] |= Flag.BAD_INPUT
                res.flags[rows[(n_good > 0) & (n_good < cfg.min_good_pixels)]] |= Flag.FEW_PIXELS
                keep = n_good >= cfg.min_good_pixels
                if not keep.any():
                    continue
                if not keep.all():
                    sel = torch.as_tensor(np.flatnonzero(keep), device=self.device)
                    d, w = d[sel], w[sel]
                fit_in_halves(lambda i_, dw: self._fit_batch(i_, *dw, res), lambda dw, sl: (dw[0][sl], dw[1][sl]),
                              rows[keep], (d, w), res, what="fit kernel: a batch", device=self.device)
        res.flags[np.isfinite(res.snr) & (res.snr < cfg.low_snr)] |= Flag.LOW_SNR
        return res

    def _screen(self, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None):
        """One batch onto the device: data and weights (m, n_pix) in the network's precision with
        unusable pixels (non-finite, ivar <= 0, masked, outside the fit's pixels) at weight 0, and
        per star the number of usable pixels (m,) and the median S/N per usable pixel (m,) (numpy)."""
        dev = self.device
        f = torch.as_tensor(flux).to(dev, non_blocking=True)
        iv = torch.as_tensor(ivar).to(dev, non_blocking=True)
        good = torch.isfinite(f) & torch.isfinite(iv) & (iv > 0) & self.usable[None]
        if mask is not None:
            good &= ~torch.as_tensor(mask).to(dev, non_blocking=True)
        d = torch.where(good, f, torch.zeros_like(f))
        w = torch.where(good, iv, torch.zeros_like(iv))
        n_good = good.sum(1)
        # Median of |flux| sqrt(ivar) over the usable pixels (for an even count the lower of the two
        # middle values: torch's convention, a fifth of the cost of averaging them through a sort).
        snr_pix = torch.where(good, d.abs() * w.sqrt(), torch.full_like(d, float("nan")))
        mid = torch.nanmedian(snr_pix, 1).values.double()
        return d.to(self.dtype), w.to(self.dtype), n_good.cpu().numpy(), mid.cpu().numpy()

    @torch.no_grad()
    def model_flux(self, labels, rv_kms, continuum, vsini_kms=None, resolution=None) -> np.ndarray:
        """Model on the observed pixels (n, n_pix): labels (n, n_labels) physical, rv (n,) km/s, continuum (n, n_cont).

        vsini_kms / resolution: broadening, for fitters that fit it (default: none / the nominal R).
        """
        p = self.params_from(labels, rv_kms, continuum, vsini_kms, resolution)
        m, _ = self.fwd.evaluate(p, jac=False)
        return m.double().cpu().numpy()

    def params_from(self, labels, rv_kms, continuum=None, vsini_kms=None, resolution=None) -> torch.Tensor:
        """Parameter vectors (n, n_par) float64 from physical labels, RV, continuum and broadening."""
        lab = torch.as_tensor(np.atleast_2d(np.asarray(labels, np.float64)))
        x = self.model.scale(lab).numpy()
        n = len(x)
        p = torch.zeros(n, self.n_par, dtype=torch.float64, device=self.device)
        p[:, : self.lmap.n_theta] = torch.as_tensor(self.lmap.from_x(x), device=self.device)
        p[:, self.fwd.i_v] = torch.as_tensor(np.broadcast_to(np.asarray(rv_kms, np.float64), (n,)).copy(),
                                             device=self.device)
        if continuum is None:
            p[:, self.fwd.i_c:] = self._unit_cont(n)
        else:
            p[:, self.fwd.i_c:] = torch.as_tensor(np.atleast_2d(np.asarray(continuum, np.float64)), device=self.device)
        if self.fwd.i_q is not None:
            v = np.zeros(n) if vsini_kms is None else np.broadcast_to(np.asarray(vsini_kms, np.float64), (n,))
            p[:, self.fwd.i_q] = torch.as_tensor(v * v, device=self.device)
        if self.fwd.i_s is not None:
            if resolution is None:
                p[:, self.fwd.i_s] = self.s_start
            else:
                sig = C_KMS / (FWHM_PER_SIGMA * np.broadcast_to(np.asarray(resolution, np.float64), (n,)))
                p[:, self.fwd.i_s] = torch.as_tensor(np.maximum(sig**2 - (self.sigma_base_kms or 0) ** 2, 0),
                                                     device=self.device)
        return p

    # ------------------------------------------------------------------ start
    def _poly_continuum(self, d, w, shape):
        """Weighted least-squares continuum coefficients of d ~ (basis @ c) * shape: (n, n_cont) float64."""
        a = self.fwd.basis_t[None] * shape[:, None, :]                              # (n, n_cont, n_pix)
        aw = a * w[:, None, :]
        lhs = (aw @ a.transpose(1, 2)).double()
        rhs = (aw @ d[:, :, None]).double()[:, :, 0]
        lhs = lhs + 1e-9 * torch.diag_embed(lhs.diagonal(dim1=1, dim2=2).abs() + 1e-12)
        return torch.linalg.solve_ex(lhs, rhs)[0]               # no error check: no host-device sync

    def _unit_cont(self, n):
        """Continuum coefficients of a flat continuum at 1 (T_0 = 1 in every segment)."""
        c = torch.zeros(n, self.n_cont, dtype=torch.float64, device=self.device)
        deg = self.config.continuum_degree
        if deg >= 0:
            c[:, ::deg + 1] = 1.0
        else:
            c[:, 0] = 1.0
        return c

    def _initial_params(self, d, w, theta0, v0, q0=None):
        """Parameter vectors (n, n_par) from start labels and RV; continuum by linear least squares."""
        n = len(d)
        p = torch.zeros(n, self.n_par, dtype=torch.float64, device=self.device)
        p[:, : self.lmap.n_theta] = theta0
        p[:, self.fwd.i_v] = v0
        p[:, self.fwd.i_c:] = self._unit_cont(n)
        if self.fwd.i_q is not None and q0 is not None:
            p[:, self.fwd.i_q] = q0
        if self.fwd.i_s is not None:
            p[:, self.fwd.i_s] = self.s_start
        if self.fit_continuum:
            p[:, self.fwd.i_c:] = self._poly_continuum(d, w, self.fwd.shape(p))
        return p

    def _vsini_start(self, d, w, p):
        """q = vsini^2 start from a few trial values (chi^2 with the continuum refitted): (n,) float64."""
        trials = torch.tensor([0.0, 30.0, 80.0, 150.0, 250.0], dtype=torch.float64, device=self.device)
        trials = trials[trials <= self.config.vsini_max_kms] ** 2
        best_c, best_q = None, torch.zeros(len(p), dtype=torch.float64, device=self.device)
        for q in trials:
            pq = p.clone()
            pq[:, self.fwd.i_q] = q
            shape = self.fwd.shape(pq)
            if self.fit_continuum:
                pq[:, self.fwd.i_c:] = self._poly_continuum(d, w, shape)
            m = shape * self.fwd.continuum(pq)
            c2 = ((d - m).double() ** 2 * w.double()).sum(1)
            if best_c is None:
                best_c, best_q = c2, torch.full_like(c2, float(q))
            else:
                better = c2 < best_c
                best_c = torch.where(better, c2, best_c)
                best_q = torch.where(better, torch.full_like(c2, float(q)), best_q)
        return best_q

    # ------------------------------------------------------------------ one batch
    def _fit_batch(self, idx, d, w, res: FitResult):
        """Fit stars ``idx`` (rows of ``res``): d, w (n, n_pix) on the device, unusable pixels at w = 0."""
        cfg, dev = self.config, self.device
        fwd = self.fwd
        n = len(d)
        if self.fit_continuum:
            cont0 = self._poly_continuum(d, w, torch.ones_like(d)).to(self.dtype) @ fwd.basis_t
        else:
            cont0 = torch.ones_like(d)
        okc = cont0 > 0
        dn = torch.where(okc, d / cont0.clamp_min(1e-30), torch.zeros_like(d))
        wn = torch.where(okc, w * cont0 * cont0, torch.zeros_like(w))
        v0, ccf_gain = self.start.rv(dn, wn)
        v0 = v0.clamp(-cfg.v_max_kms, cfg.v_max_kms)
        k = max(int(cfg.n_starts), int(cfg.starts_always), 1)
        cand = self.start.library(dn, wn, v0, k)                                      # (n, k)

        # Pixels the model cannot reach at the start velocity get no weight; the model variance
        # (emulator error) joins the data variance, once, with the start continuum.
        reach = fwd.reach(v0)
        mvar = self.work_var[fwd.pixel_index(v0)] * cont0 * cont0
        w = torch.where(reach, w / (1 + w * mvar), torch.zeros_like(w))
        dof = ((w > 0).sum(1).double() - self.free.sum().double()).clamp_min(1)

        # Stage 2 steps on a J^T W J whose label block comes from one (H, H) matrix for the batch
        # (a full Jacobian costs an (n_pix, H) product per label): the gradient stays exact, and every
        # star gets the exact matrix before it stops, so minimum and errors are the exact ones.
        curv = None
        if self.use_approx_curvature:
            curv = ApproxCurvature(fwd, w)
        n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
        best = self._run_start(d, w, cand[:, 0], v0, curvature=curv)
        n_iter += best.n_iter
        # More starts (the next library candidates): for every star up to ``starts_always``, and up to
        # ``n_starts`` for any star that would be flagged CHI2_HIGH or NOT_CONVERGED (a local minimum or
        # a bad start); the lowest chi^2 wins.
        for j in range(1, cand.shape[1]):
            poor = self._poor(best, dof)
            sel = torch.arange(n, device=dev) if j < cfg.starts_always else torch.nonzero(poor | ~best.converged).flatten()
            if len(sel) == 0:
                break
            st = self._run_start(d[sel], w[sel], cand[sel, j], v0[sel], curvature=curv)
            n_iter[sel] += st.n_iter
            self._keep_better(best, st, sel)
        # Stars still far above the noise: the best start again with all labels free from the first
        # step. Stage 1 holds the weak labels at the median, and in cool metal-rich giants the main
        # labels then absorb the CO/CN misfit and lead stage 2 into a secondary minimum (C and O both
        # high) that any library start reaches the same way.
        if cfg.restart_all_labels and len(self.main) < self.lmap.n_theta:
            chi2_red = best.chi2 / dof
            sel = torch.nonzero((chi2_red > 1 + cfg.restart_chi2_sigma * torch.sqrt(2 / dof)) | ~best.converged).flatten()
            if len(sel):
                st = self._run_start(d[sel], w[sel], cand[sel, 0], v0[sel], stage1=False, curvature=curv)
                n_iter[sel] += st.n_iter
                self._keep_better(best, st, sel)
        self._finish(idx, best, n_iter, w, dof, ccf_gain, res)

    def _poor(self, st, dof):
        """(n,) bool: CHI2_HIGH, reduced chi^2 above chi2_red_high and > chi2_sigma_high sigma above 1."""
        cfg = self.config
        chi2_red = st.chi2 / dof
        return (chi2_red > cfg.chi2_red_high) & (chi2_red > 1 + cfg.chi2_sigma_high * torch.sqrt(2 / dof))

    @staticmethod
    def _keep_better(best, st, sel):
        """Stars sel of ``best`` take the results of ``st`` where its chi^2 is lower."""
        better = (st.chi2 < best.chi2[sel] - 1e-9).nonzero().squeeze(1)      # indices: one host-device sync
        s_b = sel[better]
        for name in ("p", "A", "g", "chi2", "converged", "decrement"):
            getattr(best, name)[s_b] = getattr(st, name)[better]

    def _run_start(self, d, w, cand, v0, stage1: bool = True, curvature=None):
        """LM from library entries cand (n,) at RV v0 (n,); stage1=False frees every label at once;
        curvature: the approximate J^T W J for stage 2 (see :func:`.lm.levenberg_marquardt`)."""
        cfg, fwd = self.config, self.fwd
        p0 = self._initial_params(d, w, self.lib_theta[cand], v0)
        if fwd.i_q is not None:
            p0[:, fwd.i_q] = self._vsini_start(d, w, p0)
            if self.fit_continuum:
                p0[:, fwd.i_c:] = self._poly_continuum(d, w, fwd.shape(p0))
        sm = self.sel_main
        two_stage = stage1 and cfg.start_max_iter > 0 and len(self.main) < self.lmap.n_theta
        if two_stage:
            k1 = self.stage1_pixels
            # Its result is only a start: it may stop on the approximate matrix.
            c1 = None
            if curvature is not None and self.fwd_main.supports_approx_curvature:
                c1 = curvature.on(self.fwd_main, 1.0 / self.stage1_step)
            st1 = levenberg_marquardt(self.fwd_main, d[:, k1], w[:, k1], p0[:, sm], free=self.free[sm], lo=self.lo[sm], hi=self.hi[sm],
                                      max_iter=cfg.start_max_iter, tol=cfg.start_chi2_tol, lambda_init=cfg.lambda_init,
                                      curvature=c1, exact_stop=False)
            p0[:, sm] = st1.p
        st = levenberg_marquardt(fwd, d, w, p0, free=self.free, lo=self.lo, hi=self.hi, max_iter=cfg.max_iter,
                                 tol=cfg.chi2_tol, lambda_init=cfg.lambda_init, curvature=curvature)
        if two_stage:
            st.n_iter += st1.n_iter
        return st

    # ------------------------------------------------------------------ results
    def _finish(self, idx, st, n_iter, w, dof, ccf_gain, res: FitResult):
        """Errors from (J^T W J)^-1, physical units and flags into ``res`` rows ``idx``."""
        cfg, dev, lm, fwd = self.config, self.device, self.lmap, self.fwd
        n, K = len(st.p), lm.n_theta
        p = st.p
        cov, cov_lv = self.covariance(st.A)
        var = cov_lv.diagonal(dim1=1, dim2=2).clamp_min(0)
        x = torch.as_tensor(lm.offset, dtype=torch.float64, device=dev)[None] + p[:, :K] @ torch.as_tensor(
            lm.matrix, dtype=torch.float64, device=dev).T

        flags = np.zeros(n, np.int64)
        th = p[:, :K]
        lo, hi = self.lo[:K], self.hi[:K]
        at_bound = ((th <= lo + 1e-6) | (th >= hi - 1e-6)).cpu().numpy()
        flags[at_bound.any(1)] |= Flag.AT_LABEL_BOUND
        bits = np.zeros(n, np.int64)
        for k, grp in enumerate(lm.groups):
            for i in grp:
                bits[at_bound[:, k]] |= np.int64(1) << np.int64(i)
        res.labels_at_bound[idx] = bits
        flags[(p[:, fwd.i_v].abs() >= cfg.v_max_kms - 1e-3).cpu().numpy()] |= Flag.RV_AT_BOUND
        flags[(~st.converged).cpu().numpy()] |= Flag.NOT_CONVERGED
        chi2_red = (st.chi2 / dof).cpu().numpy()
        flags[self._poor(st, dof).cpu().numpy()] |= Flag.CHI2_HIGH
        rv_err = var[:, -1].sqrt()
        rv_bad = ~torch.isfinite(rv_err) | (rv_err > cfg.rv_err_max_kms) | (ccf_gain < cfg.rv_min_ccf_delta_chi2)
        flags[rv_bad.cpu().numpy()] |= Flag.RV_FAILED
        for i_b in (fwd.i_q, fwd.i_s):
            if i_b is not None:
                flags[(p[:, i_b] >= self.hi[i_b] * (1 - 1e-6)).cpu().numpy()] |= Flag.BROADENING_AT_BOUND
        if self._train_x is not None and self._train_x.shape[1] > 0:
            xf = x[:, torch.as_tensor(self._far_labels, device=dev)]
            nn = torch.cdist(xf, self._train_x).min(1).values
            flags[(nn > cfg.far_from_training * self.nn_ref).cpu().numpy()] |= Flag.FAR_FROM_TRAINING

        res.labels[idx] = self.model.unscale(x.cpu()).numpy()
        res.errors[idx] = var[:, : self.n_labels].sqrt().cpu().numpy()
        res.rv[idx] = p[:, fwd.i_v].cpu().numpy()
        res.rv_err[idx] = rv_err.cpu().numpy()
        res.chi2_red[idx] = chi2_red
        res.n_iter[idx] = n_iter.cpu().numpy()
        res.flags[idx] |= flags
        res.continuum[idx] = p[:, fwd.i_c:].cpu().numpy()
        if res.covariance is not None:
            res.covariance[idx] = cov_lv.cpu().numpy()
        if fwd.i_q is not None:
            q, sq = p[:, fwd.i_q].clamp_min(0), cov[:, fwd.i_q, fwd.i_q].clamp_min(0)
            res.vsini[idx] = q.sqrt().cpu().numpy()
            res.vsini_err[idx] = ((q + sq.sqrt()).sqrt() - q.sqrt()).cpu().numpy()
        if fwd.i_s is not None:
            s, ss = p[:, fwd.i_s].clamp_min(0), cov[:, fwd.i_s, fwd.i_s].clamp_min(0).sqrt()
            sig2 = (self.sigma_base_kms or 0.0) ** 2 + s
            r = C_KMS / (FWHM_PER_SIGMA * sig2.sqrt())
            res.resolution[idx] = r.cpu().numpy()
            res.resolution_err[idx] = (r / (2 * sig2) * ss).cpu().numpy()

    def covariance(self, A: torch.Tensor):
        """Covariances from J^T W J (n, P, P): of the parameters (n, P, P; 0 for held ones) and of
        the labels in physical units plus RV (n, n_labels + 1, n_labels + 1)."""
        n = len(A)
        keep = self.free.double()
        Af = A * keep[None, :, None] * keep[None, None, :] + torch.diag_embed((1 - keep)[None].expand(n, -1))
        cov = pinv_hermitian(Af) * keep[None, :, None] * keep[None, None, :]
        # Labels: x = offset + T theta; physical = (x + 0.5) span + x_min.
        span = torch.as_tensor(self.model.label_span, dtype=torch.float64, device=self.device)
        T = torch.as_tensor(self.lmap.matrix, dtype=torch.float64, device=self.device)      # (L, K)
        G = torch.zeros(self.n_labels + 1, self.n_par, dtype=torch.float64, device=self.device)
        G[: self.n_labels, : self.lmap.n_theta] = T * span[:, None]
        G[self.n_labels, self.fwd.i_v] = 1.0
        return cov, G[None] @ cov @ G.T[None]

    def fisher(self, p: torch.Tensor, ivar: torch.Tensor, usable: torch.Tensor | None = None) -> torch.Tensor:
        """J^T W J (n, n_par, n_par) float64 at parameters p for inverse variances ivar (n, n_pix).

        Pixels the fit would not use (masks, segments, model coverage at the star's RV, and
        ``usable`` False) get no weight. The Jacobian is taken in float64 products.
        """
        m, jac = self.fwd.evaluate(p, jac=True)
        ok = self.usable[None] & self.fwd.reach(p[:, self.fwd.i_v])
        if usable is not None:
            ok = ok & usable
        w = torch.where(ok, ivar.to(m.dtype), torch.zeros_like(m))
        A, _, _ = normal_equations(m, jac.double(), m, w)
        return A


def _decimated_native_grid(lam_mod, lam_obs, k: int, v_max_kms: float):
    """Every k-th model pixel as a native working grid for every k-th observed pixel; its projection
    picks those pixels out of the full model vector."""
    sub = np.arange(0, len(lam_mod), k)
    g = build_native_grid(lam_mod[sub], lam_obs[::k], v_max_kms=v_max_kms)
    pick = sp.csr_matrix((np.ones(len(sub)), (np.arange(len(sub)), sub)), shape=(len(sub), len(lam_mod)))
    return type(g)(g.log10_start, g.step_dex, g.n_work, g.covered, g.projection @ pick, g.sigma_ln, g.native,
                   g.v_max_kms)


def _segments_of(lam_obs, segments):
    """The continuum segments as used for the observed pixels (the whole range when none are given)."""
    if segments:
        return segments
    finite = lam_obs[np.isfinite(lam_obs)]
    return ((float(finite.min()), float(finite.max())),)


def _sparse_torch(matrix) -> torch.Tensor:
    coo = matrix.tocoo()
    return torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, size=coo.shape, dtype=torch.float64,
                                   check_invariants=False)


def fit_spectra(model: Emulator, wavelength_aa, flux, ivar, *, mask=None, config: FitConfig | None = None,
                device="cpu", wavelength_medium: str = "vacuum", resolution: float | None = None,
                segments=None) -> FitResult:
    """Fit every spectrum (rows of flux, ivar: (n_star, n_pix)) on one observed grid. See SpectrumFitter."""
    fitter = SpectrumFitter(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution,
                            segments=segments, config=config, device=device)
    return fitter.fit(flux, ivar, mask)
