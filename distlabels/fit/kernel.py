"""The fitting kernel: batched Levenberg-Marquardt over labels, radial velocity and continuum.

Pure torch, no I/O and no Dask; the same code runs on CPU and CUDA.

Forward model of observed pixel p of star s (all wavelengths vacuum)::

    model[s, p] = cont[s, p] * F_work(x_s)[u_p - shift(v_s)]        (linear interpolation)
    cont[s, p]  = sum_k c[s, k] * T_k(lambda_p)                     (Chebyshev per segment)

``F_work`` is the emulator folded onto the working grid (see :mod:`.working_grid`), ``x`` the
scaled labels, ``shift(v) = log10(doppler(v)) / step``. Parameters per star:
``[x (n_labels), v (km/s), c (n_cont)]``. The Jacobian is analytic (through the network, the
interpolation and the continuum); J^T W J and the solves are in float64.

Start: continuum from a polynomial fit to the data, RV from a cross-correlation against a few
emulator templates, labels from the best of ``library_size`` emulator spectra by chi^2 (two
matrix products per batch, see ``_library_start``), then LM to convergence. Stars that have
converged stop costing work. Errors are sqrt(diag((J^T W J)^-1)), not rescaled by chi^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import FitConfig
from ..io.wavelength import C_KMS, to_vacuum
from ..models.base import Emulator
from .flags import Flag
from .working_grid import build_working_grid, chebyshev_basis, log10_doppler

LN10 = float(np.log(10.0))


@dataclass
class FitResult:
    """Per-star results as numpy arrays (n_star first). Physical units; NaN where not fitted."""

    label_names: tuple[str, ...]
    labels: np.ndarray          # (n, n_labels)
    errors: np.ndarray          # (n, n_labels)
    rv: np.ndarray              # (n,) km/s
    rv_err: np.ndarray          # (n,) km/s
    chi2_red: np.ndarray        # (n,)
    n_iter: np.ndarray          # (n,) int
    flags: np.ndarray           # (n,) int64 bitmask, see distlabels.fit.flags
    continuum: np.ndarray       # (n, n_cont) Chebyshev coefficients
    snr: np.ndarray             # (n,) median S/N per pixel over usable pixels
    covariance: np.ndarray | None = field(default=None)  # (n, n_par, n_par) scaled units, optional

    def __len__(self) -> int:
        return len(self.rv)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SpectrumFitter:
    """Fits spectra that share one observed wavelength grid with one emulator.

    Building it does the per-grid work once (working grid, folded network, continuum basis,
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
        lam_obs = to_vacuum(np.asarray(wavelength_aa, np.float64), wavelength_medium)
        self.wavelength_vac = lam_obs
        self.n_pix = len(lam_obs)
        lam_mod = to_vacuum(model.wavelength, model.wavelength_medium)
        self.grid = g = build_working_grid(lam_mod, lam_obs, resolution=resolution,
                                           model_resolution=model.resolution, oversample=cfg.oversample,
                                           v_max_kms=cfg.v_max_kms)
        coo = g.projection.tocoo()
        proj = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, size=coo.shape,
                                       dtype=torch.float64, check_invariants=False)
        self.work = model.to("cpu").project(proj).to(dev).eval()
        # Network precision: float32 unless the model was cast to float64 (J^T W J is float64 always).
        self.dtype = dt = next(self.work.parameters()).dtype
        self.work_ok = torch.as_tensor(g.covered, device=dev)
        mv = model.model_variance.detach().cpu().double().numpy()
        self.work_var = torch.as_tensor(g.projection @ mv, dtype=dt, device=dev)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.u0 = torch.as_tensor(g.position(np.log10(lam_obs)), dtype=torch.float64, device=dev)
        basis, seg_of = chebyshev_basis(lam_obs, segments, cfg.continuum_degree)
        self.in_segment = torch.as_tensor((seg_of >= 0) & np.isfinite(lam_obs), device=dev)
        self.basis = torch.as_tensor(basis, dtype=dt, device=dev)                 # (n_pix, n_cont)
        self.n_cont = basis.shape[1]
        self.n_par = L + 1 + self.n_cont
        self.fit_continuum = cfg.continuum_degree >= 0

        # Which parameters move: fixed labels (FitConfig.fix) and, for pre-normalised spectra,
        # the continuum, are held.
        free = np.ones(self.n_par, bool)
        self.x_fixed = {}
        for name, value in cfg.fixed().items():
            if name not in self.label_names:
                raise ValueError(f"--fix names unknown label {name!r} (labels: {', '.join(self.label_names)})")
            i = self.label_names.index(name)
            free[i] = False
            self.x_fixed[i] = float(model.scale(torch.tensor([[value if j == i else 0.0 for j in range(L)]],
                                                             dtype=torch.float64))[0, i])
        if not self.fit_continuum:
            free[L + 1:] = False
        self.free = torch.as_tensor(free, device=dev)

        # Template library: emulator spectra on the working grid at training labels.
        rng = np.random.default_rng(cfg.seed)
        tl = model.training_labels
        if len(tl) == 0:  # no training labels stored: a Latin-hypercube-like draw inside the box
            xs = rng.uniform(-0.45, 0.45, size=(cfg.library_size, L))
        else:
            pick = rng.choice(len(tl), size=min(cfg.library_size, len(tl)), replace=False)
            xs = model.scale(torch.as_tensor(tl[pick], dtype=torch.float64)).numpy()
        xs = np.clip(xs, -0.5, 0.5)
        for i, xv in self.x_fixed.items():
            xs[:, i] = xv
        self.lib_x = torch.as_tensor(xs, dtype=dt, device=dev)
        with torch.no_grad():
            self.lib = self.work(self.lib_x) * self.work_ok                     # (K, n_work)
        order = np.argsort(xs[:, 0])
        t_idx = order[np.linspace(0, len(order) - 1, max(cfg.n_templates, 1)).round().astype(int)]
        self.templates = self.lib[torch.as_tensor(t_idx, device=dev)]        # (n_t, n_work)
        self.max_shift = int(np.ceil(float(log10_doppler(cfg.v_max_kms)) / g.step_dex))

    # ------------------------------------------------------------------ public API
    def fit(self, flux, ivar, mask=None, *, return_covariance: bool = False) -> FitResult:
        """Fit spectra: flux, ivar (n, n_pix) (any float dtype), mask (n, n_pix) bool, True = bad."""
        flux = np.asarray(flux, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float32)
        if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != self.n_pix:
            raise ValueError(f"flux and ivar must both be (n_star, {self.n_pix}); got {flux.shape} and {ivar.shape}")
        n, L = len(flux), self.n_labels
        good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        if mask is not None:
            good &= ~np.asarray(mask, dtype=bool)
        good &= self.in_segment.cpu().numpy()[None]
        n_good = good.sum(1)
        res = FitResult(self.label_names, np.full((n, L), np.nan), np.full((n, L), np.nan),
                        np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64),
                        np.zeros(n, np.int64), np.full((n, self.n_cont), np.nan), np.full(n, np.nan),
                        np.full((n, self.n_par, self.n_par), np.nan) if return_covariance else None)
        with np.errstate(invalid="ignore"):
            snr_pix = np.where(good, np.abs(flux) * np.sqrt(np.where(good, ivar, 0)), np.nan)
        all_nan = ~np.isfinite(snr_pix).any(1)
        res.snr[~all_nan] = np.nanmedian(snr_pix[~all_nan], axis=1)
        res.flags[n_good == 0] |= Flag.BAD_INPUT
        res.flags[(n_good > 0) & (n_good < self.config.min_good_pixels)] |= Flag.FEW_PIXELS
        todo = np.flatnonzero(n_good >= self.config.min_good_pixels)
        d_all = np.where(good, flux, 0).astype(np.float32)
        w_all = np.where(good, ivar, 0).astype(np.float32)
        bs = max(int(self.config.batch_size), 1)
        for lo in range(0, len(todo), bs):
            idx = todo[lo:lo + bs]
            try:
                self._fit_batch(idx, d_all[idx], w_all[idx], res)
            except (RuntimeError, torch.linalg.LinAlgError):
                # One bad batch must not sink the others: refit its stars one by one.
                for i in idx:
                    try:
                        self._fit_batch(np.array([i]), d_all[[i]], w_all[[i]], res)
                    except (RuntimeError, torch.linalg.LinAlgError):
                        res.flags[i] |= Flag.FIT_ERROR
        res.flags[np.isfinite(res.snr) & (res.snr < self.config.low_snr)] |= Flag.LOW_SNR
        return res

    @torch.no_grad()
    def model_flux(self, labels, rv_kms, continuum) -> np.ndarray:
        """Best-fit model on the observed pixels: labels (n, n_labels) physical, rv (n,), continuum (n, n_cont)."""
        lab = torch.as_tensor(np.atleast_2d(labels), dtype=torch.float64, device=self.device)
        x = self.model.scale(lab.cpu()).to(self.device)
        p = torch.cat([x, torch.as_tensor(np.atleast_1d(rv_kms), dtype=torch.float64, device=self.device)[:, None],
                       torch.as_tensor(np.atleast_2d(continuum), dtype=torch.float64, device=self.device)], 1)
        m, _ = self._evaluate(p, jac=False)
        return m.double().cpu().numpy()

    # ------------------------------------------------------------------ model evaluation
    def _interp_index(self, v: torch.Tensor):
        """Working-grid index and weight of every observed pixel at velocities v (n,) km/s."""
        g = self.grid
        b = v / C_KMS
        shift = 0.5 * (torch.log10(1 + b) - torch.log10(1 - b)) / g.step_dex      # (n,)
        u = self.u0[None] - shift[:, None]                                         # (n, n_pix)
        u = torch.nan_to_num(u, nan=0.0).clamp(0, g.n_work - 1.000001)
        i = u.floor().long()
        f = (u - i).to(self.dtype)
        return i, f

    def _evaluate(self, p: torch.Tensor, jac: bool):
        """Model (n, n_pix) and, if jac, its Jacobian (n, n_pix, n_par), at parameters p (n, n_par) float64."""
        L = self.n_labels
        x, v, c = p[:, :L], p[:, L], p[:, L + 1:]
        i, f = self._interp_index(v)
        cont = (c.to(self.dtype) @ self.basis.T) if self.fit_continuum else torch.ones_like(f)
        if not jac:
            y = self.work(x.to(self.dtype))
            y0, y1 = y.gather(1, i), y.gather(1, i + 1)
            return cont * ((1 - f) * y0 + f * y1), None
        y, jy = self.work.value_and_jacobian(x.to(self.dtype))                          # (n, W), (n, W, L)
        y0, y1 = y.gather(1, i), y.gather(1, i + 1)
        flux = (1 - f) * y0 + f * y1
        ie = i[:, :, None].expand(-1, -1, L)
        jf = (1 - f)[:, :, None] * jy.gather(1, ie) + f[:, :, None] * jy.gather(1, ie + 1)
        # d shift / dv = 1 / (ln10 * c * (1 - b^2)) / step; u = u0 - shift
        b = v / C_KMS
        dshift = (1.0 / (LN10 * C_KMS * (1 - b * b) * self.grid.step_dex)).to(self.dtype)
        jv = -cont * (y1 - y0) * dshift[:, None]
        jc = flux[:, :, None] * self.basis[None]
        jac_full = torch.cat([cont[:, :, None] * jf, jv[:, :, None], jc], dim=2)
        return cont * flux, jac_full

    # ------------------------------------------------------------------ start
    def _poly_continuum(self, d, w, shape):
        """Weighted least-squares continuum coefficients of d ~ (basis @ c) * shape: (n, n_cont) float64."""
        a = self.basis[None] * shape[:, :, None]                                   # (n, n_pix, n_cont)
        aw = a * w[:, :, None]
        lhs = (aw.transpose(1, 2) @ a).double()
        rhs = (aw.transpose(1, 2) @ d[:, :, None]).double()[:, :, 0]
        lhs = lhs + 1e-9 * torch.diag_embed(lhs.diagonal(dim1=1, dim2=2).abs() + 1e-12)
        return torch.linalg.solve(lhs, rhs)

    def _rv_ccf(self, dn, wn):
        """RV (n,) km/s from a chi^2-weighted cross-correlation with a few templates.

        Observed pixels are binned to their nearest working pixel at rest, so the correlation over
        every integer shift is one matrix product per template.
        """
        n = len(dn)
        g = self.grid
        idx = self.u0.round().long().clamp(0, g.n_work - 1)
        data = torch.zeros(n, g.n_work, dtype=dn.dtype, device=self.device).index_add_(1, idx, wn * (dn - 1))
        wts = torch.zeros(n, g.n_work, dtype=dn.dtype, device=self.device).index_add_(1, idx, wn)
        k = self.max_shift
        shifts = torch.arange(-k, k + 1, device=self.device)
        src = torch.arange(g.n_work, device=self.device)[:, None] - shifts[None]      # (W, 2k+1)
        inside = (src >= 0) & (src < g.n_work)
        src = src.clamp(0, g.n_work - 1)
        best_val = torch.full((n,), -np.inf, device=self.device)
        best_shift = torch.zeros(n, dtype=torch.float64, device=self.device)
        for t in self.templates:
            tm = (t[src] - 1) * inside * self.work_ok[src]                             # (W, 2k+1)
            ccf = data @ tm                                                           # (n, 2k+1)
            norm = (wts @ (tm * tm)).clamp_min(1e-20)
            crit = torch.where(ccf > 0, ccf * ccf / norm, torch.zeros_like(ccf))
            val, j = crit.max(1)
            # Parabola through the peak and its neighbours for a sub-pixel shift.
            jl, jr = (j - 1).clamp(0, 2 * k), (j + 1).clamp(0, 2 * k)
            cl, c0, cr = crit.gather(1, jl[:, None])[:, 0], val, crit.gather(1, jr[:, None])[:, 0]
            den = cl - 2 * c0 + cr
            off = torch.where((den < 0) & (j > 0) & (j < 2 * k), 0.5 * (cl - cr) / den, torch.zeros_like(den))
            sh = shifts[j].double() + off.double().clamp(-1, 1)
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_shift = torch.where(better, sh, best_shift)
        # Invert shift = log10(doppler(v)) / step for v.
        r = 10.0 ** (2 * best_shift * g.step_dex)
        return C_KMS * (r - 1) / (r + 1)

    def _library_start(self, dn, wn, v, k: int):
        """Indices (n, k) of the k library spectra with the lowest chi^2 (free scale) at velocity v."""
        i, f = self._interp_index(v)
        near = torch.where(f > 0.5, i + 1, i)
        n = len(dn)
        data = torch.zeros(n, self.grid.n_work, dtype=dn.dtype, device=self.device).scatter_add_(1, near, wn * dn)
        wts = torch.zeros(n, self.grid.n_work, dtype=dn.dtype, device=self.device).scatter_add_(1, near, wn)
        s1 = data @ self.lib.T                                                       # (n, K)
        s2 = (wts @ (self.lib * self.lib).T).clamp_min(1e-20)
        crit = torch.where(s1 > 0, s1 * s1 / s2, torch.zeros_like(s1))
        return crit.topk(min(k, crit.shape[1]), dim=1).indices

    # ------------------------------------------------------------------ LM
    def _initial_params(self, d, w, x0, v0):
        """Parameter vector (n, n_par) from start labels and RV, continuum by linear least squares."""
        n, L = len(d), self.n_labels
        p = torch.cat([x0, v0[:, None], self._unit_cont(n)], 1)
        for i, xv in self.x_fixed.items():
            p[:, i] = xv
        if self.fit_continuum:
            shape, _ = self._evaluate(p, jac=False)
            p[:, L + 1:] = self._poly_continuum(d, w, shape / (p[:, L + 1:].to(self.dtype) @ self.basis.T))
        return p

    def _fit_batch(self, idx, d_np, w_np, res: FitResult):
        """Start, LM, restarts for poor fits, then errors and flags into ``res`` rows ``idx``."""
        cfg, dev, L = self.config, self.device, self.n_labels
        d = torch.as_tensor(d_np, device=dev).to(self.dtype)
        w = torch.as_tensor(w_np, device=dev).to(self.dtype)
        n = len(d)
        # Continuum of the data alone, then RV, then the library start.
        if self.fit_continuum:
            cont0 = self._poly_continuum(d, w, torch.ones_like(d)).to(self.dtype) @ self.basis.T
        else:
            cont0 = torch.ones_like(d)
        okc = cont0 > 0
        dn = torch.where(okc, d / cont0.clamp_min(1e-30), torch.zeros_like(d))
        wn = torch.where(okc, w * cont0 * cont0, torch.zeros_like(w))
        v0 = self._rv_ccf(dn, wn)
        cand = self._library_start(dn, wn, v0, max(cfg.n_starts, 1))                  # (n, k)
        p = self._initial_params(d, w, self.lib_x[cand[:, 0]].double(), v0)
        # Pixels the model cannot reach at the start velocity get no weight; model variance
        # (emulator error) is added to the data variance here, once.
        i0, _ = self._interp_index(p[:, L])
        reach = self.work_ok[i0] & self.work_ok[(i0 + 1).clamp(max=self.grid.n_work - 1)]
        cont_start = (p[:, L + 1:].to(self.dtype) @ self.basis.T) if self.fit_continuum else torch.ones_like(d)
        mvar = self.work_var[i0] * cont_start * cont_start
        w = torch.where(reach, w / (1 + w * mvar), torch.zeros_like(w))
        dof = ((w > 0).sum(1).double() - self.free.sum().double()).clamp_min(1)

        p, chi2, A, conv, n_iter = self._lm(d, w, p)
        # Restarts: a chi^2 far above what noise allows (or no convergence) means a local minimum
        # or a bad start; try the next library candidates and keep the best.
        for k in range(1, cand.shape[1]):
            poor = ((chi2 / dof) > 1 + cfg.restart_sigma * torch.sqrt(2 / dof)) | ~conv
            sel = torch.nonzero(poor).flatten()
            if len(sel) == 0:
                break
            p2 = self._initial_params(d[sel], w[sel], self.lib_x[cand[sel, k]].double(), p[sel, L].clone())
            q, c2, A2, cv2, it2 = self._lm(d[sel], w[sel], p2)
            n_iter[sel] += it2
            better = c2 < chi2[sel]
            s_b = sel[better]
            p[s_b], chi2[s_b], A[s_b], conv[s_b] = q[better], c2[better], A2[better], cv2[better]
        self._finish(idx, p, chi2, A, conv, n_iter, w, dof, res)

    def _lm(self, d, w, p):
        """Levenberg-Marquardt from p (n, n_par) float64; returns p, chi2, J^T W J, converged, n_iter."""
        cfg, dev, L = self.config, self.device, self.n_labels
        n = len(d)
        lo = torch.full((self.n_par,), -np.inf, dtype=torch.float64, device=dev)
        hi = torch.full((self.n_par,), np.inf, dtype=torch.float64, device=dev)
        lo[:L], hi[:L] = -0.5, 0.5
        lo[L], hi[L] = -cfg.v_max_kms, cfg.v_max_kms
        p = torch.minimum(torch.maximum(p, lo), hi)
        lam = torch.full((n,), cfg.lambda_init, dtype=torch.float64, device=dev)
        chi2 = torch.zeros(n, dtype=torch.float64, device=dev)
        A = torch.zeros(n, self.n_par, self.n_par, dtype=torch.float64, device=dev)
        grad = torch.zeros(n, self.n_par, dtype=torch.float64, device=dev)
        need = torch.ones(n, dtype=torch.bool, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        converged = torch.zeros(n, dtype=torch.bool, device=dev)
        n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
        for _ in range(cfg.max_iter):
            act = torch.nonzero(active).flatten()
            if len(act) == 0:
                break
            upd = act[need[act]]
            if len(upd):
                A[upd], grad[upd], chi2[upd] = self._normal_equations(p[upd], d[upd], w[upd])
                need[upd] = False
            pa, Aa, ga = p[act], A[act], grad[act]
            # Parameters held: fixed ones, and bounded ones pushing outward (projected LM).
            hold = ~self.free[None].expand(len(act), -1).clone()
            hold |= (pa <= lo + 1e-9) & (ga < 0)
            hold |= (pa >= hi - 1e-9) & (ga > 0)
            diag = Aa.diagonal(dim1=1, dim2=2).clamp_min(1e-12)
            M = Aa + lam[act, None, None] * torch.diag_embed(diag)
            keep = (~hold).double()
            M = M * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(hold.double())
            step = torch.linalg.solve(M, (ga * keep)[:, :, None])[:, :, 0]
            trial = torch.minimum(torch.maximum(pa + step, lo), hi)
            mt, _ = self._evaluate(trial, jac=False)
            chi2_t = ((d[act] - mt).double() ** 2 * w[act].double()).sum(1)
            ok = torch.isfinite(chi2_t) & (chi2_t <= chi2[act])
            gain = chi2[act] - chi2_t
            n_iter[act] += 1
            p[act] = torch.where(ok[:, None], trial, pa)
            chi2[act] = torch.where(ok, chi2_t, chi2[act])
            need[act] = ok
            lam[act] = torch.where(ok, (lam[act] / 5).clamp_min(1e-7), lam[act] * 10)
            # Converged: an accepted step that barely changed chi^2, or steps that fail even
            # with heavy damping (already at the minimum to numerical precision).
            done = (ok & (gain < cfg.chi2_tol)) | (lam[act] > 1e9)
            converged[act] |= done
            active[act] &= ~done
        # Curvature at the solution for stars whose last step was accepted.
        upd = torch.nonzero(need).flatten()
        if len(upd):
            A[upd], _, chi2[upd] = self._normal_equations(p[upd], d[upd], w[upd])
        return p, chi2, A, converged, n_iter

    def _normal_equations(self, p, d, w):
        """J^T W J (n, P, P), J^T W r (n, P) and chi^2 (n,) at p, in float64."""
        m, jac = self._evaluate(p, jac=True)
        jd, wd = jac.double(), w.double()
        r = (d - m).double()
        jw = jd * wd[:, :, None]
        return jw.transpose(1, 2) @ jd, (jw.transpose(1, 2) @ r[:, :, None])[:, :, 0], (r * r * wd).sum(1)

    def _finish(self, idx, p, chi2, A, converged, n_iter, w, dof, res: FitResult):
        """Errors from (J^T W J)^-1, physical units and flags into ``res`` rows ``idx``."""
        cfg, dev, L = self.config, self.device, self.n_labels
        n = len(p)
        held = ~self.free
        keep = (~held).double()
        Af = A * keep[None, :, None] * keep[None, None, :] + torch.diag_embed(held.double()[None].expand(n, -1))
        cov = torch.linalg.pinv(Af, hermitian=True) * keep[None, :, None] * keep[None, None, :]
        var = cov.diagonal(dim1=1, dim2=2).clamp_min(0)
        span = torch.as_tensor(self.model.label_span, dtype=torch.float64, device=dev)
        x = p[:, :L]
        flags = np.zeros(n, np.int64)
        at_bound = ((x <= -0.5 + 1e-6) | (x >= 0.5 - 1e-6)) & self.free[None, :L]
        flags[at_bound.any(1).cpu().numpy()] |= Flag.AT_LABEL_BOUND
        flags[(p[:, L].abs() >= cfg.v_max_kms - 1e-3).cpu().numpy()] |= Flag.RV_AT_BOUND
        flags[(~converged).cpu().numpy()] |= Flag.NOT_CONVERGED
        chi2_red = (chi2 / dof).cpu().numpy()
        flags[chi2_red > cfg.chi2_red_high] |= Flag.CHI2_HIGH
        res.labels[idx] = self.model.unscale(x.cpu()).numpy()
        res.errors[idx] = (var[:, :L].sqrt() * span).cpu().numpy()
        res.rv[idx] = p[:, L].cpu().numpy()
        res.rv_err[idx] = var[:, L].sqrt().cpu().numpy()
        res.chi2_red[idx] = chi2_red
        res.n_iter[idx] = n_iter.cpu().numpy()
        res.flags[idx] |= flags
        res.continuum[idx] = p[:, L + 1:].cpu().numpy()
        if res.covariance is not None:
            res.covariance[idx] = cov.cpu().numpy()

    def _unit_cont(self, n):
        """Continuum coefficients of a flat continuum at 1 (T_0 = 1 in every segment)."""
        c = torch.zeros(n, self.n_cont, dtype=torch.float64, device=self.device)
        deg = self.config.continuum_degree
        if deg >= 0:
            c[:, ::deg + 1] = 1.0
        else:
            c[:, 0] = 1.0
        return c


def fit_spectra(model: Emulator, wavelength_aa, flux, ivar, *, mask=None, config: FitConfig | None = None,
                device="cpu", wavelength_medium: str = "vacuum", resolution: float | None = None,
                segments=None) -> FitResult:
    """Fit every spectrum (rows of flux, ivar: (n_star, n_pix)) on one observed grid. See SpectrumFitter."""
    fitter = SpectrumFitter(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution,
                            segments=segments, config=config, device=device)
    return fitter.fit(flux, ivar, mask)
