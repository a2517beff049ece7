"""Survey FITS loaders behind one registry, with auto-detection from the HDU structure.

Each loader module registers its readers::

    @register_loader("lamost", survey="lamost", identify=identify_lamost)
    def load_lamost(hdul, path, options) -> LoadedFile: ...

``identify(path_or_hdul) -> (bool, reason)`` looks only at headers and HDU shapes and says why it
refused a file, so a file that no loader takes lands in the quarantine with every loader's reason.
:func:`detect` runs the identifiers in registration order; :func:`read_file` opens a file once,
detects (or checks) its loader and reads it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from .base import LayoutError, LoadedFile, LoaderOptions, PixelGrid, SurveyFacts

SURVEYS = ("lamost", "desi", "boss", "apogee")


@dataclass(frozen=True)
class Loader:
    name: str                 # registry key, e.g. "apogee-apstar"
    survey: str               # lamost | desi | boss | apogee
    load: Callable            # (hdul, path, options) -> LoadedFile
    identify: Callable        # (path_or_hdul) -> (bool, reason)
    doc: str


LOADERS: dict[str, Loader] = {}


def _accepting_paths(identify):
    """Let an identifier take a path too: it is opened lazily (headers only) and closed again."""
    def wrapped(path_or_hdul):
        if isinstance(path_or_hdul, (str, os.PathLike)):
            with open_fits(path_or_hdul) as hdul:
                return identify(hdul)
        return identify(path_or_hdul)
    wrapped.__name__ = getattr(identify, "__name__", "identify")
    wrapped.__doc__ = identify.__doc__
    return wrapped


def register_loader(name: str, *, identify: Callable, survey: str | None = None):
    """Decorator: register ``func(hdul, path, options) -> LoadedFile`` under ``name``."""
    survey = survey or name.split("-")[0]
    if survey not in SURVEYS:
        raise ValueError(f"unknown survey {survey!r}")

    def deco(func):
        if name in LOADERS:
            raise ValueError(f"loader {name!r} registered twice")
        LOADERS[name] = Loader(name, survey, func, _accepting_paths(identify), (func.__doc__ or "").strip())
        return func
    return deco


def open_fits(path: str | os.PathLike):
    """astropy HDUList, lazily loaded, not memory-mapped (many small files: plain reads are faster).

    An ``.npz`` path opens as :class:`.apogee_npz.NpzSpectraFile` instead (FITS identifiers refuse it).
    """
    if str(path).lower().endswith(".npz"):
        from .apogee_npz import NpzSpectraFile

        return NpzSpectraFile(path)
    from astropy.io import fits

    return fits.open(path, memmap=False, lazy_load_hdus=True)


def loaders_for(survey: str = "auto") -> list[Loader]:
    _ensure_registered()
    if survey == "auto":
        return list(LOADERS.values())
    found = [ld for ld in LOADERS.values() if ld.survey == survey or ld.name == survey]
    if not found:
        raise KeyError(survey)
    return found


def detect(hdul, candidates: list[Loader] | None = None) -> tuple[Loader | None, dict[str, str]]:
    """(first loader whose identifier accepts ``hdul`` or None, {loader name: reason} of every verdict)."""
    reasons: dict[str, str] = {}
    for ld in candidates if candidates is not None else loaders_for("auto"):
        try:
            ok, why = ld.identify(hdul)
        except Exception as e:  # a header so broken that even identification fails
            ok, why = False, f"{type(e).__name__}: {e}"
        reasons[ld.name] = why
        if ok:
            return ld, reasons
    return None, reasons


def identify_file(path: str | os.PathLike, survey: str = "auto") -> tuple[Loader | None, str]:
    """(loader or None, reason) for a path; never raises for unreadable files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_fits(path) as hdul:
                ld, reasons = detect(hdul, loaders_for(survey))
    except Exception as e:
        return None, f"not a readable FITS file ({type(e).__name__}: {e})"
    if ld is None:
        return None, "; ".join(f"not {k}: {v}" for k, v in reasons.items())
    return ld, reasons[ld.name]


def read_file(path: str | os.PathLike, loaders: list[Loader], options: LoaderOptions | None = None
              ) -> tuple[Loader, LoadedFile]:
    """Open ``path``, pick the first of ``loaders`` that identifies it, read it.

    Raises LayoutError (a file no candidate takes, or a layout error) or the reading error;
    the caller quarantines the file with the message.
    """
    options = options or LoaderOptions()
    with warnings.catch_warnings():
        # astropy only warns about a truncated file (and reads zeros): make that an error. Other
        # warnings (non-standard cards it repairs) are not reasons to lose a spectrum.
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*truncated.*")
        with open_fits(path) as hdul:
            ld, reasons = detect(hdul, loaders)
            if ld is None:
                known = _known_layout(hdul, loaders)
                raise LayoutError(known or ("no loader recognises the file: "
                                            + "; ".join(f"not {k}: {v}" for k, v in reasons.items())))
            return ld, ld.load(hdul, str(path), options)


def _known_layout(hdul, exclude: list[Loader]) -> str | None:
    """For a file refused by the run's loaders: name its layout if another loader knows it."""
    others = [ld for ld in loaders_for("auto") if ld not in exclude]
    ld, _ = detect(hdul, others)
    if ld is None:
        return None
    want = sorted({x.name for x in exclude})
    return (f"a {ld.name} file, foreign to this ingest (which reads {', '.join(want)}): "
            "one store holds one survey's grid")


def _ensure_registered() -> None:
    """Loader modules register themselves on import (at the end of this module)."""


__all__ = ["LOADERS", "SURVEYS", "LayoutError", "LoadedFile", "Loader", "LoaderOptions", "PixelGrid",
           "SurveyFacts", "detect", "identify_file", "loaders_for", "open_fits", "read_file", "register_loader"]

# Registration order is detection order: most specific identifiers first.
from . import lamost, boss, desi, apogee, apogee_npz  # noqa: E402,F401  (register on import)
