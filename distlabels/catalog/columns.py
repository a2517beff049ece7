"""Names, units and display labels of catalog columns, shared by plots, FITS output and ``info``.

Label naming follows the emulators: ``teff`` [K], ``logg`` [dex, cgs], ``mh`` ([M/H], dex), and
abundances as ``<element>m`` ([X/M], dex: ``mgm`` is [Mg/M], ``nam`` [Na/M]); ``am`` or ``alpha_m``
is [alpha/M]; The Payne's APOGEE network uses ``feh`` and ``alphafe``. Velocities are km/s.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ABUNDANCE_EXCLUDE", "abundance_labels", "axis_label", "unit", "element"]

_ELEMENTS = {"c", "n", "o", "na", "mg", "al", "si", "s", "k", "ca", "ti", "v", "cr", "mn", "co", "ni", "cu",
             "sc", "ba", "ce", "nd", "zr", "y", "sr", "eu", "la", "p", "f", "fe", "zn", "rb", "li"}
_SPECIAL = {"teff": "Teff [K]", "logg": "log g [dex]", "mh": "[M/H] [dex]", "feh": "[Fe/H] [dex]",
            "am": "[α/M] [dex]", "alpha_m": "[α/M] [dex]", "alphafe": "[α/Fe] [dex]",
            "vmic": "v_mic [km/s]", "vmacro": "v_macro [km/s]", "vmac": "v_macro [km/s]",
            "vsini": "v sin i [km/s]", "rv": "RV [km/s]", "snr": "S/N per pixel", "chi2_red": "reduced χ²",
            "ra": "RA [deg]", "dec": "Dec [deg]"}
_UNITS = {"teff": "K", "rv": "km/s", "vmic": "km/s", "vmacro": "km/s", "vmac": "km/s", "vsini": "km/s",
          "ra": "deg", "dec": "deg", "bary_corr_kms": "km/s"}
_UNITLESS = {"snr", "chi2_red", "n_iter", "flags", "ingest_flags", "_healpix_29", "Norder", "Dir", "Npix"}
# labels that are not abundance ratios [X/M]
ABUNDANCE_EXCLUDE = ("teff", "logg", "mh", "feh", "vmic", "vmacro", "vmac", "vsini", "rv", "c12c13")


def _base(name: str) -> str:
    """The label a column describes: teff_err -> teff, true_mgm -> mgm."""
    if name.startswith("true_"):
        name = name[5:]
    return name[:-4] if name.endswith("_err") else name


def element(label: str) -> str | None:
    """Element symbol of an abundance label ``<el>m`` ('mgm' -> 'Mg'), else None."""
    if label.endswith("m") and label[:-1] in _ELEMENTS and label != "mh":
        return label[:-1].capitalize()
    return None


def abundance_labels(label_names: Sequence[str]) -> list[str]:
    """The labels of ``label_names`` that are abundance ratios ([X/M], [alpha/M], ...)."""
    return [n for n in label_names if n not in ABUNDANCE_EXCLUDE and (element(n) or n in ("am", "alpha_m", "alphafe"))]


def unit(name: str) -> str | None:
    """Unit of a catalog column ('K', 'km/s', 'deg', 'dex'), None when dimensionless or unknown.

    Labels that are not Teff, a velocity or a position are logarithmic: dex.
    """
    base = _base(name)
    if name in _UNITLESS or base in _UNITLESS:
        return None
    if base in _UNITS:
        return _UNITS[base]
    if base == "logg" or base in ("mh", "feh", "am", "alpha_m", "alphafe") or element(base):
        return "dex"
    return None


def axis_label(name: str) -> str:
    """A readable axis label with its unit: 'mgm' -> '[Mg/M] [dex]', 'teff_err' -> 'σ(Teff) [K]'."""
    base = _base(name)
    if base in _SPECIAL:
        text = _SPECIAL[base]
    elif element(base):
        text = f"[{element(base)}/M] [dex]"
    else:
        u = unit(base)
        text = f"{base} [{u}]" if u else base
    if name.endswith("_err"):
        label, _, rest = text.partition(" [")
        text = f"σ({label})" + (f" [{rest}" if rest else "")
    if name.startswith("true_"):
        text = "true " + text
    return text
