"""``compact``: every row exactly once, same answers, one file per pixel, safe at every step."""
from __future__ import annotations

import json
import shutil
import threading

import duckdb
import numpy as np
import pandas as pd
import pytest

from distlabels import paths
from distlabels.catalog.compact import compact_catalog, recover
from distlabels.catalog.query import open_catalog
from distlabels.catalog.writer import fragment_done
from distlabels.errors import DistlabelsError
from distlabels.healpix import parent_pixel
from tests.catalog.conftest import ORDER
from tests.catalog.helpers import MIXED_MAX_ROWS
from tests.catalog.helpers import copy_catalog


class Crash(Exception):
    pass


def _ids(root) -> list[str]:
    """Every source_id as DuckDB reads the files (not distlabels' reader), sorted, duplicates kept."""
    rows = duckdb.sql(f"select source_id from read_parquet('{root}/dataset/**/*.parquet')").fetchall()
    return sorted(r[0] for r in rows)


def _n_pixels(df) -> int:
    return len(np.unique(parent_pixel(df[paths.HEALPIX_COLUMN].to_numpy(), ORDER)))


@pytest.fixture
def cat_copy(mock_catalog, tmp_path):
    return copy_catalog(mock_catalog.root, tmp_path / "cat")


def test_compact_keeps_every_row_once_and_same_answers(cat_copy, mock_catalog) -> None:
    df = mock_catalog.df
    before = open_catalog(cat_copy)
    queries = [dict(where="teff > 5000 and flags & 4 == 0", columns=["source_id", "teff"]),
               dict(cone=(45.0, 30.0, 12.0), columns=["source_id", "ra"]),
               dict(where="survey == 'boss'", cone=(200.0, -60.0, 25.0), columns=["source_id", "mh"])]
    answers = [before.query(**q).sort_by("source_id") for q in queries]
    n_files = len(before.fragments)
    assert n_files > _n_pixels(df)  # even pixels hold two fragments

    s = compact_catalog(cat_copy, max_rows=0)  # one file per pixel, no merging across pixels
    assert s.n_files_before == n_files and s.n_files_after == _n_pixels(df) == s.n_pixels
    assert s.n_rows == len(df) and s.n_compacted == n_files - _n_pixels(df)
    assert _ids(cat_copy) == sorted(df.source_id)  # exactly once, as another tool sees it
    after = open_catalog(cat_copy)
    for q, a in zip(queries, answers):  # NaN-aware comparison of the same rows and values
        pd.testing.assert_frame_equal(after.query(**q).sort_by("source_id").to_pandas(), a.to_pandas())
    merged = [f for f in after.fragments if f.name.startswith("Npix=")]
    assert merged and all(f.name == f"{f.parent.name}.parquet" for f in merged)
    hp = after.query(columns=["_healpix_29"], where=f"Npix == {paths.parse_pixel_dir(merged[0])[1]}")
    assert np.all(np.diff(hp.column("_healpix_29").to_numpy()) >= 0)  # rows in spatial order
    assert not (cat_copy / paths.STAGING_DIR).exists()
    meta = json.loads((cat_copy / "catalog.json").read_text())
    assert meta["n_fragments"] == _n_pixels(df) and meta["model_id"] == "payne-test-1"  # description kept

    again = compact_catalog(cat_copy, max_rows=0)  # idempotent
    assert again.n_compacted == 0 and again.n_files_after == _n_pixels(df)
    assert _ids(cat_copy) == sorted(df.source_id)


@pytest.mark.parametrize("max_rows", [0, MIXED_MAX_ROWS], ids=["per-pixel", "mixed-orders"])
def test_compacted_catalog_is_strictly_valid_hats_and_opens_in_lsdb(cat_copy, mock_catalog, max_rows) -> None:
    import lsdb
    from hats.io.validation import is_valid_catalog

    compact_catalog(cat_copy, max_rows=max_rows)
    assert is_valid_catalog(cat_copy, strict=True)
    got = lsdb.open_catalog(cat_copy, columns=["source_id"]).compute()
    assert sorted(got.source_id) == sorted(mock_catalog.df.source_id)


