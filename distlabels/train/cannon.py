"""Training The Cannon, batched over pixels in torch (CPU or GPU).

For every pixel p the coefficients theta_p (T,) minimise the weighted chi^2 over the training
stars n, with the intrinsic scatter s2_p added to each star's variance::

    chi2_p = sum_n w_np (f_np - theta_p . v_n)^2,     w_np = ivar_np / (1 + ivar_np s2_p)

* theta for all pixels of a chunk at once: the normal matrices A_p = sum_n w_np v_n v_n^T are one
  matrix product ``W^T @ VV`` (VV: the stars' packed outer products v v^T), then a batched
  Cholesky solve, in float64 (the quadratic design is ill-conditioned).
* s2_p by maximum likelihood, -2 ln L = sum_n [w r^2 - ln w], with the degrees of freedom used by
  theta taken out (REML-like: sum w^2 r^2 = (N_p - T)/N_p sum w): a safeguarded Newton solve per
  pixel, batched. Unlike the median-chi^2 heuristic (Casey et al. 2016), this finds a scatter
  below the noise level. theta and s2 alternate until s2 settles; pixels whose stars all share one
  ivar need no second pass (there theta does not depend on s2).
* Optional L1 regularisation ``chi2 + Lambda sum_{t>=1} |theta_t|`` (Casey et al. 2016) by
  batched ADMM, Lambda chosen per pixel from ``config.l1`` on a held-out validation set, then the
  model retrained on all stars.

Training spectra are pseudo-continuum normalised (:class:`PseudoContinuum`, continuum pixels chosen
from the training set and stored in the model) and brought to the rest frame first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import CannonTrainConfig
from ..errors import DistlabelsError
from ..io.wavelength import to_vacuum
from ..models.cannon import CannonModel, label_vector, n_terms
from ..models.continuum import PseudoContinuum, rough_continuum
from .data import TrainingSet, shift_to_rest

DEAD_PIXEL_S2 = 1.0e4   # s^2 of a pixel no training star constrains: weight ~0 in every fit


@dataclass
class CannonTrainReport:
    n_train: int
    n_pix: int
    n_labels: int
    n_terms: int
    seconds: float
    scatter_iterations: int
    n_dead_pixels: int
    n_continuum_pixels: int
    s2_median: float
    l1_choice: dict = field(default_factory=dict)       # Lambda -> number of pixels
    timings: dict = field(default_factory=dict)
    systematics: dict = field(default_factory=dict)

    def summary(self) -> str:
        l1 = (", L1 per pixel: " + ", ".join(f"{k:g}: {v}" for k, v in self.l1_choice.items())) if self.l1_choice else ""
        return (f"{self.n_train} stars x {self.n_pix} pixels, {self.n_labels} labels ({self.n_terms} terms), "
                f"{self.seconds:.2f} s; {self.scatter_iterations} theta/s2 passes, median s = "
                f"{np.sqrt(max(self.s2_median, 0)):.4g}, {self.n_dead_pixels} unconstrained pixels, "
                f"{self.n_continuum_pixels} continuum pixels{l1}" +
                (f"; error floor per label {np.round(self.systematics['label_systematic_error'], 4).tolist()}"
                 if self.systematics.get("label_systematic_error") is not None else ""))


# ------------------------------------------------------------------------------ linear algebra
def packed_outer(v: torch.Tensor) -> torch.Tensor:
    """v (N, T) -> (N, T(T+1)/2) products v_i v_j for i <= j (row-major upper triangle)."""
    i, j = torch.triu_indices(v.shape[1], v.shape[1], device=v.device)
    return v[:, i] * v[:, j]


def unpack_symmetric(packed: torch.Tensor, T: int) -> torch.Tensor:
    """(..., T(T+1)/2) upper triangles -> (..., T, T) symmetric matrices."""
    i, j = torch.triu_indices(T, T, device=packed.device)
    out = packed.new_zeros(packed.shape[:-1] + (T, T))
    out[..., i, j] = packed
    out[..., j, i] = packed
    return out


def normal_equations(vv: torch.Tensor, v: torch.Tensor, f: torch.Tensor, w: torch.Tensor):
    """A (p, T, T) and b (p, T) of every pixel: A_p = sum_n w_np v_n v_n^T, b_p = sum_n w_np f_np v_n."""
    A = unpack_symmetric(w.T @ vv, v.shape[1])
    b = (w * f).T @ v
    return A, b


def solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched solve of symmetric positive (semi-)definite systems; Cholesky with a pinv fallback."""
    d = A.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
    Ar = A + 1e-13 * d[:, None, None] * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(Ar)
    x = torch.cholesky_solve(b[..., None], L)[..., 0]
    bad = (info != 0) | ~torch.isfinite(x).all(-1)
    if bad.any():
        x[bad] = (torch.linalg.pinv(A[bad], hermitian=True) @ b[bad][..., None])[..., 0]
    return x


