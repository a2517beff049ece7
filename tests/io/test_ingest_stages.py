"""The pure ingest stages (map -> plan -> reduce) without a cluster, and their helpers."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from distlabels import paths
from distlabels.errors import DistlabelsError
from distlabels.io.ingest import (IngestFlag, IngestSpec, choose_family, expand_inputs, map_task, read_quarantine,
                                  task_name)
from distlabels.io.ingest_plan import (HIST_ORDER, GridPlan, choose_primary, pixel_range, plan_partitions, plan_task,
                                       reduce_partition)
from distlabels.io.store import list_to_numpy
from tests.io import fits_factory as ff


def run_stages(root, files, spec, max_rows=1000, batch=3):
    """map -> plan -> reduce in this process, as the Dask graph does; returns (plan, store table)."""
    root.mkdir(parents=True, exist_ok=True)
    results = [map_task(i, task_name(i, b, spec), b, spec, str(root))
               for i, b in enumerate([files[k:k + batch] for k in range(0, len(files), batch)])]
    map_files = {r["index"]: r["map_file"] for r in results}
    plan = plan_task(str(root), [map_files[i] for i in sorted(map_files)], spec.target,
                     {k: v for r in results for k, v in r["tables"].items()})
    parts = plan_partitions(np.array(plan["hist_pix"]), np.array(plan["hist_counts"]), HIST_ORDER, max_rows)
    for o, p, _ in parts:
        reduce_partition(str(root), o, p, plan["grid"], map_files, max_rows)
    frags = paths.list_fragments(root)
    table = pq.ParquetDataset(frags).read() if frags else None
    return plan, results, table


def test_expand_inputs_dirs_globs_lists_and_missing(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.fits", "a/b/y.fits.gz", "a/b/z.FIT", "a/notes.md", "c.fits"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# inputs\nc.fits\na/b/y.fits.gz  # again below\n")
    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.fits"), str(tmp_path / "list.txt")])
    names = sorted(p.split(str(tmp_path) + "/")[1] for p in got)
    assert names == ["a/b/y.fits.gz", "a/b/z.FIT", "a/x.fits", "c.fits"]      # unique, .md skipped
    with pytest.raises(DistlabelsError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope*.fits")])


def test_choose_family_refuses_mixed_inputs_but_tolerates_strays(tmp_path):
    lam = [tmp_path / f"spec-{100000 + k}.fits" for k in range(5)]
    ff.lamost_set(tmp_path, n=5)
    boss = []
    for k in range(4):
        boss.append(tmp_path / f"spec-1-2-{k}.fits")
        ff.write_boss(boss[-1], plate=1, mjd=2, fiber=k, ra=1.0, dec=1.0, flux=np.ones(50, np.float32),
                      ivar=np.ones(50, np.float32))
    fam, counts = choose_family([str(p) for p in lam + boss[:1]])
    assert fam == "lamost" and counts == {"lamost": 5, "boss": 1}
    with pytest.raises(DistlabelsError, match="mix files of several surveys"):
        choose_family([str(p) for p in lam + boss])
    with pytest.raises(DistlabelsError, match="none of the"):
        choose_family([str(p) for p in lam], survey="desi")


def test_plan_partitions_cover_without_overlap_and_respect_the_limit():
    rng = np.random.default_rng(3)
    dense = rng.integers(0, 8, 3000)                      # a few crowded order-8 pixels near pixel 0
    sparse = rng.integers(0, 12 * 4**8, 2000)
    pix, cnt = np.unique(np.concatenate([dense, sparse]), return_counts=True)
    parts = plan_partitions(pix, cnt, 8, max_rows=400)
    assert sum(n for *_, n in parts) == cnt.sum()
    cover = np.zeros(12 * 4**8, int)                      # every order-8 pixel in exactly one partition
    for o, p, n in parts:
        lo, hi = pixel_range(o, p)
        a, b = lo >> 2 * (29 - 8), hi >> 2 * (29 - 8)
        cover[a:b] += 1
        assert n <= 400 or o == 8
    assert cover.max() == 1 and (cover[pix] == 1).all()
    assert {o for o, *_ in parts} >= {0, 8}               # sparse sky merged up, crowded pixels stay fine


def test_choose_primary_prefers_unflagged_then_snr_then_id():
    star = np.array(["a", "a", "a", "b", "b", "c"], object)
    flags = np.array([0, 4, 0, 0, 0, 1])
    snr = np.array([10.0, 99.0, 20.0, np.nan, 5.0, np.nan])
    sid = np.array(["a1", "a2", "a3", "b1", "b2", "c1"], object)
    np.testing.assert_array_equal(choose_primary(star, flags, snr, sid), [False, False, True, False, True, True])


def test_stages_align_lamost_grids_by_index_and_read_back_exactly(tmp_path):
    recs = ff.lamost_set(tmp_path / "in", n=5, seed=2) + ff.lamost_set(tmp_path / "in", n=3, seed=4, layout="table",
                                                                        start_obsid=300000)
    files = expand_inputs([str(tmp_path / "in")])
    plan, results, t = run_stages(tmp_path / "store", files, IngestSpec(family="lamost"), max_rows=3)
    g = GridPlan(**{**plan["grid"], "table": None})
    wave = g.wavelength_aa()
    assert t.num_rows == 8 and sorted(t.column("source_id").to_pylist()) == sorted(r["source_id"] for r in recs)
    assert t.column("primary").to_pylist() == [True] * 8
    flux, ivar = list_to_numpy(t.column("flux"), g.n_pix), list_to_numpy(t.column("ivar"), g.n_pix)
    mask = list_to_numpy(t.column("mask"), g.n_pix, np.bool_)
    ids = t.column("source_id").to_pylist()
    for rec in recs:
        i = ids.index(rec["source_id"])
        o = int(np.argmin(np.abs(np.log10(wave) - rec["coeff0"])))        # the file's first pixel on the store grid
        assert np.log10(wave[o]) == pytest.approx(rec["coeff0"], abs=1e-9)
        sl = slice(o, o + rec["n_pix"])
        np.testing.assert_array_equal(flux[i, sl], rec["flux"])
        bad = (rec["andmask"] != 0) | ~np.isfinite(rec["flux"])
        np.testing.assert_array_equal(ivar[i, sl], np.where(bad, 0, rec["ivar"]))
        outside = np.ones(g.n_pix, bool)
        outside[sl] = False
        assert np.isnan(flux[i, outside]).all() and (ivar[i, outside] == 0).all() and mask[i, outside].all()
    hp = t.column(paths.HEALPIX_COLUMN).to_numpy()
    for f in paths.list_fragments(tmp_path / "store"):       # every row sits in its pixel directory
        o, p = paths.parse_pixel_dir(f)
        h = pq.read_table(f, columns=[paths.HEALPIX_COLUMN]).column(0).to_numpy()
        assert np.all((h >> 2 * (29 - o)) == p) and len(h) <= 3
    assert len(hp) == 8


def test_unusable_spectra_are_kept_flagged_and_duplicates_quarantined(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    n = ff.LAMOST_NPIX
    ff.write_lamost(d / "nan.fits", obsid=1, ra=10.0, dec=10.0, flux=np.full(n, np.nan, np.float32),
                    ivar=np.ones(n, np.float32))
    ff.write_lamost(d / "zero.fits", obsid=2, ra=10.0, dec=10.0, flux=np.ones(n, np.float32),
                    ivar=np.zeros(n, np.float32), fibermask=2)
    ff.write_lamost(d / "nocoord.fits", obsid=3, ra=np.nan, dec=np.nan, flux=np.ones(n, np.float32),
                    ivar=np.ones(n, np.float32))
    ff.write_lamost(d / "galaxy.fits", obsid=4, ra=1.0, dec=1.0, flux=np.ones(n, np.float32),
                    ivar=np.ones(n, np.float32), cls="GALAXY")
    ff.write_lamost(d / "ok.fits", obsid=5, ra=1.0, dec=1.0, flux=np.ones(n, np.float32), ivar=np.ones(n, np.float32))
    shutil.copy(d / "ok.fits", d / "ok-again.fits")             # the same spectrum under another name
    files = expand_inputs([str(d)])
    plan, results, t = run_stages(tmp_path / "store", files, IngestSpec(family="lamost"), batch=2)
    flags = dict(zip(t.column("source_id").to_pylist(), t.column("ingest_flags").to_pylist()))
    unusable = IngestFlag.NO_POSITIVE_IVAR | IngestFlag.LOW_COVERAGE          # no usable pixel at all
    assert flags == {"lamost:1": IngestFlag.NO_FINITE_FLUX | unusable, "lamost:3": IngestFlag.BAD_COORDS,
                     "lamost:2": unusable | IngestFlag.SURVEY_FLAGGED, "lamost:5": 0}
    assert np.isnan(t.column("ra").to_numpy()[t.column("source_id").to_pylist().index("lamost:3")])
    assert sum(r["n_excluded"] for r in results) == 1            # the galaxy: read, not selected
    q = read_quarantine(tmp_path / "store").to_pylist()
    assert len(q) == 1 and q[0]["source_id"] is None and "duplicate of lamost:5" in q[0]["reason"]
    assert q[0]["path"].endswith("ok.fits") and plan["n_duplicates"] == 1    # ok-again.fits sorts first, wins


def test_select_expression_and_idempotent_map_task(tmp_path):
    from distlabels.catalog.query import parse_where
    from distlabels.io.ingest import SELECT_SCHEMA

    ff.lamost_set(tmp_path / "in", n=6, seed=1)
    files = expand_inputs([str(tmp_path / "in")])
    spec = IngestSpec(family="lamost", select=parse_where("snr > 45 and is_star", SELECT_SCHEMA),
                      select_text="snr > 45 and is_star")
    (tmp_path / "s").mkdir()
    r1 = map_task(0, task_name(0, files, spec), files, spec, str(tmp_path / "s"))
    mf = tmp_path / "s" / r1["map_file"]
    snr = pq.read_table(mf, columns=["snr"]).column(0).to_numpy()
    assert 0 < r1["n_selected"] < 6 and (snr > 45).all() and r1["n_excluded"] == 6 - r1["n_selected"]
    before = mf.stat().st_mtime_ns
    r2 = map_task(0, task_name(0, files, spec), files, spec, str(tmp_path / "s"))
    assert r2["n_selected"] == r1["n_selected"] and mf.stat().st_mtime_ns == before   # a retry does no work


def test_table_grids_must_match_and_apvisit_needs_a_model_grid(tmp_path):
    path = ff.write_aspcapstar(tmp_path / "a1.fits", apogee_id="2M1", n_pix=7214)
    ff.write_aspcapstar(tmp_path / "a2.fits", apogee_id="2M2", n_pix=7214, seed=1)
    plan, _, t = run_stages(tmp_path / "s", expand_inputs([str(tmp_path)]), IngestSpec(family="apogee-aspcapstar"))
    assert t.num_rows == 2 and plan["grid"]["kind"] == "table" and len(plan["grid"]["table"]) == 7214
    assert path["apogee_id"] == "2M1"
    h = fits.Header()
    h["OBJID"], h["TELESCOP"] = "2M3", "apo25m"
    w = np.tile(np.linspace(15990, 15000, 50), (3, 1)) + np.arange(3)[::-1, None] * 1000
    fits.HDUList([fits.PrimaryHDU(header=h)] + [fits.ImageHDU(np.ones((3, 50), np.float32)) for _ in range(3)]
                 + [fits.ImageHDU(w)]).writeto(tmp_path / "v.fits")
    (tmp_path / "sv").mkdir()
    spec = IngestSpec(family="apogee-apvisit")
    r = map_task(0, "m", [str(tmp_path / "v.fits")], spec, str(tmp_path / "sv"))
    q = read_quarantine(tmp_path / "sv").to_pylist()
    assert r["n_files_quarantined"] == 1 and "--grid MODEL_DIR" in q[0]["reason"]


def test_reduce_is_idempotent_and_resumes_from_done_markers(tmp_path):
    ff.lamost_set(tmp_path / "in", n=4, seed=9)
    files = expand_inputs([str(tmp_path / "in")])
    spec = IngestSpec(family="lamost")
    run_stages(tmp_path / "s", files, spec, max_rows=2)
    frags = paths.list_fragments(tmp_path / "s")
    stamp = {f: f.stat().st_mtime_ns for f in frags}
    _, _, t = run_stages(tmp_path / "s", files, spec, max_rows=2)         # a retried run: markers say done
    assert {f: f.stat().st_mtime_ns for f in paths.list_fragments(tmp_path / "s")} == stamp and t.num_rows == 4
