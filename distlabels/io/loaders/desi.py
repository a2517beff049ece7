"""DESI coadd and spectra files (desidatamodel: ``coadd-SURVEY-PROGRAM-PIXNUM.fits``,
``spectra-SURVEY-PROGRAM-PIXNUM.fits`` and the tile-based equivalents): many spectra per file.

Layout: FIBERMAP (one row per spectrum: TARGETID, TARGET_RA, TARGET_DEC, target bits, ...), in
coadds EXP_FIBERMAP, then per arm b, r, z: ``X_WAVELENGTH`` [nwave] (vacuum Angstrom, linear
0.8 A: b 3600-5800, r 5760-7620, z 7520-9824), ``X_FLUX``/``X_IVAR`` [nspec, nwave], ``X_MASK``
[nspec, nwave] (often tile-compressed, which astropy reads transparently; != 0 is bad) and
``X_RESOLUTION`` [nspec, ndiag=11, nwave] (diagonals; offsets ndiag//2 - arange(ndiag) in
scipy's dia convention). Missing arms are allowed; at least one must be present.

- The arms are joined on one linear grid (their 0.8 A lattices coincide): where arms overlap the
  flux is the inverse-variance weighted mean and the ivar the sum; a pixel with one usable arm
  keeps that arm's values exactly.
- Resolution per pixel from each resolution-matrix row: the LSF sigma is the second moment of the
  row (in pixels), R = lambda / (2.355 sigma 0.8 A); overlaps take the ivar-weighted mean. The
  spectrum's ``resolution`` is the median over usable pixels. Without RESOLUTION HDUs a nominal
  R = 3000 is used.
- ``source_id`` = ``desi:SURVEY:PROGRAM:TARGETID`` for coadds (a TARGETID recurs across
  survey/program coadds), with ``:EXPID`` appended for per-exposure spectra files; ``star_id`` =
  ``desi:TARGETID``. SURVEY and PROGRAM come from header keys SURVEY/PROGRAM (HDU 0 or FIBERMAP),
  else the file name; a file with neither is refused.
- Stars: DESI_TARGET (or SVn_DESI_TARGET) with any of STD_FAINT (33), STD_WD (34), STD_BRIGHT (35),
  MWS_ANY (61) set, or MWS_TARGET (SVn_MWS_TARGET) != 0 (bits from desitarget's main and SV1
  target masks). ``survey_flags`` = COADD_FIBERSTATUS (coadds) or FIBERSTATUS; ``mjd`` = MEAN_MJD,
  else the mean of EXP_FIBERMAP's MJD per target, else MJD (spectra files).
- Wavelengths are vacuum and barycentric (desispec corrects them); no per-spectrum correction is
  stored in these files (``bary_corr_kms`` NaN).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import register_loader
from .base import (LayoutError, LoadedFile, PixelGrid, SurveyFacts, header_value, linear_grid_from, make_rows,
                   row_median, sanitize, segment_medians)

ARMS = ("B", "R", "Z")
NOMINAL_R = 3000.0
STAR_DESI_BITS = (1 << 33) | (1 << 34) | (1 << 35) | (1 << 61)
FACTS = SurveyFacts(survey="desi", family="desi", wavelength_medium="vacuum", rv_frame="observed",
                    velocity_frame="barycentric", bary_corr_applied=True, resolution=None,
                    resolution_source="resolution_matrix", split_aa=(5780.0, 7570.0))
_NAME = re.compile(r"(?:coadd|spectra)-([a-z0-9]+)-([a-z0-9]+)-\d+", re.I)


def _hdu(hdul, name):
    try:
        return hdul[name]
    except KeyError:
        return None


def identify_desi(hdul) -> tuple[bool, str]:
    """A DESI coadd/spectra file: a FIBERMAP table with TARGETID and at least one X_FLUX / X_WAVELENGTH pair."""
    fm = _hdu(hdul, "FIBERMAP")
    if fm is None:
        return False, "no FIBERMAP HDU"
    if "TARGETID" not in {n.upper() for n in fm.columns.names}:
        return False, "FIBERMAP has no TARGETID column"
    arms = [a for a in ARMS if _hdu(hdul, f"{a}_FLUX") is not None and _hdu(hdul, f"{a}_WAVELENGTH") is not None]
    if not arms:
        return False, "no B/R/Z _FLUX and _WAVELENGTH HDUs"
    return True, f"DESI spectra with arms {''.join(arms).lower()}"


def _survey_program(hdul, path: str) -> tuple[str, str]:
    for h in (hdul[0].header, hdul["FIBERMAP"].header):
        s, p = header_value(h, "SURVEY"), header_value(h, "PROGRAM")
        if s and p:
            return str(s).lower(), str(p).lower()
    m = _NAME.search(Path(path).name)
    if m:
        return m.group(1).lower(), m.group(2).lower()
    raise LayoutError("no SURVEY/PROGRAM header keys and a file name not like coadd-SURVEY-PROGRAM-PIXNUM.fits: "
                      "cannot make a DESI-wide unique source_id")


def resolution_from_matrix(data: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """(nspec, nwave) resolving power from resolution-matrix diagonals (nspec, ndiag, nwave).

    Row i of the matrix is the LSF of output pixel i: element (i, i+d) is data[:, k, i+d] with
    d = ndiag//2 - k. sigma^2 is its second central moment in pixels.
    """
    data = np.asarray(data, dtype=np.float64)
    nspec, ndiag, nwave = data.shape
    w0 = np.zeros((nspec, nwave))
    w1 = np.zeros((nspec, nwave))
    w2 = np.zeros((nspec, nwave))
    for k in range(ndiag):
        d = ndiag // 2 - k
        lo, hi = max(0, -d), min(nwave, nwave - d)       # rows i with 0 <= i + d < nwave
        v = data[:, k, lo + d:hi + d]
        w0[:, lo:hi] += v
        w1[:, lo:hi] += v * d
        w2[:, lo:hi] += v * d * d
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = w1 / w0
        sigma = np.sqrt(np.maximum(w2 / w0 - mean**2, 0.0))
        dlam = np.gradient(np.asarray(wave, np.float64))
        r = wave / (2.0 * np.sqrt(2.0 * np.log(2.0)) * sigma * dlam)
    return np.where(np.isfinite(r) & (sigma > 0), r, np.nan)


def _target_bits(fm, names, survey: str, kind: str) -> np.ndarray:
    pref = [f"{survey.upper()}_{kind}_TARGET"] if survey.startswith("sv") else []
    for col in pref + [f"{kind}_TARGET", f"SV3_{kind}_TARGET", f"SV2_{kind}_TARGET", f"SV1_{kind}_TARGET"]:
        if col in names:
            return np.asarray(fm[names[col]], dtype=np.int64)
    return np.zeros(len(fm), np.int64)


def _mjd(hdul, fm, names, targetid) -> np.ndarray:
    if "MEAN_MJD" in names:
        return np.asarray(fm[names["MEAN_MJD"]], np.float64)
    efm = _hdu(hdul, "EXP_FIBERMAP")
    if efm is not None and efm.data is not None and "MJD" in {n.upper() for n in efm.columns.names}:
        en = {n.upper(): n for n in efm.columns.names}
        tid, mjd = np.asarray(efm.data[en["TARGETID"]]), np.asarray(efm.data[en["MJD"]], np.float64)
        u, inv = np.unique(tid, return_inverse=True)
        mean = np.bincount(inv, mjd, minlength=len(u)) / np.bincount(inv, minlength=len(u))
        pos = np.searchsorted(u, targetid)
        pos = np.clip(pos, 0, len(u) - 1)
        return np.where(u[pos] == targetid, mean[pos], np.nan)
    if "MJD" in names:
        return np.asarray(fm[names["MJD"]], np.float64)
    return np.full(len(fm), np.nan)


@register_loader("desi", survey="desi", identify=identify_desi)
def load_desi(hdul, path: str, options) -> LoadedFile:
    """DESI coadd or spectra file: the b, r, z arms joined onto one linear grid."""
    fm = hdul["FIBERMAP"].data
    if fm is None or len(fm) == 0:
        raise LayoutError("FIBERMAP is empty")
    names = {n.upper(): n for n in fm.columns.names}
    nspec = len(fm)
    survey, program = _survey_program(hdul, path)
    arms = []
    for a in ARMS:
        fh, wh = _hdu(hdul, f"{a}_FLUX"), _hdu(hdul, f"{a}_WAVELENGTH")
        if fh is None or wh is None:
            continue
        wave = np.asarray(wh.data, np.float64)
        flux = np.asarray(fh.data)
        ivh, mh, rh = _hdu(hdul, f"{a}_IVAR"), _hdu(hdul, f"{a}_MASK"), _hdu(hdul, f"{a}_RESOLUTION")
        if ivh is None:
            raise LayoutError(f"arm {a.lower()} has flux but no {a}_IVAR")
        ivar = np.asarray(ivh.data)
        mask = np.asarray(mh.data) if mh is not None and mh.data is not None else None
        if flux.ndim != 2 or flux.shape != (nspec, wave.size) or ivar.shape != flux.shape or (
                mask is not None and mask.shape != flux.shape):
            raise LayoutError(f"arm {a.lower()}: FLUX {flux.shape}, IVAR {ivar.shape} do not match "
                              f"{nspec} FIBERMAP rows x {wave.size} wavelengths")
        grid = linear_grid_from(wave)
        res = None
        if rh is not None and rh.data is not None:
            rd = np.asarray(rh.data)
            if rd.ndim == 3 and rd.shape[0] == nspec and rd.shape[2] == wave.size:
                res = resolution_from_matrix(rd, wave)
        arms.append((a, grid, flux, ivar, mask, res))
    step = arms[0][1].step
    for a, g, *_ in arms:
        if abs(g.step - step) > 1e-6 * step or abs((g.start - arms[0][1].start) / step
                                                   - round((g.start - arms[0][1].start) / step)) > 0.01:
            raise LayoutError(f"arm {a.lower()} is not on the same {step} A lattice as arm {arms[0][0].lower()}")
    start = min(g.start for _, g, *_ in arms)
    offs = [int(round((g.start - start) / step)) for _, g, *_ in arms]
    n_pix = max(o + g.n_pix for o, (_, g, *_) in zip(offs, arms))
    num = np.zeros((nspec, n_pix))
    den = np.zeros((nspec, n_pix))
    n_good = np.zeros((nspec, n_pix), np.int16)
    single = np.full((nspec, n_pix), np.nan, np.float32)
    fsum = np.zeros((nspec, n_pix))
    fcnt = np.zeros((nspec, n_pix), np.int16)
    rnum = np.zeros((nspec, n_pix))
    rden = np.zeros((nspec, n_pix))
    for o, (a, g, flux, ivar, mask, res) in zip(offs, arms):
        sl = slice(o, o + g.n_pix)
        f, iv, _ = sanitize(flux, ivar, None if mask is None else mask != 0)
        good = iv > 0
        num[:, sl] += np.where(good, f.astype(np.float64) * iv, 0.0)
        den[:, sl] += iv
        n_good[:, sl] += good
        single[:, sl] = np.where(good, f, single[:, sl])
        fin = np.isfinite(f)
        fsum[:, sl] += np.where(fin, f, 0.0)
        fcnt[:, sl] += fin
        if res is not None:
            wr = np.where(np.isfinite(res), np.where(good, iv, 1e-30), 0.0)
            rnum[:, sl] += wr * np.nan_to_num(res)
            rden[:, sl] += wr
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(n_good == 1, single,
                        np.where(den > 0, num / den, np.where(fcnt > 0, fsum / fcnt, np.nan))).astype(np.float32)
        r_pix = np.where(rden > 0, rnum / rden, np.nan)
    ivar = den.astype(np.float32)
    mask = ~(ivar > 0)
    grid = PixelGrid("linear", start, step, n_pix)
    if np.isfinite(r_pix).any():
        resolution = row_median(r_pix, ~mask)
        res_seg = segment_medians(r_pix, grid.wavelength_aa(), FACTS.split_aa, ~mask)
    else:
        resolution, res_seg = np.full(nspec, NOMINAL_R), None
    targetid = np.asarray(fm[names["TARGETID"]], np.int64)
    is_spectra = "EXPID" in names and "COADD_NUMEXP" not in names and _hdu(hdul, "EXP_FIBERMAP") is None
    if is_spectra:
        expid = np.asarray(fm[names["EXPID"]], np.int64)
        sids = [f"desi:{survey}:{program}:{t}:{e}" for t, e in zip(targetid, expid)]
    else:
        sids = [f"desi:{survey}:{program}:{t}" for t in targetid]
    desi_t = _target_bits(fm, names, survey, "DESI")
    mws_t = _target_bits(fm, names, survey, "MWS")
    flags_col = names.get("COADD_FIBERSTATUS", names.get("FIBERSTATUS"))
    rows = make_rows(
        nspec, source_id=sids, star_id=[f"desi:{t}" for t in targetid],
        ra=np.asarray(fm[names["TARGET_RA"]], np.float64) if "TARGET_RA" in names else np.nan,
        dec=np.asarray(fm[names["TARGET_DEC"]], np.float64) if "TARGET_DEC" in names else np.nan,
        mjd=_mjd(hdul, fm, names, targetid),
        survey_flags=np.asarray(fm[flags_col], np.int64) if flags_col else 0,
        resolution=resolution.astype(np.float32), file_hdu=int(hdul.index_of(f"{arms[0][0]}_FLUX")),
        file_row=np.arange(nspec), is_star=((desi_t & STAR_DESI_BITS) != 0) | (mws_t != 0),
        desi_target=desi_t, bgs_target=_target_bits(fm, names, survey, "BGS"), mws_target=mws_t)
    layout = "desi-spectra" if is_spectra else "desi-coadd"
    return LoadedFile(layout, FACTS, grid, flux, ivar, mask, rows, resolution_segments=res_seg)
