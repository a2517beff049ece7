"""Default pixel masks: wavelength windows where the data hold light that no stellar emulator models.

Every window is in VACUUM Angstrom (survey spectra are vacuum; the kernel compares in vacuum) and
in the observer's frame (tellurics, sky lines and interstellar lines do not move with the star).
A window is given at infinite resolution and widened on both sides by ``lsf_fwhm`` times the
instrument's FWHM (lambda / R), since the line-spread function spreads a narrow feature over
neighbouring pixels.

Windows (air values from the usual line lists, converted with Piskunov's formula):

=========  =========  =======================  ===========================================================
name       kind       vacuum window (A)        why
=========  =========  =======================  ===========================================================
o2_a       telluric   7592.1 - 7702.1          O2 A band (absorption by the Earth's atmosphere)
o2_b       telluric   6861.9 - 6951.9          O2 B band
oi_5577    sky        5578.9 +- 0.5            [O I] 5577 airglow, the strongest optical sky line
oi_6300    sky        6302.0 +- 0.5            [O I] 6300 airglow
oi_6364    sky        6365.5 +- 0.5            [O I] 6364 airglow
hg_4358    sky        4359.6 +- 0.5            Hg I 4358 street-light line
hg_5461    sky        5462.3 +- 0.5            Hg I 5461 street-light line
nad_ism    ism        5890.9 - 5898.2          interstellar Na I D1/D2 (+-35 km/s around rest)
dib_4428   dib        4417.2 - 4441.2          diffuse interstellar band 4428 (broad, FWHM ~ 17 A)
dib_5780   dib        5780.1 - 5784.1          DIB 5780
dib_5797   dib        5797.7 - 5799.7          DIB 5797
dib_6284   dib        6282.6 - 6288.6          DIB 6284
dib_6614   dib        6614.3 - 6616.6          DIB 6614
=========  =========  =======================  ===========================================================

Per survey (:data:`SURVEY_MASKS`): the optical low- and mid-resolution surveys (LAMOST, DESI, BOSS /
SDSS, mocks of them) use every window; APOGEE (H band) none of these (its sky is masked by its own
pipeline). Override with ``FitConfig(masks=...)``: ``"default"`` (every window), ``"none"``, a survey
name, or a tuple whose items are window names or ``(lo_aa, hi_aa)`` vacuum ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DistlabelsError


@dataclass(frozen=True)
class MaskWindow:
    name: str
    kind: str          # telluric | sky | ism | dib
    lo_aa: float       # vacuum, infinite resolution
    hi_aa: float


WINDOWS: tuple[MaskWindow, ...] = (
    MaskWindow("o2_a", "telluric", 7592.1, 7702.1),
    MaskWindow("o2_b", "telluric", 6861.9, 6951.9),
    MaskWindow("oi_5577", "sky", 5578.4, 5579.4),
    MaskWindow("oi_6300", "sky", 6301.5, 6302.5),
    MaskWindow("oi_6364", "sky", 6365.0, 6366.0),
    MaskWindow("hg_4358", "sky", 4359.1, 4360.1),
    MaskWindow("hg_5461", "sky", 5461.8, 5462.8),
    MaskWindow("nad_ism", "ism", 5890.9, 5898.2),
    MaskWindow("dib_4428", "dib", 4417.2, 4441.2),
    MaskWindow("dib_5780", "dib", 5780.1, 5784.1),
    MaskWindow("dib_5797", "dib", 5797.7, 5799.7),
    MaskWindow("dib_6284", "dib", 6282.6, 6288.6),
    MaskWindow("dib_6614", "dib", 6614.3, 6616.6),
)
BY_NAME = {w.name: w for w in WINDOWS}
ALL = tuple(w.name for w in WINDOWS)

SURVEY_MASKS: dict[str, tuple[str, ...]] = {
    "default": ALL, "lamost": ALL, "desi": ALL, "boss": ALL, "sdss": ALL, "segue": ALL, "mock": ALL,
    "apogee": (), "none": (),
}

LSF_FWHM_WIDEN = 1.0   # each window grows by this many instrumental FWHM on each side


def mask_windows(spec="default", resolution: float | None = None) -> list[tuple[float, float]]:
    """Vacuum (lo_aa, hi_aa) windows for a mask spec, widened for resolving power R (None: not widened).

    spec: ``"default"``, ``"none"``, a survey name in :data:`SURVEY_MASKS`, or an iterable of window
    names and ``(lo_aa, hi_aa)`` pairs.
    """
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        key = spec.lower()
        if key not in SURVEY_MASKS:
            raise DistlabelsError(f"unknown mask set {spec!r} (known: {', '.join(sorted(SURVEY_MASKS))}, or a list "
                                  "of window names and [lo, hi] vacuum ranges).")
        items: list = list(SURVEY_MASKS[key])
    else:
        items = list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in BY_NAME:
                raise DistlabelsError(f"unknown mask window {item!r} (known: {', '.join(ALL)}).")
            w = BY_NAME[item]
            lo, hi = w.lo_aa, w.hi_aa
        else:
            try:
                lo, hi = (float(v) for v in item)
            except (TypeError, ValueError):
                raise DistlabelsError(f"a mask window must be a name or a (lo_aa, hi_aa) pair, not {item!r}.") from None
            if not hi > lo:
                raise DistlabelsError(f"mask window ({lo}, {hi}) must have hi > lo.")
        if resolution:
            pad = LSF_FWHM_WIDEN * 0.5 * (lo + hi) / float(resolution)
            lo, hi = lo - pad, hi + pad
        out.append((lo, hi))
    return out


def pixel_mask(wavelength_vac_aa, windows) -> np.ndarray:
    """(n_pix,) bool, True where a pixel falls in any window (vacuum Angstrom)."""
    lam = np.asarray(wavelength_vac_aa, dtype=np.float64)
    bad = np.zeros(lam.shape, dtype=bool)
    for lo, hi in windows:
        bad |= (lam >= lo) & (lam <= hi)
    return bad
