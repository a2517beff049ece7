"""Row-count-adaptive partitions (compact merges sibling pixels upward) and queries on mixed orders.

Expectations come from the generated rows (numpy, astropy separations), DuckDB, hats and LSDB,
or, for the partition plan, from the HATS rule computed pixel by pixel.
"""
from __future__ import annotations

import warnings

import astropy.units as u
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from distlabels import paths
from distlabels.catalog.compact import compact_catalog
from distlabels.catalog.partitioning import plan_partitions
from distlabels.catalog.query import open_catalog
from distlabels.catalog.writer import fragment_done, write_catalog_fragment, write_catalog_meta
from distlabels.healpix import healpix29, parent_pixel
from distlabels.io.location import Location
from tests.catalog.conftest import LABELS, ORDER, make_rows
from tests.catalog.helpers import MIXED_MAX_ROWS, CountingHandler, copy_catalog


def _hats_rule(counts: dict[int, int], order: int, max_rows: int) -> dict[int, tuple[int, int]]:
    """For pixels of one order: the coarsest ancestor whose rows fit in max_rows, else the pixel."""
    out = {}
    for p in counts:
        out[p] = (order, p)
        for k in range(order):
            q = p >> (2 * (order - k))
            if sum(n for r, n in counts.items() if r >> (2 * (order - k)) == q) <= max_rows:
                out[p] = (k, q)
                break
    return out


def test_plan_follows_the_hats_rule_and_never_splits() -> None:
    rng = np.random.default_rng(3)
    pix = rng.choice(12 * 4**3, 400, replace=False)
    counts = {int(p): int(n) for p, n in zip(pix, rng.integers(1, 300, len(pix)))}
    plan = plan_partitions({(3, p): n for p, n in counts.items()}, 2000)
    expected = _hats_rule(counts, 3, 2000)
    assert {p: plan[(3, p)] for p in counts} == expected
    assert len({k for k, _ in plan.values()}) >= 2  # mixed orders
    assert plan_partitions({(3, p): n for p, n in counts.items()}, 0) == {(3, p): (3, p) for p in counts}
    # a coarse pixel compacted earlier takes the finer pixels streamed in under it, even over max_rows
    again = plan_partitions({(1, 5): 5000, (3, 5 * 16 + 2): 10, (3, 7 * 16): 10}, 2000)
    assert again == {(1, 5): (1, 5), (3, 82): (1, 5), (3, 112): (1, 7)}


