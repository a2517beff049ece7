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
    """Sample indices (..., 4) (clamped to the grid), weights (..., 4), weight derivatives by
    position (..., 4), and ``inside`` (...): 0 <= pos <= n - 1. In the first and last interval,
    where the cubic lacks a sample, the weights are linear ([0, 1 - t, t, 0])."""
    k = pos.floor().clamp(0, n - 2)
    t = (pos - k).clamp(0, 1)
    c, dc = catmull_rom(t)
    edge = ((k < 1) | (k > n - 3))[..., None]
    zero = torch.zeros_like(t)
    lin = torch.stack([zero, 1 - t, t, zero], -1)
    dlin = torch.stack([zero, -torch.ones_like(t), torch.ones_like(t), zero], -1)
    c = torch.where(edge, lin, c)
    dc = torch.where(edge, dlin, dc)
    idx = (k.long()[..., None] + torch.arange(-1, 3, device=pos.device)).clamp(0, n - 1)
    inside = (pos >= 0) & (pos <= n - 1)
    return idx, c, dc, inside


def interpolate(y: torch.Tensor, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y (n, m) at taps idx, c (n, p, 4) -> (n, p)."""
    n, p, _ = idx.shape
    return (y.gather(1, idx.reshape(n, -1)).reshape(n, p, N_TAPS) * c).sum(-1)
