"""A real fit run on a 2-worker LocalCluster, checked against the mock's truth."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from distlabels import open_catalog, paths
from distlabels.config import FitConfig, RunConfig
from distlabels.errors import DistlabelsError
from distlabels.fit import NOT_FITTED, Flag
from distlabels.io.store import open_store
from distlabels.models import load
from distlabels.pipeline import GridSpec, fit_partition, run_fit
from distlabels.pipeline.run import pack_rows_for
from distlabels.pipeline.worker import pack_partitions
from tests.conftest import BAD_ROWS


def _catalog_df(root):
    return pd.read_parquet(root / paths.DATASET_DIR)


def test_every_input_star_exactly_once(fitted_catalog, mock_store):
    root, summary = fitted_catalog
    assert summary.n_failed == 0 and summary.n_done == summary.n_partitions
    ids_in = sorted(open_store(mock_store).source_ids())
    ids_out = _catalog_df(root)["source_id"].tolist()
    assert len(ids_out) == len(set(ids_out))          # no duplicates
    assert sorted(ids_out) == ids_in                  # nothing lost


def test_labels_recover_truth_at_snr50(fitted_catalog):
    df = _catalog_df(fitted_catalog[0])
    good = df[~df.source_id.isin(list(BAD_ROWS))]
    assert len(good) >= 200
    for name in ("teff", "logg", "mh", "rv"):
        pull = (good[name] - good[f"true_{name}"]) / good[f"{name}_err"]
        frac = np.mean(np.abs(pull) < 3)
        assert frac >= 0.95, f"{name}: only {frac:.1%} of stars within 3 sigma"
    assert ((good["flags"] & int(NOT_FITTED)) == 0).all()


def test_bad_spectra_are_in_the_catalog_flagged(fitted_catalog):
    df = _catalog_df(fitted_catalog[0]).set_index("source_id")
    assert df.loc["bad:nan-flux", "flags"] & Flag.BAD_INPUT
    assert df.loc["bad:zero-ivar", "flags"] & Flag.BAD_INPUT
    assert df.loc["bad:few-pixels", "flags"] & Flag.FEW_PIXELS
    assert df.loc[list(BAD_ROWS), "teff"].isna().all()


def test_rerun_does_no_work_and_changes_nothing(fitted_catalog, bossbrain_model_dir, mock_store):
    root, first = fitted_catalog
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in paths.list_fragments(root)}
    again = run_fit(bossbrain_model_dir, mock_store, root, RunConfig(workers=2, task_rows=40, progress=False))
    assert again.n_done == 0 and again.n_skipped == first.n_partitions and again.n_rows_fitted == 0
    after = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in paths.list_fragments(root)}
    assert before == after


def test_rerun_with_other_settings_is_refused(fitted_catalog, bossbrain_model_dir, mock_store):
    cfg = RunConfig(workers=1, task_rows=40, progress=False, fit=FitConfig(continuum_degree=2))
    with pytest.raises(DistlabelsError, match="config_hash"):
        run_fit(bossbrain_model_dir, mock_store, fitted_catalog[0], cfg)


def test_query_returns_exactly_the_expected_rows(fitted_catalog):
    root = fitted_catalog[0]
    df = _catalog_df(root)
    expect = set(df[(df.teff < 4500) & (df.logg < 2.0) & ((df["flags"] & 1) == 0)].source_id)
    got = open_catalog(root).query(where="teff < 4500 and logg < 2.0 and flags & 1 == 0", columns=["source_id"])
    assert set(got.column("source_id").to_pylist()) == expect and got.num_rows == len(expect)
    n_duck = duckdb.sql(f"select count(*) from read_parquet('{root}/dataset/**/*.parquet', hive_partitioning=true)"
                        " where teff < 4500 and logg < 2.0 and (flags & 1) = 0").fetchall()[0][0]
    assert n_duck == len(expect)


def test_fit_partition_alone_matches_the_cluster_run(fitted_catalog, bossbrain_model_dir, mock_store):
    """The pure per-partition function, without a cluster, gives the rows the run wrote."""
    store = open_store(mock_store)
    part = store.partitions(40)[0]
    out = fit_partition(store.read(part), load(bossbrain_model_dir), FitConfig(), GridSpec.from_store_meta(store.meta))
    written = pq.read_table(paths.fragment_path(fitted_catalog[0], part.norder, part.npix, part.name))
    assert out.column("source_id").to_pylist() == written.column("source_id").to_pylist()
    a, b = out.column("teff").to_numpy(), written.column("teff").to_numpy()
    err = written.column("teff_err").to_numpy()
    ok = np.isfinite(b)
    np.testing.assert_array_less(np.abs(a[ok] - b[ok]), 0.05 * err[ok] + 1e-3)


def test_packed_tasks_write_the_same_catalog(fitted_catalog, bossbrain_model_dir, mock_store, client, tmp_path):
    """Partitions packed into tasks of up to 130 rows (as GPU runs do by default: one kernel call for
    several fragments) write one catalog fragment per partition with the rows, flags and labels of
    the one-partition-per-task run (labels within 0.05 sigma: a batch shares its approximate curvature)."""
    parts = open_store(mock_store).partitions(40)
    packs = pack_partitions(parts, 130)
    assert len(packs) < len(parts) and max(sum(p.n_rows for p in g) for g in packs) <= 130
    assert pack_rows_for(RunConfig()) == 0 and pack_rows_for(RunConfig(cluster="local-cuda")) == 32768
    out = tmp_path / "packed"
    s = run_fit(bossbrain_model_dir, mock_store, out, RunConfig(task_rows=40, pack_rows=130, progress=False),
                client=client)
    assert s.status == "complete" and s.n_done == len(parts) and s.n_failed == 0
    assert sorted(p.name for p in out.rglob("*.parquet") if "Npix=" in str(p.parent)) == \
        sorted(p.name for p in fitted_catalog[0].rglob("*.parquet") if "Npix=" in str(p.parent))
    log = [json.loads(line) for line in (out / paths.RUN_LOG).read_text().splitlines()]
    assert max(r.get("packed_with", 0) for r in log) > 1                   # packs really ran
    a = _catalog_df(out).set_index("source_id").sort_index()
    b = _catalog_df(fitted_catalog[0]).set_index("source_id").sort_index()
    assert a.index.tolist() == b.index.tolist()
    np.testing.assert_array_equal(a["flags"].to_numpy(), b["flags"].to_numpy())
    for name in ("teff", "logg", "mh"):
        ok = np.isfinite(b[name].to_numpy())
        dev = np.abs(a[name].to_numpy()[ok] - b[name].to_numpy()[ok]) / b[f"{name}_err"].to_numpy()[ok]
        assert float(dev.max()) < 0.05, (name, dev.max())