def admm_l1(A: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, theta0: torch.Tensor, n_iter: int = 300,
            tol: float = 1e-7) -> torch.Tensor:
    """Minimise theta^T A theta - 2 b^T theta + lam * sum_{t>=1} |theta_t| for every pixel (batched ADMM).

    A (p, T, T), b (p, T), lam (p,), theta0 (p, T) warm start. The intercept theta_0 is not
    penalised. Returns z (the sparse iterate).
    """
    p, T = b.shape
    rho = (2 * A.diagonal(dim1=1, dim2=2).mean(1)).clamp_min(1e-12)                    # (p,)
    eye = torch.eye(T, dtype=A.dtype, device=A.device)
    Minv = torch.linalg.inv(2 * A + rho[:, None, None] * eye)
    z = theta0.clone()
    u = torch.zeros_like(z)
    thr = (lam / rho)[:, None]
    for it in range(n_iter):
        th = (Minv @ (2 * b + rho[:, None] * (z - u))[..., None])[..., 0]
        zt = th + u
        z_new = zt.clone()
        z_new[:, 1:] = torch.sign(zt[:, 1:]) * (zt[:, 1:].abs() - thr).clamp_min(0)
        u = u + th - z_new
        if it % 20 == 19:
            prim = (th - z_new).norm(dim=1)
            dual = (z_new - z).norm(dim=1) * rho
            scale = th.norm(dim=1).clamp_min(1e-30)
            if bool(((prim < tol * scale) & (dual < tol * scale * rho)).all()):
                z = z_new
                break
        z = z_new
    return z


