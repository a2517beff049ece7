"""Cubic (Catmull-Rom) interpolation weights, shared by Cannon training and its test step.

Linear interpolation of a spectrum sampled at ~2-3 pixels per resolution element smooths it
(at half a pixel it averages two neighbours), so a model or training set shifted that way has
shallower lines than the data: a bias of tens of K in Teff at LAMOST-like sampling. The
Catmull-Rom kernel (4 taps, exact for quadratics, weights (-1, 9, 9, -1)/16 at half a pixel)
keeps lines sharp and stays linear in the values, so the Cannon's quadratic form survives it.
"""
from __future__ import annotations

import torch

N_TAPS = 4


def catmull_rom(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (..., 4) of the samples at offsets -1, 0, 1, 2 for fractional positions t in [0, 1],
    and their derivatives by t."""
    t2, t3 = t * t, t * t * t
    c = torch.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2,
                     (t3 - t2) / 2], -1)
    dc = torch.stack([(-3 * t2 + 4 * t - 1) / 2, (9 * t2 - 10 * t) / 2, (-9 * t2 + 8 * t + 1) / 2,
                      (3 * t2 - 2 * t) / 2], -1)
    return c, dc


def taps(pos: torch.Tensor, n: int):
    """Cubic taps of fractional positions ``pos`` (any shape) on a grid of n samples.

    Returns (idx, c, dc, inside): idx a list of 4 index tensors (clamped to the grid), c the 4
    weights, dc their derivatives by position, inside: 0 <= pos <= n - 1. In the first and last
    interval, where the cubic lacks a sample, the weights are linear ([0, 1 - t, t, 0]). Lists of
    (...)-shaped tensors rather than one (..., 4) array: callers loop over the taps anyway, and
    stacking large arrays costs more than the arithmetic.
    """
    k = pos.floor().clamp(0, n - 2)
    t = (pos - k).clamp(0, 1).to(torch.float32)     # weights in float32: 1e-7 is far below any noise
    t2 = t * t
    t3 = t2 * t
    c = [(2 * t2 - t - t3).mul_(0.5), (3 * t3 - 5 * t2 + 2).mul_(0.5), (4 * t2 + t - 3 * t3).mul_(0.5),
         (t3 - t2).mul_(0.5)]
    dc = [(4 * t - 3 * t2 - 1).mul_(0.5), (9 * t2 - 10 * t).mul_(0.5), (8 * t - 9 * t2 + 1).mul_(0.5),
          (3 * t2 - 2 * t).mul_(0.5)]
    edge = ((k < 1) | (k > n - 3)).nonzero(as_tuple=True)
    if len(edge[0]):                                  # few pixels: patch them in place
        te = t[edge]
        for a, (lin, dlin) in enumerate(((0.0, 0.0), (1 - te, -1.0), (te, 1.0), (0.0, 0.0))):
            c[a][edge] = lin
            dc[a][edge] = dlin
    kl = k.long()
    idx = [(kl + (a - 1)).clamp(0, n - 1) for a in range(N_TAPS)]
    inside = (pos >= 0) & (pos <= n - 1)
    return idx, c, dc, inside


def interpolate(y: torch.Tensor, idx, c) -> torch.Tensor:
    """y (n, m) at taps (lists from :func:`taps`, each (n, p)) -> (n, p)."""
    out = None
    for i, w in zip(idx, c):
        v = y.gather(1, i) * w
        out = v if out is None else out.add_(v)
    return out
