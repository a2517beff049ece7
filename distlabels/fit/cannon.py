"""The Cannon's test step: labels of observed spectra from a trained :class:`CannonModel`.

Per batch of stars (all torch, batched, CPU or CUDA):

1. RV from a cross-correlation of the roughly normalised spectrum with a few model spectra over a
   velocity grid (one matrix product per template; the template matrices are built once per grid),
   refined by a parabola through the peak. Skipped when the spectra are already in the rest frame
   (``FitConfig.v_max_kms <= 0``, or ``fix: {rv: VALUE}``).
2. The model's stored pseudo-continuum normalisation at that RV (the same function training used).
   Skipped for pre-normalised spectra (``FitConfig.continuum_degree < 0``) or a model trained on them.
3. The data stay on their own pixels (never resampled); the model is shifted onto them by cubic
   (Catmull-Rom) interpolation, which keeps lines sharp where linear interpolation would bias
   Teff, and its intrinsic scatter s2 is added to the variance.
4. Quadratic-form fast path. With RV and normalisation fixed the model is linear in the label vector
   v(x), so chi^2(x) = c - 2 b.v + v^T A v with per-star sums over pixels computed once::

       A = sum_p w_p th_p th_p^T    b = sum_p w_p f~_p th_p    c = sum_p w_p f~_p^2

   (th_p: the interpolated coefficients without the intercept, f~ = flux - intercept, which
   keeps the sums well scaled). For every star at once these are matrix products with packed
   per-model-pixel products theta_j theta_{j+d}^T (d > 0 only for sub-pixel shifts). Every later
   evaluation costs O(T^2) per star whatever the number of pixels.
5. Training-noise debiasing. Noise in the training spectra makes the model's own error at labels x,
   sum_p w_p v^T Cov(theta_p) v, smallest near the training set's centre, so a plain chi^2 pulls
   every star there (by about a formal error for ~1,000 training stars at S/N 100). The model
   stores Cov(theta_p) ~ k_p G from training; the fit subtracts beta v^T G v (beta = sum_p w_p k_p)
   from chi^2 and from the curvature used for the errors (``debias=False``: the references' chi^2).
6. Multi-start: chi^2 of a library of training-label points (one matrix product), Levenberg-Marquardt
   from the ``n_starts`` best, the lowest chi^2 kept; labels bounded to the training box.
7. With a free RV: Newton refinement of the RV in pixel space, the quadratic form rebuilt there
   and the labels refitted; errors from the joint (labels + RV) Fisher matrix, otherwise from
   J^T A J, in physical units, plus the pseudo-continuum's own noise (its coefficient covariance
   propagated through the estimator) and the model's error floor when it has one.

``fast_path=False`` runs the same LM on explicit per-pixel residuals (the reference the fast path
is tested against).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import FitConfig
from ..io.wavelength import C_KMS, to_vacuum
from ..models.cannon import CannonModel, label_vector, label_vector_jacobian
from ..models.continuum import fractional_index, rough_continuum
from ..models.resample import interpolate, taps
from .flags import Flag
from .kernel import FitResult, fit_in_halves
from .lm import pinv_hermitian
from .registry import check_fit_options, register_fitter, resolve_device

DEAD_S2 = 1.0e3   # model pixels with s2 above this are unconstrained by training: ignored


def _packed(v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Rows v (m, T) -> packed upper-triangle products (m, T(T+1)/2) (of v and w when given)."""
    i, j = torch.triu_indices(v.shape[1], v.shape[1], device=v.device)
    return v[:, i] * (v if w is None else w)[:, j]


def _unpack(p: torch.Tensor, T: int) -> torch.Tensor:
    i, j = torch.triu_indices(T, T, device=p.device)
    out = p.new_zeros(p.shape[:-1] + (T, T))
    out[..., i, j] = p
    out[..., j, i] = p
    return out