def _inside(df: pd.DataFrame, ra: float, dec: float, radius: float) -> set[str]:
    sep = SkyCoord(df.ra.to_numpy() * u.deg, df.dec.to_numpy() * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
    return set(df.source_id.to_numpy()[sep.deg <= radius])


def _duck_ids(root) -> list[str]:
    return sorted(r[0] for r in duckdb.sql(f"select source_id from read_parquet('{root}/dataset/**/*.parquet')").fetchall())


@pytest.fixture(scope="module")
def mixed(mock_catalog, tmp_path_factory):
    """The mock catalog compacted with max_rows=MIXED_MAX_ROWS (orders 1 and 2); read-only."""
    root = copy_catalog(mock_catalog.root, tmp_path_factory.mktemp("mixed") / "cat")
    before = open_catalog(root)
    queries = [dict(where="teff > 5000 and flags & 4 == 0", columns=["source_id", "teff"]),
               dict(where="not (teff > 3000)", columns=["source_id", "teff"]),
               dict(cone=(45.0, 30.0, 12.0), columns=["source_id", "ra"]),
               dict(where="survey == 'boss'", cone=(200.0, -60.0, 25.0), columns=["source_id", "mh"])]
    answers = [before.query(**q).sort_by("source_id").to_pandas() for q in queries]
    compact_catalog(root, max_rows=MIXED_MAX_ROWS)
    return root, queries, answers


def test_mixed_orders_are_valid_hats_and_answer_as_before(mixed, mock_catalog) -> None:
    from hats.io.validation import is_valid_catalog

    root, queries, answers = mixed
    df = mock_catalog.df
    info = pd.read_csv(root / paths.PARTITION_INFO)
    assert set(info.Norder) == {1, ORDER} and len(info) < len(np.unique(parent_pixel(df._healpix_29.to_numpy(), ORDER)))
    assert is_valid_catalog(root, strict=True)
    cat = open_catalog(root)
    assert len(cat.fragments) == len(info)  # one file per partition (a lone fragment is left as it is)
    assert all(f.name == f"{f.parent.name}.parquet" for f in cat.fragments if paths.parse_pixel_dir(f)[0] < ORDER)
    for f in cat.fragments:  # rows in spatial order within every file, and inside their pixel
        hp = pq.read_table(f, columns=["_healpix_29"]).column(0).to_numpy()
        norder, npix = paths.parse_pixel_dir(f)
        assert np.all(parent_pixel(hp, norder) == npix)
        assert np.all(np.diff(hp) >= 0) or not f.name.startswith("Npix=")  # compact's files are sorted
    assert _duck_ids(root) == sorted(df.source_id)  # exactly once, as another tool sees it
    for q, a in zip(queries, answers):
        pd.testing.assert_frame_equal(cat.query(**q).sort_by("source_id").to_pandas(), a)
    # a full scan: one scanner built from dataset/_metadata, each data file opened once
    handler = CountingHandler()
    open_catalog(root, filesystem=pafs.PyFileSystem(handler)).query(where="teff > 0", columns=["source_id"])
    data = [p for p in handler.opened if p.endswith(".parquet")]
    assert sum(p.endswith("/_metadata") for p in handler.opened) == 1
    assert len(data) == len(set(data)) == len(info)
    # independent truth for the NaN case the scanner must not lose (row-group statistics leave NaN out)
    nan_rows = cat.query(where="not (teff > 3000)", columns=["source_id"])
    assert sorted(nan_rows.column(0).to_pylist()) == sorted(df.source_id[df.teff.isna()]) and nan_rows.num_rows > 10


@pytest.mark.parametrize("cone", [(120.0, 20.0, 3.0), (359.0, -5.0, 9.0), (10.0, 85.0, 2.0)])
def test_cone_on_mixed_orders_opens_only_touched_partitions_and_equals_lsdb(mixed, mock_catalog, cone) -> None:
    import lsdb
    from astropy_healpix import HEALPix

    root = mixed[0]
    ra, dec, radius = cone
    handler = CountingHandler()
    got = open_catalog(root, filesystem=pafs.PyFileSystem(handler)).query(cone=cone, columns=["source_id"])
    expected = _inside(mock_catalog.df, ra, dec, radius)
    assert set(got.column("source_id").to_pylist()) == expected and got.num_rows == len(expected)
    opened = {paths.parse_pixel_dir(p) for p in handler.opened if p.endswith(".parquet")}
    # the partitions the cone touches, found independently: the order-8 pixel of every point on
    # the cone's edge and of its centre, mapped to the partition that contains it
    parts = [tuple(r) for r in pd.read_csv(root / paths.PARTITION_INFO)[["Norder", "Npix"]].to_numpy()]
    hp = HEALPix(nside=2**8, order="nested")
    edge = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(np.linspace(0, 360, 1441) * u.deg, radius * u.deg)
    fine = set(hp.lonlat_to_healpix(edge.ra, edge.dec).tolist()) | {int(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg))}
    touched = {(k, p) for k, p in parts for f in fine if f >> (2 * (8 - k)) == p}
    assert touched <= opened and len(opened) <= len(touched) + 1  # nothing missed, little extra
    assert len(opened) <= max(4, len(parts) // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc = lsdb.open_catalog(root, columns=["source_id"], search_filter=lsdb.ConeSearch(ra, dec, radius * 3600.0)).compute()
    assert sorted(lc.source_id) == sorted(expected)


def test_run_streaming_into_a_compacted_coarse_pixel(mixed, mock_catalog, tmp_path) -> None:
    """A later run writes fragments at the store's order under a coarser compacted pixel: they are
    read exactly once, the merged fragments still count as written, and compact folds them in."""
    from hats.io.validation import is_valid_catalog

    root = copy_catalog(mixed[0], tmp_path / "cat", with_meta=False)
    df = mock_catalog.df
    loc = Location.parse(str(root))
    old_done = loc.completed()
    original = {p.relative_to(mock_catalog.root).as_posix() for p in (mock_catalog.root / "dataset").rglob("part-*.parquet")}
    assert original <= old_done and all(loc.is_complete(r) for r in sorted(original)[::17])
    coarse = next((k, p) for k, p in (paths.parse_pixel_dir(f) for f in open_catalog(root).fragments) if k < ORDER)
    child = coarse[1] * 4 + 1  # an order-2 pixel inside the order-1 partition
    # new stars inside that child pixel (rows drawn until 20 fall in it)
    new = make_rows(12000, seed=11)
    new = new[parent_pixel(new._healpix_29.to_numpy(), ORDER) == child].head(20).copy()
    new["source_id"] = [f"new{i:03d}" for i in range(len(new))]
    assert len(new) == 20 and np.all(parent_pixel(healpix29(new.ra.to_numpy(), new.dec.to_numpy()), coarse[0]) == coarse[1])
    table = pa.table({c: pa.array(new[c].to_numpy()) for c in df.columns}).cast(
        pq.read_schema(open_catalog(root).fragments[0]).remove_metadata())
    assert not fragment_done(root, ORDER, child, "part-0100")
    write_catalog_fragment(root, ORDER, child, "part-0100", table)
    assert fragment_done(root, ORDER, child, "part-0100")

    everything = sorted(list(df.source_id) + list(new.source_id))
    cat = open_catalog(root)  # _metadata is now stale: the scan must see the new file anyway
    assert sorted(cat.query(columns=["source_id"]).column(0).to_pylist()) == everything
    r0 = new.iloc[0]
    got = cat.query(cone=(r0.ra, r0.dec, 1.0), columns=["source_id"]).column(0).to_pylist()
    assert sorted(got) == sorted(_inside(pd.concat([df, new]), r0.ra, r0.dec, 1.0)) and "new000" in got
    write_catalog_meta(root, {"label_names": list(LABELS)})  # end of that run
    assert sorted(cat.query(where="teff > -1e9 or isnan(teff)", columns=["source_id"]).column(0).to_pylist()) == everything

    n_parts = len(pd.read_csv(root / paths.PARTITION_INFO))
    s = compact_catalog(root, max_rows=MIXED_MAX_ROWS)
    assert s.n_compacted == 1 and s.n_partitions == n_parts - 1  # folded into the coarse pixel
    assert not paths.pixel_dir(root, ORDER, child).exists() and _duck_ids(root) == everything
    assert is_valid_catalog(root, strict=True)
    assert fragment_done(root, ORDER, child, "part-0100") and original | {
        paths.fragment_path("", ORDER, child, "part-0100").as_posix()} <= loc.completed()
    assert compact_catalog(root, max_rows=MIXED_MAX_ROWS).n_compacted == 0  # idempotent
