"""Doppler interpolation on aligned log-uniform grids, batched for GPUs (optionally fused by torch.compile).

On a log-uniform survey grid whose observed pixels fall every ``m`` working pixels (LAMOST, SDSS/BOSS,
APOGEE on a working grid oversampled m times), a radial velocity moves every pixel of a star by the
same fraction of a working pixel. A star then has one base index ``b_s`` and one weight per tap
``w_t[s]``, and observed pixel p reads working pixels ``b_s + t + m p``::

    out[s, r, p] = scale[s, p] * sum_t w_t[s] * rows[s, r, b_s + t + m p]

The CPU path of :class:`~distlabels.fit.forward.ForwardModel` does this with strided slices per star;
a GPU does it in one batched gather (thousands of small slices would each cost a kernel launch).
Unfused, each tap is its own pass over the (n, R, n_work) rows, which at GPU batch sizes (tens of
GB) makes the interpolation bandwidth-bound; :class:`FusedTaps` compiles the same function with
``torch.compile`` so that the taps, the weights and the scale are one kernel that reads the rows once.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings

import torch

from ..errors import DistlabelsError


def interp_aligned(rows: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, m: int, n_pix: int,
                   scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows (n, R, n_work) at the taps of an aligned grid: (n, R, n_pix), written into ``out`` when given.

    base: (n,) long, first tap of pixel 0 (every tap inside the grid); weights: (T, n) per tap and
    star; scale: optional (n, n_pix) factor per pixel (continuum times sqrt(weight) in a Jacobian);
    out: optional (n, R, n_pix) view to write (compiled, the kernel stores there directly).
    """
    n, r, _ = rows.shape
    idx = base[:, None, None] + m * torch.arange(n_pix, device=rows.device)[None, None, :]     # (n, 1, n_pix)
    acc = None
    for t in range(weights.shape[0]):
        term = rows.gather(2, (idx + t).expand(n, r, n_pix)) * weights[t][:, None, None]
        acc = term if acc is None else acc + term
    if scale is not None:
        acc = acc * scale[:, None, :]
    if out is not None:
        out.copy_(acc)
        return out
    return acc


def spread_aligned(u: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, m: int, n_work: int,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of :func:`interp_aligned`: u (n, R, n_pix) (times scale (n, n_pix)) spread onto
    the working grid by the same taps, (n, R, n_work)."""
    n, r, n_pix = u.shape
    v = u if scale is None else u * scale[:, None, :]
    idx = base[:, None, None] + m * torch.arange(n_pix, device=u.device)[None, None, :]
    out = torch.zeros(n, r, n_work, dtype=u.dtype, device=u.device)
    for t in range(weights.shape[0]):
        out = out.scatter_add(2, (idx + t).expand(n, r, n_pix), v * weights[t][:, None, None])
    return out


def _fusion_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can fuse kernels on this device (CUDA with Triton), and why not."""
    if device.type != "cuda":
        return False, f"fused kernels are for CUDA; this fit runs on {device.type}"
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (it comes with the CUDA builds of torch)"
    if not (os.environ.get("CC") or any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
        return False, "no C compiler on this machine (Triton builds its kernel launchers with one)"
    return True, ""


# One function (one code object, so its own compile cache and recompile budget) per kind of call.
def _values(rows, base, weights, m: int, n_pix: int):
    return interp_aligned(rows, base, weights, m, n_pix)


def _jacobian_rows(rows, base, weights, m: int, n_pix: int, scale, out):
    return interp_aligned(rows, base, weights, m, n_pix, scale, out)


def _spread(u, base, weights, m: int, n_work: int, scale):
    return spread_aligned(u, base, weights, m, n_work, scale)


class FusedTaps:
    """:func:`interp_aligned` and :func:`spread_aligned`, compiled into single kernels where that works.

    mode: ``"auto"`` (compiled on CUDA when Triton is importable), True (compile, also on CPU, where
    inductor writes C++; for tests), False (plain torch). Each kind of call (model values; scaled
    Jacobian rows written into a buffer; the transpose) is compiled on its own, with dynamic sizes,
    so that a few variants cover every batch; batches of one star run unfused (a size of 1 would be
    compiled apart). A compilation that fails at its first call (no C compiler on the machine, an
    unsupported op) is reported once as a warning and the plain functions take over: the results
    are the same, only slower.
    """

    def __init__(self, mode: bool | str, device: torch.device):
        if mode not in ("auto", True, False):
            raise DistlabelsError(f"fused_kernels must be auto, true or false, not {mode!r}.")
        ok, why = _fusion_available(torch.device(device))
        self.enabled = bool(mode is True or (mode == "auto" and ok))
        self.reason = "" if self.enabled else (why if mode == "auto" else "fused_kernels is false")
        self._compiled = {}
        if self.enabled:
            self._compiled = {f: torch.compile(f, dynamic=True) for f in (_values, _jacobian_rows, _spread)}

    def _call(self, plain, *args):
        if self.enabled and len(args[0]) > 1:
            try:
                return self._compiled[plain](*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure: the plain function is exact too
                self.enabled = False
                first = (str(e).splitlines() or [""])[0][:160]
                self.reason = f"torch.compile failed ({e.__class__.__name__}: {first})"
                warnings.warn(f"fit kernel: {self.reason}; interpolating with unfused kernels", RuntimeWarning,
                              stacklevel=3)
        return plain(*args)

    def interp(self, rows, base, weights, m, n_pix, scale=None, out=None):
        """:func:`interp_aligned`."""
        if scale is None and out is None:
            return self._call(_values, rows, base, weights, m, n_pix)
        if scale is None:
            scale = torch.ones((), dtype=rows.dtype, device=rows.device).expand(len(rows), n_pix)
        if out is None:
            out = torch.empty(rows.shape[0], rows.shape[1], n_pix, dtype=rows.dtype, device=rows.device)
        return self._call(_jacobian_rows, rows, base, weights, m, n_pix, scale, out)

    def spread(self, u, base, weights, m, n_work, scale=None):
        """:func:`spread_aligned`."""
        if scale is None:
            scale = torch.ones((), dtype=u.dtype, device=u.device).expand(len(u), u.shape[2])
        return self._call(_spread, u, base, weights, m, n_work, scale)
