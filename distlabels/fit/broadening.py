"""Rotational and Gaussian broadening on a uniform log-wavelength grid, with derivatives.

On a grid uniform in log(lambda) both kernels are shift-invariant (a velocity is a constant number
of pixels), so broadening a spectrum is a convolution, done here as a product in Fourier space.
That makes it exact for any width (no sub-pixel sampling error for small vsini), gives the
derivatives in closed form, and acts on any emulator's output alike: the kernel broadens the model
spectrum (and its label Jacobian) on the working grid, before the shift to the observed pixels.

Kernels, as functions of frequency ``f`` (cycles per km/s):

* rotation with linear limb darkening ``eps`` (Gray, *The Observation and Analysis of Stellar
  Photospheres*): the profile is the projection of a limb-darkened disc, so its transform is the
  disc's 2-D transform along one axis. With ``k = 2 pi f vsini``::

      R(k) = [(1 - eps) J1(k)/k + eps (sin k - k cos k)/k^3] / [(1 - eps)/2 + eps/3]

* a Gaussian of variance ``s`` (km/s)^2 (an instrumental profile wider than assumed)::

      G(f) = exp(-2 pi^2 f^2 s)

The fit parameters are ``q = vsini^2`` and ``s = sigma^2``: both kernels are even, so the model is
smooth (linear near 0) in q and s, and Gauss-Newton does not stall at vsini = 0 where d/d vsini
vanishes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..io.wavelength import C_KMS

_SMALL_K = 1e-2


def vsini_resolution_limit_kms(resolution: float | None, pixel_kms: float) -> float:
    """vsini (km/s) below which rotation is not resolved by the data: the larger of half the
    instrumental FWHM, c / (2 R), and one pixel (``pixel_kms``; the only width left on a model's own
    grid, R None). At R ~ 1800 that is 83 km/s, on bossbrain's 0.5 A grid ~30 km/s.

    Below it the fitted vsini is best read as an upper limit. The rotational profile (second moment
    0.225 vsini^2 for limb darkening 0.6) is then narrower than the line-spread function, so vsini
    only adds sigma_LSF^2 + 0.225 vsini^2 to the line width: with a perfect model the Cramer-Rao
    bound is still a few km/s (``distlabels crb --vsini-kms 50``: 5 km/s at S/N 50, R 1800), but a
    5 % error in the assumed LSF width alone reads as vsini ~ 47 km/s at R 1800, and the fits of
    mocks scatter by up to half the limit there. Above it the fit recovers vsini to
    max(5 km/s, 10 %) at S/N 100 (``tests/fit/test_hotpayne.py``).
    """
    lim = float(pixel_kms)
    if resolution is not None and np.isfinite(resolution) and resolution > 0:
        lim = max(lim, C_KMS / (2.0 * float(resolution)))
    return lim


def _disc_terms(k: torch.Tensor):
    """J1(k)/k, (sin k - k cos k)/k^3 and their derivatives divided by k (series near 0)."""
    small = k.abs() < _SMALL_K
    ks = torch.where(small, torch.ones_like(k), k)
    k2 = k * k
    j0, j1 = torch.special.bessel_j0(ks), torch.special.bessel_j1(ks)
    sn, cs = torch.sin(ks), torch.cos(ks)
    a = torch.where(small, 0.5 - k2 / 16 + k2 * k2 / 384, j1 / ks)
    # d/dk (J1/k) = -J2(k)/k = (J0 - 2 J1/k)/k; divided by k:
    da_k = torch.where(small, -1.0 / 8 + k2 / 96, (j0 - 2 * j1 / ks) / (ks * ks))
    b = torch.where(small, 1.0 / 3 - k2 / 30 + k2 * k2 / 840, (sn - ks * cs) / ks**3)
    # d/dk ((sin k - k cos k)/k^3) = (k^2 sin k - 3 sin k + 3 k cos k)/k^4; divided by k:
    db_k = torch.where(small, -1.0 / 15 + k2 / 210, (k2 * sn - 3 * sn + 3 * ks * cs) / ks**5)
    return a, da_k, b, db_k


def rotation_transform(freq: torch.Tensor, q: torch.Tensor, eps: float):
    """Rotational kernel's transform R and dR/dq at frequencies freq (n_f,) for q = vsini^2 (n,).

    Returns two (n, n_f) tensors. vsini in km/s, freq in cycles per km/s.
    """
    vs = q.clamp_min(0).sqrt()[:, None]
    w = 2 * math.pi * freq[None, :]
    k = w * vs
    a, da_k, b, db_k = _disc_terms(k)
    norm = (1 - eps) / 2 + eps / 3
    r = ((1 - eps) * a + eps * b) / norm
    # dR/dq = dR/dk * dk/dq, dk/dq = w / (2 vsini) = w^2 / (2 k): finite at q = 0.
    dr = ((1 - eps) * da_k + eps * db_k) / norm * (w * w) / 2
    return r, dr


def gaussian_transform(freq: torch.Tensor, s: torch.Tensor):
    """Gaussian kernel's transform G and dG/ds at freq (n_f,) for variance s (n,) (km/s)^2."""
    c = 2 * math.pi**2 * freq[None, :] ** 2
    g = torch.exp(-c * s.clamp_min(0)[:, None])
    return g, -c * g


