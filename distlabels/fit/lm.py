"""Batched, bounded Levenberg-Marquardt with per-star damping and convergence.

Each star has its own damping ``lambda`` (Nielsen's update from the ratio of actual to predicted
chi^2 decrease) and its own stop, and leaves the batch when it stops, so converged stars cost
nothing. A star stops when

* the undamped Gauss-Newton step would lower chi^2 by less than ``tol`` (the Newton decrement
  g^T A^-1 g: the squared distance to the minimum in units of the errors), or
* even the damped step it is about to take could not gain ``tol`` (a LeakyReLU network is
  piecewise linear, so the minimum can sit on a kink where the local quadratic model keeps
  promising a gain that is not there).

A trial point costs one forward pass; the Jacobian (one product with the network's last layer,
see :meth:`~distlabels.models.base.Emulator.value_and_jacobian_stacked`) is computed only where a
step is accepted, so J^T W J at the returned point is always exact.

Bounds by projection: a parameter on its bound whose gradient points outward is held for the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


APPROX_MAX_STEPS = 10   # trial steps on an approximate J^T W J before a star gets the exact one

# cuSOLVER's batched symmetric eigensolver (behind pinv(hermitian=True)) stopped with an internal error
# on 65,536 matrices of 24 x 24 float64 on an H100 (CUDA 13.0) where 49,152 had worked: the
# pseudo-inverses of a batch are taken this many matrices per call.
LINALG_BATCH = 16_384


@dataclass
class LMState:
    p: torch.Tensor          # (n, P) float64
    A: torch.Tensor          # (n, P, P) J^T W J at p (from a full Jacobian)
    g: torch.Tensor          # (n, P) J^T W r at p
    chi2: torch.Tensor       # (n,)
    converged: torch.Tensor  # (n,) bool
    n_iter: torch.Tensor     # (n,) int64: trial steps
    n_jac: torch.Tensor      # (n,) int64: full Jacobian evaluations
    decrement: torch.Tensor  # (n,) Newton decrement at p


def normal_equations(model, jac, d, w):
    """J^T W J (n, P, P), J^T W r (n, P), chi^2 (n,) in float64 from model (n, n_pix), J (n, P, n_pix).

    The products run in the Jacobian's precision (float32 by default: rounding there only changes
    the path, never the minimum, which is set by the residuals); call with a float64 Jacobian for
    the final covariance.
    """
    r = d - model
    rw = r * w
    chi2 = (r.double() * rw.double()).sum(1)
    jw = jac * w.to(jac.dtype)[:, None, :]
    A = (jw @ jac.transpose(1, 2)).double()
    A = 0.5 * (A + A.transpose(1, 2))
    g = (jac @ rw.to(jac.dtype)[:, :, None])[:, :, 0].double()
    return A, g, chi2


def pinv_hermitian(A: torch.Tensor, batch: int = LINALG_BATCH) -> torch.Tensor:
    """Pseudo-inverses of symmetric matrices A (n, P, P), at most ``batch`` matrices per call."""
    if len(A) <= batch:
        return torch.linalg.pinv(A, hermitian=True)
    return torch.cat([torch.linalg.pinv(A[i:i + batch], hermitian=True) for i in range(0, len(A), batch)])


def _held(p, g, free, lo, hi):
    """(n, P) bool: parameters fixed, or on a bound with the gradient pushing outward."""
    hold = ~free[None].expand(len(p), -1)
    hold = hold | ((p <= lo + 1e-12) & (g < 0)) | ((p >= hi - 1e-12) & (g > 0))
    return hold


def _solve(A, g, hold, lam):
    """Damped step (n, P) and predicted chi^2 decrease (n,) with held parameters frozen."""
    keep = (~hold).double()
    diag = A.diagonal(dim1=1, dim2=2).clamp_min(1e-30)
    M = A * keep[:, :, None] * keep[:, None, :]
    M = M + torch.diag_embed(hold.double() + lam[:, None] * diag * keep + 1e-10 * diag * keep)
    gk = g * keep
    # solve_ex: no error check, which would make the host wait for the GPU twice per iteration; a
    # singular system (it is damped, so only with non-finite input) gives a non-finite step that the
    # trial rejects.
    step = torch.linalg.solve_ex(M, gk[:, :, None])[0][:, :, 0]
    pred = (step * (gk + lam[:, None] * diag * keep * step)).sum(1)
    return step, pred


def _decrement_and_step(A, g, hold, lam):
    """Newton decrement (n,) (as :func:`newton_decrement`) and the damped step and predicted decrease (as
    :func:`_solve`) from one batched solve of both systems: half the small operations, each a kernel
    launch on a GPU."""
    n = len(A)
    keep = (~hold).double()
    diag = A.diagonal(dim1=1, dim2=2).clamp_min(1e-30) * keep
    M = A * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(hold.double() + 1e-10 * diag)
    gk = g * keep
    both = torch.cat([M, M + torch.diag_embed(lam[:, None] * diag)])
    sol = torch.linalg.solve_ex(both, torch.cat([gk, gk])[:, :, None])[0][:, :, 0]
    step = sol[n:]
    dec = (sol[:n] * gk).sum(1)
    pred = (step * (gk + lam[:, None] * diag * step)).sum(1)
    return dec, step, pred


def newton_decrement(A, g, hold):
    """g^T A^-1 g over the parameters not held: the chi^2 an undamped Gauss-Newton step would gain."""
    step, _ = _solve(A, g, hold, torch.zeros(len(A), dtype=A.dtype, device=A.device))
    return (step * g * (~hold).double()).sum(1)


def weighted_normal_equations(fwd, p, sw, d):
    """J^T W J, J^T W r, chi^2 (float64) at parameters p.

    sw: (n, n_pix) square roots of the weights. The weighted Jacobian sqrt(W) J is assembled in
    place (n, P, n_pix) and multiplied by its own transpose, ``fwd.jacobian_chunk`` stars at a time
    (None: all at once): its buffers, not the batch, then set the memory of a GPU batch.
    """
    n, chunk = len(p), getattr(fwd, "jacobian_chunk", None) or len(p)
    if n <= chunk:
        return _weighted_normal_equations(fwd, p, sw, d)
    parts = [_weighted_normal_equations(fwd, p[i:i + chunk], sw[i:i + chunk], d[i:i + chunk])
             for i in range(0, n, chunk)]
    return tuple(torch.cat(x) for x in zip(*parts))


def _weighted_normal_equations(fwd, p, sw, d):
    n_par = fwd.n_par
    # The weighted residual rides as one more row of the Jacobian buffer, so a single batched
    # product gives J^T W J and J^T W r (a separate matrix-vector product costs as much again).
    model, js = fwd.weighted_jacobian(p, sw, extra_rows=1)
    rs = js[:, n_par]
    torch.mul(d - model, sw, out=rs)
    M = (js @ js.transpose(1, 2)).double()
    A = M[:, :n_par, :n_par]
    A = 0.5 * (A + A.transpose(1, 2))
    g = M[:, :n_par, n_par].contiguous()
    return A, g, (rs.double() ** 2).sum(1)


class _Batch:
    """Per-star state of one LM run: parameters and J^T W J, J^T W r, chi^2 at them.

    With ``curvature`` (a :class:`~distlabels.fit.forward.ApproxCurvature`: an approximate J^T W J
    with the exact J^T W r and chi^2) stars move on that until they would stop; ``exact`` marks the
    stars whose matrix is the exact one.
    """

    def __init__(self, fwd, d, w, p, curvature=None):
        self.fwd, self.d, self.w = fwd, d, w
        self.p = p
        self.sw = w.clamp_min(0).sqrt()
        self.curvature = curvature
        n = len(p)
        self.exact = torch.full((n,), curvature is None, dtype=torch.bool, device=p.device)
        ne = (weighted_normal_equations(fwd, p, self.sw, d) if curvature is None
              else curvature.normal_equations(p, self.sw, d))
        self.A, self.g, self.chi2 = ne
        self.n_jac = torch.full((n,), int(curvature is None), dtype=torch.int64, device=p.device)

    def move(self, idx, p_new, parts=None):
        """Move stars idx to p_new and evaluate the Jacobian (or its approximation) there; parts: the
        trial's forward pieces at p_new (rows as idx), reused by the approximation."""
        if len(idx) == 0:
            return
        self.p[idx] = p_new
        # Exact and approximate stars as row indices, not masks: each boolean index is a
        # host-device sync on a GPU (here one count instead of two).
        if self.curvature is None:
            groups = [(None, True)]
        else:
            ex = self.exact[idx]
            n_ex = int(ex.sum())
            if n_ex in (0, len(idx)):
                groups = [(None, n_ex > 0)]
            else:
                order = torch.argsort((~ex).to(torch.int8), stable=True)          # exact stars first
                groups = [(order[:n_ex], True), (order[n_ex:], False)]
        for m, exact in groups:
            part = idx if m is None else idx[m]
            pp, sw, d = self.p[part], self.sw[part], self.d[part]
            if exact:
                ne = weighted_normal_equations(self.fwd, pp, sw, d)
            else:
                sub = parts if parts is None or m is None else parts.take(m)
                ne = self.curvature.normal_equations(pp, sw, d, sub)
            self.A[part], self.g[part], self.chi2[part] = ne
            self.n_jac[part] += int(exact)

    def make_exact(self, idx):
        """The exact J^T W J (one full Jacobian) for stars idx, which stay where they are."""
        if len(idx) == 0:
            return
        idx = idx[~self.exact[idx]]
        if len(idx):
            self.exact[idx] = True
            self.move(idx, self.p[idx])

    def chi2_at(self, idx, p):
        """chi^2 (n,) float64 of stars idx at p, and the forward pieces there (None without curvature)."""
        if self.curvature is not None:
            return self.curvature.trial(p, self.d[idx], self.w[idx])
        m, _ = self.fwd.evaluate(p, jac=False)
        r = (self.d[idx] - m).double()
        return (r * r * self.w[idx].double()).sum(1), None


