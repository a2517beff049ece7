"""APOGEE spectra saved as .npz by The Payne / binspec tools (El-Badry et al. 2018; Ting et al. 2019).

Two layouts, told apart by their array names (checked against the files of ``../shared/data``):

- **combined**: ``spectrum`` and ``spec_err`` (n_pix,): one star's combined spectrum, rest frame,
  pseudo-continuum normalised, errors floored at 0.005 (S/N 200) with large errors on bad pixels.
- **visits**: ``spectra`` and ``spec_errs`` (n_visit, n_pix), ``snrs``, ``vhelios`` (km/s),
  ``hjds`` (HJD - 2,400,000) per visit. binspec prepared them from apVisit files: normalised with a
  preliminary visit continuum, shifted by the barycentric correction (so the pixels are in the
  *heliocentric* frame: the star's RV, ``vhelios``, is still in them), interpolated onto the
  combined spectra's grid, errors floored at 0.005.

The grid is the 7,214-pixel ASPCAP grid (vacuum; :func:`.apogee.aspcap_wavelength`) when n_pix is
7,214, or the 12,288-pixel apVisit grid when an ``apogee_visit_wavelength.npz`` (key ``wave``)
lies next to the file with that many values. There is no pixel mask: bad pixels carry huge errors
(ivar then ~0). The files hold no coordinates: RA/Dec come from the 2MASS designation in the file
name (``2MHHMMSSss+DDMMSSs``), which is also the APOGEE_ID. ``source_id`` =
``apogee:npz:APOGEE_ID:combined`` or ``...:visit:HJD``; ``star_id`` = ``apogee:APOGEE_ID`` (as the
FITS loaders). Nothing is unpickled (``allow_pickle=False``).

The flux is stored as given (normalised); the fit of ``payne-perpixel`` models renormalises it with
the model's own continuum pixels at each star's RV (:mod:`distlabels.fit.payne_perpixel`).
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import register_loader
from .apogee import CHIP_SPLITS_AA, RESOLUTION, aspcap_wavelength
from .base import LayoutError, LoadedFile, PixelGrid, SurveyFacts, ivar_from_error, make_rows, sanitize

ASPCAP_N_PIX = 7214
VISIT_WAVELENGTH_FILE = "apogee_visit_wavelength.npz"
_DESIGNATION = re.compile(r"2M(\d{2})(\d{2})(\d{2})(\d{2})([+-])(\d{2})(\d{2})(\d{2})(\d)")
FACTS_COMBINED = SurveyFacts(survey="apogee", family="apogee-npz-combined", wavelength_medium="vacuum",
                             rv_frame="rest", velocity_frame="rest", bary_corr_applied=True, resolution=RESOLUTION,
                             resolution_source="nominal", split_aa=CHIP_SPLITS_AA, flux_normalized=True)
FACTS_VISITS = replace(FACTS_COMBINED, family="apogee-npz-visits", rv_frame="observed", velocity_frame="heliocentric")


class NpzSpectraFile:
    """An open .npz handed to loader identifiers in place of a FITS HDU list (arrays read on demand).

    Indexing it like an HDU list raises IndexError, so FITS identifiers refuse it with a reason.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._z = np.load(self.path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise OSError(f"not a readable .npz file ({e.__class__.__name__}: {e})") from None
        if not isinstance(self._z, np.lib.npyio.NpzFile):
            raise OSError("a single .npy array, not an .npz archive")
        self.files = list(self._z.files)
        self._shapes: dict[str, tuple] = {}

    def shape(self, key: str) -> tuple:
        """Shape of array ``key`` from its header only (no data read)."""
        if key not in self._shapes:
            fmt = np.lib.format
            with self._z.zip.open(f"{key}.npy") as f:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape = fmt.read_array_header_1_0(f)[0]
                elif version == (2, 0):
                    shape = fmt.read_array_header_2_0(f)[0]
                else:                              # a newer header version: read the array itself
                    shape = self._z[key].shape
            self._shapes[key] = tuple(shape)
        return self._shapes[key]

    def __getitem__(self, key):
        if isinstance(key, int):
            raise IndexError("an .npz file has no FITS HDUs")
        return self._z[key]

    def __len__(self):
        return 0

    def close(self):
        self._z.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def radec_from_designation(name: str) -> tuple[float, float, str]:
    """(ra_deg, dec_deg, APOGEE_ID) from a 2MASS designation inside ``name``; NaN, NaN, "" if none."""
    m = _DESIGNATION.search(name)
    if not m:
        return np.nan, np.nan, ""
    hh, mm, ss, cs, sign, dd, am, asec, ds = m.groups()
    ra = 15.0 * (int(hh) + int(mm) / 60 + (int(ss) + int(cs) / 100) / 3600)
    dec = (int(dd) + int(am) / 60 + (int(asec) + int(ds) / 10) / 3600) * (-1 if sign == "-" else 1)
    return ra, dec, m.group(0)


def _visit_wavelength(path: str) -> np.ndarray | None:
    p = Path(path).with_name(VISIT_WAVELENGTH_FILE)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return np.asarray(z["wave"], np.float64) if "wave" in z.files else None


def identify_apogee_npz(f) -> tuple[bool, str]:
    """binspec/Payne APOGEE .npz: (spectrum, spec_err) 1-D or (spectra, spec_errs, vhelios) 2-D of 7,214 pixels."""
    if not isinstance(f, NpzSpectraFile):
        return False, "not an .npz file"
    keys = set(f.files)
    if {"spectrum", "spec_err"} <= keys:
        shapes = {f.shape("spectrum"), f.shape("spec_err")}
        if len(shapes) != 1 or len(shapes.pop()) != 1:
            return False, "spectrum and spec_err are not 1-D arrays of one length"
        n = f.shape("spectrum")[0]
    elif {"spectra", "spec_errs", "vhelios"} <= keys:
        s = f.shape("spectra")
        if len(s) != 2 or f.shape("spec_errs") != s or f.shape("vhelios") != (s[0],):
            return False, "spectra/spec_errs are not (n_visit, n_pix) with one vhelio per visit"
        n = s[1]
    else:
        return False, "neither spectrum/spec_err (combined) nor spectra/spec_errs/vhelios (visits) arrays"
    if n != ASPCAP_N_PIX:
        w = _visit_wavelength(f.path)
        if w is None or len(w) != n:
            return False, (f"{n} pixels: neither the 7214-pixel ASPCAP grid nor the {VISIT_WAVELENGTH_FILE} "
                           "grid beside the file")
    return True, "binspec/Payne APOGEE .npz layout"


@register_loader("apogee-npz", survey="apogee", identify=identify_apogee_npz)
def load_apogee_npz(f, path: str, options) -> LoadedFile:
    """binspec/Payne APOGEE .npz: a combined spectrum (rest frame) or visits (heliocentric frame)."""
    if not isinstance(f, NpzSpectraFile):
        raise LayoutError("not an .npz file")
    ra, dec, apid = radec_from_designation(Path(path).name)
    apid = apid or Path(path).stem
    combined = "spectrum" in f.files
    if combined:
        flux, err = np.asarray(f["spectrum"])[None], np.asarray(f["spec_err"])[None]
    else:
        flux, err = np.atleast_2d(f["spectra"]), np.atleast_2d(f["spec_errs"])
    n, n_pix = flux.shape
    if n_pix == ASPCAP_N_PIX:
        wave = aspcap_wavelength()
    else:
        wave = _visit_wavelength(path)
        if wave is None or len(wave) != n_pix:
            raise LayoutError(f"{n_pix}-pixel spectra without a matching {VISIT_WAVELENGTH_FILE} beside the file")
    order = np.argsort(wave, kind="stable")         # the apVisit grid runs red to blue per chip
    wave, flux, err = wave[order], flux[:, order], err[:, order]
    if not np.all(np.diff(wave) > 0):
        raise LayoutError("the wavelengths are not distinct")
    fl, iv, m = sanitize(flux, ivar_from_error(err))
    base = f"apogee:npz:{apid}"
    if combined:
        rows = make_rows(1, source_id=f"{base}:combined", star_id=f"apogee:{apid}", ra=ra, dec=dec,
                         resolution=RESOLUTION, file_hdu=-1, file_row=0, is_star=True)
        facts = FACTS_COMBINED
    else:
        hjd = np.asarray(f["hjds"], np.float64) if "hjds" in f.files else np.full(n, np.nan)
        vhel = np.asarray(f["vhelios"], np.float64)
        snr = np.asarray(f["snrs"], np.float64) if "snrs" in f.files else np.full(n, np.nan)
        # HJD - 2,400,000 -> MJD (heliocentric); binspec fell back to the JD when no HJD was known.
        rows = make_rows(n, source_id=[f"{base}:visit:{h:.5f}" if np.isfinite(h) else f"{base}:visit:{i}"
                                       for i, h in enumerate(hjd)],
                         star_id=f"apogee:{apid}", ra=ra, dec=dec, mjd=hjd - 0.5, survey_rv_kms=vhel,
                         survey_snr=snr, resolution=RESOLUTION, file_hdu=-1, file_row=list(range(n)), is_star=True)
        facts = FACTS_VISITS
    grid = PixelGrid("table", 0.0, 1.0, n_pix, tuple(wave.tolist()))
    return LoadedFile("apogee-npz", facts, grid, fl, iv, m, rows)