class Broadener:
    """Broadens rows of spectra on a uniform log grid of ``n_work`` pixels, ``dv_kms`` per pixel.

    ``pad`` pixels of continuum are added before the transform so that the circular convolution
    does not wrap the red end onto the blue end.
    """

    def __init__(self, n_work: int, dv_kms: float, pad: int, *, limb_darkening: float = 0.6,
                 fit_vsini: bool = False, fit_lsf: bool = False, device=None, dtype=torch.float32):
        self.n_work = int(n_work)
        n = self.n_work + 2 * int(pad)
        self.n_fft = _fast_len(n)
        self.dv_kms = float(dv_kms)
        self.eps = float(limb_darkening)
        self.fit_vsini, self.fit_lsf = bool(fit_vsini), bool(fit_lsf)
        self.freq = torch.fft.rfftfreq(self.n_fft, d=self.dv_kms, dtype=torch.float64, device=device)
        self.dtype = dtype

    @property
    def n_extra(self) -> int:
        return int(self.fit_vsini) + int(self.fit_lsf)

    def transfer(self, q: torch.Tensor, s: torch.Tensor):
        """Kernel transform B (n, n_f) and the list of dB/dparam for the fitted parameters."""
        n = len(q)
        b = torch.ones(n, len(self.freq), dtype=torch.float64, device=q.device)
        derivs = []
        r = dr = g = dg = None
        if self.fit_vsini:
            r, dr = rotation_transform(self.freq, q, self.eps)
            b = b * r
        if self.fit_lsf:
            g, dg = gaussian_transform(self.freq, s)
            b = b * g
        if self.fit_vsini:
            derivs.append(dr * (g if g is not None else 1.0))
        if self.fit_lsf:
            derivs.append(dg * (r if r is not None else 1.0))
        return b, derivs

    def apply(self, rows: torch.Tensor, q: torch.Tensor, s: torch.Tensor, with_derivs: bool):
        """Broaden rows (n, n_rows, n_work); row 0 is the spectrum, the others its label derivatives.

        Returns (n, n_rows [+ n_extra], n_work): the broadened rows, then (if with_derivs) the
        derivative of the broadened spectrum with respect to each fitted broadening parameter.
        """
        b, derivs = self.transfer(q, s)
        x = rows.clone()
        x[:, 0] -= 1.0                      # broaden the line depth: padding is then continuum
        spec = torch.fft.rfft(x, n=self.n_fft, dim=-1)
        bt = b.to(spec.real.dtype)
        out = torch.fft.irfft(spec * bt[:, None, :], n=self.n_fft, dim=-1)[..., : self.n_work]
        out[:, 0] += 1.0
        if with_derivs and derivs:
            extra = [torch.fft.irfft(spec[:, 0] * d.to(spec.real.dtype), n=self.n_fft, dim=-1)[..., : self.n_work]
                     for d in derivs]
            out = torch.cat([out, torch.stack(extra, 1)], 1)
        return out.to(rows.dtype)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly length)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best