def _restart_exact(b: _Batch, idx, lam, nu, lambda_init: float) -> None:
    """Stars idx leave the approximate matrix: the exact one (one Jacobian), damping reset."""
    if len(idx):
        b.make_exact(idx)
        lam[idx] = float(lambda_init)
        nu[idx] = 2.0


def levenberg_marquardt(fwd, d, w, p, *, free, lo, hi, max_iter: int, tol: float, lambda_init: float,
                        curvature=None, exact_stop: bool = True) -> LMState:
    """Fit every star of the batch from p (n, P) float64.

    fwd: a :class:`~distlabels.fit.forward.ForwardModel`; d, w: (n, n_pix) data and weights in its
    dtype; free: (P,) bool; lo, hi: (P,) float64 bounds. curvature: optional cheap J^T W J
    (see :class:`_Batch`); a star that would stop on it gets the exact matrix (one Jacobian) and
    stops only if the test passes on that too, so the returned A is always exact. exact_stop=False
    (a start, whose matrix nobody reads) stops on the approximate matrix and returns it.
    """
    check_exact = curvature is not None and exact_stop
    n = len(p)
    dev = p.device
    p = torch.minimum(torch.maximum(p, lo), hi).clone()
    b = _Batch(fwd, d, w, p, curvature)
    lam = torch.full((n,), float(lambda_init), dtype=torch.float64, device=dev)
    nu = torch.full((n,), 2.0, dtype=torch.float64, device=dev)
    converged = torch.zeros(n, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
    dec = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    active = torch.arange(n, device=dev)
    for _ in range(max_iter):
        if len(active) == 0:
            break
        pa, Aa, ga = b.p[active], b.A[active], b.g[active]
        hold = _held(pa, ga, free, lo, hi)
        lam_a = lam[active]
        dec_a, step, pred = _decrement_and_step(Aa, ga, hold, lam_a)
        dec[active] = dec_a
        stop = (dec_a < tol) | (pred < tol)
        wait = torch.zeros_like(stop)
        if check_exact:
            # A star that would stop on the approximate matrix gets the exact one (one Jacobian) and
            # is tested again on it next round, without a step now.
            # So does one that has not stopped after APPROX_MAX_STEPS trials: the approximate matrix
            # can be far off for a star (masks unlike the batch's, a large fractional pixel shift)
            # and crawl.
            wait = (stop | (n_iter[active] >= APPROX_MAX_STEPS)) & ~b.exact[active]
            _restart_exact(b, active[wait], lam, nu, lambda_init)
            stop = stop & ~wait
        converged[active] |= stop
        # Boolean masks become row indices once: every boolean index is a host-device sync on a GPU.
        go = (~stop & ~wait).nonzero().squeeze(1)
        sel, pa, step, pred, lam_a = active[go], pa[go], step[go], pred[go], lam_a[go]
        active = active[~stop]
        if len(sel) == 0:
            continue
        trial = torch.minimum(torch.maximum(pa + step, lo), hi)
        chi2_t, parts = b.chi2_at(sel, trial)
        gain = b.chi2[sel] - chi2_t
        n_iter[sel] += 1
        ok = torch.isfinite(chi2_t) & (gain > 0)
        rho = gain / pred.clamp_min(1e-30)
        # Nielsen: shrink lambda by up to 3 after a good step, grow it geometrically after a bad one.
        lam[sel] = torch.where(ok, lam_a * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3.0),
                               lam_a * nu[sel]).clamp_min(1e-7)
        nu[sel] = torch.where(ok, torch.full_like(lam_a, 2.0), nu[sel] * 2)
        ok = ok.nonzero().squeeze(1)
        b.move(sel[ok], trial[ok], None if parts is None else parts.take(ok))
        # Steps that fail even with heavy damping: at the minimum to numerical precision (judged on
        # the exact matrix: a star still on the approximate one gets it and goes on).
        stuck = lam[active] > 1e10
        if check_exact:
            redo = stuck & ~b.exact[active]
            _restart_exact(b, active[redo], lam, nu, lambda_init)
            stuck = stuck & ~redo
        converged[active] = torch.where(stuck, dec[active] < 100 * tol, converged[active])
        active = active[~stuck]
    # Out of iterations: the covariance still needs the exact matrix.
    if check_exact:
        b.make_exact(torch.arange(n, device=dev))
    return LMState(b.p, b.A, b.g, b.chi2, converged, n_iter, b.n_jac, dec)
