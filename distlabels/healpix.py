"""Sky indexing: nested HEALPix at order 29 (the HATS spatial index) and its coarser parents."""
from __future__ import annotations

import numpy as np

ORDER_MAX = 29


def healpix29(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Nested HEALPix index at order 29 of each position. ra_deg, dec_deg: (n,) -> (n,) int64."""
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    bad = ~np.isfinite(ra) | ~np.isfinite(dec) | (np.abs(dec) > 90)
    ra = np.where(bad, 0.0, ra)
    dec = np.where(bad, 0.0, dec)
    return np.asarray(lonlat_to_healpix(ra * u.deg, dec * u.deg, 2**ORDER_MAX, order="nested"),
                      dtype=np.int64)


def parent_pixel(hp29: np.ndarray, order: int) -> np.ndarray:
    """Nested index at ``order`` of the order-29 indices ``hp29``: a bit shift in the nested scheme."""
    return np.asarray(hp29, dtype=np.int64) >> (2 * (ORDER_MAX - int(order)))


def choose_order(n_rows: int, max_rows: int, max_order: int = 10) -> int:
    """Lowest order whose mean pixel holds <= max_rows rows (uniform sky assumed)."""
    order = 0
    while order < max_order and n_rows / (12 * 4**order) > max_rows:
        order += 1
    return order
