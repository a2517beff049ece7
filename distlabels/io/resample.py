"""Flux-conserving resampling of spectra onto another wavelength grid, inverse variance propagated.

Every pixel is a bin around its centre (edges half-way to the neighbours; across a gap wider
than 1.5 neighbouring steps the bin is made symmetric instead). Output pixel i takes the
overlap-weighted mean of the input flux densities, f_i = sum_j o_ij f_j / sum_j o_ij, with o_ij
the wavelength overlap of bins i and j, so the integral of the flux over any run of whole pixels
is unchanged. Its variance is sum_j o_ij^2 var_j / (sum_j o_ij)^2 (neighbouring output pixels
become correlated; that is not recorded). An output pixel is usable only if input bins cover it
completely and every input pixel overlapping it is usable.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def bin_edges(centres: np.ndarray, gap_factor: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of each pixel's bin from increasing pixel centres (n >= 2)."""
    c = np.asarray(centres, dtype=np.float64)
    if c.ndim != 1 or c.size < 2 or not np.all(np.diff(c) > 0):
        raise ValueError("pixel centres must be a strictly increasing 1-D array of >= 2 values")
    d = np.diff(c)
    left = np.concatenate([[d[0]], d])          # spacing to the previous pixel
    right = np.concatenate([d, [d[-1]]])        # spacing to the next pixel
    gap_l = left > gap_factor * right           # the previous neighbour is across a gap
    gap_r = right > gap_factor * left
    half_l = np.where(gap_l, right, left) / 2
    half_r = np.where(gap_r, left, right) / 2
    return c - half_l, c + half_r


def overlap_matrix(in_centres: np.ndarray, out_centres: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(O, width_out): O[i, j] = wavelength overlap of output bin i and input bin j (n_out, n_in)."""
    in_lo, in_hi = bin_edges(in_centres)
    out_lo, out_hi = bin_edges(out_centres)
    j0 = np.searchsorted(in_hi, out_lo, side="right")      # first input bin ending after out_lo
    j1 = np.searchsorted(in_lo, out_hi, side="left")       # first input bin starting at/after out_hi
    span = int(np.max(j1 - j0)) if len(j0) else 0
    rows, cols, vals = [], [], []
    for k in range(max(span, 0)):
        j = j0 + k
        ok = j < j1
        i = np.flatnonzero(ok)
        jj = j[ok]
        ov = np.minimum(out_hi[i], in_hi[jj]) - np.maximum(out_lo[i], in_lo[jj])
        keep = ov > 0
        rows.append(i[keep])
        cols.append(jj[keep])
        vals.append(ov[keep])
    n_out, n_in = len(out_lo), len(in_lo)
    if rows:
        m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in))
    else:
        m = sp.csr_matrix((n_out, n_in))
    return m, out_hi - out_lo


class Resampler:
    """Resample spectra given on ``in_centres`` onto ``out_centres`` (same unit and medium)."""

    def __init__(self, in_centres: np.ndarray, out_centres: np.ndarray):
        self.O, self.width = overlap_matrix(in_centres, out_centres)
        self.O2 = self.O.multiply(self.O).tocsr()
        self.covered = np.asarray(self.O.sum(axis=1)).ravel()           # (n_out,)
        self.full = self.covered >= self.width * (1 - 1e-9)
        lo, hi = bin_edges(in_centres)
        olo, ohi = bin_edges(out_centres)
        self.inside = (olo >= lo[0]) & (ohi <= hi[-1])                 # within the input's span
        in_dlog = np.median(np.diff(np.log(np.asarray(in_centres, np.float64))))
        dlog_out = np.diff(np.log(np.asarray(out_centres, np.float64)))
        both = self.inside[:-1] & self.inside[1:]
        out_dlog = np.median(dlog_out[both] if both.any() else dlog_out)
        self.upsampling = bool(out_dlog < in_dlog * 0.999)    # finer output pixels than the data's

    def __call__(self, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flux, ivar, mask) on the output grid from (n, n_in) float arrays; ivar 0 = unusable."""
        flux = np.atleast_2d(np.asarray(flux, np.float64))
        ivar = np.atleast_2d(np.asarray(ivar, np.float64))
        good_in = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        f0 = np.where(good_in, flux, 0.0)
        var = np.where(good_in, 1.0 / np.where(good_in, ivar, 1.0), 0.0)
        bad_overlap = (self.O @ (~good_in).T.astype(np.float64)).T                # (n, n_out)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (self.O @ f0.T).T / self.covered
            v = (self.O2 @ var.T).T / self.covered**2
        usable = self.full[None, :] & (bad_overlap <= 1e-12 * self.width[None, :]) & (v > 0)
        out_ivar = np.where(usable, 1.0 / np.where(usable, v, 1.0), 0.0).astype(np.float32)
        out_flux = np.where(self.covered > 0, f, np.nan).astype(np.float32)
        return out_flux, out_ivar, ~usable
