"""The per-star flag bitmask written to the catalog's ``flags`` column.

A star with ``flags == 0`` was fitted, converged inside the model's label box with a sane
chi-square, a trustworthy RV and labels near the model's training set. Bits 0-7 are quality
warnings (labels are present); bits 8 and above mean the star was not fitted (labels are NaN) but
it is still in the catalog, exactly once. Bit values never change once released.

=====  ====================  ===================================================================================
bit    name                  meaning
=====  ====================  ===================================================================================
1      NOT_CONVERGED         LM stopped (max_iter, or no step could lower chi^2) while the Gauss-Newton step
                             would still gain more than ``chi2_tol``: the labels may not be at the minimum.
2      AT_LABEL_BOUND        a fitted label (or tie group) ended on the edge of the model's training box: the
                             minimum lies outside the box, the value is a limit, its error is not meaningful.
4      RV_AT_BOUND           |RV| ended at the search limit ``v_max_kms``: RV (and labels) unreliable.
8      LOW_SNR               median S/N per pixel below ``low_snr``.
16     CHI2_HIGH             reduced chi^2 above ``chi2_red_high`` (default 1.2) and further above 1 than
                             ``chi2_sigma_high`` x sqrt(2/dof) allows for noise: the model does not describe the
                             data (wrong kind of star for the emulator, bad data, unmodelled broadening or
                             resolution mismatch; add the emulator's error as ``model_variance`` if it is known).
32     FAR_FROM_TRAINING     the fitted labels are farther from every training label (nearest neighbour, scaled
                             units, over the few labels that shape the spectrum most: the start labels) than
                             ``far_from_training`` x the training set's own 99th-percentile nearest-neighbour
                             distance: the emulator extrapolates.
64     RV_FAILED             no trustworthy RV: the cross-correlation peak improves chi^2 by less than
                             ``rv_min_ccf_delta_chi2``, or the fitted RV error exceeds ``rv_err_max_kms``.
128    BROADENING_AT_BOUND   a fitted broadening (vsini, extra LSF width) ended at its upper bound.
256    FEW_PIXELS            fewer usable pixels than ``min_good_pixels``: not fitted.
512    BAD_INPUT             flux/ivar unusable (all NaN, ivar <= 0 everywhere, wrong length): not fitted.
1024   FIT_ERROR             the kernel failed on this star even when fitted alone (a failing batch is fitted again
                             in halves, down to single stars): not fitted, labels NaN.
=====  ====================  ===================================================================================
"""
from __future__ import annotations

import enum


class Flag(enum.IntFlag):
    NOT_CONVERGED = 1 << 0
    AT_LABEL_BOUND = 1 << 1
    RV_AT_BOUND = 1 << 2
    LOW_SNR = 1 << 3
    CHI2_HIGH = 1 << 4
    FAR_FROM_TRAINING = 1 << 5
    RV_FAILED = 1 << 6
    BROADENING_AT_BOUND = 1 << 7
    FEW_PIXELS = 1 << 8
    BAD_INPUT = 1 << 9
    FIT_ERROR = 1 << 10

    @classmethod
    def describe(cls, value: int) -> list[str]:
        """Names of the bits set in ``value``."""
        return [f.name for f in cls if value & f]


NOT_FITTED = Flag.FEW_PIXELS | Flag.BAD_INPUT | Flag.FIT_ERROR