@register_fitter("cannon")
class CannonFitter:
    """Fits spectra on one observed grid with a Cannon model; ``fit(flux, ivar, mask) -> FitResult``.

    The constructor signature is the one :func:`distlabels.fit.registry.make_fitter` uses.
    ``qf_dtype``: precision of the per-star pixel sums A (float32 halves their cost; every later
    step is float64).
    """

    # Broadening would break the quadratic-in-labels fast path (the model is no longer linear in the
    # label vector); a Cannon learns broadening from its training spectra instead.
    UNSUPPORTED_OPTIONS = {
        "fit_vsini": "a Cannon is data-driven: train it with vsini as a label, e.g. --labels teff,logg,mh,vsini "
                     "on a store with a true_vsini column, or fit with an emulator kind",
        "fit_lsf": "a Cannon is trained at the survey's own resolution",
    }

    def __init__(self, model: CannonModel, wavelength_aa, *, wavelength_medium: str = "vacuum",
                 resolution: float | None = None, segments=None, config: FitConfig | None = None,
                 device="cpu", fast_path: bool = True, qf_dtype: torch.dtype = torch.float32,
                 lm_batch: int = 4096, sum_chunk: int = 128, debias: bool = True, use_floor: bool = True):
        if not isinstance(model, CannonModel):
            raise TypeError(f"CannonFitter needs a cannon model, not {type(model).__name__}")
        self.config = cfg = config or FitConfig()
        check_fit_options("cannon", cfg)
        self.device = dev = resolve_device(device)
        self.model = model
        self.fast_path = fast_path
        self.qf_dtype = qf_dtype
        self.lm_batch, self.sum_chunk = int(lm_batch), int(sum_chunk)
        self.label_names = tuple(model.label_names)
        self.n_labels = L = model.n_labels
        self.lam_obs = to_vacuum(np.asarray(wavelength_aa, np.float64), wavelength_medium)
        self.n_pix = len(self.lam_obs)
        self.lam_obs_t = torch.as_tensor(self.lam_obs, device=dev)
        self.grid = torch.as_tensor(model.wavelength_vac, device=dev)                # (P_mod,) rest, vacuum
        self.segments = segments
        th = model.theta.detach().double().to(dev)
        self.theta0 = th[:, 0].contiguous()                                          # (P_mod,) intercept
        self.theta_r = th[:, 1:].contiguous()                                        # (P_mod, T')
        self.Tr = self.theta_r.shape[1]
        s2 = model.model_variance.detach().double().to(dev)
        self.dead = s2 >= DEAD_S2
        self.s2 = torch.where(self.dead, torch.zeros_like(s2), s2)
        self.theta2 = _packed(self.theta_r).to(qf_dtype)                             # (P_mod, Tp)
        self.theta0_q, self.theta_r_q, self.s2_q = (self.theta0.to(qf_dtype), self.theta_r.to(qf_dtype),
                                                    self.s2.to(qf_dtype))
        self.alive_q = (~self.dead).to(qf_dtype)
        self.alive_np = (~self.dead).cpu().numpy() if bool(self.dead.any()) else None
        # Training-noise debiasing: E[(model error)^2] at labels x is sum_p w_p v^T Cov(theta_p) v,
        # with Cov(theta_p) ~ k_p G; it pulls a plain chi^2 minimum towards the training set's centre.
        self.debias = bool(debias) and model.theta_cov_ref is not None
        if self.debias:
            self.G = torch.as_tensor(model.theta_cov_ref, dtype=torch.float64, device=dev)
            self.k = torch.where(self.dead, torch.zeros_like(s2),
                                 torch.as_tensor(model.theta_cov_scale, dtype=torch.float64, device=dev))
            self.k_q = self.k.to(qf_dtype)
        self._cross_cache: dict[int, torch.Tensor] = {}
        self.u_a = model.u_a.double().to(dev)
        self.u_c = model.u_c.double().to(dev)
        self.span = torch.as_tensor(model.label_span, device=dev)

        # What is held: labels from FitConfig.fix, and the RV (rest-frame spectra or fix: {rv: v}).
        fixed = cfg.fixed()
        self.rv_fixed = fixed.pop("rv", None)
        if cfg.v_max_kms <= 0 and self.rv_fixed is None:
            self.rv_fixed = 0.0
        self.free = torch.ones(L, dtype=torch.bool, device=dev)
        self.x_fixed: dict[int, float] = {}
        for name, value in fixed.items():
            if name not in self.label_names:
                raise ValueError(f"--fix names unknown label {name!r} (labels: {', '.join(self.label_names)})")
            i = self.label_names.index(name)
            self.free[i] = False
            lo, hi = model.label_bounds[i]
            self.x_fixed[i] = float((value - lo) / (hi - lo) - 0.5)
        self.normalise = model.continuum is not None and cfg.continuum_degree >= 0
        self.sys_err = model.label_systematic_error if use_floor else None
        self.n_cont = model.continuum.n_coeff if self.normalise else 1

        # Library of start points: training labels (scaled), their label vectors and packed products.
        rng = np.random.default_rng(cfg.seed)
        tl = model.training_labels
        if len(tl):
            pick = rng.choice(len(tl), size=min(cfg.library_size, len(tl)), replace=False)
            xs = model.scale(torch.as_tensor(tl[pick], dtype=torch.float64)).numpy()
        else:
            xs = rng.uniform(-0.45, 0.45, size=(cfg.library_size, L))
        xs = np.clip(xs, -0.5, 0.5)
        for i, xv in self.x_fixed.items():
            xs[:, i] = xv
        self.lib_x = torch.as_tensor(xs, device=dev)
        vlib = self._v(self.lib_x)
        wts = 2 - torch.eye(self.Tr, device=dev, dtype=torch.float64)[tuple(torch.triu_indices(self.Tr, self.Tr))]
        self.lib_v = vlib                                                            # (K, T')
        self.lib_vv = _packed(vlib) * wts[None]                                      # (K, Tp): v^T A v = A_packed . this

        # Same pixels as the model and no shift: the sums need no interpolation at all.
        self.same_grid = (len(self.grid) == self.n_pix and
                          bool(np.allclose(model.wavelength_vac, self.lam_obs, rtol=0, atol=1e-9)))
        if self.rv_fixed is None:
            self._build_ccf()

    # ------------------------------------------------------------------ label vector
    def _v(self, x):
        """Label vector without the intercept (m, T') at scaled labels x (m, L)."""
        return label_vector(x * self.u_a + self.u_c)[:, 1:]

    def _dv(self, x):
        """d v / d x (m, T', L)."""
        return label_vector_jacobian(x * self.u_a + self.u_c)[:, 1:] * self.u_a[None, None, :]

    # ------------------------------------------------------------------ RV
    def _build_ccf(self):
        cfg, dev = self.config, self.device
        dlnl = np.diff(np.log(self.lam_obs))
        step = float(np.median(dlnl[dlnl > 0])) * C_KMS * 0.5                          # km/s, half a pixel
        k = int(np.ceil(cfg.v_max_kms / step))
        self.ccf_v = torch.arange(-k, k + 1, device=dev, dtype=torch.float64) * step
        self.ccf_step = step
        order = torch.argsort(self.lib_x[:, 0])
        sel = order[torch.linspace(0, len(order) - 1, max(cfg.n_templates, 1), device=dev).round().long()]
        spectra = self._model_on_grid(self.lib_x[sel])                                # (n_t, P_mod)
        pos, inside = self._positions(self.ccf_v)                                    # (n_vel, P_obs)
        self.ccf_templates = []
        for t in spectra:
            tm = self._interp(t[None].expand(len(self.ccf_v), -1), pos) - 1
            self.ccf_templates.append(torch.where(inside, tm, torch.zeros_like(tm)).T.contiguous())  # (P_obs, n_vel)

    def _positions(self, rv):
        """Fractional model-grid position of every observed pixel at velocities rv (n,): (n, P_obs), inside."""
        b = rv / C_KMS
        dop = torch.sqrt((1 + b) / (1 - b))
        pos = fractional_index(self.grid, self.lam_obs_t[None] / dop[:, None])
        inside = (pos >= 0) & (pos <= len(self.grid) - 1)
        return pos, inside

    def _interp(self, y, pos):
        """y (n, P_mod) at fractional positions pos (n, P_obs), linear."""
        i = pos.floor().long().clamp(0, len(self.grid) - 2)
        t = (pos - i).clamp(0, 1)
        return (1 - t) * y.gather(1, i) + t * y.gather(1, i + 1)

    def _model_on_grid(self, x):
        """Model flux on the model grid (n, P_mod) float64."""
        return self.theta0[None] + self._v(x) @ self.theta_r.T

    def _rv_ccf(self, d, w):
        cont = rough_continuum(d.cpu(), w.cpu(), self.lam_obs, self.segments or
                               ((float(self.lam_obs.min()), float(self.lam_obs.max())),),
                               degree=3).to(self.device)
        ok = cont > 0
        dn = torch.where(ok, d / cont.clamp_min(1e-30), torch.ones_like(d))
        wn = torch.where(ok, w * cont * cont, torch.zeros_like(w))
        data = wn * (dn - 1)
        best_val = torch.full((len(d),), -np.inf, dtype=torch.float64, device=self.device)
        best_v = torch.zeros(len(d), dtype=torch.float64, device=self.device)
        nv = len(self.ccf_v)
        for tm in self.ccf_templates:
            ccf = data @ tm
            norm = (wn @ (tm * tm)).clamp_min(1e-30)
            crit = torch.where(ccf > 0, ccf * ccf / norm, torch.zeros_like(ccf))
            val, j = crit.max(1)
            jl, jr = (j - 1).clamp(0, nv - 1), (j + 1).clamp(0, nv - 1)
            cl, cr = crit.gather(1, jl[:, None])[:, 0], crit.gather(1, jr[:, None])[:, 0]
            den = cl - 2 * val + cr
            off = torch.where((den < 0) & (j > 0) & (j < nv - 1), 0.5 * (cl - cr) / den, torch.zeros_like(den))
            v = self.ccf_v[j] + off.clamp(-1, 1) * self.ccf_step
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_v = torch.where(better, v, best_v)
        return best_v

    # ------------------------------------------------------------------ quadratic form
    def _cross(self, d: int):
        """Packed theta_j theta_{j+d}^T + theta_{j+d} theta_j^T, (P_mod - d, Tp), built once per offset."""
        if d not in self._cross_cache:
            a, b = self.theta_r[:-d], self.theta_r[d:]
            self._cross_cache[d] = (_packed(a, b) + _packed(b, a)).to(self.qf_dtype)
        return self._cross_cache[d]

    def _taps_at(self, rv):
        """Cubic-interpolation taps of every observed pixel on the model grid at rv (n,):
        idx (n, P, 4), weights c, their derivatives by RV (km/s), reachable (n, P) bool.
        The last result is kept: one batch asks for the same velocities several times."""
        last = getattr(self, "_taps_cache", None)
        if last is not None and last[0].shape == rv.shape and torch.equal(last[0], rv):
            return last[1]
        out = self._taps_compute(rv)
        self._taps_cache = (rv.clone(), out)
        return out

    def _taps_compute(self, rv):
        b = rv / C_KMS
        dop = torch.sqrt((1 + b) / (1 - b))
        lam_rest = self.lam_obs_t[None] / dop[:, None]
        pos = fractional_index(self.grid, lam_rest)
        idx, c, dc, inside = taps(pos, len(self.grid))
        k = idx[1]
        dpos = -lam_rest / (C_KMS * (1 - b * b))[:, None] / (self.grid[(k + 1).clamp(max=len(self.grid) - 1)]
                                                            - self.grid[k]).clamp_min(1e-12)
        reach = inside
        if bool(self.dead.any()):
            for i, w in zip(idx, c):
                reach = reach & ~(self.dead[i] & (w.abs() > 1e-12))
        return idx, c, [d * dpos for d in dc], reach

    def _buffers(self, n):
        """Three reusable (n, n_pix) work arrays: fresh multi-MB tensors per operation would cost
        more in page faults than the arithmetic itself on CPU."""
        key = (n, self.qf_dtype)
        if getattr(self, "_buf_key", None) != key:
            self._buf = [torch.empty(n, self.n_pix, dtype=self.qf_dtype, device=self.device) for _ in range(3)]
            self._buf_key = key
        return self._buf

    def _sums_same_grid(self, fn, w):
        """Pixel sums when data and model share pixels and no shift: (A, b, c) float64; fn, w untouched."""
        n = len(fn)
        we, ft, wf = self._buffers(n)
        torch.mul(w, self.s2_q, out=we)
        we.add_(1)
        torch.div(w, we, out=we)                                                     # ivar / (1 + ivar s2)
        we.mul_(self.alive_q)                                                       # dead model pixels: 0
        torch.sub(fn, self.theta0_q, out=ft)
        torch.mul(we, ft, out=wf)
        A = _unpack((we @ self.theta2).double(), self.Tr)
        b = (wf @ self.theta_r_q).double()
        c = (wf[:, None, :] @ ft[:, :, None])[:, 0, 0].double()
        beta = (we @ self.k_q).double() if self.debias else torch.zeros_like(c)
        return A, b, c, beta

    def _sums_shifted(self, fn, w, rv):
        """Pixel sums for the model interpolated (cubic) onto the observed pixels at rv (n,):
        A, b, c, beta, n_use, and the effective weights (n, P_obs)."""
        n, P = fn.shape
        Pm = len(self.grid)
        fn, w = fn.double(), w.double()
        idx, cw, _, reach = self._taps_at(rv)
        s2 = interpolate(self.s2[None].expand(n, -1), idx, cw).clamp_min(0)
        we = torch.where(reach, w / (1 + w * s2), torch.zeros_like(w))
        ft = fn - interpolate(self.theta0[None].expand(n, -1), idx, cw)
        # Each observed pixel's coefficients are sum_a c_a theta_{j_a}; its outer product spreads
        # over theta_j theta_{j+d}^T (d = 0..3) with weights c_a c_{a+d} at model pixel j_a.
        Ap = None
        u0 = None
        for d in range(4):
            u = torch.zeros(n, Pm, dtype=torch.float64, device=self.device)
            for a in range(4 - d):
                u.scatter_add_(1, idx[a], we * cw[a] * cw[a + d])
            if d == 0:
                u0 = u
                term = u.to(self.qf_dtype) @ self.theta2
            else:
                term = u[:, :Pm - d].to(self.qf_dtype) @ self._cross(d)
            Ap = term if Ap is None else Ap + term
        beta = torch.zeros(n, Pm, dtype=torch.float64, device=self.device)
        wft = we * ft
        for a in range(4):
            beta.scatter_add_(1, idx[a], wft * cw[a])
        c = (we * ft * ft).sum(1)
        kb = u0 @ self.k if self.debias else torch.zeros_like(c)
        return _unpack(Ap.double(), self.Tr), beta @ self.theta_r, c, kb, (we > 0).sum(1), we

    def _debias_terms(self, x, v, beta):
        """The debiasing term beta v^T G v (m,) and its half-gradient (m, L) (zeros when off)."""
        if not self.debias:
            return torch.zeros_like(beta), None
        vf = torch.cat([torch.ones_like(v[:, :1]), v], 1)
        Gv = vf @ self.G
        return beta * (vf * Gv).sum(1), Gv[:, 1:]

    def _debiased_curvature(self, x, H, beta):
        """J^T A J minus the training-noise part beta J^T G J (kept where it stays positive definite)."""
        if not self.debias:
            return H
        dv = self._dv(x)
        Hc = H - beta[:, None, None] * (dv.transpose(1, 2) @ self.G[1:, 1:] @ dv)
        ok = torch.linalg.cholesky_ex(Hc)[1] == 0
        return torch.where(ok[:, None, None], Hc, H)

    def _qf_eval(self, A, b, c, beta):
        def ev(x, rows, jac):
            v = self._v(x)
            Ai = A[rows]
            Av = (Ai @ v[:, :, None])[:, :, 0]
            corr, Gv = self._debias_terms(x, v, beta[rows])
            chi2 = c[rows] - 2 * (b[rows] * v).sum(1) + (v * Av).sum(1) - corr
            if not jac:
                return chi2, None, None
            dv = self._dv(x)
            r = Av - b[rows] if Gv is None else Av - b[rows] - beta[rows][:, None] * Gv
            g = (dv.transpose(1, 2) @ r[:, :, None])[:, :, 0]
            H = dv.transpose(1, 2) @ Ai @ dv
            return chi2, g, H
        return ev

    def _pixel_eval(self, fn, we, rv, beta):
        """The same chi^2, gradient and J^T W J from explicit per-pixel residuals (reference path)."""
        idx, cw, _, _ = self._taps_at(rv)

        def ev(x, rows, jac):
            th = sum(cw[a][rows][..., None] * self.theta_r[idx[a][rows]] for a in range(4))   # (m, P, T')
            t0 = sum(cw[a][rows] * self.theta0[idx[a][rows]] for a in range(4))
            v = self._v(x)
            r = fn[rows] - t0 - (th @ v[:, :, None])[:, :, 0]
            corr, Gv = self._debias_terms(x, v, beta[rows])
            chi2 = (we[rows] * r * r).sum(1) - corr
            if not jac:
                return chi2, None, None
            dv = self._dv(x)
            J = th @ dv                                                                 # (m, P, L)
            Jw = J * we[rows][:, :, None]
            g = -(Jw.transpose(1, 2) @ r[:, :, None])[:, :, 0]
            if Gv is not None:
                g = g - beta[rows][:, None] * (dv.transpose(1, 2) @ Gv[:, :, None])[:, :, 0]
            return chi2, g, Jw.transpose(1, 2) @ J
        return ev

    # ------------------------------------------------------------------ LM
    def _lm(self, ev, x, rows):
        """Levenberg-Marquardt on scaled labels x (m, L) within [-0.5, 0.5]; rows: star of each problem."""
        cfg, dev = self.config, self.device
        m, L = x.shape
        x = x.clamp(-0.5, 0.5)
        lam = torch.full((m,), cfg.lambda_init, dtype=torch.float64, device=dev)
        chi2, g, H = ev(x, rows, True)
        active = torch.ones(m, dtype=torch.bool, device=dev)
        conv = torch.zeros(m, dtype=torch.bool, device=dev)
        n_iter = torch.zeros(m, dtype=torch.int64, device=dev)
        for _ in range(cfg.max_iter):
            act = torch.nonzero(active).flatten()
            if len(act) == 0:
                break
            xa, ga, Ha = x[act], g[act], H[act]
            hold = ~self.free[None].expand(len(act), -1).clone()
            hold |= (xa <= -0.5 + 1e-12) & (ga > 0)
            hold |= (xa >= 0.5 - 1e-12) & (ga < 0)
            keep = (~hold).double()
            diag = Ha.diagonal(dim1=1, dim2=2).clamp_min(1e-12)
            M = (Ha + lam[act, None, None] * torch.diag_embed(diag)) * keep[:, :, None] * keep[:, None, :]
            M = M + torch.diag_embed(hold.double())
            step = -torch.linalg.solve(M, (ga * keep)[:, :, None])[:, :, 0]
            trial = (xa + step).clamp(-0.5, 0.5)
            c_t, _, _ = ev(trial, rows[act], False)
            ok = torch.isfinite(c_t) & (c_t <= chi2[act])
            gain = chi2[act] - c_t
            n_iter[act] += 1
            acc = act[ok]
            if len(acc):
                x[acc] = trial[ok]
                chi2[acc], g[acc], H[acc] = ev(x[acc], rows[acc], True)
            lam[act] = torch.where(ok, (lam[act] / 5).clamp_min(1e-9), lam[act] * 10)
            tol = torch.maximum(torch.full_like(gain, cfg.chi2_tol), 1e-9 * chi2[act].abs())
            done = (ok & (gain < tol)) | (lam[act] > 1e9)
            conv[act] |= done
            active[act] &= ~done
        return x, chi2, H, conv, n_iter

    def _multistart(self, ev_eval, A, b, c, n_star):
        """LM from the n_starts library points of lowest chi^2; the best result per star."""
        cfg, dev = self.config, self.device
        Tr = self.Tr
        i, j = torch.triu_indices(Tr, Tr, device=dev)
        chi_lib = c[:, None] - 2 * b @ self.lib_v.T + A[:, i, j] @ self.lib_vv.T        # (n, K)
        k = min(max(cfg.n_starts, 1), chi_lib.shape[1])
        start = chi_lib.topk(k, dim=1, largest=False).indices                           # (n, k)
        x0 = self.lib_x[start.reshape(-1)].clone()
        rows = torch.arange(n_star, device=dev).repeat_interleave(k)
        x, chi2, H, conv, n_iter = self._lm(ev_eval, x0, rows)
        chi2 = torch.where(torch.isfinite(chi2), chi2, torch.full_like(chi2, np.inf)).reshape(n_star, k)
        best = chi2.argmin(1)
        pick = torch.arange(n_star, device=dev) * k + best
        return x[pick], chi2[torch.arange(n_star, device=dev), best], H[pick], conv[pick], \
            n_iter.reshape(n_star, k).sum(1)

    def _refine_rv(self, x, fn, we_raw, rv, n_newton: int = 2):
        """Newton steps on the RV alone (labels held) in pixel space."""
        F = self._model_on_grid(x)                                                     # (n, P_mod)
        vmax = self.config.v_max_kms
        for _ in range(n_newton):
            m, dmdv, we = self._model_and_dv(F, rv, we_raw)
            r = fn - m
            num = (we * r * dmdv).sum(1)
            den = (we * dmdv * dmdv).sum(1).clamp_min(1e-30)
            rv = (rv + (num / den).clamp(-5 * self.ccf_step, 5 * self.ccf_step)).clamp(-vmax, vmax)
        return rv

    def _model_and_dv(self, F, rv, w):
        """Model on observed pixels, its derivative by RV (km/s), and effective weights, at rv (n,)."""
        idx, cw, dcw, reach = self._taps_at(rv)
        s2 = interpolate(self.s2[None].expand(len(F), -1), idx, cw).clamp_min(0)
        we = torch.where(reach, w / (1 + w * s2), torch.zeros_like(w))
        return interpolate(F, idx, cw), interpolate(F, idx, dcw), we

    # ------------------------------------------------------------------ public API
    def fit(self, flux, ivar, mask=None, *, return_covariance: bool = False) -> FitResult:
        """Fit spectra: flux, ivar (n, n_pix) (any float dtype), mask (n, n_pix) bool (True = bad)."""
        flux, ivar = np.asarray(flux), np.asarray(ivar)
        if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != self.n_pix:
            raise ValueError(f"flux and ivar must both be (n_star, {self.n_pix}); got {flux.shape} and {ivar.shape}")
        n, L = len(flux), self.n_labels
        n_par = L + 1
        res = FitResult(label_names=self.label_names, labels=np.full((n, L), np.nan),
                        errors=np.full((n, L), np.nan), rv=np.full(n, np.nan), rv_err=np.full(n, np.nan),
                        chi2_red=np.full(n, np.nan), n_iter=np.zeros(n, np.int64), flags=np.zeros(n, np.int64),
                        continuum=np.full((n, self.n_cont), np.nan), snr=np.full(n, np.nan),
                        covariance=np.full((n, n_par, n_par), np.nan) if return_covariance else None)
        # With the RV held, the per-star sums are all the solver needs: they are built in
        # cache-sized chunks and the (pixel-free) solve runs on large batches of stars.
        quick = self.fast_path and self.rv_fixed is not None
        bs = max(int(self.config.batch_size), 1)
        block = max(bs, self.lm_batch) if quick else bs
        chunk = min(self.sum_chunk, block) if quick else block
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            rows, parts = [], []
            for clo in range(lo, hi, chunk):
                got = self._clean(flux, ivar, mask, slice(clo, min(clo + chunk, hi)), res)
                if got is not None:
                    rows.append(got[0])
                    parts.append(got[1:])
            if not rows:
                continue
            fit_in_halves(lambda i_, p_: self._fit_block(i_, p_, res), self._take, np.concatenate(rows), parts, res,
                          what="Cannon fit: a block", device=self.device)
        res.flags[np.isfinite(res.snr) & (res.snr < self.config.low_snr)] |= Flag.LOW_SNR
        return res

    def _clean(self, flux, ivar, mask, sl, res):
        """Usable pixels, S/N and input flags of rows ``sl``; (rows, d, w, n_live) to fit, or None.

        In numpy: its comparisons are several times faster than torch's on CPU.
        """
        d, w = flux[sl], ivar[sl]
        good = np.isfinite(d) & np.isfinite(w) & (w > 0)
        if mask is not None:
            good &= ~np.asarray(mask[sl], dtype=bool)
        ng = np.count_nonzero(good, axis=1)
        # Median S/N per pixel from at most ~512 evenly spaced pixels (a statistic, not a fit input).
        step = max(self.n_pix // 512, 1)
        with np.errstate(invalid="ignore"):
            sn = np.sort(np.where(good[:, ::step], np.abs(d[:, ::step]) * np.sqrt(np.abs(w[:, ::step])), np.inf), 1)
        k = np.count_nonzero(good[:, ::step], axis=1)
        has = np.flatnonzero(k > 0)
        lo_i, hi_i = (k[has] - 1) // 2, k[has] // 2
        res.snr[sl.start + has] = 0.5 * (sn[has, lo_i] + sn[has, hi_i])
        res.flags[sl.start + np.flatnonzero(ng == 0)] |= Flag.BAD_INPUT
        res.flags[sl.start + np.flatnonzero((ng > 0) & (ng < self.config.min_good_pixels))] |= Flag.FEW_PIXELS
        ok = np.flatnonzero(ng >= self.config.min_good_pixels)
        if len(ok) == 0:
            return None
        if len(ok) < len(ng):
            d, w, good = d[ok], w[ok], good[ok]
        n_live = ng[ok] if self.alive_np is None else np.count_nonzero(good & self.alive_np, axis=1)
        quick = self.fast_path and self.rv_fixed is not None and not self.normalise
        np_dt = np.float32 if (quick and self.qf_dtype == torch.float32) else np.float64
        if good.all():                        # nothing to blank: no copy (inputs are never modified)
            d, w = d.astype(np_dt, copy=False), w.astype(np_dt, copy=False)
        else:
            d, w = np.where(good, d, 0).astype(np_dt, copy=False), np.where(good, w, 0).astype(np_dt, copy=False)
        return (sl.start + ok, torch.from_numpy(np.ascontiguousarray(d)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(w)).to(self.device), n_live)

    def _prepare(self, d, w, n_live):
        """RV, normalisation and pixel sums of one chunk of stars."""
        n = len(d)
        dev = self.device
        if self.rv_fixed is not None:
            rv = torch.full((n,), float(self.rv_fixed), dtype=torch.float64, device=dev)
        else:
            rv = self._rv_ccf(d.double(), w.double())
        cont = ccov = None
        if self.normalise:
            fn, wn, coeffs, _, cont, ccov = self.model.continuum.normalise(d.cpu(), w.cpu(), self.lam_obs, rv.cpu(),
                                                                           good=(w > 0).cpu(), full=True)
            fn, wn, coeffs, n_live = fn.to(dev), wn.to(dev), coeffs.to(dev), None
            cont, ccov = cont.to(dev), ccov.to(dev)
        else:
            fn, wn, coeffs = d, w, torch.ones(n, 1, dtype=torch.float64, device=dev)
        out = {"rv": rv, "coeffs": coeffs}
        if self.fast_path and self.same_grid and bool((rv == 0).all()):
            q = self.qf_dtype
            out["A"], out["b"], out["c"], out["beta"] = self._sums_same_grid(fn.to(q), wn.to(q))
            out["n_use"] = torch.as_tensor(n_live, device=dev) if n_live is not None else \
                ((wn > 0) & ~self.dead[None]).sum(1)
            we = None
        else:
            out["A"], out["b"], out["c"], out["beta"], out["n_use"], we = self._sums_shifted(fn, wn, rv)
            if self.rv_fixed is None or not self.fast_path:
                out["fn"], out["wn"], out["we"] = fn.double(), wn.double(), we
        if cont is not None:
            out["Q"], out["ccov"] = self._continuum_sensitivity(fn.double(), wn.double(), we, cont, rv), ccov
        return out

    def _continuum_sensitivity(self, fn, wn, we, cont, rv):
        """Q (n, T', K) = sum_p w_p (fn_p / cont_p) th_p B_p^T: how the label-vector gradient moves
        with the continuum coefficients. With their covariance it adds the normalisation's own
        noise to the label covariance (J^T W dr, dr = fn B dc / cont)."""
        pc = self.model.continuum
        if getattr(self, "_cont_basis", None) is None:
            from ..models.continuum import chebyshev_design

            self._cont_basis = torch.as_tensor(chebyshev_design(self.lam_obs, pc.segments, pc.degree)[0],
                                               device=self.device)
        B = self._cont_basis                                                          # (P, K)
        if we is None:                                                                # same grid, no shift
            we = torch.where(self.dead[None], torch.zeros_like(wn), wn / (1 + wn * self.s2[None]))
            g = we * fn / cont.clamp_min(1e-30)
            return torch.stack([(g * B[:, k]) @ self.theta_r for k in range(B.shape[1])], 2)
        g = we * fn / cont.clamp_min(1e-30)
        tidx, cw, _, _ = self._taps_at(rv)
        out = []
        for k in range(B.shape[1]):
            u = torch.zeros(len(fn), len(self.grid), dtype=torch.float64, device=self.device)
            gk = g * B[:, k]
            for a in range(4):
                u.scatter_add_(1, tidx[a], gk * cw[a])
            out.append(u @ self.theta_r)
        return torch.stack(out, 2)

    @staticmethod
    def _take(parts, sl: slice):
        """Stars ``sl`` of a block's prepared chunks [(d, w, n_live)], as one chunk."""
        d, w = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        live = None if parts[0][2] is None else np.concatenate([q[2] for q in parts])
        return [(d[sl], w[sl], None if live is None else live[sl])]

    def _fit_block(self, idx, parts, res: FitResult):
        """Prepare every chunk, then solve all stars ``idx`` (rows of res) together."""
        preps = [self._prepare(d, w, n_live) for d, w, n_live in parts]
        cat = {k: torch.cat([p[k] for p in preps]) for k in preps[0]}
        self._solve(idx, cat, res)

    def _solve(self, idx, p, res: FitResult):
        cfg, dev, L = self.config, self.device, self.n_labels
        A, b, c, beta, rv, n_use = p["A"], p["b"], p["c"], p["beta"], p["rv"], p["n_use"]
        n = len(A)
        flags = np.zeros(n, np.int64)
        few = (n_use < cfg.min_good_pixels).cpu().numpy()
        ev = self._qf_eval(A, b, c, beta) if self.fast_path else self._pixel_eval(p["fn"], p["we"], rv, beta)
        x, chi2, H, conv, n_iter = self._multistart(ev, A, b, c, n)
        if self.rv_fixed is None:
            fn, wn = p["fn"], p["wn"]
            rv = self._refine_rv(x, fn, wn, rv)
            A, b, c, beta, _, we = self._sums_shifted(fn, wn, rv)
            ev = self._qf_eval(A, b, c, beta) if self.fast_path else self._pixel_eval(fn, we, rv, beta)
            x, chi2, H, conv2, it2 = self._lm(ev, x.clone(), torch.arange(n, device=dev))
            conv, n_iter = conv & conv2, n_iter + it2
            F = self._model_on_grid(x)
            _, dmdv, we = self._model_and_dv(F, rv, wn)
            # Joint Fisher matrix of (labels, RV): the label block is J^T A J; the cross terms
            # need sum_p w_p dm_p/dv th_p, one scatter onto the model grid and one product.
            tidx, cw, _, _ = self._taps_at(rv)
            q = torch.zeros(n, len(self.grid), dtype=torch.float64, device=dev)
            wd = we * dmdv
            for a in range(4):
                q.scatter_add_(1, tidx[a], wd * cw[a])
            q = q @ self.theta_r
            cross = (self._dv(x).transpose(1, 2) @ q[:, :, None])[:, :, 0]            # (n, L)
            Fm = torch.zeros(n, L + 1, L + 1, dtype=torch.float64, device=dev)
            Fm[:, :L, :L] = self._debiased_curvature(x, H, beta)
            Fm[:, :L, L] = cross
            Fm[:, L, :L] = cross
            Fm[:, L, L] = (we * dmdv * dmdv).sum(1)
            free = torch.cat([self.free, torch.ones(1, dtype=torch.bool, device=dev)])
            flags[(rv.abs() >= cfg.v_max_kms - self.ccf_step).cpu().numpy()] |= Flag.RV_AT_BOUND
        else:
            Fm = torch.zeros(n, L + 1, L + 1, dtype=torch.float64, device=dev)
            Fm[:, :L, :L] = self._debiased_curvature(x, H, beta)
            free = torch.cat([self.free, torch.zeros(1, dtype=torch.bool, device=dev)])
        keep = free.double()
        Ff = Fm * keep[None, :, None] * keep[None, None, :] + torch.diag_embed((~free).double()[None].expand(n, -1))
        cov = pinv_hermitian(Ff) * keep[None, :, None] * keep[None, None, :]
        if "Q" in p:
            # The normalisation's noise, dr = fn B dc / cont, through the estimator: cov E cov with
            # E = dv^T Q Cov(c) Q^T dv on the label block.
            K = self._dv(x).transpose(1, 2) @ p["Q"]                                   # (n, L, K)
            E = K @ p["ccov"] @ K.transpose(1, 2)
            E = E * self.free.double()[None, :, None] * self.free.double()[None, None, :]
            cov = cov + cov[:, :, :L] @ E @ cov[:, :L, :]
        var = cov.diagonal(dim1=1, dim2=2).clamp_min(0)
        at_bound = ((x <= -0.5 + 1e-6) | (x >= 0.5 - 1e-6)) & self.free[None]
        flags[at_bound.any(1).cpu().numpy()] |= Flag.AT_LABEL_BOUND
        flags[(~conv).cpu().numpy()] |= Flag.NOT_CONVERGED
        dof = (n_use.double() - self.free.sum() - (0 if self.rv_fixed is not None else 1)).clamp_min(1)
        chi2_red = (chi2 / dof).cpu().numpy()
        flags[chi2_red > cfg.chi2_red_high] |= Flag.CHI2_HIGH
        labels = self.model.unscale(x.cpu()).numpy()
        errors = (var[:, :L].sqrt() * self.span).cpu().numpy()
        if self.sys_err is not None:   # the model's error floor (inadequacy), in quadrature, free labels only
            errors = np.sqrt(errors ** 2 + (self.sys_err * self.free.cpu().numpy()) ** 2)
        labels[few] = np.nan
        errors[few] = np.nan
        flags[few] = Flag.FEW_PIXELS
        res.labels[idx] = labels
        res.errors[idx] = errors
        res.rv[idx] = np.where(few, np.nan, rv.cpu().numpy())
        res.rv_err[idx] = np.where(few, np.nan, var[:, L].sqrt().cpu().numpy())
        res.chi2_red[idx] = np.where(few, np.nan, chi2_red)
        res.n_iter[idx] = n_iter.cpu().numpy()
        res.flags[idx] |= flags
        res.continuum[idx] = p["coeffs"].cpu().numpy()
        if res.covariance is not None:
            res.covariance[idx] = cov.cpu().numpy()
