"""SDSS / BOSS ``spec-PLATE-MJD-FIBER.fits`` files: one spectrum per file.

Layout (checked against bossbrain's ``spec-3586-55181-0500.fits``): HDU 1 (EXTNAME COADD) is a
table of per-pixel rows with columns flux, loglam (log10 vacuum Angstrom), ivar, and_mask,
or_mask, wdisp, sky, model; HDU 2 (SPALL; SPECOBJ in SDSS-I/II files) holds one row with PLATE,
MJD, FIBERID, PLUG_RA, PLUG_DEC, CLASS, SUBCLASS, Z, SN_MEDIAN_ALL, ZWARNING, THING_ID. HDU 0
holds COEFF0/COEFF1 (log10 start and step, 1e-4 dex) and HELIO_RV.

- ``source_id`` = ``boss:PLATE-MJD-FIBER`` (plate 4, MJD 5, fiber 4 digits, as the file name);
  ``star_id`` = ``boss:thing_id:THING_ID`` (the photometric object), else the source_id.
- Pixels with and_mask != 0 (bad in every exposure) get ivar 0 (conservative: SDSS sets
  ivar 0 itself only for fully rejected pixels).
- Resolution per pixel from wdisp, the Gaussian LSF sigma in units of the 1e-4 dex pixel:
  R = 1 / (2.355 ln(10) wdisp * COEFF1); the spectrum's ``resolution`` is the median over usable
  pixels (~1800-2000).
- Wavelengths are vacuum and heliocentric: idlspec2d applies HELIO_RV to the wavelength solution;
  HELIO_RV is kept as ``bary_corr_kms`` for reference. Blue and red arms join near 6000 A.
"""
from __future__ import annotations

import numpy as np

from . import register_loader
from .base import (C_KMS, FastHeader, LayoutError, LoadedFile, SurveyFacts, header_float, header_value,
                   loglam_grid_from,
                   make_rows, r_from_sigma_loglam, row_median, sanitize, segment_medians)

FACTS = SurveyFacts(survey="boss", family="boss", wavelength_medium="vacuum", rv_frame="observed",
                    velocity_frame="heliocentric", bary_corr_applied=True, resolution=2000.0,
                    resolution_source="wdisp", split_aa=(6000.0,))


def _cols(hdu) -> dict[str, str]:
    return {n.lower(): n for n in hdu.columns.names}


def identify_boss(hdul) -> tuple[bool, str]:
    """An SDSS/BOSS spec file: HDU 1 table with flux, loglam, ivar; HDU 2 table with PLATE, MJD, FIBERID."""
    try:
        h1, h2 = hdul[1], hdul[2]
    except IndexError:
        return False, "fewer than three HDUs"
    if h1.header.get("XTENSION", "").strip() != "BINTABLE" or h2.header.get("XTENSION", "").strip() != "BINTABLE":
        return False, "HDU 1 and HDU 2 are not both binary tables"
    c1 = _cols(h1)
    missing = {"flux", "loglam", "ivar"} - set(c1)
    if missing:
        return False, f"HDU 1 lacks column(s) {', '.join(sorted(missing))}"
    c2 = {n.upper() for n in h2.columns.names}
    missing = {"PLATE", "MJD", "FIBERID"} - c2
    if missing:
        return False, f"HDU 2 lacks column(s) {', '.join(sorted(missing))}"
    return True, "SDSS/BOSS spec-PLATE-MJD-FIBER layout"


def _get(rec, names: dict[str, str], key: str, default=None):
    n = names.get(key.upper())
    if n is None:
        return default
    v = rec[n]
    return v.strip() if isinstance(v, str) else v


@register_loader("boss", survey="boss", identify=identify_boss)
def load_boss(hdul, path: str, options) -> LoadedFile:
    """SDSS/BOSS spec-PLATE-MJD-FIBER coadded spectrum."""
    h0 = FastHeader(hdul[0].header)
    tab = hdul[1].data
    if tab is None or len(tab) < 2:
        raise LayoutError("the COADD table in HDU 1 has fewer than two pixels")
    c = _cols(hdul[1])
    loglam = np.asarray(tab[c["loglam"]], dtype=np.float64)
    c0, c1 = header_float(h0, "COEFF0"), header_float(h0, "COEFF1")
    if np.isfinite(c0) and np.isfinite(c1):
        grid = loglam_grid_from(loglam, start=c0, step=c1)
    else:
        grid = loglam_grid_from(np.round(loglam, 4))
    bad = np.asarray(tab[c["and_mask"]]) != 0 if "and_mask" in c else None
    flux, ivar, mask = sanitize(np.asarray(tab[c["flux"]])[None, :], np.asarray(tab[c["ivar"]])[None, :],
                                None if bad is None else bad[None, :])
    if "wdisp" in c:
        r_pix = r_from_sigma_loglam(np.asarray(tab[c["wdisp"]], dtype=np.float64) * grid.step)
        resolution = float(row_median(r_pix[None, :], ~mask)[0])
        res_seg = segment_medians(r_pix[None, :], grid.wavelength_aa(), FACTS.split_aa, ~mask)
    else:
        resolution, res_seg = np.nan, None
    spall = hdul[2].data
    if spall is None or len(spall) < 1:
        raise LayoutError("the SPALL/SPECOBJ table in HDU 2 is empty")
    rec, n2 = spall[0], {n.upper(): n for n in spall.columns.names}
    try:
        plate, mjd, fiber = (int(_get(rec, n2, k)) for k in ("PLATE", "MJD", "FIBERID"))
    except (TypeError, ValueError):
        raise LayoutError("PLATE, MJD or FIBERID in HDU 2 is not an integer") from None
    source_id = f"boss:{plate:04d}-{mjd:05d}-{fiber:04d}"
    thing = _get(rec, n2, "THING_ID", -1)
    try:
        thing = int(thing)
    except (TypeError, ValueError):
        thing = -1
    ra = _get(rec, n2, "PLUG_RA", header_value(h0, "PLUG_RA"))
    dec = _get(rec, n2, "PLUG_DEC", header_value(h0, "PLUG_DEC"))
    cls = str(_get(rec, n2, "CLASS", "")).upper()
    z = _get(rec, n2, "Z", np.nan)
    rows = make_rows(
        1, source_id=source_id, star_id=f"boss:thing_id:{thing}" if thing > 0 else source_id,
        ra=float(ra) if ra is not None else np.nan, dec=float(dec) if dec is not None else np.nan,
        mjd=float(mjd), bary_corr_kms=header_float(h0, "HELIO_RV"),
        survey_rv_kms=float(z) * C_KMS if z is not None else np.nan,
        survey_snr=float(_get(rec, n2, "SN_MEDIAN_ALL", np.nan)), survey_class=cls,
        survey_subclass=str(_get(rec, n2, "SUBCLASS", "")), survey_flags=int(_get(rec, n2, "ZWARNING", 0)),
        resolution=resolution, file_hdu=1, file_row=0, is_star=cls == "STAR")
    return LoadedFile("boss-spec", FACTS, grid, flux, ivar, mask, rows, resolution_segments=res_seg)