def fit_scatter(r: torch.Tensor, ivar: torch.Tensor, n_par: int, const: torch.Tensor | None = None,
                n_use: torch.Tensor | None = None, n_iter: int = 30) -> torch.Tensor:
    """s2 (p,) maximising the likelihood of residuals r (N, p) with noise ivar (N, p) plus s2.

    Stationarity of -2 ln L = sum_n [w r^2 - ln w], w = ivar / (1 + ivar s2), with the n_par
    fitted coefficients' degrees of freedom removed: g(s2) = sum w^2 r^2 - k sum w = 0,
    k = (N_p - n_par) / N_p. s2 = 0 where g(0) <= 0 (no scatter beyond the noise). Pixels whose
    stars share one ivar (``const``) have the closed form s2 = sum r^2 / (k N_p) - 1 / ivar; the
    others take a safeguarded Newton solve (bracketed, batched).
    """
    if n_use is None:
        r = r * (ivar > 0)
        n_use = (ivar > 0).sum(0)
    n_use = n_use.to(r.dtype)
    r2 = r * r                                         # r is 0 where ivar is 0
    k = ((n_use - n_par) / n_use.clamp_min(1)).clamp_min(0)
    sum_iv = ivar.sum(0).clamp_min(1e-300)
    # Exact for a constant ivar; the Newton start otherwise.
    z = (r2.sum(0) / (k * n_use).clamp_min(1e-300) - n_use / sum_iv).clamp_min(0)
    z = torch.where(n_use > n_par, z, torch.zeros_like(z))
    todo = (n_use > n_par) if const is None else ((n_use > n_par) & ~const)
    idx = torch.nonzero(todo).flatten()
    if len(idx) == 0:
        return z
    iv, rr, kk = ivar[:, idx], r2[:, idx], k[idx]
    w, tmp = torch.empty_like(iv), torch.empty_like(iv)
    ivbar = (iv.sum(0) / n_use[idx].clamp_min(1)).clamp_min(1e-300)

    def g_and_dg(zz):
        # In place: fresh (N, p) temporaries cost more in page faults than the arithmetic.
        torch.mul(iv, zz, out=w)
        w.add_(1)
        torch.div(iv, w, out=w)                                  # w = ivar / (1 + ivar s2)
        sw = w.sum(0)
        torch.mul(w, w, out=tmp)
        sw2 = tmp.sum(0)
        tmp.mul_(rr)
        s_w2r2 = tmp.sum(0)
        tmp.mul_(w)
        s_w3r2 = tmp.sum(0)
        return s_w2r2 - kk * sw, kk * sw2 - 2 * s_w3r2

    g0, _ = g_and_dg(torch.zeros(len(idx), dtype=r.dtype, device=r.device))
    need = g0 > 0
    zz = torch.where(need, torch.where(z[idx] > 0, z[idx], 1e-3 * n_use[idx] / sum_iv[idx]), torch.zeros_like(g0))
    lo = torch.zeros_like(zz)
    hi = torch.full_like(zz, float("inf"))
    for _ in range(n_iter):
        g, dg = g_and_dg(zz)
        lo = torch.where(need & (g > 0), zz, lo)
        hi = torch.where(need & (g <= 0), zz, hi)
        newton = zz - g / torch.where(dg < 0, dg, torch.full_like(dg, -1e-300))
        fallback = torch.where(torch.isfinite(hi), 0.5 * (lo + hi), 2 * zz + 1e-300)
        z_new = torch.where((newton > lo) & (newton < hi) & torch.isfinite(newton), newton, fallback)
        z_new = torch.where(need, z_new, torch.zeros_like(z_new))
        # Converged to a millionth of the pixel's noise variance.
        done = bool(((z_new - zz).abs() <= 1e-6 * (zz.abs() + 1 / ivbar)).all())
        zz = z_new
        if done:
            break
    z[idx] = zz
    return z


# ------------------------------------------------------------------------------ per-chunk training
def _train_chunk(v, vv, f, w0, cfg: CannonTrainConfig, lam=None):
    """theta (p, T), s2 (p,), passes, dead (p,) for one chunk of pixels.

    f, w0: (N, p) float64, f already 0 where w0 is 0 (so unused stars add nothing to any sum).
    """
    T = v.shape[1]
    use = w0 > 0
    n_use = use.sum(0)
    dead = n_use <= T
    # Pixels whose usable stars all share one ivar: theta does not depend on s2 there.
    wmax = w0.amax(0)
    wmin = torch.where(use, w0, torch.full_like(w0, np.inf)).amin(0)
    const = (wmax - wmin).abs() <= 1e-9 * wmax.abs()
    s2 = torch.zeros(f.shape[1], dtype=f.dtype, device=f.device)
    theta = None
    todo = torch.ones_like(dead)
    passes = 0
    for it in range(max(cfg.scatter_iter, 1)):
        idx = torch.nonzero(todo).flatten()
        if len(idx) == 0:
            break
        passes += 1
        every = len(idx) == f.shape[1]
        fi, wi, ui = (f, w0, use) if every else (f[:, idx], w0[:, idx], use[:, idx])
        w = wi if it == 0 else wi / (1 + wi * s2[idx][None])
        A, b = normal_equations(vv, v, fi, w)
        th = solve_spd(A, b)
        if lam is not None and bool((lam[idx] > 0).any()):
            pen = torch.nonzero(lam[idx] > 0).flatten()
            th[pen] = admm_l1(A[pen], b[pen], lam[idx][pen], th[pen], n_iter=cfg.admm_iter)
        if theta is None:
            theta = th
        else:
            theta[idx] = th
        if cfg.scatter == "none":
            break
        r = torch.addmm(fi, v, th.T, alpha=-1)
        r.mul_(ui)                                   # residuals of unused stars -> 0
        s2_new = fit_scatter(r, wi, T, const[idx], n_use[idx])
        changed = (s2_new - s2[idx]).abs() > 1e-3 * (s2[idx] + 1.0 / wmax[idx].clamp_min(1e-300))
        s2[idx] = s2_new
        nxt = torch.zeros_like(todo)
        nxt[idx] = changed & ~const[idx] & ~dead[idx]
        todo = nxt
    theta[dead] = 0
    theta[dead, 0] = 1
    s2[dead] = DEAD_PIXEL_S2
    # Total final weight per pixel: with the stars' relative weights omega it gives the scale of
    # the coefficient covariance, (V^T W_p V)^-1 ~ (sum omega / sum_n w_np) (V^T Omega V)^-1.
    wsum = (w0 / (1 + w0 * s2[None])).sum(0)
    wsum[dead] = 0
    return theta, s2, passes, dead, wsum


