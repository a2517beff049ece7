"""What every survey loader returns, and small helpers they share.

A loader turns one open FITS file into a :class:`LoadedFile`: plain numpy arrays, one row per
spectrum, all on the file's one pixel grid (:class:`PixelGrid`), plus per-row metadata and the
facts about the survey's pixels (:class:`SurveyFacts`) that end up in ``store.json``. Loaders do no
alignment, resampling, selection or I/O beyond reading the file: :mod:`distlabels.io.ingest` does.

Conventions shared by all loaders:

- ``flux`` is the file's flux, unchanged (NaN stays NaN); ``ivar`` is the file's inverse variance
  (or 1/error^2) with 0 wherever the survey's pixel mask says bad, the flux or ivar is not finite,
  or ivar < 0; ``mask`` is True exactly where ivar was set to 0 or was already 0.
- Wavelengths in Angstrom; the medium (air or vacuum) and velocity frame are file-level facts.
- Per-row metadata uses the names of :data:`ROW_FIELDS`; missing values are NaN / "" / 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io.fits.card import Undefined

C_KMS = 299792.458
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

# name -> (numpy dtype, fill value). Kept by ingest as store columns (except the selection-only ones).
ROW_FIELDS: dict[str, tuple[Any, Any]] = {
    "source_id": (object, ""),        # survey-qualified, unique: lamost:OBSID, boss:PLATE-MJD-FIBER, ...
    "star_id": (object, ""),          # groups repeat spectra of one star
    "ra": (np.float64, np.nan),       # deg
    "dec": (np.float64, np.nan),      # deg
    "mjd": (np.float64, np.nan),      # mean MJD of the exposures
    "bary_corr_kms": (np.float32, np.nan),   # barycentric/heliocentric correction given by the file
    "survey_rv_kms": (np.float32, np.nan),   # the survey pipeline's own RV (z*c or VHELIO)
    "survey_snr": (np.float32, np.nan),      # the survey's own S/N figure (band differs per survey)
    "survey_class": (object, ""),     # CLASS (LAMOST, BOSS)
    "survey_subclass": (object, ""),
    "survey_flags": (np.int64, 0),    # the survey's spectrum-level quality bitmask (0 = fine)
    "resolution": (np.float32, np.nan),      # effective resolving power of this spectrum
    "file_hdu": (np.int16, -1),       # HDU that holds the flux
    "file_row": (np.int32, -1),       # row of the spectrum in that HDU
    # selection only (not stored): used by the default star selection and --select
    "is_star": (np.bool_, False),
    "desi_target": (np.int64, 0),
    "bgs_target": (np.int64, 0),
    "mws_target": (np.int64, 0),
}
SELECTION_ONLY = ("is_star", "desi_target", "bgs_target", "mws_target")


@dataclass(frozen=True)
class PixelGrid:
    """The pixels of one file.

    kind ``loglam``: wavelength_aa = 10**(start + step * i) (start, step in log10 Angstrom);
    ``linear``: start + step * i (Angstrom); ``table``: explicit ``table`` (Angstrom, ascending).
    Grids of one kind and step differ only by their offset on the lattice ``start / step``.
    """

    kind: str
    start: float
    step: float
    n_pix: int
    table: tuple[float, ...] | None = None

    def wavelength_aa(self) -> np.ndarray:
        i = np.arange(self.n_pix, dtype=np.float64)
        if self.kind == "loglam":
            return 10.0 ** (self.start + self.step * i)
        if self.kind == "linear":
            return self.start + self.step * i
        return np.asarray(self.table, dtype=np.float64)

    @property
    def lattice_pos(self) -> float:
        """Position of pixel 0 on the infinite lattice of this step (table grids: 0)."""
        return self.start / self.step if self.kind in ("loglam", "linear") else 0.0


@dataclass(frozen=True)
class SurveyFacts:
    """File-level facts that must agree across one store."""

    survey: str                       # lamost | desi | boss | apogee
    family: str                       # grid family: files of one family share a store grid
    wavelength_medium: str = "vacuum"
    rv_frame: str = "observed"        # observed: the star's RV is in the pixels; rest: shifted out
    velocity_frame: str = "barycentric"   # frame of the wavelength scale (heliocentric, barycentric,
    #                                       topocentric, rest)
    bary_corr_applied: bool = True    # the file's barycentric correction is already in the wavelengths
    resolution: float | None = None   # nominal R (used where a row has none)
    resolution_source: str = "nominal"    # nominal | wdisp | resolution_matrix
    split_aa: tuple[float, ...] = ()  # continuum segment boundaries (arm / chip joins), Angstrom
    flux_normalized: bool = False     # pseudo-continuum normalised flux (fit with continuum_degree -1)
    native_ok: bool = True            # False: the file's grid varies per file (apVisit): needs --grid MODEL_DIR


@dataclass
class LoadedFile:
    """Spectra of one file: (n, n_pix) arrays on ``grid`` and per-row metadata."""

    layout: str
    facts: SurveyFacts
    grid: PixelGrid
    flux: np.ndarray                  # (n, n_pix) float32
    ivar: np.ndarray                  # (n, n_pix) float32, 0 = unusable
    mask: np.ndarray                  # (n, n_pix) bool, True = unusable pixel
    rows: dict[str, np.ndarray]       # ROW_FIELDS name -> (n,) array
    rejected: list[tuple[int | None, int | None, str]] = field(default_factory=list)  # (hdu, row, reason)
    resolution_segments: np.ndarray | None = None   # (n, len(facts.split_aa) + 1) R per arm/chip, if known

    @property
    def n(self) -> int:
        return int(self.flux.shape[0])


@dataclass(frozen=True)
class LoaderOptions:
    """Options a user can pass to every loader."""

    visits: bool = False              # also read single-visit spectra where a file holds them (apStar)


class LayoutError(ValueError):
    """The file looks like the right survey but cannot be read (one sentence, quarantined)."""


def make_rows(n: int, **cols) -> dict[str, np.ndarray]:
    """Per-row metadata arrays for ``n`` spectra: every ROW_FIELDS name, scalars broadcast."""
    unknown = set(cols) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"unknown row field(s) {sorted(unknown)}")
    out = {}
    for name, (dtype, fill) in ROW_FIELDS.items():
        v = cols.get(name, fill)
        if dtype is object:
            arr = np.empty(n, dtype=object)
            arr[:] = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * n
        else:
            arr = np.empty(n, dtype=dtype)
            arr[:] = v
        out[name] = arr
    return out


def sanitize(flux, ivar, bad=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flux float32, ivar float32 with 0 at bad pixels, mask bool) from raw arrays.

    bad: optional bool array, True where the survey's pixel mask marks the pixel unusable.
    """
    flux = np.array(flux, dtype=np.float32, copy=True)
    ivar = np.array(ivar, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        mask = ~np.isfinite(flux) | ~np.isfinite(ivar) | ~(ivar > 0)
    if bad is not None:
        mask |= np.asarray(bad, dtype=bool)
    ivar[mask] = 0.0
    return flux, ivar, mask


def ivar_from_error(err) -> np.ndarray:
    """1/err^2 as float32, 0 where err is not a positive finite number."""
    e = np.asarray(err, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iv = np.where(np.isfinite(e) & (e > 0), 1.0 / e**2, 0.0)
    return iv.astype(np.float32)


class FastHeader:
    """Read-only view of a FITS header that parses only the requested keys' values.

    astropy parses a card's value on first access, with a config lookup per value; for millions
    of small files that is most of a loader's time. This reads the raw 80-character card images
    of the header once (astropy's parsed-card cache, when available) and parses simple values
    (strings, logicals, integers, reals) itself; anything else (long CONTINUE strings, complex
    values, a header without the cache) falls back to astropy's own parsing.
    """

    def __init__(self, header):
        self.header = header
        self.raw: dict[str, str] = {}
        try:
            for card in header._cards:          # astropy internals: fall back below if absent
                im = card._image
                if im is None:
                    continue
                k = im[:8].rstrip()
                if k and im[8:10] == "= " and k not in self.raw:
                    self.raw[k] = im[10:]
        except (AttributeError, TypeError):
            self.raw = {}
        self.fallback = not self.raw

    def __contains__(self, key: str) -> bool:
        return key in self.raw if not self.fallback else key in self.header

    def get(self, key: str, default=None):
        if self.fallback or key not in self.raw:
            return self.header.get(key, default) if self.fallback else default
        v = _parse_card_value(self.raw[key])
        return self.header.get(key, default) if v is _UNPARSED else v


_UNPARSED = object()


def _parse_card_value(text: str):
    t = text.strip()
    if t.startswith("'"):                       # string: '' escapes a quote; a comment may follow
        out, i = [], 1
        while i < len(t):
            if t[i] == "'":
                if i + 1 < len(t) and t[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                s = "".join(out).rstrip()
                return _UNPARSED if s.endswith("&") else s      # long-string convention: astropy
            out.append(t[i])
            i += 1
        return _UNPARSED
    v = t.split("/", 1)[0].strip()
    if v == "T":
        return True
    if v == "F":
        return False
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E"))
    except ValueError:
        return _UNPARSED


def header_value(header, *keys, default=None):
    """First present, non-blank value among ``keys`` of a FITS header (or a FastHeader)."""
    for k in keys:
        if k in header:
            v = header.get(k)
            if isinstance(v, str):
                v = v.strip()
                if v == "":
                    continue
            if v is None or isinstance(v, Undefined):
                continue
            return v
    return default


def header_float(header, *keys, default=np.nan, invalid=(-9999.0, -9999.99, -999.0)) -> float:
    v = header_value(header, *keys)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(f) or any(abs(f - x) < 1e-6 for x in invalid):
        return default
    return f


def loglam_grid_from(loglam: np.ndarray, *, start: float | None = None, step: float | None = None,
                     tol_px: float = 0.05) -> PixelGrid:
    """A log-lambda PixelGrid for the per-pixel log10 wavelengths ``loglam``.

    start/step from the header when given (they are exact; float32 arrays are not) and checked
    against the array to ``tol_px`` pixels; otherwise fitted. Raises LayoutError when the
    pixels are not on one log-linear grid.
    """
    x = np.asarray(loglam, dtype=np.float64)
    n = len(x)
    if n < 2 or not np.all(np.isfinite(x)):
        raise LayoutError("the wavelength array is empty or not finite")
    i = np.arange(n)
    if start is None or step is None:
        step, start = np.polyfit(i, x, 1)
    if not (step > 0):
        raise LayoutError(f"the log-wavelength step {step} is not positive")
    resid = np.max(np.abs(x - (start + step * i))) / step
    if resid > tol_px:
        raise LayoutError(f"the wavelengths are not on one log-linear grid (off by {resid:.2f} pixel)")
    return PixelGrid("loglam", float(start), float(step), n)


def linear_grid_from(wave: np.ndarray, *, tol_px: float = 0.05) -> PixelGrid:
    """A linear PixelGrid for ``wave`` (Angstrom), or LayoutError."""
    w = np.asarray(wave, dtype=np.float64)
    n = len(w)
    if n < 2 or not np.all(np.isfinite(w)):
        raise LayoutError("the wavelength array is empty or not finite")
    step = (w[-1] - w[0]) / (n - 1)
    start = w[0]
    resid = np.max(np.abs(w - (start + step * np.arange(n)))) / step
    if not (step > 0) or resid > tol_px:
        raise LayoutError(f"the wavelengths are not on one linear grid (off by {resid:.2f} pixel)")
    # Snap to the step's own decimals (DESI: 0.8 A) so that arms land on one lattice exactly.
    step_r = round(step, 6)
    return PixelGrid("linear", float(round(start, 4)), float(step_r), n)


def median_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median per-pixel S/N |flux| * sqrt(ivar) over usable pixels, per row; NaN for none. (n,) float32."""
    good = ivar > 0
    s = np.abs(flux) * np.sqrt(np.where(good, ivar, 0))
    out = np.full(len(flux), np.nan, np.float32)
    for i in range(len(flux)):                  # a plain median per row: nanmedian is slow per call
        v = s[i][good[i]]
        v = v[np.isfinite(v)]
        if v.size:
            out[i] = np.median(v)
    return out


def row_median(values: np.ndarray, prefer: np.ndarray) -> np.ndarray:
    """(n,) median of each row's finite values where ``prefer``; rows with none: of all finite values; else NaN."""
    import warnings

    v = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows are expected
        out = np.nanmedian(np.where(prefer, v, np.nan), axis=1)
        miss = ~np.isfinite(out)
        if miss.any():
            out[miss] = np.nanmedian(v[miss], axis=1)
    return out


def segment_medians(values: np.ndarray, wave_aa: np.ndarray, split_aa: tuple[float, ...],
                    prefer: np.ndarray) -> np.ndarray:
    """(n, len(split_aa) + 1) per-row medians of ``values`` (n, m) in each wavelength segment."""
    edges = np.concatenate([[-np.inf], np.sort(split_aa), [np.inf]])
    out = np.full((len(values), len(edges) - 1), np.nan)
    for k in range(len(edges) - 1):
        sel = (wave_aa >= edges[k]) & (wave_aa < edges[k + 1])
        if sel.any():
            out[:, k] = row_median(values[:, sel], prefer[:, sel])
    return out


def iau_designation(ra_deg: float, dec_deg: float) -> str:
    """'JHHMMSS.ss+DDMMSS.s' (truncated, IAU style) of a position, '' if not finite."""
    if not (math.isfinite(ra_deg) and math.isfinite(dec_deg)):
        return ""
    ra_s = (ra_deg % 360.0) / 15.0 * 3600.0
    h, rem = divmod(ra_s, 3600.0)
    m, s = divmod(rem, 60.0)
    sign = "+" if dec_deg >= 0 else "-"
    d_s = abs(dec_deg) * 3600.0
    dd, rem = divmod(d_s, 3600.0)
    dm, ds = divmod(rem, 60.0)
    s = math.floor(s * 100) / 100
    ds = math.floor(ds * 10) / 10
    return f"J{int(h):02d}{int(m):02d}{s:05.2f}{sign}{int(dd):02d}{int(dm):02d}{ds:04.1f}"


def r_from_sigma_loglam(sigma_log10: np.ndarray) -> np.ndarray:
    """Resolving power lambda / FWHM from a Gaussian LSF sigma in log10(lambda) units."""
    s = np.asarray(sigma_log10, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 / (FWHM_PER_SIGMA * np.log(10.0) * s)
    return np.where(np.isfinite(r) & (s > 0), r, np.nan)
