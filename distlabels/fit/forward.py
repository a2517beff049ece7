"""The forward model of the fit and its analytic Jacobian, batched over stars.

Model of observed pixel p of star s (all wavelengths vacuum)::

    model[s, p] = cont[s, p] * B(q_s, s_s)[F(theta_s)] (u_p - shift(v_s))
    cont[s, p]  = sum_k c[s, k] * T_k(lambda_p)                 (Chebyshev per segment)

``F`` is the emulator evaluated on the working grid (its resampling and line-spread function
folded into the last layer, the label map into the first, see :mod:`.working_grid` and
:mod:`.labels`), ``B`` the optional broadening (rotation q = vsini^2, extra Gaussian width
s = sigma^2; :mod:`.broadening`), and ``(.)(u)`` interpolation at fractional working index ``u``
(cubic, 4 taps, on a uniform log grid; linear on the model's native grid). ``shift(v)`` is
log10 of the relativistic Doppler factor in working pixels.

Parameters per star, in this order: ``[theta (n_theta), v (km/s), q (if fit_vsini),
s (if fit_lsf), c (n_cont)]``. Every derivative is analytic: through the network
(:meth:`~distlabels.models.base.Emulator.value_and_jacobian_stacked`), the Fourier-space
broadening, the interpolation weights and the continuum. The network runs in its own precision
(float32 by default); parameters, J^T W J and the solves are float64.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..io.wavelength import C_KMS
from .aligned import FusedTaps
from .broadening import Broadener

LN10 = float(np.log(10.0))

# On native grids on the CPU, rows are interpolated run by run (contiguous slices, per star) from
# this many rows up: a Jacobian's 23 rows run 2.5x faster that way than with gather/scatter, but a
# model's or a pulled-back gradient's one or two rows run 1.3-2.5x faster batched, where the
# per-star slicing costs more than the arithmetic (one thread, 8-64 stars of 14,001 pixels).
RUNS_MIN_ROWS = 3


def grid_v_max(grid) -> float:
    """The |RV| range a working grid was built for (its margin), km/s."""
    return float(getattr(grid, "v_max_kms", 500.0))


def cubic_weights(f: torch.Tensor):
    """Keys cubic convolution (a = -1/2) weights for taps -1, 0, 1, 2 and their derivatives in f."""
    f2, f3 = f * f, f * f * f
    w = (-0.5 * f3 + f2 - 0.5 * f, 1.5 * f3 - 2.5 * f2 + 1, -1.5 * f3 + 2 * f2 + 0.5 * f, 0.5 * f3 - 0.5 * f2)
    dw = (-1.5 * f2 + 2 * f - 0.5, 4.5 * f2 - 5 * f, -4.5 * f2 + 4 * f + 0.5, 1.5 * f2 - f)
    return w, dw


# The same weights as polynomials: rows are the coefficients of f^3, f^2, f, 1 (weights) and of f^2, f, 1
# (derivatives), columns the taps. For per-star weights (aligned grids) one small product replaces
# some thirty element-wise operations, each a kernel launch on a GPU.
_CUBIC_W = ((-0.5, 1.5, -1.5, 0.5), (1.0, -2.5, 2.0, -0.5), (-0.5, 0.0, 0.5, 0.0), (0.0, 1.0, 0.0, 0.0))
_CUBIC_DW = ((-1.5, 4.5, -4.5, 1.5), (2.0, -5.0, 4.0, -1.0), (-0.5, 0.0, 0.5, 0.0))
_CUBIC_CACHE: dict = {}


def cubic_weights_per_star(f: torch.Tensor, dscale: torch.Tensor):
    """:func:`cubic_weights` for one fraction per star, f (n,): weights and d weights / dv (times dscale (n,)),
    each a tuple of 4 (n,) views."""
    f2 = f * f
    powers = torch.stack([f2 * f, f2, f, torch.ones_like(f)], 1)                     # (n, 4)
    key = (f.dtype, f.device)
    if key not in _CUBIC_CACHE:          # once per dtype and device: a copy to a GPU is a synchronisation
        _CUBIC_CACHE[key] = (torch.tensor(_CUBIC_W, dtype=f.dtype, device=f.device),
                             torch.tensor(_CUBIC_DW, dtype=f.dtype, device=f.device))
    cw, cdw = _CUBIC_CACHE[key]
    w = powers @ cw
    dw = (powers[:, 1:] @ cdw) * dscale[:, None]
    return w.unbind(1), dw.unbind(1)


@dataclass
class Evaluation:
    model: torch.Tensor            # (n, n_pix) cont * y
    y: torch.Tensor                # (n, n_pix) normalised model
    cont: torch.Tensor             # (n, n_pix)
    light: torch.Tensor            # (n, 1 + n_extra, n_pix) d y / d (v, q, s)
    jtheta: torch.Tensor | None    # (n, n_theta, n_pix) d y / d theta

    def take(self, idx):
        return Evaluation(self.model[idx], self.y[idx], self.cont[idx], self.light[idx],
                          None if self.jtheta is None else self.jtheta[idx])


class ForwardModel:
    """Everything that maps a parameter vector to model fluxes on the observed pixels.

    work: the emulator of theta on the working grid; grid: its :class:`WorkingGrid`;
    log10_obs: (n_pix,) log10 vacuum wavelengths of the observed pixels; basis: (n_pix, n_cont)
    continuum basis (a single column of ones for pre-normalised spectra).
    """

    def __init__(self, work, grid, log10_obs: np.ndarray, basis: np.ndarray, *, n_theta: int,
                 fit_continuum: bool, broadener: Broadener | None, device, dtype, fused: bool | str = "auto"):
        self.work, self.grid = work, grid
        self.device, self.dtype = device, dtype
        self.n_theta = n_theta
        self.fit_continuum = fit_continuum
        self.broadener = broadener
        self.n_extra = broadener.n_extra if broadener is not None else 0
        self.n_cont = basis.shape[1]
        self.i_v = n_theta
        self.i_q = n_theta + 1 if broadener is not None and broadener.fit_vsini else None
        self.i_s = n_theta + 1 + int(self.i_q is not None) if broadener is not None and broadener.fit_lsf else None
        self.i_c = n_theta + 1 + self.n_extra
        self.n_par = self.i_c + self.n_cont
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}
        self.basis = torch.as_tensor(basis, dtype=dtype, device=device)          # (n_pix, n_cont)
        self.basis_t = self.basis.T.contiguous()                                 # (n_cont, n_pix)
        self.covered = torch.as_tensor(grid.covered, device=device)
        lo = torch.as_tensor(log10_obs, dtype=torch.float64, device=device)
        self.log10_obs = lo
        self.taps = 4 if grid.uniform else 2
        self.n_work = grid.n_work
        self.aligned = None
        self.native_offset = None
        self.fused = FusedTaps(fused, torch.device(device))
        self.jacobian_chunk: int | None = None     # stars per full-Jacobian chunk (lm.weighted_normal_equations)
        # Aligned taps as per-star slices (CPU) or batched gathers (GPU; and CPU when fusion is forced).
        self.batched_taps = torch.device(device).type != "cpu" or self.fused.enabled
        if grid.uniform:
            self.u0 = (lo - grid.log10_start) / grid.step_dex                     # (n_pix,) fractional index at v = 0
            # Observed pixels every m working pixels (log-uniform surveys: LAMOST, SDSS/BOSS, APOGEE):
            # then a star's interpolation weights are the same for all its pixels, and the taps are
            # strided slices on a CPU and one batched (on CUDA fused) gather on a GPU, which does that
            # better than thousands of small slices (:mod:`.aligned`).
            u0 = self.u0.cpu().numpy()
            du = np.diff(u0)
            if len(u0) > 1 and np.all(np.isfinite(u0)):
                m = int(round(float(np.median(du))))
                if m >= 1 and np.all(np.abs(du - m) < 1e-4):
                    self.aligned = (float(u0[0]), m)
        else:
            self.native = torch.as_tensor(grid.native, dtype=torch.float64, device=device)
            # Index lookup on a uniform table finer than the smallest native step: O(1) per pixel
            # instead of a binary search (the table cell's last native pixel, then at most one step).
            nat = np.asarray(grid.native, np.float64)
            h = 0.5 * float(np.min(np.diff(nat)))
            n_tab = int(np.ceil((nat[-1] - nat[0]) / h)) + 2
            tab = np.searchsorted(nat, nat[0] + h * np.arange(n_tab), side="right") - 1
            self._lookup = (float(nat[0]), h, torch.as_tensor(np.clip(tab, 0, len(nat) - 2), device=device))
            # On a smooth grid (a model's linear-in-lambda pixels) the fractional index of a pixel shifted
            # by s dex is a quadratic in s to 1e-4 pixel over the RV range: u = u0 + a s + b s^2.
            self._taylor = None
            self._taylor_fast = None
            lobs = np.asarray(log10_obs, np.float64)
            s_max = float(np.log10((1 + grid_v_max(grid) / 299792.458) / (1 - grid_v_max(grid) / 299792.458)) / 2)
            self._s_max = s_max
            if s_max > 0:
                idx = np.arange(len(nat), dtype=np.float64)
                u_at = lambda sh: np.interp(lobs - sh, nat, idx)          # noqa: E731
                u0, up, um = u_at(0.0), u_at(s_max), u_at(-s_max)
                a = (up - um) / (2 * s_max)
                b = (up + um - 2 * u0) / (2 * s_max ** 2)
                inside = (lobs - s_max > nat[0]) & (lobs + s_max < nat[-1])
                # Within s_max of the grid's ends np.interp clamps the shifted points, so the
                # differences above understate a and b there (0.05 pixel off at 5 km/s): take them
                # from a straight line through the nearest 16 inside pixels (smooth in the pixel index).
                k_in = np.flatnonzero(inside)
                if 2 <= len(k_in) < len(lobs):
                    px = np.arange(len(lobs))
                    for out, ref in ((px < k_in[0], k_in[:16]), (px > k_in[-1], k_in[-16:])):
                        for arr in (a, b):
                            arr[out] = np.polyval(np.polyfit(ref, arr[ref], 1), px[out])
                err = max(np.max(np.abs(u_at(sh) - (u0 + a * sh + b * sh * sh))[inside], initial=0.0)
                          for sh in (0.5 * s_max, -0.3 * s_max, 0.9 * s_max))
                if err < 1e-3:
                    self._taylor = tuple(torch.as_tensor(x, dtype=torch.float64, device=device) for x in (u0, a, b))
                    # The same in the network's precision around the integer part of u0: the shift
                    # itself is a few pixels at most, so float32 resolves it to ~1e-6 pixel, and the
                    # per-pixel work (every trial point and Jacobian) halves.
                    u0i = np.floor(u0)
                    reach_px = np.abs(a) * s_max + np.abs(b) * s_max ** 2 + 2
                    near = (u0 - reach_px < 0) | (u0 + reach_px > len(nat) - 1)
                    self._taylor_fast = (torch.as_tensor(u0i.astype(np.int64), device=device),
                                         torch.as_tensor(u0 - u0i, dtype=dtype, device=device),
                                         torch.as_tensor(a, dtype=dtype, device=device),
                                         torch.as_tensor(b, dtype=dtype, device=device),
                                         torch.as_tensor(np.flatnonzero(near), device=device))
            # Observed pixels that are native pixels (data on the model's own grid): consecutive
            # pixels then read consecutive working pixels, in a few runs of constant offset per star.
            u0 = np.interp(lobs, nat, np.arange(len(nat), dtype=np.float64))
            off = u0 - np.arange(len(u0))
            if len(u0) > 1 and np.all(np.abs(off - round(float(off[0]))) < 1e-6):
                self.native_offset = int(round(float(off[0])))

    # ------------------------------------------------------------------ interpolation
    def taps_at(self, v: torch.Tensor):
        """Interpolation at velocities v (n,) km/s: base index (n, n_pix) long, weights and d weights / dv.

        Weights are a tuple of ``taps`` tensors (n, n_pix) for working pixels base + t; the base is
        clamped so that every tap is inside the grid (pixels that fall off are given no weight by
        the caller through :meth:`reach`).
        """
        b = v / C_KMS
        shift_dex = 0.5 * (torch.log10(1 + b) - torch.log10(1 - b))                 # (n,)
        dshift_dv = 1.0 / (LN10 * C_KMS * (1 - b * b))                              # d shift_dex / dv
        if self.aligned is not None:
            u00, m = self.aligned
            n_pix = len(self.u0)
            u = u00 - shift_dex / self.grid.step_dex                                   # (n,)
            base = u.floor()
            f = (u - base).to(self.dtype)
            base = base.long() - 1
            top = self.n_work - 4 - m * (n_pix - 1)
            if self.batched_taps:
                # The grid's margin covers |v| <= v_max (the bounds), so the clamp changes nothing in a
                # fit; a test on the host would cost a GPU synchronisation per call.
                base = base.clamp(0, max(top, 0))
            if self.batched_taps or bool(((base >= 0) & (base <= top)).all()):
                return (base,) + cubic_weights_per_star(f, (-dshift_dv / self.grid.step_dex).to(self.dtype))
        if self.grid.uniform:
            u = self.u0[None] - (shift_dex / self.grid.step_dex)[:, None]
            u = torch.nan_to_num(u, nan=0.0).clamp(1, self.n_work - 3.000001)
            i = u.floor()
            f = (u - i).to(self.dtype)
            i = i.long() - 1
            w, dw = cubic_weights(f)
            scale = (-dshift_dv / self.grid.step_dex).to(self.dtype)[:, None]       # df/dv
            return i, w, tuple(d * scale for d in dw)
        if self._taylor_fast is not None and bool((shift_dex.abs() <= self._s_max).all()):
            u0i, u0f, a, bb, edge = self._taylor_fast
            sh = shift_dex.to(self.dtype)[:, None]
            slope = torch.addcmul(a[None], sh, bb[None])                               # (n, n_pix)
            uf = torch.addcmul(u0f[None], sh, slope)                                   # fractional part
            k = uf.floor()
            f = uf - k
            i = u0i[None] + k.long()
            if len(edge):
                # Pixels whose taps can leave the grid: clamp as the float64 path does.
                ie, fe = i[:, edge], f[:, edge]
                i[:, edge] = ie.clamp(0, self.n_work - 2)
                f[:, edge] = torch.where(ie < 0, torch.zeros_like(fe), torch.where(ie > self.n_work - 2,
                                                                                     torch.ones_like(fe), fe))
            dfdv = torch.addcmul(slope, sh, bb[None]).mul_(dshift_dv.to(self.dtype)[:, None])
            return i, (1 - f, f), (-dfdv, dfdv)
        if self._taylor is not None:
            u0, a, bb = self._taylor
            sh = shift_dex[:, None]
            u = (u0[None] + sh * (a[None] + sh * bb[None])).clamp(0, self.n_work - 1.000001)
            i = u.floor()
            f = (u - i).to(self.dtype)
            dfdv = ((a[None] + 2 * sh * bb[None]) * dshift_dv[:, None]).to(self.dtype)
            i = i.long()
            return i, (1 - f, f), (-dfdv, dfdv)
        val = self.log10_obs[None] - shift_dex[:, None]
        val = torch.nan_to_num(val, nan=float(self.native[0]))
        l0, h, tab = self._lookup
        i = tab[((val - l0) / h).floor().long().clamp(0, len(tab) - 1)]
        i = (i + (self.native[(i + 1).clamp(max=self.n_work - 1)] <= val).long()).clamp(0, self.n_work - 2)
        lo, hi = self.native[i], self.native[i + 1]
        f = ((val - lo) / (hi - lo)).clamp(0, 1)
        dfdv = (-dshift_dv[:, None] / (hi - lo)).to(self.dtype)
        f = f.to(self.dtype)
        return i, (1 - f, f), (-dfdv, dfdv)

    def pixel_index(self, v: torch.Tensor) -> torch.Tensor:
        """(n, n_pix) long: the working pixel nearest to each observed pixel at velocities v."""
        i, w, _ = self.taps_at(v)
        if i.dim() == 1:
            i = i[:, None] + self.aligned[1] * torch.arange(len(self.u0), device=i.device)[None]
        return (i + (1 if self.taps == 4 else 0)).clamp(0, self.n_work - 1)

    def reach(self, v: torch.Tensor) -> torch.Tensor:
        """(n, n_pix) bool: every interpolation tap of the pixel falls on a covered working pixel."""
        i, _, _ = self.taps_at(v)
        if i.dim() == 1:
            i = i[:, None] + self.aligned[1] * torch.arange(len(self.u0), device=i.device)[None]
        ok = torch.ones_like(i, dtype=torch.bool)
        for t in range(self.taps):
            ok &= self.covered[(i + t).clamp(0, self.n_work - 1)]
        if self.grid.uniform:
            b = v / C_KMS
            u = self.u0[None] - (0.5 * (torch.log10(1 + b) - torch.log10(1 - b)) / self.grid.step_dex)[:, None]
            ok &= (u >= 1) & (u <= self.n_work - 3)
        else:
            val = self.log10_obs[None] - (0.5 * (torch.log10(1 + v / C_KMS) - torch.log10(1 - v / C_KMS)))[:, None]
            ok &= (val >= self.native[0]) & (val <= self.native[-1])
        return ok

    def _interp(self, rows: torch.Tensor, i: torch.Tensor, w, out: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """rows (n, R, n_work) at the taps: (n, R, n_pix), written into ``out`` when given.

        scale: (n, n_pix), only with aligned batched taps (the one-kernel path multiplies by it)."""
        n, r, _ = rows.shape
        if i.dim() == 1 and self.batched_taps:
            return self.fused.interp(rows, i, torch.stack(w), self.aligned[1], len(self.u0), scale, out)
        if i.dim() == 1:
            # Aligned grid: per star, each tap is a strided slice with one weight.
            m, n_pix = self.aligned[1], len(self.u0)
            if out is None:
                out = torch.empty(n, r, n_pix, dtype=rows.dtype, device=rows.device)
            span = m * (n_pix - 1) + 1
            base = i.tolist()
            wl = [wt.tolist() for wt in w]
            for s_ in range(n):
                b0 = base[s_]
                o = out[s_]
                torch.mul(rows[s_, :, b0:b0 + span:m], wl[0][s_], out=o)
                for t in range(1, len(w)):
                    o.add_(rows[s_, :, b0 + t:b0 + t + span:m], alpha=wl[t][s_])
            return out
        if self.native_offset is not None and self.device.type == "cpu" and r >= RUNS_MIN_ROWS:
            return self._interp_runs(rows, i, w, out)
        acc = None
        for t, wt in enumerate(w):
            g = rows.gather(2, (i + t)[:, None, :].expand(n, r, -1))
            acc = g * wt[:, None, :] if acc is None else acc.addcmul_(g, wt[:, None, :])
        if out is not None:
            out.copy_(acc)
            return out
        return acc

    def _interp_runs(self, rows, i, w, out=None):
        """Interpolation when observed pixel p sits on native pixel p + offset: per star, runs of pixels
        whose taps are at a constant offset are contiguous slices (no gather)."""
        n, r, _ = rows.shape
        n_pix = i.shape[1]
        if out is None:
            out = torch.empty(n, r, n_pix, dtype=rows.dtype, device=rows.device)
        for s_, a_, b_, kk in self._runs(i):
            o = out[s_, :, a_:b_]
            torch.mul(rows[s_, :, a_ + kk:b_ + kk], w[0][s_, a_:b_], out=o)
            for t in range(1, len(w)):
                o.addcmul_(rows[s_, :, a_ + kk + t:b_ + kk + t], w[t][s_, a_:b_])
        return out

    def interp_t(self, u: torch.Tensor, i: torch.Tensor, w, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The transpose of :meth:`_interp`: observed-pixel rows u (n, R, n_pix) (times scale (n, n_pix))
        spread back onto the working grid by the same taps, (n, R, n_work). Used to pull vectors back
        through the network."""
        n, r, n_pix = u.shape
        if i.dim() == 1 and self.batched_taps:
            return self.fused.spread(u, i, torch.stack(w), self.aligned[1], self.n_work, scale)
        if scale is not None:
            u = u * scale[:, None, :]
        out = torch.zeros(n, r, self.n_work, dtype=u.dtype, device=u.device)
        if i.dim() == 1:
            m = self.aligned[1]
            span = m * (n_pix - 1) + 1
            base = i.tolist()
            wl = [wt.tolist() for wt in w]
            for s_ in range(n):
                b0 = base[s_]
                for t in range(len(w)):
                    out[s_, :, b0 + t:b0 + t + span:m].add_(u[s_], alpha=wl[t][s_])
            return out
        if self.native_offset is not None and self.device.type == "cpu" and r >= RUNS_MIN_ROWS:
            for s_, a_, b_, kk in self._runs(i):
                for t in range(len(w)):
                    out[s_, :, a_ + kk + t:b_ + kk + t].addcmul_(u[s_, :, a_:b_], w[t][s_, a_:b_])
            return out
        for t, wt in enumerate(w):
            out.scatter_add_(2, (i + t)[:, None, :].expand(n, r, -1), u * wt[:, None, :])
        return out

    def _runs(self, i: torch.Tensor):
        """(star, first pixel, end pixel, offset) of the runs of observed pixels whose taps start at a
        constant offset from the pixel index (native grids)."""
        n, n_pix = i.shape
        k = i - torch.arange(n_pix, device=i.device)[None]
        change = (k[:, 1:] != k[:, :-1]).cpu().numpy()
        k = k.cpu().numpy()
        out = []
        for s_ in range(n):
            cuts = [0] + (np.flatnonzero(change[s_]) + 1).tolist() + [n_pix]
            out += [(s_, a_, b_, int(k[s_, a_])) for a_, b_ in zip(cuts[:-1], cuts[1:])]
        return out

    # ------------------------------------------------------------------ approximate curvature
    @property
    def supports_approx_curvature(self) -> bool:
        """The cheap J^T W J of :meth:`approx_normal_equations` needs the network's last layer split off
        (:class:`~distlabels.models.payne.PayneMLP`) and no broadening."""
        return self.broadener is None and hasattr(self.work, "last_hidden")

    def curvature_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """G = M^T diag(pattern) M (H, H) for a batch with weights w (n, n_pix).

        M (n_pix, H) is the network's last layer interpolated onto the observed pixels at zero
        velocity, pattern the batch's median weights relative to each star's mean. Then
        c_s a_s^T G a_s (a_s = d hidden / d theta, c_s = mean(w_s cont_s^2)) approximates the label
        block of star s's J^T W J at the cost of a (H, H) product instead of the (n_pix, H) one.
        """
        if getattr(self, "_m_obs", None) is None:
            w_out, _ = self.work.output_layer()                                    # (n_work, H)
            i, wt, _ = self.taps_at(torch.zeros(1, dtype=torch.float64, device=self.device))
            self._m_obs = self._interp(w_out.T.contiguous()[None], i, wt)[0].T.contiguous()   # (n_pix, H)
        m = self._m_obs
        pat = (w / w.mean(1, keepdim=True).clamp_min(1e-30)).median(0).values.to(m.dtype)
        # G only steers the steps: the previous batch's serves while its pattern is within 2 % (mean
        # absolute difference), sparing an (n_pix, H, H) product per batch.
        cached = getattr(self, "_g_cache", None)
        if cached is not None and float((pat - cached[0]).abs().mean()) < 0.02 * float(cached[0].abs().mean()):
            return cached[1]
        G = (m * pat[:, None]).T @ m
        self._g_cache = (pat, G)
        return G

    # ------------------------------------------------------------------ evaluation
    def _buffer(self, name: str, shape, dtype) -> torch.Tensor:
        """A reusable scratch tensor of this shape (its contents are overwritten by the caller)."""
        numel = int(np.prod(shape))
        mine = self._scratch.setdefault(threading.get_ident(), {})     # per thread: a worker may run several fits
        buf = mine.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = mine[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(*shape)

    def working_rows(self, p: torch.Tensor, jac: bool, derivs: bool | None = None, scratch: bool = False) -> torch.Tensor:
        """Network (and broadening) on the working grid: (n, 1 [+ n_theta] [+ n_extra], n_work).

        jac: add the label derivatives; derivs (default: jac): add the broadening derivatives;
        scratch: the result may live in a buffer that the next call overwrites.
        """
        theta = p[:, : self.n_theta].to(self.dtype)
        if jac and scratch and self.broadener is None and getattr(self.work, "stacked_out", False):
            buf = self._buffer("rows", (len(theta), 1 + self.n_theta, self.n_work), self.dtype)
            return self.work.value_and_jacobian_stacked(theta, out=buf)
        if jac:
            rows = self.work.value_and_jacobian_stacked(theta).to(self.dtype)
        else:
            rows = self.work(theta)[:, None, :].to(self.dtype)
        if self.broadener is not None:
            cov = self.covered[None, None, :]
            rows = torch.where(cov, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
            rows[:, 0] = torch.where(self.covered[None], rows[:, 0], torch.ones((), dtype=rows.dtype, device=rows.device))
            q = p[:, self.i_q] if self.i_q is not None else torch.zeros(len(p), dtype=torch.float64, device=p.device)
            s = p[:, self.i_s] if self.i_s is not None else torch.zeros(len(p), dtype=torch.float64, device=p.device)
            rows = self.broadener.apply(rows, q, s, with_derivs=jac if derivs is None else derivs)
        return rows

    def continuum(self, p: torch.Tensor) -> torch.Tensor:
        """(n, n_pix) multiplicative continuum."""
        return p[:, self.i_c:].to(self.dtype) @ self.basis_t

    def evaluate_parts(self, p: torch.Tensor, labels: bool) -> "Evaluation":
        """Model and its derivatives at p (n, n_par) float64.

        The derivatives with respect to RV and broadening (``light``, cheap: they need only the
        spectrum row) are always computed; those with respect to the labels (``jtheta``, one
        network Jacobian) only if ``labels``. Both in normalised flux (before the continuum).
        """
        rows = self.working_rows(p, jac=labels, derivs=True)
        i, w, dw = self.taps_at(p[:, self.i_v])
        cont = self.continuum(p)
        obs = self._interp(rows, i, w)                                     # (n, R, n_pix)
        k = self.n_theta
        y = obs[:, 0]
        light = [self._interp(rows[:, :1], i, dw)[:, 0]]
        extra = obs[:, 1 + k:] if labels else obs[:, 1:]
        if self.n_extra:
            light += list(extra.unbind(1))
        return Evaluation(cont * y, y, cont, torch.stack(light, 1), obs[:, 1:1 + k] if labels else None)

    def weighted_jacobian(self, p: torch.Tensor, sw: torch.Tensor, extra_rows: int = 0):
        """Model (n, n_pix) and sqrt(W) J (n, n_par [+ extra_rows], n_pix) at p, assembled in place.

        sw: (n, n_pix) square roots of the weights, in the model's dtype. extra_rows: rows left
        for the caller to fill after the Jacobian's (the buffer is reused by the next call).
        """
        rows = self.working_rows(p, jac=True, derivs=True, scratch=True)    # (n, 1 + k + extra, W)
        i, w, dw = self.taps_at(p[:, self.i_v])
        n, k, ic = len(p), self.n_theta, self.i_c
        n_pix = self.basis.shape[0]
        # js is consumed by the caller's normal equations before the next call: a reused buffer.
        js = self._buffer("js", (n, self.n_par + extra_rows, n_pix), rows.dtype)
        y = self._interp(rows[:, :1], i, w)[:, 0]
        cont = self.continuum(p)
        cs = cont * sw
        if i.dim() == 1 and self.batched_taps:
            # Aligned grid on a GPU: weights per star, cont * sqrt(w) applied in the same kernel.
            self._interp(rows[:, 1:1 + k], i, w, out=js[:, :k], scale=cs)
            self._interp(rows[:, :1], i, dw, out=js[:, k:k + 1], scale=cs)
            if self.n_extra:
                self._interp(rows[:, 1 + k:], i, w, out=js[:, k + 1:ic], scale=cs)
        elif i.dim() == 1:
            # Aligned grid: one weight per star and tap; scale afterwards.
            self._interp(rows[:, 1:1 + k], i, w, out=js[:, :k])
            self._interp(rows[:, :1], i, dw, out=js[:, k:k + 1])
            if self.n_extra:
                self._interp(rows[:, 1 + k:], i, w, out=js[:, k + 1:ic])
            js[:, :ic] *= cs[:, None, :]
        else:
            # Per-pixel weights: fold cont * sqrt(w) into them (one pass over the Jacobian, not two).
            wc = tuple(wt * cs for wt in w)
            self._interp(rows[:, 1:1 + k], i, wc, out=js[:, :k])
            self._interp(rows[:, :1], i, tuple(d * cs for d in dw), out=js[:, k:k + 1])
            if self.n_extra:
                self._interp(rows[:, 1 + k:], i, wc, out=js[:, k + 1:ic])
        torch.mul((y * sw)[:, None, :], self.basis_t[None], out=js[:, ic:self.n_par])
        return cont * y, js

    def jacobian(self, ev: "Evaluation", jtheta: torch.Tensor) -> torch.Tensor:
        """Full Jacobian (n, n_par, n_pix) from an evaluation and label derivatives (n, n_theta, n_pix)."""
        c = ev.cont[:, None, :]
        return torch.cat([jtheta * c, ev.light * c, ev.y[:, None, :] * self.basis_t[None]], 1)

    def evaluate(self, p: torch.Tensor, jac: bool):
        """Model (n, n_pix) and, if jac, its Jacobian (n, n_par, n_pix), at parameters p (n, n_par) float64."""
        if not jac:
            rows = self.working_rows(p, jac=False)
            i, w, _ = self.taps_at(p[:, self.i_v])
            return self.continuum(p) * self._interp(rows, i, w)[:, 0], None
        ev = self.evaluate_parts(p, labels=True)
        return ev.model, self.jacobian(ev, ev.jtheta)

    def shape(self, p: torch.Tensor) -> torch.Tensor:
        """Model without continuum (n, n_pix): the normalised spectrum at the observed pixels."""
        rows = self.working_rows(p, jac=False)
        i, w, _ = self.taps_at(p[:, self.i_v])
        return self._interp(rows, i, w)[:, 0]


@dataclass
class _Parts:
    """Forward pieces at a point that the approximate normal equations reuse (rows: stars)."""

    a: torch.Tensor        # (H, n, k) d hidden / d theta
    yw: torch.Tensor       # (n, 1, n_work) spectrum on the working grid
    taps: tuple            # (i, w, dw) of ForwardModel.taps_at
    y: torch.Tensor        # (n, n_pix) normalised model at the observed pixels
    cont: torch.Tensor     # (n, n_pix)
    r: torch.Tensor        # (n, n_pix) residual d - cont * y
    chi2: torch.Tensor     # (n,) float64

    def take(self, m: torch.Tensor) -> "_Parts":
        """The pieces of rows m: a bool mask or row indices (indices: no host-device sync per piece)."""
        if m.dtype == torch.bool:
            m = m.nonzero().squeeze(1)
        i, w, dw = self.taps
        return _Parts(self.a[:, m], self.yw[m], (i[m], tuple(t[m] for t in w), tuple(t[m] for t in dw)),
                      self.y[m], self.cont[m], self.r[m], self.chi2[m])


class ApproxCurvature:
    """J^T W J with its label block from one (H, H) matrix per batch, the rest exact.

    The label block of star s is approximated by c_s a_s^T G a_s, a_s = d hidden / d theta (H, k),
    G from :meth:`ForwardModel.curvature_matrix`, c_s = mean(w_s cont_s^2): an (H, H) product
    instead of the (n_pix, H) one of a full Jacobian. Every other block, J^T W r and chi^2 are
    exact: the label rows meet the residual, RV and continuum rows by pulling those back through
    the network (a few (n_pix, H) matrix-vector products). An LM step from this matrix goes downhill
    on the exact chi^2 and stops where the exact gradient vanishes; only the path (and the stopping
    test, which :func:`~distlabels.fit.lm.levenberg_marquardt` repeats on the exact matrix) depends
    on the approximation.
    """

    def __init__(self, fwd: "ForwardModel", w: torch.Tensor | None = None, G: torch.Tensor | None = None):
        self.fwd = fwd
        self.G = fwd.curvature_matrix(w) if G is None else G

    def on(self, fwd: "ForwardModel", pixel_fraction: float) -> "ApproxCurvature":
        """The same approximation for a forward model with the same hidden layers on a subset of the
        pixels (stage 1's every k-th pixel: pixel_fraction 1/k)."""
        return ApproxCurvature(fwd, G=self.G * pixel_fraction)

    def trial(self, p: torch.Tensor, d: torch.Tensor, w: torch.Tensor):
        """chi^2 (n,) float64 at p (n, n_par) and the pieces :meth:`normal_equations` can reuse there."""
        fwd = self.fwd
        h, a = fwd.work.last_hidden(p[:, :fwd.n_theta].to(fwd.dtype))
        yw = fwd.work.apply_output(h)[:, None, :]
        i, wt, dw = fwd.taps_at(p[:, fwd.i_v])
        y = fwd._interp(yw, i, wt)[:, 0]
        cont = fwd.continuum(p)
        r = d - cont * y
        chi2 = (r * r * w).sum(1, dtype=torch.float64)
        return chi2, _Parts(a, yw, (i, wt, dw), y, cont, r, chi2)

    def normal_equations(self, p: torch.Tensor, sw: torch.Tensor, d: torch.Tensor, parts: _Parts | None = None):
        """Approximate J^T W J (n, P, P), exact J^T W r (n, P) and chi^2 (n,), float64."""
        fwd = self.fwd
        w = sw * sw
        if parts is None:
            _, parts = self.trial(p, d, w)
        n, k, n_pix = len(p), fwd.n_theta, fwd.basis.shape[0]
        a, yw, (i, wt, dw), y, cont = parts.a, parts.yw, parts.taps, parts.y, parts.cont
        hdim = a.shape[0]
        # Rows that meet the labels: residual, d model / d v, d model / d continuum (when fitted).
        n_c = fwd.n_cont if fwd.fit_continuum else 0
        e = torch.empty(n, 2 + n_c, n_pix, dtype=y.dtype, device=y.device)
        e[:, 0] = parts.r
        torch.mul(cont, fwd._interp(yw, i, dw)[:, 0], out=e[:, 1])
        if n_c:
            torch.mul(y[:, None, :], fwd.basis_t[None], out=e[:, 2:])
        z = fwd.interp_t(e, i, wt, scale=cont * w)                             # (n, R, n_work)
        back = fwd.work.pullback(z.view(n * z.shape[1], -1)).view(n, -1, hdim)  # (n, R, H)
        an = a.permute(1, 0, 2)                                                # (n, H, k)
        x = (an.transpose(1, 2) @ back.transpose(1, 2)).double()              # (n, k, R): J_theta^T W e
        es = e * sw[:, None, :]
        nn = (es @ es.transpose(1, 2)).double()                                # (n, R, R)
        ga = (self.G @ a.reshape(hdim, n * k)).view(hdim, n, k).permute(1, 0, 2)   # (n, H, k)
        scale = (w * cont * cont).mean(1).double()
        att = (an.transpose(1, 2) @ ga).double() * scale[:, None, None]
        P = fwd.n_par
        A = torch.zeros(n, P, P, dtype=torch.float64, device=p.device)      # held continuum: zero blocks
        g = torch.zeros(n, P, dtype=torch.float64, device=p.device)
        end = k + 1 + n_c
        A[:, :k, :k] = 0.5 * (att + att.transpose(1, 2))
        A[:, :k, k:end] = x[:, :, 1:]
        A[:, k:end, :k] = x[:, :, 1:].transpose(1, 2)
        A[:, k:end, k:end] = nn[:, 1:, 1:]
        g[:, :k] = x[:, :, 0]
        g[:, k:end] = nn[:, 1:, 0]
        return A, g, parts.chi2