def _validation_nll(theta, s2, v, f, w0):
    """-2 ln L per pixel of held-out stars: sum_n [w r^2 - ln w] over usable stars."""
    r = f - v @ theta.T
    w = w0 / (1 + w0 * s2[None])
    use = w0 > 0
    return torch.where(use, w * r * r - torch.log(w.clamp_min(1e-300)), torch.zeros_like(r)).sum(0)


def fit_coefficients(u: torch.Tensor, flux: torch.Tensor, ivar: torch.Tensor, cfg: CannonTrainConfig,
                     progress=None):
    """theta (P, T), s2 (P,), l1 (P,) or None, info dict, for vectorizer labels u (N, L), flux/ivar (N, P)."""
    v = label_vector(u)
    vv = packed_outer(v)
    P = flux.shape[1]
    T = v.shape[1]
    theta = torch.empty(P, T, dtype=flux.dtype, device=flux.device)
    s2 = torch.empty(P, dtype=flux.dtype, device=flux.device)
    dead = torch.zeros(P, dtype=torch.bool, device=flux.device)
    wsum = torch.zeros(P, dtype=flux.dtype, device=flux.device)
    lam_all = None
    info = {"passes": 0, "l1_choice": {}}
    grid = sorted(set(float(x) for x in cfg.l1 if x > 0))
    if grid:
        gen = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(len(u), generator=gen).to(flux.device)
        n_val = max(int(round(cfg.validation_fraction * len(u))), 1)
        if len(u) - n_val <= T:
            raise DistlabelsError(f"too few training stars ({len(u)}) to hold out a validation set for the L1 choice.")
        val, tr = perm[:n_val], perm[n_val:]
        lam_all = torch.zeros(P, dtype=flux.dtype, device=flux.device)
        v_tr, vv_tr, v_val = v[tr], vv[tr], v[val]
    chunk = max(int(cfg.pixel_chunk), 1)
    for lo in range(0, P, chunk):
        sl = slice(lo, min(lo + chunk, P))
        f = flux[:, sl]
        w0 = ivar[:, sl]
        lam = None
        if grid:
            # Unregularised fit on the training part, then each Lambda (warm-started, increasing);
            # the validation stars' likelihood picks Lambda per pixel.
            f_tr, w_tr = f[tr], w0[tr]
            th0, s20, _, _, _ = _train_chunk(v_tr, vv_tr, f_tr, w_tr, cfg)
            best = _validation_nll(th0, s20, v_val, f[val], w0[val])
            lam = torch.zeros(f.shape[1], dtype=f.dtype, device=f.device)
            w = w_tr / (1 + w_tr * s20[None])
            A, b = normal_equations(vv_tr, v_tr, f_tr, w)
            th = th0
            for g in grid:
                th = admm_l1(A, b, torch.full_like(lam, g), th, n_iter=cfg.admm_iter)
                nll = _validation_nll(th, s20, v_val, f[val], w0[val])
                better = nll < best
                best = torch.where(better, nll, best)
                lam = torch.where(better, torch.full_like(lam, g), lam)
            lam_all[sl] = lam
        th, s, passes, d, ws = _train_chunk(v, vv, f, w0, cfg, lam)
        theta[sl], s2[sl], dead[sl], wsum[sl] = th, s, d, ws
        info["passes"] = max(info["passes"], passes)
        if progress:
            progress(sl.stop - sl.start)
    if lam_all is not None:
        vals, counts = torch.unique(lam_all, return_counts=True)
        info["l1_choice"] = {float(a): int(c) for a, c in zip(vals.cpu(), counts.cpu())}
    # Coefficient covariance of pixel p ~ k_p G (exact when every pixel weights the stars alike):
    # omega_n = star n's mean weight relative to each pixel's mean, G = (V^T Omega V)^-1.
    live = ~dead
    wbar = ivar[:, live].mean(0).clamp_min(1e-300)
    omega = (ivar[:, live] / wbar[None]).mean(1)
    G = torch.linalg.pinv((v * omega[:, None]).T @ v, hermitian=True)
    k = torch.where(live, omega.sum() / wsum.clamp_min(1e-300), torch.zeros_like(wsum))
    info["theta_cov"] = (G, k)
    return theta, s2, lam_all, dead, info