def test_merged_fragments_still_count_as_written(cat_copy, mock_catalog) -> None:
    names = {(paths.parse_pixel_dir(f.relative_to(cat_copy)), f.stem) for f in open_catalog(cat_copy).fragments}
    s = compact_catalog(cat_copy, max_rows=MIXED_MAX_ROWS)  # most fragments end in a coarser pixel's file
    assert s.n_partitions < s.n_pixels
    for (norder, npix), stem in names:
        assert fragment_done(cat_copy, norder, npix, stem)
    (norder, npix), stem = next(iter(names))
    assert not fragment_done(cat_copy, norder, npix, "part-7777")
    assert not fragment_done(cat_copy, norder, npix + 1 if npix < 191 else npix - 1, "part-7777")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("step", ["staged", "moved_aside", "swapped"])
def test_crash_at_any_step_loses_nothing(cat_copy, mock_catalog, exchange, step) -> None:
    if exchange and step == "moved_aside":
        pytest.skip("the atomic exchange has no intermediate step")
    expected = sorted(mock_catalog.df.source_id)

    def hook(where: str) -> None:
        if where == step:
            raise Crash(where)

    with pytest.raises(Crash):
        compact_catalog(cat_copy, max_rows=MIXED_MAX_ROWS, use_exchange=exchange, hook=hook)
    if step == "moved_aside":  # the two-rename fallback's window: dataset/ is away, nothing is read
        assert not (cat_copy / paths.DATASET_DIR).exists()
    else:
        ids = _ids(cat_copy)
        assert len(ids) == len(set(ids))  # never a duplicate, whatever the step
        assert ids == expected
    recover(cat_copy)
    assert _ids(cat_copy) == expected
    s = compact_catalog(cat_copy, max_rows=MIXED_MAX_ROWS, use_exchange=exchange)  # a new compact completes the job
    assert _ids(cat_copy) == expected and s.n_files_after == s.n_partitions < _n_pixels(mock_catalog.df)
    assert not (cat_copy / paths.STAGING_DIR).exists()


def test_readers_never_see_duplicates_or_losses_during_compact(cat_copy, mock_catalog) -> None:
    expected = sorted(mock_catalog.df.source_id)
    cat = open_catalog(cat_copy)
    seen, stop, bad = [], threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                got = sorted(cat.query(columns=["source_id"]).column("source_id").to_pylist())
            except DistlabelsError:  # a file swapped away three times in a row: an error, never wrong rows
                continue
            seen.append(len(got))
            if got != expected:
                bad.append(len(got))

    th = threading.Thread(target=reader)
    th.start()
    try:
        compact_catalog(cat_copy, max_rows=MIXED_MAX_ROWS)
    finally:
        stop.set()
        th.join()
    assert seen and not bad


def test_compact_refuses_a_running_fit(cat_copy) -> None:
    (cat_copy / paths.RUN_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00Z", "status": "running"}))
    with pytest.raises(DistlabelsError, match="has started and not finished") as info:
        compact_catalog(cat_copy)
    assert "\n" not in str(info.value)
    (cat_copy / paths.RUN_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00Z"}))  # an older record
    with pytest.raises(DistlabelsError, match="has started and not finished"):
        compact_catalog(cat_copy)
    assert compact_catalog(cat_copy, force=True).n_compacted > 0


def test_rerun_after_compact_does_no_work(fitted_catalog, tmp_path, bossbrain_model_dir, mock_store) -> None:
    from distlabels.config import RunConfig
    from distlabels.pipeline import run_fit

    root = tmp_path / "fitted"
    shutil.copytree(fitted_catalog[0], root)
    before = _ids(root)
    s = compact_catalog(root, min_files=1)  # every fragment merged into its pixel's Npix=N.parquet
    assert s.n_compacted == s.n_pixels and _ids(root) == before
    assert all(f.name.startswith("Npix=") for f in open_catalog(root).fragments)
    again = run_fit(bossbrain_model_dir, mock_store, root, RunConfig(workers=1, task_rows=40, progress=False))
    assert again.n_done == 0 and again.n_skipped == fitted_catalog[1].n_partitions
    assert _ids(root) == before


def test_recover_puts_back_a_pixel_left_by_an_older_per_pixel_swap(cat_copy, mock_catalog) -> None:
    # an older compact swapped one pixel directory at a time and could stop between its two renames
    frag = open_catalog(cat_copy).fragments[0]
    live = frag.parent
    legacy = cat_copy / paths.STAGING_DIR / live.parent.parent.name / live.parent.name / f"{live.name}.old"
    legacy.parent.mkdir(parents=True)
    live.rename(legacy)
    assert len(_ids(cat_copy)) < len(mock_catalog.df)
    assert recover(cat_copy) == 1
    assert _ids(cat_copy) == sorted(mock_catalog.df.source_id) and not (cat_copy / paths.STAGING_DIR).exists()
