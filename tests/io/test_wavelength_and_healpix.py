import astropy.units as u
import numpy as np
from astropy_healpix import lonlat_to_healpix

from distlabels.healpix import choose_order, healpix29, parent_pixel
from distlabels.io.wavelength import air_to_vacuum, survey_grid, vacuum_to_air


def test_air_vacuum_known_lines_and_round_trip():
    # H-alpha and H-beta: air 6562.80 / 4861.33 A <-> vacuum 6564.61 / 4862.68 A (NIST).
    vac = air_to_vacuum(np.array([6562.80, 4861.33]))
    np.testing.assert_allclose(vac, [6564.61, 4862.68], atol=0.01)
    lam = np.linspace(3500, 10500, 1001)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(lam)), lam, atol=1e-6)


def test_lamost_grid_matches_documented_layout():
    wave, resolution, _ = survey_grid("lamost")
    assert len(wave) == 3909 and wave[0] == 3690.0
    np.testing.assert_allclose(np.diff(np.log10(wave)), 1e-4, rtol=1e-9)
    assert resolution == 1800.0


def test_parent_pixel_equals_healpix_at_lower_order():
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 360, 500), np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))
    hp29 = healpix29(ra, dec)
    for order in (0, 3, 7, 12):
        direct = lonlat_to_healpix(ra * u.deg, dec * u.deg, 2**order, order="nested")
        np.testing.assert_array_equal(parent_pixel(hp29, order), direct)


def test_choose_order():
    assert choose_order(100, 1000) == 0
    assert choose_order(12 * 4**3 * 1000, 1000) == 3
