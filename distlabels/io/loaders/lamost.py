"""LAMOST low-resolution (LRS) spectra: one spectrum per file, two layouts.

- DR1-DR7 (``lamost-image``): the primary HDU is a (5, n_pix) float image whose rows are flux,
  inverse variance, wavelength, andmask, ormask (row order as in LAMOST's DR2 data description and
  public readers, e.g. laspec). One LAMOST page calls the third row a continuum-subtracted
  spectrum: the wavelengths therefore come from the header (COEFF0/COEFF1, log10 start and step;
  else CRVAL1/CD1_1/CRPIX1) and the third row is only used as a cross-check when it looks like
  wavelengths.
- DR8 and later (``lamost-table``): HDU 1 is a binary table (EXTNAME COADD in current releases;
  the name is not relied on) with one row of arrays FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK; the
  header keys are in HDU 0. NORMALIZATION, when present, is not applied (the fit models the
  continuum).

Header keys (HDU 0): OBSID (required: the id), RA/DEC (input-catalogue position; RA_OBS/DEC_OBS as
fallback), DESIG ("LAMOST JHHMMSS.ss+DDMMSS.s", groups repeat spectra of one target; made from
RA/DEC when absent), CLASS, SUBCLASS, Z, SNRR (SN_R in older files), MJD, VACUUM (default vacuum),
FIB_MASK (DR7+) / FIBERMAS (DR5-6) as survey_flags, HELIO_RV when present (unverified key).

Facts: vacuum wavelengths in the heliocentric frame (LAMOST's FITS description), so the
correction is already applied; R ~ 1800 at 5500 A (nominal; the files carry no LSF); the arms join
near 5900 A. Pixel mask: ANDMASK != 0 (bad in every exposure) -> ivar 0; ORMASK is ignored.
Assumptions not verified against a real file here: the exact DR8+ EXTNAME, the NORMALIZATION
column, HELIO_RV/FIB_MASK key names.
"""
from __future__ import annotations

import numpy as np

from . import register_loader
from .base import (C_KMS, FastHeader, LayoutError, LoadedFile, PixelGrid, SurveyFacts, header_float,
                   header_value,
                   iau_designation, loglam_grid_from, make_rows, sanitize)

RESOLUTION = 1800.0
FACTS = SurveyFacts(survey="lamost", family="lamost", wavelength_medium="vacuum", rv_frame="observed",
                    velocity_frame="heliocentric", bary_corr_applied=True, resolution=RESOLUTION,
                    resolution_source="nominal", split_aa=(5900.0,))


def _is_table_layout(hdul) -> tuple[bool, str]:
    try:
        h1 = hdul[1]
    except IndexError:
        return False, "no HDU 1"
    if h1.header.get("XTENSION", "").strip() != "BINTABLE":
        return False, "HDU 1 is not a binary table"
    names = {n.upper() for n in h1.columns.names}
    missing = {"FLUX", "IVAR", "WAVELENGTH"} - names
    if missing:
        return False, f"HDU 1 lacks column(s) {', '.join(sorted(missing))}"
    return True, "LAMOST DR8+ table layout"


def identify_lamost(hdul) -> tuple[bool, str]:
    """A LAMOST LRS file: OBSID in HDU 0 and either a (5, n) primary image or a FLUX/IVAR/WAVELENGTH table in HDU 1."""
    h0 = hdul[0].header
    if "OBSID" not in h0:
        return False, "no OBSID keyword in the primary header"
    if h0.get("NAXIS", 0) == 2 and h0.get("NAXIS2") == 5 and h0.get("NAXIS1", 0) > 10:
        return True, "LAMOST DR1-7 image layout"
    return _is_table_layout(hdul)


def _grid_from_header(h, n_pix: int) -> PixelGrid | None:
    c0, c1 = header_float(h, "COEFF0"), header_float(h, "COEFF1")
    if np.isfinite(c0) and np.isfinite(c1) and c1 > 0:
        return PixelGrid("loglam", c0, c1, n_pix)
    crval, cd = header_float(h, "CRVAL1"), header_float(h, "CD1_1", "CDELT1")
    crpix = header_float(h, "CRPIX1", default=1.0)
    if np.isfinite(crval) and np.isfinite(cd) and cd > 0 and crval < 5:  # log10 WCS (DC-FLAG 1)
        return PixelGrid("loglam", crval - (crpix - 1) * cd, cd, n_pix)
    return None


