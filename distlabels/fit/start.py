"""Robust starting points: RV by cross-correlation, labels from a chi-square library search.

Both work on a uniform log-wavelength grid (the fit's working grid, or a coarser one when the fit
runs on the model's native pixels), where a velocity is a whole number of pixels:

1. The data, divided by a polynomial continuum, are binned onto that grid at rest (each observed
   pixel shared between its two nearest grid pixels). For every template and every integer shift up to +-v_max the
   chi-square gain of a free-scale fit of the template's line depths is one matrix product; the best
   template's peak, refined by a parabola through its neighbours, gives the RV.
2. The data are binned again at that RV, and every spectrum of a library of emulator spectra (at
   training labels) is scored by the chi-square of a free-scale fit: two matrix products for the
   whole batch. The best ``k`` library entries are the starts.
"""
from __future__ import annotations

import numpy as np
import torch

from ..io.wavelength import C_KMS


class StartSearch:
    """Cross-correlation and library search on a uniform grid.

    grid: a uniform :class:`WorkingGrid`; net: emulator of theta on that grid; lib_theta: (K, n_theta)
    library parameters; log10_obs: (n_pix,) observed pixels; v_max_kms: CCF range.
    """

    def __init__(self, grid, net, lib_theta: torch.Tensor, log10_obs: np.ndarray, *, n_templates: int,
                 v_max_kms: float, device, dtype, continuum_basis: np.ndarray | None = None):
        self.grid, self.device, self.dtype = grid, device, dtype
        self.ok = torch.as_tensor(grid.covered, device=device)
        with torch.no_grad():
            lib = net(lib_theta.to(dtype))                                                # (K, W)
            okf = self.ok.to(lib.dtype)
            lib = lib * okf + (1 - okf)                                                   # 1 outside coverage
            if continuum_basis is not None:
                # The data are divided by a polynomial fitted to them (lines included), so the library
                # is divided by the same kind of polynomial: otherwise the line blanketing that the
                # data's pseudo-continuum removes would count against every line-rich spectrum, and
                # the weakest-lined (most metal-poor) spectrum would win.
                b = torch.as_tensor(continuum_basis, dtype=torch.float64, device=device) * self.ok[:, None]
                lhs = b.T @ b + 1e-9 * torch.eye(b.shape[1], dtype=b.dtype, device=device)
                coef = torch.linalg.solve(lhs, (lib @ b.to(lib.dtype)).double().T)        # (n_cont, K)
                cont = (coef.T.to(lib.dtype) @ b.T.to(lib.dtype))                         # (K, W)
                good = (cont > 1e-6) & self.ok[None]
                lib = torch.where(good, lib / cont.clamp_min(1e-6), torch.ones((), dtype=lib.dtype, device=device))
        self.lib_theta = lib_theta
        self.lib_depth = (lib - 1) * okf                  # line depths, 0 outside coverage
        self.lib_depth2 = self.lib_depth * self.lib_depth
        self.u0 = torch.as_tensor((np.asarray(log10_obs) - grid.log10_start) / grid.step_dex, dtype=torch.float64,
                                  device=device)
        # Templates: library spectra spread over the first label (Teff for every model we know).
        order = np.argsort(lib_theta[:, 0].cpu().numpy())
        k = max(int(n_templates), 1)
        pick = order[np.linspace(0, len(order) - 1, k).round().astype(int)]
        self.templates = self.lib_depth[torch.as_tensor(pick, device=device)]            # (T, W)
        self.max_shift = k = int(np.ceil(0.5 * np.log10((1 + v_max_kms / C_KMS) / (1 - v_max_kms / C_KMS))
                                         / grid.step_dex))
        # Every template at every integer shift, side by side: the cross-correlations of a batch with all
        # of them are then one matrix product (W, T (2k + 1)) instead of a gather and two products per
        # template and call.
        W = grid.n_work
        self.shifts = torch.arange(-k, k + 1, device=device)
        src = torch.arange(W, device=device)[:, None] - self.shifts[None]                  # (W, 2k+1)
        inside = (src >= 0) & (src < W)
        tm = self.templates[:, src.clamp(0, W - 1)] * inside                              # (T, W, 2k+1)
        self.shifted = tm.permute(1, 0, 2).reshape(W, -1).contiguous()                   # (W, T (2k+1))
        self.shifted2 = self.shifted * self.shifted

    def _bin(self, dn, wn, shift_pix):
        """Normalised data binned onto the grid at rest: (sum w (d - 1), sum w) per grid pixel, (n, W) each.

        Each observed pixel is shared between its two neighbouring grid pixels in proportion to
        its distance (linear "cloud-in-cell" weights), so binning shifts nothing.
        """
        n, W = len(dn), self.grid.n_work
        u = self.u0[None] - shift_pix[:, None]
        i0 = u.floor()
        f = (u - i0).to(dn.dtype)
        i0 = i0.long()
        num = torch.zeros(n, W, dtype=dn.dtype, device=self.device)
        den = torch.zeros(n, W, dtype=dn.dtype, device=self.device)
        x = wn * (dn - 1)
        # The grid's margin holds every pixel at |v| <= v_max: the edge checks (a third of the work) are
        # needed only when a pixel falls off (one host check per call).
        edge = bool(((i0 < 0) | (i0 + 1 >= W)).any())
        for idx, wt in ((i0, 1 - f), (i0 + 1, f)):
            if edge:
                wt = torch.where((idx >= 0) & (idx < W), wt, torch.zeros((), dtype=wt.dtype, device=wt.device))
                idx = idx.clamp(0, W - 1)
            num.scatter_add_(1, idx, x * wt)
            den.scatter_add_(1, idx, wn * wt)
        return num, den

    def rv(self, dn: torch.Tensor, wn: torch.Tensor):
        """RV (n,) km/s and the chi^2 gain of its cross-correlation peak (n,), from normalised data."""
        n = len(dn)
        num, den = self._bin(dn, wn, torch.zeros(n, dtype=torch.float64, device=self.device))
        k = self.max_shift
        n_t = len(self.templates)
        ccf = (num @ self.shifted).view(n, n_t, 2 * k + 1)                              # (n, T, 2k+1)
        norm = (den @ self.shifted2).clamp_min(1e-20).view(n, n_t, 2 * k + 1)
        crit = torch.where(ccf > 0, ccf * ccf / norm, torch.zeros_like(ccf)).double()
        # The best template (the first of equals) and its peak, refined by a parabola through its neighbours.
        best_val, j = crit.flatten(1).max(1)
        c = crit[torch.arange(n, device=self.device), j // (2 * k + 1)]                   # (n, 2k+1)
        j = j % (2 * k + 1)
        jl, jr = (j - 1).clamp(0, 2 * k), (j + 1).clamp(0, 2 * k)
        cl, cr = c.gather(1, jl[:, None])[:, 0], c.gather(1, jr[:, None])[:, 0]
        den2 = cl - 2 * best_val + cr
        off = torch.where((den2 < 0) & (j > 0) & (j < 2 * k), 0.5 * (cl - cr) / den2, torch.zeros_like(den2))
        best_shift = self.shifts[j].double() + off.clamp(-1, 1)
        r = 10.0 ** (2 * best_shift * self.grid.step_dex)
        return C_KMS * (r - 1) / (r + 1), best_val

    def library(self, dn: torch.Tensor, wn: torch.Tensor, v: torch.Tensor, k: int):
        """Indices (n, k) of the k library spectra with the lowest chi^2 (free depth scale) at velocity v."""
        b = v / C_KMS
        shift = 0.5 * (torch.log10(1 + b) - torch.log10(1 - b)) / self.grid.step_dex
        num, den = self._bin(dn, wn, shift)
        s1 = num @ self.lib_depth.T                                                       # (n, K)
        s2 = (den @ self.lib_depth2.T).clamp_min(1e-20)
        # chi^2(a) = sum w (d - 1 - a m)^2 is lowest at a = s1/s2; keep a near 1 (depths, not shapes):
        # score = chi^2 at the best a within [0.5, 2] (up to the constant sum w (d-1)^2).
        a = (s1 / s2).clamp(0.5, 2.0)
        score = -2 * a * s1 + a * a * s2
        return score.topk(min(k, score.shape[1]), dim=1, largest=False).indices