# ------------------------------------------------------------------------------ continuum pixels
def choose_continuum_pixels(flux_rest, ivar_rest, wavelength_vac_aa, segments, fraction: float, chunks: int,
                            min_per_segment: int) -> np.ndarray:
    """(n_pix,) bool: in each of ``chunks`` pieces of every segment, the ``fraction`` of pixels whose
    roughly normalised training flux is highest and steadiest across stars (median - 2 x robust spread)."""
    f = torch.where(ivar_rest > 0, flux_rest, torch.full_like(flux_rest, float("nan")))
    med = torch.nanmedian(f, dim=0).values
    mad = torch.nanmedian((f - med[None]).abs(), dim=0).values * 1.4826
    score = (med - 2 * mad).cpu().numpy()
    ok = np.isfinite(score)
    lam = np.asarray(wavelength_vac_aa)
    mask = np.zeros(len(lam), bool)
    for lo, hi in segments:
        idx = np.flatnonzero((lam >= lo) & (lam <= hi) & ok)
        if len(idx) == 0:
            continue
        for piece in np.array_split(idx, max(int(chunks), 1)):
            if len(piece) == 0:
                continue
            k = max(int(np.ceil(fraction * len(piece))), int(np.ceil(min_per_segment / max(chunks, 1))))
            mask[piece[np.argsort(-score[piece])[:k]]] = True
    return mask


def default_segments(wavelength_vac_aa: np.ndarray, segments) -> tuple[tuple[float, float], ...]:
    lam = np.asarray(wavelength_vac_aa)
    if segments:
        return tuple((float(a), float(b)) for a, b in segments)
    return ((float(lam.min()), float(lam.max())),)


def prepare_spectra(ts: TrainingSet, cfg: CannonTrainConfig):
    """Normalised rest-frame training spectra (flux, ivar (n, n_pix) float64 torch) and the
    PseudoContinuum that made them (None when the spectra come normalised)."""
    lam_vac = to_vacuum(ts.wavelength_aa, ts.wavelength_medium)
    rv = np.zeros(len(ts)) if ts.rv_kms is None else np.asarray(ts.rv_kms, np.float64)
    if cfg.normalise == "none":
        f, w = shift_to_rest(ts.flux, ts.ivar, ts.wavelength_aa, rv)
        return f, w, None
    if cfg.normalise != "chebyshev":
        raise DistlabelsError(f"unknown normalisation {cfg.normalise!r} (chebyshev or none).")
    # Segments come in the store's medium; the continuum works in vacuum.
    segs = default_segments(lam_vac, [to_vacuum(np.asarray(s, np.float64), ts.wavelength_medium)
                                      for s in ts.segments] if ts.segments else None)
    rough = rough_continuum(ts.flux, ts.ivar, lam_vac, segs, degree=cfg.continuum_degree)
    f = torch.as_tensor(ts.flux, dtype=torch.float64)
    w = torch.as_tensor(ts.ivar, dtype=torch.float64)
    ok = (rough > 0) & (w > 0) & torch.isfinite(f)
    fr = torch.where(ok, f / rough.clamp_min(1e-30), torch.ones_like(f))
    wr = torch.where(ok, w * rough * rough, torch.zeros_like(w))
    fr, wr = shift_to_rest(fr.numpy(), wr.numpy(), ts.wavelength_aa, rv, nearest=True)
    min_seg = max(3 * (cfg.continuum_degree + 1), 10)
    mask = choose_continuum_pixels(fr, wr, lam_vac, segs, cfg.continuum_fraction, cfg.continuum_chunks, min_seg)
    pc = PseudoContinuum(lam_vac, mask, segs, cfg.continuum_degree, min_pixels_per_segment=min_seg)
    fn, wn, _, _ = pc.normalise(ts.flux, ts.ivar, lam_vac, rv)
    fn, wn = shift_to_rest(fn.numpy(), wn.numpy(), ts.wavelength_aa, rv)
    return fn, wn, pc