def _check_wave(grid: PixelGrid | None, wave, *, required: bool) -> PixelGrid:
    """Reconcile the header grid with a wavelength array (checked, or used when no header grid)."""
    w = np.asarray(wave, dtype=np.float64)
    if grid is not None and w.size == grid.n_pix and w.size > 64:
        w_check = w[np.linspace(0, w.size - 1, 33).astype(int)]       # a sample suffices to tell the rows
        i_check = np.linspace(0, w.size - 1, 33).astype(int)
        ok = np.all(np.isfinite(w_check)) and np.all(np.diff(w_check) > 0) and 2000 < w_check[0] < 20000
        if ok:
            resid = np.max(np.abs(np.log10(w_check) - (grid.start + grid.step * i_check))) / grid.step
            if resid > 0.05:
                raise LayoutError(f"the wavelength row and COEFF0/COEFF1 disagree by {resid:.2f} pixel")
        elif required:
            raise LayoutError("the WAVELENGTH column is not an increasing wavelength array")
        return grid
    looks_like_wave = (w.size == (grid.n_pix if grid else w.size) and np.all(np.isfinite(w))
                       and np.all(np.diff(w) > 0) and 2000 < w[0] < 20000)
    if grid is None:
        if not looks_like_wave:
            raise LayoutError("no COEFF0/COEFF1 or log10 WCS keys and no usable wavelength array")
        return loglam_grid_from(np.log10(w))
    if looks_like_wave:
        loglam_grid_from(np.log10(w), start=grid.start, step=grid.step)  # raises if they disagree
    elif required:
        raise LayoutError("the WAVELENGTH column is not an increasing wavelength array")
    return grid


def _rows(h):
    obsid = header_value(h, "OBSID")
    try:
        obsid = int(obsid)
    except (TypeError, ValueError):
        raise LayoutError(f"OBSID {obsid!r} is not an integer") from None
    ra = header_float(h, "RA", "RA_OBS")
    dec = header_float(h, "DEC", "DEC_OBS")
    desig = str(header_value(h, "DESIG", default="")).replace("LAMOST", "").strip() or iau_designation(ra, dec)
    z = header_float(h, "Z")
    cls = str(header_value(h, "CLASS", default="")).upper()
    return make_rows(
        1, source_id=f"lamost:{obsid}", star_id=f"lamost:{desig}" if desig else f"lamost:{obsid}",
        ra=ra, dec=dec, mjd=header_float(h, "MJD", "LMJD"), bary_corr_kms=header_float(h, "HELIO_RV"),
        survey_rv_kms=z * C_KMS, survey_snr=header_float(h, "SNRR", "SN_R"), survey_class=cls,
        survey_subclass=str(header_value(h, "SUBCLASS", default="")),
        survey_flags=int(header_float(h, "FIB_MASK", "FIBERMAS", default=0)), resolution=RESOLUTION,
        file_row=0, is_star=cls == "STAR")


def _facts(h) -> SurveyFacts:
    vac = header_value(h, "VACUUM", default=True)
    if vac is False:
        from dataclasses import replace

        return replace(FACTS, wavelength_medium="air")
    return FACTS


@register_loader("lamost", survey="lamost", identify=identify_lamost)
def load_lamost(hdul, path: str, options) -> LoadedFile:
    """LAMOST LRS DR1-7 (primary image) or DR8+ (HDU 1 table) spectrum."""
    h = FastHeader(hdul[0].header)
    if h.get("NAXIS", 0) == 2:
        data = hdul[0].data
        if data is None or data.ndim != 2 or data.shape[0] != 5:
            raise LayoutError("the primary image is not 5 rows of flux, ivar, wavelength, andmask, ormask")
        n_pix = data.shape[1]
        flux, ivar, wave, andmask = data[0], data[1], data[2], data[3]
        grid = _check_wave(_grid_from_header(h, n_pix), wave, required=False)
        hdu, layout = 0, "lamost-image"
    else:
        tab = hdul[1].data
        if tab is None or len(tab) < 1:
            raise LayoutError("HDU 1 has no rows")
        names = {n.upper(): n for n in tab.columns.names}
        flux, ivar, wave = (np.asarray(tab[names[k]][0]) for k in ("FLUX", "IVAR", "WAVELENGTH"))
        andmask = np.asarray(tab[names["ANDMASK"]][0]) if "ANDMASK" in names else np.zeros(flux.shape, np.int32)
        if not (flux.shape == ivar.shape == wave.shape == andmask.shape) or flux.ndim != 1:
            raise LayoutError(f"FLUX, IVAR, WAVELENGTH, ANDMASK differ in shape ({flux.shape}, {ivar.shape}, "
                              f"{wave.shape}, {andmask.shape})")
        grid = _check_wave(_grid_from_header(h, flux.size), wave, required=True)
        hdu, layout = 1, "lamost-table"
    with np.errstate(invalid="ignore"):
        bad = np.asarray(andmask) != 0
    f, iv, m = sanitize(flux[None, :], ivar[None, :], bad[None, :])
    rows = _rows(h)
    rows["file_hdu"][:] = hdu
    return LoadedFile(layout, _facts(h), grid, f, iv, m, rows)
