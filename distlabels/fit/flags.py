"""The per-star flag bitmask written to the catalog's ``flags`` column.

A star with ``flags == 0`` was fitted, converged inside the model's label box with a sane
chi-square. Bits 0-7 are quality warnings (labels are present); bits 8 and above mean the star
was not fitted (labels are NaN) but it is still in the catalog, exactly once.
"""
from __future__ import annotations

import enum


class Flag(enum.IntFlag):
    NOT_CONVERGED = 1 << 0     # LM hit max_iter before the chi^2 / step criteria
    AT_LABEL_BOUND = 1 << 1    # a fitted label ended on the edge of the model's training box
    RV_AT_BOUND = 1 << 2       # |RV| ended at the search limit v_max_kms: RV (and labels) unreliable
    LOW_SNR = 1 << 3           # median S/N per pixel below FitConfig.low_snr
    CHI2_HIGH = 1 << 4         # reduced chi^2 above FitConfig.chi2_red_high: model does not describe the data
    FEW_PIXELS = 1 << 8        # fewer usable pixels than FitConfig.min_good_pixels: not fitted
    BAD_INPUT = 1 << 9         # flux/ivar unusable (all NaN, ivar <= 0 everywhere, wrong length): not fitted
    FIT_ERROR = 1 << 10        # the kernel failed on this star (numerical error): not fitted

    @classmethod
    def describe(cls, value: int) -> list[str]:
        """Names of the bits set in ``value``."""
        return [f.name for f in cls if value & f]


NOT_FITTED = Flag.FEW_PIXELS | Flag.BAD_INPUT | Flag.FIT_ERROR
