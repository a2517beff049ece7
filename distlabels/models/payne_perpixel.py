"""The Payne's 2018-19 per-pixel networks (El-Badry et al. 2018; Ting et al. 2019, APOGEE).

Every output pixel p has its own tiny network with one hidden layer of H sigmoid neurons::

    z[p, k]  = sum_j w0[p, k, j] x_j + b0[p, k]              (x: scaled labels, L of them)
    flux[p]  = sum_k w1[p, k] sigmoid(z[p, k]) + b1[p]

with x = (label - x_min) / (x_max - x_min) - 0.5, the same scaling as every distlabels kind. The
published APOGEE network has 7,214 pixels (the ASPCAP grid, vacuum), H = 5, and five labels
(Teff, log g, [Fe/H], [alpha/Fe], vmacro); its output is pseudo-continuum-normalised flux at
APOGEE's resolution (R ~ 22,500), so no line-spread function is applied on top.

Evaluation is batched over stars: the first layer of all pixels is one (n, L) @ (L, P*H) product,
the Jacobian one batched product over pixels. The fit kernel's label map (subset, fixed values,
ties) is folded into ``w0``/``b0`` (:meth:`with_inputs`); its resampling onto the working grid
(:meth:`project`) is a pixel selection when the working grid is the model's own pixels (the usual
case: APOGEE spectra at APOGEE's resolution), else a sparse matrix applied to the output.

Optionally the model carries two per-pixel masks from the publication's data: ``continuum_pixels``
(the pseudo-continuum normalisation that defines its output flux) and ``bad_pixels`` (pixels the
network models poorly, left out of fits). :mod:`distlabels.fit.payne_perpixel` applies them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError
from .base import Emulator, register_kind


def _selection_rows(matrix) -> np.ndarray | None:
    """Column index per row when ``matrix`` (n_out, n_pix) selects one pixel per row with weight 1, else None."""
    if isinstance(matrix, torch.Tensor):
        if not matrix.is_sparse:
            return None
        m = matrix.coalesce()
        idx = m.indices().cpu().numpy()
        val = m.values().cpu().numpy()
        n_out = m.shape[0]
    else:
        import scipy.sparse as sp

        if not sp.issparse(matrix):
            return None
        c = matrix.tocoo()
        idx, val, n_out = np.vstack([c.row, c.col]), c.data, c.shape[0]
    if idx.shape[1] != n_out or not np.allclose(val, 1.0, rtol=0, atol=1e-12):
        return None
    rows = np.full(n_out, -1, np.int64)
    rows[idx[0]] = idx[1]
    return None if (rows < 0).any() else rows


@register_kind("payne-perpixel")
class PerPixelPayne(Emulator):
    """Per-pixel sigmoid networks. w0: (P, H, L), b0: (P, H), w1: (P, H), b1: (P,).

    ``projection``: an optional sparse (n_out, P) matrix applied to the output (set by
    :meth:`project` when the working grid is not a pixel selection); ``wavelength_aa`` then
    numbers the n_out working pixels.
    """

    def __init__(self, w0, b0, w1, b1, *, continuum_pixels=None, bad_pixels=None, projection=None,
                 **common: Any):
        super().__init__(**common)
        w0, b0, w1, b1 = (torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
                          for t in (w0, b0, w1, b1))
        if w0.ndim != 3:
            raise ModelFormatError(f"per-pixel w0 must be (n_pix, n_hidden, n_labels); got {tuple(w0.shape)}.")
        P, H, L = w0.shape
        if L != self.n_labels:
            raise ModelFormatError(f"per-pixel w0 takes {L} labels but {self.n_labels} label names were given.")
        if b0.shape != (P, H) or w1.shape != (P, H) or b1.shape != (P,):
            raise ModelFormatError(f"per-pixel shapes do not agree: w0 {tuple(w0.shape)}, b0 {tuple(b0.shape)}, "
                                   f"w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}.")
        n_out = P if projection is None else projection.shape[0]
        if n_out != self.n_pix:
            raise ModelFormatError(f"the network has {n_out} outputs but the wavelength grid has {self.n_pix} pixels.")

        def param(t):
            t = t.detach()
            return torch.nn.Parameter(t if t.is_floating_point() and t.dtype != torch.float16 else t.float(),
                                      requires_grad=False)

        self.w0, self.b0, self.w1, self.b1 = param(w0), param(b0), param(w1), param(b1)
        if projection is not None:
            self.register_buffer("projection", projection.to(self.w0.dtype), persistent=False)
        else:
            self.projection = None
        self.continuum_pixels = None if continuum_pixels is None else np.asarray(continuum_pixels, bool)
        self.bad_pixels = None if bad_pixels is None else np.asarray(bad_pixels, bool)
        for name, m in (("continuum_pixels", self.continuum_pixels), ("bad_pixels", self.bad_pixels)):
            if m is not None and m.shape != (P,):
                raise ModelFormatError(f"{name} must have one value per network pixel ({P}); got {m.shape}.")

    matmul_backend: str = "torch"   # set by the fit kernel; this kind has no large dense product to route

    @property
    def n_hidden(self) -> int:
        return int(self.w0.shape[1])

    @property
    def n_net_pix(self) -> int:
        """Pixels of the per-pixel networks (before any projection)."""
        return int(self.w0.shape[0])

    # ----- evaluation ----------------------------------------------------------------------
    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations z (n, P, H) of all pixels: one (n, L) @ (L, P*H) product."""
        P, H, L = self.w0.shape
        x = x.to(self.w0.dtype)
        return (x @ self.w0.reshape(P * H, L).T).view(len(x), P, H) + self.b0

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the projection to (n, R, P) or (n, P) rows."""
        if self.projection is None:
            return y
        shp = y.shape
        flat = y.reshape(-1, shp[-1])
        out = torch.sparse.mm(self.projection, flat.T).T if self.projection.is_sparse else flat @ self.projection.T
        return out.reshape(*shp[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self._hidden(x))
        return self._out((s * self.w1).sum(-1) + self.b1)

    def value_and_jacobian_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1 + L, n_out): flux, then d flux / d x_j = sum_k w1 s'(z) w0[:, k, j]."""
        s = torch.sigmoid(self._hidden(x))                                  # (n, P, H)
        y = (s * self.w1).sum(-1) + self.b1                                 # (n, P)
        a = s * (1 - s) * self.w1                                           # (n, P, H)
        # One batched product over pixels: (P, n, H) @ (P, H, L) -> (P, n, L).
        jac = torch.bmm(a.transpose(0, 1), self.w0).permute(1, 2, 0)        # (n, L, P)
        return self._out(torch.cat([y[:, None, :], jac], 1))

    def value_and_jacobian(self, x: torch.Tensor):
        st = self.value_and_jacobian_stacked(x)
        return st[:, 0], st[:, 1:].transpose(1, 2)

    # ----- folding the fit's maps in ---------------------------------------------------------
    def _clone(self, w0, b0, w1, b1, projection, wavelength_aa, label_names, x_min, x_max, training_labels,
               continuum_pixels, bad_pixels) -> "PerPixelPayne":
        common = dict(label_names=label_names, x_min=x_min, x_max=x_max, wavelength_aa=wavelength_aa,
                      wavelength_medium=self.wavelength_medium, resolution=self.resolution,
                      training_labels=training_labels, meta=self.meta)
        out = PerPixelPayne(w0, b0, w1, b1, continuum_pixels=continuum_pixels, bad_pixels=bad_pixels,
                            projection=projection, **common)
        out.matmul_backend = self.matmul_backend
        return out.to(self.w0.device)

    def with_inputs(self, matrix, offset) -> "PerPixelPayne":
        """x = offset + theta @ matrix.T folded in: w0' = w0 M (P, H, k), b0' = b0 + w0 offset."""
        m = torch.as_tensor(np.asarray(matrix, np.float64), device=self.w0.device)
        o = torch.as_tensor(np.asarray(offset, np.float64), device=self.w0.device)
        w0 = (self.w0.double() @ m).to(self.w0.dtype)
        b0 = (self.b0.double() + self.w0.double() @ o).to(self.b0.dtype)
        k = m.shape[1]
        return self._clone(w0, b0, self.w1.data, self.b1.data, self.projection, self.wavelength,
                           [f"theta{i}" for i in range(k)], [-0.5] * k, [0.5] * k, None,
                           self.continuum_pixels, self.bad_pixels)

    def project(self, matrix) -> "PerPixelPayne":
        """Output ``matrix @ flux`` (matrix (n_out, n_out_now), sparse or dense).

        A pure pixel selection keeps only those pixels' networks (exact, and cheaper than the
        full model); anything else is stored as a sparse projection applied to the output.
        """
        rows = _selection_rows(matrix)
        n_new = matrix.shape[0]
        wave = np.arange(n_new, dtype=np.float64)
        if rows is not None and self.projection is None:
            r = torch.as_tensor(rows, device=self.w0.device)
            sel = lambda t: None if t is None else t[rows]   # noqa: E731
            return self._clone(self.w0.data[r], self.b0.data[r], self.w1.data[r], self.b1.data[r], None, wave,
                               self.label_names, self.x_min.cpu().numpy(), self.x_max.cpu().numpy(),
                               self.training_labels, sel(self.continuum_pixels), sel(self.bad_pixels))
        m = matrix if isinstance(matrix, torch.Tensor) else _to_torch_sparse(matrix)
        m = m.to(device=self.w0.device, dtype=torch.float64)
        if self.projection is not None:
            prev = self.projection.double()
            prev = prev.to_dense() if prev.is_sparse else prev
            m = (torch.sparse.mm(m, prev) if m.is_sparse else m @ prev).to_sparse()
        elif not m.is_sparse:
            m = m.to_sparse()
        return self._clone(self.w0.data, self.b0.data, self.w1.data, self.b1.data, m.coalesce(), wave,
                           self.label_names, self.x_min.cpu().numpy(), self.x_max.cpu().numpy(),
                           self.training_labels, None, None)

    # ----- persistence ---------------------------------------------------------------------
    def tensors(self):
        if self.projection is not None:
            raise ModelFormatError("a projected per-pixel model is a fitting intermediate and cannot be saved.")
        t = {"w0": self.w0.data, "b0": self.b0.data, "w1": self.w1.data, "b1": self.b1.data}
        if self.continuum_pixels is not None:
            t["continuum_pixels"] = torch.as_tensor(self.continuum_pixels.astype(np.uint8))
        if self.bad_pixels is not None:
            t["bad_pixels"] = torch.as_tensor(self.bad_pixels.astype(np.uint8))
        return t

    def kind_meta(self):
        return {"activation": "sigmoid", "n_hidden_per_pixel": self.n_hidden, "n_pix": self.n_net_pix,
                "formula": "flux[p] = sum_k w1[p,k] sigmoid(sum_j w0[p,k,j] x_j + b0[p,k]) + b1[p]",
                "continuum_pixels": self.continuum_pixels is not None, "bad_pixels": self.bad_pixels is not None}

    @classmethod
    def from_parts(cls, meta, tensors, common):
        for k in ("w0", "b0", "w1", "b1"):
            if k not in tensors:
                raise ModelFormatError(f"weights.safetensors lacks {k!r} for a payne-perpixel model.")
        cp = tensors.get("continuum_pixels")
        bp = tensors.get("bad_pixels")
        return cls(tensors["w0"], tensors["b0"], tensors["w1"], tensors["b1"],
                   continuum_pixels=None if cp is None else cp.numpy().astype(bool),
                   bad_pixels=None if bp is None else bp.numpy().astype(bool), **common)


def _to_torch_sparse(matrix) -> torch.Tensor:
    c = matrix.tocoo()
    return torch.sparse_coo_tensor(np.vstack([c.row, c.col]), c.data, size=c.shape, dtype=torch.float64,
                                   check_invariants=False)