def scaling_of(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorizer pivot (median) and scale (2.5-97.5 percentile range), per label."""
    pivot = np.median(labels, axis=0)
    lo, hi = np.percentile(labels, [2.5, 97.5], axis=0)
    scale = hi - lo
    span = labels.max(0) - labels.min(0)
    return pivot, np.where(scale > 0, scale, np.where(span > 0, span, 1.0))


def train_cannon(ts: TrainingSet, config: CannonTrainConfig | None = None, *, device="cpu",
                 progress: bool = False, meta: dict | None = None) -> tuple[CannonModel, CannonTrainReport]:
    """Train a Cannon model on a :class:`TrainingSet`; returns (model, report)."""
    cfg = config or CannonTrainConfig()
    from ..fit.registry import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    labels = np.asarray(ts.labels, np.float64)
    n, L = labels.shape
    T = n_terms(L)
    if n <= T:
        raise DistlabelsError(f"{n} training stars cannot constrain {T} coefficients per pixel ({L} labels); "
                              f"use more stars or fewer labels.")
    lo, hi = labels.min(0), labels.max(0)
    const = [name for name, a, b in zip(ts.label_names, lo, hi) if not b > a]
    if const:
        raise DistlabelsError(f"label(s) {', '.join(const)} take one value across the training set; drop them.")
    timings = {}
    flux, ivar, pc = prepare_spectra(ts, cfg)
    timings["prepare_s"] = time.perf_counter() - t0
    pivot, scale = scaling_of(labels)
    u = torch.as_tensor((labels - pivot) / scale, dtype=torch.float64, device=dev)
    flux = flux.to(dev)
    ivar = ivar.to(dev)
    flux = torch.where(ivar > 0, flux, torch.zeros_like(flux))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=flux.shape[1], unit="px", desc="train cannon")
    t1 = time.perf_counter()
    common = dict(pivot=pivot, scale=scale, continuum=pc, label_names=ts.label_names, x_min=lo, x_max=hi,
                  wavelength_aa=ts.wavelength_aa, wavelength_medium=ts.wavelength_medium, resolution=ts.resolution)
    sys_err, sys_info = None, {}
    if cfg.systematics:
        # Model-inadequacy floor: train without a held-out set, fit it, and compare the scatter of
        # its labels about the truth with the formal errors.
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        perm = torch.randperm(n, generator=gen)
        n_val = int(round(cfg.validation_fraction * n))
        if n_val >= 10 and n - n_val > T:
            val, tr = perm[:n_val], perm[n_val:]
            th_v, s2_v, lam_v, _, info_v = fit_coefficients(u[tr.to(dev)], flux[tr.to(dev)],
                                                             ivar[tr.to(dev)], cfg)
            G_v, k_v = info_v["theta_cov"]
            m_v = CannonModel(th_v.cpu(), theta_cov=(G_v.cpu().numpy(), k_v.cpu().numpy()),
                              training_labels=labels[tr.numpy()], model_variance=s2_v.cpu().numpy(), **common)
            sys_err, sys_info = label_systematics(m_v, flux[val.to(dev)], ivar[val.to(dev)], labels[val.numpy()],
                                                  device=dev)
            timings["systematics_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    theta, s2, lam, dead, info = fit_coefficients(u, flux, ivar, cfg, progress=bar.update if bar else None)
    if bar:
        bar.close()
    timings["coefficients_s"] = time.perf_counter() - t2
    G, k = info["theta_cov"]
    model = CannonModel(theta.cpu(), theta_cov=(G.cpu().numpy(), k.cpu().numpy()), label_systematic_error=sys_err,
                        l1_regularization=None if lam is None else lam.cpu().numpy(), training_labels=labels,
                        model_variance=s2.cpu().numpy(),
                        meta={**(meta or {}), "training": {
                            "method": "cannon-wls", "n_train": int(n), "scatter": cfg.scatter,
                            "l1": list(cfg.l1), "normalise": cfg.normalise, "systematics": sys_info,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **ts.notes}}, **common)
    report = CannonTrainReport(n_train=n, n_pix=flux.shape[1], n_labels=L, n_terms=T,
                               seconds=time.perf_counter() - t0, scatter_iterations=info["passes"],
                               n_dead_pixels=int(dead.sum()), n_continuum_pixels=int(pc.mask.sum()) if pc else 0,
                               s2_median=float(s2[~dead].median()) if (~dead).any() else float("nan"),
                               l1_choice=info["l1_choice"], timings=timings, systematics=sys_info)
    return model, report


def label_systematics(model: CannonModel, flux, ivar, labels, device="cpu"):
    """Per-label error floor (n_labels,) from held-out stars with known labels: the robust scatter
    of (fit - truth) beyond the formal errors, sqrt(max(0, (1.4826 MAD)^2 - median(err^2))).

    flux, ivar: (n, n_pix) normalised rest-frame spectra on the model's grid.
    """
    from ..config import FitConfig
    from ..fit.cannon import CannonFitter

    f = CannonFitter(model, model.wavelength, wavelength_medium=model.wavelength_medium,
                     config=FitConfig(v_max_kms=0.0, continuum_degree=-1), device=device)
    res = f.fit(flux.cpu().numpy(), ivar.cpu().numpy())
    ok = np.isfinite(res.labels).all(1) & ((res.flags & 2) == 0)       # not stuck on the box edge
    if ok.sum() < 10:
        return None, {"n_validation": int(len(labels)), "n_used": int(ok.sum())}
    d = res.labels[ok] - labels[ok]
    spread = 1.4826 * np.median(np.abs(d - np.median(d, 0)), 0)
    formal = np.median(res.errors[ok] ** 2, 0)
    sys_err = np.sqrt(np.clip(spread ** 2 - formal, 0, None))
    return sys_err, {"n_validation": int(len(labels)), "n_used": int(ok.sum()),
                     "label_systematic_error": sys_err.tolist(), "robust_scatter": spread.tolist(),
                     "median_formal_error": np.sqrt(formal).tolist()}


def training_set_from_arrays(flux, ivar, labels, label_names, wavelength_aa, *, wavelength_medium="vacuum",
                             resolution=None, segments=None, rv_kms=None) -> TrainingSet:
    """A TrainingSet from in-memory arrays (benchmarks, tests, notebooks)."""
    flux = np.asarray(flux, np.float32)
    ivar = np.asarray(ivar, np.float32)
    ivar = np.where(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0), ivar, 0).astype(np.float32)
    return TrainingSet(flux=flux, ivar=ivar, labels=np.asarray(labels, np.float64), label_names=tuple(label_names),
                       source_id=np.arange(len(flux)).astype(str), wavelength_aa=np.asarray(wavelength_aa, np.float64),
                       wavelength_medium=wavelength_medium, resolution=resolution,
                       segments=tuple(tuple(s) for s in segments) if segments else None,
                       rv_kms=None if rv_kms is None else np.asarray(rv_kms, np.float64))
