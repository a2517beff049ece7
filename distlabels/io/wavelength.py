"""Wavelength grids and air/vacuum conversion (all wavelengths in Angstrom).

Synthetic grids (synspec, bossbrain) are in air; survey spectra (LAMOST, DESI, BOSS, APOGEE)
are in vacuum. Mixing them fakes ~80 km/s of radial velocity at 5000 A, so every grid carries its
medium and the kernel compares in vacuum.
"""
from __future__ import annotations

import numpy as np

C_KMS = 299792.458


def air_to_vacuum(wavelength_air_aa: np.ndarray) -> np.ndarray:
    """Air -> vacuum (Piskunov's inversion of the Ciddor/Morton formula, as used by VALD)."""
    lam = np.asarray(wavelength_air_aa, dtype=np.float64)
    s2 = (1e4 / lam) ** 2
    n = 1 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) + 1.599740894897e-4 / (38.92568793293 - s2)
    return lam * n


def vacuum_to_air(wavelength_vac_aa: np.ndarray) -> np.ndarray:
    """Vacuum -> air (Morton 2000, IAU standard)."""
    lam = np.asarray(wavelength_vac_aa, dtype=np.float64)
    s2 = (1e4 / lam) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return lam / n


def to_vacuum(wavelength_aa: np.ndarray, medium: str) -> np.ndarray:
    if medium == "vacuum":
        return np.asarray(wavelength_aa, dtype=np.float64)
    if medium == "air":
        return air_to_vacuum(wavelength_aa)
    raise ValueError(f"unknown wavelength medium {medium!r}")


def loglam_grid(start_aa: float, step_dex: float, n_pix: int) -> np.ndarray:
    """Log-linear grid: start_aa * 10**(step_dex * i), i = 0..n_pix-1."""
    return start_aa * 10.0 ** (step_dex * np.arange(n_pix))


# Survey-like grids for mocks. LAMOST LRS: log-lambda from 3690 A in 1e-4 dex steps (3,909 pixels).
# DESI: three arms joined on a linear 0.8 A grid (3600-9824 A).
SURVEY_GRIDS = {
    "lamost": dict(kind="loglam", start_aa=3690.0, step_dex=1e-4, n_pix=3909, resolution=1800.0,
                   segments=((3690.0, 5900.0), (5900.0, 9100.0))),
    "desi": dict(kind="linear", start_aa=3600.0, step_aa=0.8, n_pix=7781, resolution=3000.0,
                 segments=((3600.0, 5780.0), (5780.0, 7570.0), (7570.0, 9824.0))),
}


def survey_grid(name: str) -> tuple[np.ndarray, float, tuple[tuple[float, float], ...]]:
    """(wavelength_vac_aa (n_pix,), resolving power R, continuum segments) of a survey-like grid."""
    g = SURVEY_GRIDS[name]
    if g["kind"] == "loglam":
        wave = loglam_grid(g["start_aa"], g["step_dex"], g["n_pix"])
    else:
        wave = g["start_aa"] + g["step_aa"] * np.arange(g["n_pix"])
    return wave, g["resolution"], g["segments"]
