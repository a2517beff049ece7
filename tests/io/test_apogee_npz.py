"""The apogee-npz loader (binspec/Payne .npz spectra): identification with reasons, values, frames."""
from __future__ import annotations

import numpy as np
import pytest

from distlabels.io.loaders import identify_file, loaders_for, read_file
from distlabels.io.loaders.apogee import aspcap_wavelength
from distlabels.io.loaders.apogee_npz import VISIT_WAVELENGTH_FILE, radec_from_designation
from distlabels.io.loaders.base import LayoutError
from tests.io import fits_factory as ff


def _combined(path, n_pix=7214, seed=0):
    rng = np.random.default_rng(seed)
    spec = (1 + 0.01 * rng.normal(size=n_pix)).astype(np.float32)
    err = np.full(n_pix, 0.005, np.float32)
    err[:10] = 1e4            # bad pixels carry huge errors in these files
    spec[10] = np.nan
    np.savez(path, spectrum=spec, spec_err=err)
    return spec, err


def test_designation_gives_coordinates_and_id():
    ra, dec, apid = radec_from_designation("apogee_2M06133561+2433362_visits.npz")
    assert apid == "2M06133561+2433362"
    assert ra == pytest.approx(15 * (6 + 13 / 60 + 35.61 / 3600), abs=1e-9)
    assert dec == pytest.approx(24 + 33 / 60 + 36.2 / 3600, abs=1e-9)
    ra, dec, _ = radec_from_designation("2M17335483-2753043.npz")
    assert dec == pytest.approx(-(27 + 53 / 60 + 4.3 / 3600)) and ra == pytest.approx(263.478458, abs=1e-5)
    assert radec_from_designation("spectrum.npz")[2] == ""


def test_combined_and_visit_files_are_read_with_their_frames(tmp_path):
    spec, err = _combined(tmp_path / "apogee_2M01020304+0506070_combined.npz")
    ld, lf = read_file(tmp_path / "apogee_2M01020304+0506070_combined.npz", loaders_for("apogee"))
    assert ld.name == "apogee-npz" and lf.n == 1
    np.testing.assert_allclose(lf.grid.wavelength_aa(), aspcap_wavelength())
    assert lf.facts.rv_frame == "rest" and lf.facts.flux_normalized and lf.facts.wavelength_medium == "vacuum"
    assert lf.rows["source_id"][0] == "apogee:npz:2M01020304+0506070:combined"
    assert lf.rows["ra"][0] == pytest.approx(15.512667, abs=1e-6) and lf.rows["dec"][0] == pytest.approx(5.101944, abs=1e-6)
    np.testing.assert_allclose(lf.ivar[0, 20:], 1 / err[20:].astype(np.float64) ** 2, rtol=1e-6)
    assert lf.mask[0, 10] and lf.ivar[0, 10] == 0 and lf.ivar[0, 0] < 1e-7

    rng = np.random.default_rng(1)
    vis = tmp_path / "apogee_2M01020304-0506070_visits.npz"
    np.savez(vis, spectra=1 + 0.01 * rng.normal(size=(2, 7214)), spec_errs=np.full((2, 7214), 0.01),
             snrs=np.array([80.0, 90.0], np.float32), vhelios=np.array([12.5, -3.0], np.float32),
             hjds=np.array([56000.25, 56010.75]))
    _, lv = read_file(vis, loaders_for("apogee"))
    assert lv.n == 2 and lv.facts.rv_frame == "observed" and lv.facts.velocity_frame == "heliocentric"
    assert lv.facts.bary_corr_applied and lv.rows["dec"][0] < 0
    np.testing.assert_allclose(lv.rows["survey_rv_kms"], [12.5, -3.0])
    np.testing.assert_allclose(lv.rows["mjd"], [55999.75, 56010.25])       # HJD - 2,400,000 - 0.5
    assert list(lv.rows["source_id"]) == ["apogee:npz:2M01020304-0506070:visit:56000.25000",
                                          "apogee:npz:2M01020304-0506070:visit:56010.75000"]
    assert set(lv.rows["star_id"]) == {"apogee:2M01020304-0506070"}


def test_visit_grid_needs_its_wavelength_file_and_is_sorted(tmp_path):
    n = 300
    wave = np.concatenate([np.linspace(16900, 16500, 100), np.linspace(16400, 15900, 100), np.linspace(15800, 15200, 100)])
    f = tmp_path / "apogee_2M00000000+0000000_visits.npz"
    flux = np.vstack([wave / 1e4, wave / 2e4])
    np.savez(f, spectra=flux, spec_errs=np.full((2, n), 0.01), vhelios=np.zeros(2))
    ld, why = identify_file(f)
    assert ld is None and VISIT_WAVELENGTH_FILE in why
    np.savez(tmp_path / VISIT_WAVELENGTH_FILE, wave=wave)
    _, lf = read_file(f, loaders_for("apogee"))
    w = lf.grid.wavelength_aa()
    assert np.all(np.diff(w) > 0)
    np.testing.assert_allclose(lf.flux[1], w / 2e4, rtol=1e-6)                # pixels follow their wavelengths


def test_other_files_are_refused_with_reasons(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "net.npz", w_array_0=rng.normal(size=(10, 5, 5)), x_min=np.zeros(5), x_max=np.ones(5))
    ld, why = identify_file(tmp_path / "net.npz")
    assert ld is None and "not apogee-npz: neither spectrum/spec_err" in why and "not apogee-apstar" in why
    np.savez(tmp_path / "odd.npz", spectrum=np.ones(500), spec_err=np.ones(500))
    ld, why = identify_file(tmp_path / "odd.npz")
    assert ld is None and "500 pixels" in why
    (tmp_path / "text.npz").write_text("not a zip")
    ld, why = identify_file(tmp_path / "text.npz")
    assert ld is None and "not a readable" in why
    fits = tmp_path / "spec-100001.fits"
    ff.write_lamost(fits, obsid=1, ra=1.0, dec=1.0, flux=np.ones(3909, np.float32), ivar=np.ones(3909, np.float32))
    from distlabels.io.loaders.apogee_npz import identify_apogee_npz
    from distlabels.io.loaders import open_fits

    with open_fits(fits) as hdul:
        assert identify_apogee_npz(hdul) == (False, "not an .npz file")
    with pytest.raises(LayoutError, match="no loader recognises"):
        read_file(tmp_path / "net.npz", loaders_for("apogee"))


def test_the_shared_files_are_recognised(shared_data):
    for name, n in (("apogee_2M13012770+5754582_combined.npz", 1), ("apogee_2M06133561+2433362_visits.npz", 3)):
        ld, lf = read_file(shared_data / name, loaders_for("auto"))
        assert ld.name == "apogee-npz" and lf.n == n and lf.grid.n_pix == 7214
    for other in ("payne_apogee_dwarf_nn.npz", "apogee_mask.npz", "apogee_wavelength.npz"):
        assert identify_file(shared_data / other)[0] is None
