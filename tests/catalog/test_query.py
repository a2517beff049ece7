"""Catalog queries checked against expectations computed independently of distlabels' reader."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import astropy.units as u
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from distlabels.catalog.query import Catalog, format_table, open_catalog, parse_where
from distlabels.errors import QueryError, StoreError

# (expression, the same selection as a numpy mask on the generated DataFrame)
WHERE_CASES = [
    ("teff > 5000", lambda d: d.teff.to_numpy() > 5000),
    ("teff > 5000 and logg < 3.5", lambda d: (d.teff.to_numpy() > 5000) & (d.logg.to_numpy() < 3.5)),
    ("4000 <= teff < 6000", lambda d: (d.teff.to_numpy() >= 4000) & (d.teff.to_numpy() < 6000)),
    ("(teff > 6000) | (mh < -2)", lambda d: (d.teff.to_numpy() > 6000) | (d.mh.to_numpy() < -2)),
    ("(logg > 4) & ~(mh > 0)", lambda d: (d.logg.to_numpy() > 4) & ~(d.mh.to_numpy() > 0)),
    ("not (teff > 5000) or snr >= 100", lambda d: ~(d.teff.to_numpy() > 5000) | (d.snr.to_numpy() >= 100)),
    ("flags & 4 == 0", lambda d: (d["flags"].to_numpy() & 4) == 0),
    ("flags & 6 == 6 and n_iter < 10", lambda d: ((d["flags"].to_numpy() & 6) == 6) & (d.n_iter.to_numpy() < 10)),
    ("survey == 'apogee'", lambda d: d.survey.to_numpy() == "apogee"),
    ("survey in ('boss', 'lamost')", lambda d: np.isin(d.survey.to_numpy(), ["boss", "lamost"])),
    ("survey not in ('boss',)", lambda d: d.survey.to_numpy() != "boss"),
    ("n_iter in (3, 5, 7)", lambda d: np.isin(d.n_iter.to_numpy(), [3, 5, 7])),
    ("isnan(teff)", lambda d: np.isnan(d.teff.to_numpy())),
    ("not isnull(mh) and mh > -1", lambda d: d.mh.to_numpy() > -1),
    ("abs(rv - true_rv) < 0.5", lambda d: np.abs(d.rv.to_numpy() - d.true_rv.to_numpy()) < 0.5),
    ("-rv > 20", lambda d: -d.rv.to_numpy() > 20),
    ("teff - true_teff > 2 * 25", lambda d: d.teff.to_numpy() - d.true_teff.to_numpy() > 50),
    ("n_iter / 4 > 5.5", lambda d: d.n_iter.to_numpy() / 4 > 5.5),
    ("dec > 30 and ra < 90", lambda d: (d.dec.to_numpy() > 30) & (d.ra.to_numpy() < 90)),
]


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("source_id").to_pylist())


@pytest.fixture(scope="module")
def cat(mock_catalog) -> Catalog:
    return open_catalog(mock_catalog.root)


# --- opening -----------------------------------------------------------------------------------
def test_open_catalog_properties(mock_catalog, cat: Catalog) -> None:
    assert cat.label_names == ["teff", "logg", "mh", "cm"]
    assert cat.meta["model_id"] == "payne-test-1"
    assert len(cat.fragments) == mock_catalog.n_fragments
    assert all(p.suffix == ".parquet" and not p.name.startswith(".") for p in cat.fragments)
    assert cat.columns == list(mock_catalog.df.columns)  # file columns only, no Norder/Dir/Npix


def test_open_catalog_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_catalog(tmp_path / "nope")
    with pytest.raises(StoreError, match="dataset"):
        open_catalog(tmp_path)


def test_catalog_without_meta_and_without_rows(mock_catalog, tmp_path: Path) -> None:
    # label names fall back to the columns that have an _err partner; meta is then empty
    root = tmp_path / "copy"
    shutil.copytree(mock_catalog.root, root)
    (root / "catalog.json").unlink()
    cat = open_catalog(root)
    assert cat.meta == {} and cat.label_names == ["teff", "logg", "mh", "cm"]
    (tmp_path / "empty" / "dataset").mkdir(parents=True)
    empty = open_catalog(tmp_path / "empty")
    assert empty.fragments == [] and empty.query().num_rows == 0


def test_full_read_matches_generated_rows(mock_catalog, cat: Catalog) -> None:
    t = cat.query()
    assert t.num_rows == len(mock_catalog.df)
    assert t.column_names == list(mock_catalog.df.columns)
    assert cat.last_files_read == mock_catalog.n_fragments
    got = t.to_pandas().sort_values("source_id").reset_index(drop=True)
    exp = mock_catalog.df.sort_values("source_id").reset_index(drop=True)
    np.testing.assert_array_equal(got.teff.to_numpy(), exp.teff.to_numpy())
    np.testing.assert_array_equal(got["flags"].to_numpy(), exp["flags"].to_numpy())


def test_duckdb_and_pandas_read_the_same_rows(mock_catalog, cat: Catalog) -> None:
    root = mock_catalog.root
    (n_duck,) = duckdb.sql(f"select count(*) from read_parquet('{root}/dataset/**/*.parquet', "
                           "hive_partitioning=true)").fetchall()[0]
    n_pandas = len(pd.read_parquet(root / "dataset"))
    assert n_duck == n_pandas == cat.query(columns=["source_id"]).num_rows == len(mock_catalog.df)


# --- where -------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,mask", WHERE_CASES, ids=[c[0] for c in WHERE_CASES])
def test_where_matches_numpy_mask(mock_catalog, cat: Catalog, expr, mask) -> None:
    df = mock_catalog.df
    expected = sorted(df.source_id.to_numpy()[mask(df)])
    got = cat.query(where=expr, columns=["source_id"])
    assert got.num_rows == len(expected)
    assert _ids(got) == expected


def test_where_float32_literal_compares_like_numpy(mock_catalog, cat: Catalog) -> None:
    # equality with a value printed from the float32 column must find that row
    v = float(np.float32(mock_catalog.df.mh.dropna().iloc[0]))
    literal = str(np.float32(v))  # shortest float32 repr, e.g. '-1.2345678'
    got = cat.query(where=f"mh == {literal}", columns=["mh"])
    assert got.num_rows >= 1


def test_where_partition_column_prunes_directories(mock_catalog, cat: Catalog) -> None:
    npix = int(cat.fragments[0].parent.name.split("=")[1])
    t = cat.query(where=f"Npix == {npix}", columns=["source_id", "Npix"])
    assert set(t.column("Npix").to_pylist()) == {npix}
    assert cat.last_files_read <= 2


@pytest.mark.parametrize("expr,fragment", [
    ("tef > 5000", "'tef'"),
    ("teff > 5000 and logq < 3", "'logq'"),
    ("teff >", "could not parse"),
    ("teff > > 3", "could not parse"),
    ("__import__('os').system('true')", "__import__"),
    ("teff.real > 0", "attribute access"),
    ("sum(teff) > 0", "'sum'"),
    ("teff ** 2 > 0", "this operator"),
    ("[x for x in teff]", "comprehensions"),
    ("teff if snr > 3 else logg", "conditional"),
    ("lambda: 0", "lambda"),
    ("teff + 1", "condition"),
    ("survey > 3", "cannot compare"),
    ("teff is None", "'is'"),
    ("survey in 'apogee'", "tuple of constants"),
    ("logg & 4 == 0", "'&'"),
    ("teff > 5000 & flags < 3", "parentheses"),
    ("", "empty"),
])
def test_where_errors(cat: Catalog, expr: str, fragment: str) -> None:
    with pytest.raises(QueryError, match=None) as info:
        cat.query(where=expr)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg and msg.endswith(".")


def test_unknown_column_suggests_close_match(cat: Catalog) -> None:
    with pytest.raises(QueryError) as info:
        parse_where("tef > 1", cat.columns)
    assert "unknown column 'tef'" in str(info.value) and "did you mean 'teff'" in str(info.value)


def test_where_is_never_evaluated(tmp_path: Path, cat: Catalog) -> None:
    marker = tmp_path / "pwned"
    for expr in (f"__import__('pathlib').Path('{marker}').touch()",
                 f"open('{marker}', 'w')", "().__class__.__bases__[0].__subclasses__()"):
        with pytest.raises(QueryError):
            parse_where(expr, cat.columns)
    assert not marker.exists()


def test_parse_where_returns_expression_without_schema() -> None:
    e = parse_where("a > 1 and b in ('x', 'y')", ["a", "b"])
    assert isinstance(e, pc.Expression)
    t = pa.table({"a": [0, 2, 3], "b": ["x", "y", "z"]})
    assert t.filter(e).num_rows == 1


# --- columns and limit -------------------------------------------------------------------------
def test_columns_and_limit(mock_catalog, cat: Catalog) -> None:
    mask = mock_catalog.df.teff.to_numpy() > 5000
    t = cat.query(where="teff > 5000", columns=["teff", "source_id"], limit=7)
    assert t.column_names == ["teff", "source_id"] and t.num_rows == 7
    assert set(_ids(t)) <= set(mock_catalog.df.source_id[mask])
    assert cat.last_files_read < mock_catalog.n_fragments  # stopped opening files early
    assert cat.query(where="teff > 5000", limit=10**6, columns=["ra"]).num_rows == mask.sum()
    assert cat.query(limit=0).num_rows == 0
    with pytest.raises(QueryError, match="limit"):
        cat.query(limit=-1)


def test_unknown_output_column(cat: Catalog) -> None:
    with pytest.raises(QueryError, match="'tef'.*did you mean 'teff'"):
        cat.query(columns=["source_id", "tef"])


# --- cone search -------------------------------------------------------------------------------
def _brute_force_cone(df: pd.DataFrame, ra: float, dec: float, radius: float) -> list[str]:
    stars = SkyCoord(df.ra.to_numpy() * u.deg, df.dec.to_numpy() * u.deg)
    sep = stars.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg
    return sorted(df.source_id.to_numpy()[sep <= radius])


@pytest.mark.parametrize("cone", [(45.0, 30.0, 10.0), (359.5, -5.0, 8.0), (0.0, 89.0, 15.0),
                                  (200.0, -60.0, 25.0), (10.0, 0.0, 0.5), (100.0, 0.0, 180.0)])
def test_cone_matches_astropy_brute_force(mock_catalog, cat: Catalog, cone) -> None:
    t = cat.query(cone=cone, columns=["source_id"])
    assert t.column_names == ["source_id"]  # ra/dec read for the cut but not returned
    assert _ids(t) == _brute_force_cone(mock_catalog.df, *cone)
    if cone[2] <= 15:
        assert cat.last_files_read < mock_catalog.n_fragments / 4  # pixel directories pruned


def test_random_cones_never_miss_a_star(mock_catalog, cat: Catalog) -> None:
    # pruning must be conservative everywhere: poles, ra wrap-around, pixel corners
    rng = np.random.default_rng(11)
    for _ in range(25):
        cone = (rng.uniform(0, 360), float(np.degrees(np.arcsin(rng.uniform(-1, 1)))), rng.uniform(0.5, 40))
        assert _ids(cat.query(cone=cone, columns=["source_id"])) == _brute_force_cone(mock_catalog.df, *cone)


def test_cone_with_where_and_limit(mock_catalog, cat: Catalog) -> None:
    df = mock_catalog.df
    inside = set(_brute_force_cone(df, 120.0, 20.0, 30.0))
    hot = set(df.source_id[df.teff.to_numpy() > 6000])
    t = cat.query(where="teff > 6000", cone=(120.0, 20.0, 30.0))
    assert set(_ids(t)) == inside & hot
    t5 = cat.query(where="teff > 6000", cone=(120.0, 20.0, 30.0), limit=5)
    assert t5.num_rows == 5 and set(_ids(t5)) <= inside & hot


@pytest.mark.parametrize("cone,fragment", [((0, 91, 1), "declination"), ((0, -90.5, 1), "declination"),
                                           ((0, 0, 0), "radius"), ((0, 0, -1), "radius"),
                                           ((0, 0, 181), "radius"), ((0, float("nan"), 1), "finite"),
                                           ((1, 2), "three numbers")])
def test_cone_validation(cat: Catalog, cone, fragment: str) -> None:
    with pytest.raises(QueryError, match=fragment):
        cat.query(cone=cone)


# --- output ------------------------------------------------------------------------------------
def test_format_csv_round_trip(mock_catalog, cat: Catalog, tmp_path: Path) -> None:
    t = cat.query(where="logg < 2", columns=["source_id", "survey", "teff", "flags"])
    text = format_table(t, "csv")
    back = pcsv.read_csv(io.BytesIO(text.encode()))
    assert back.num_rows == t.num_rows
    assert back.column("source_id").to_pylist() == t.column("source_id").to_pylist()
    np.testing.assert_array_equal(back.column("teff").to_numpy().astype(np.float32),
                                  t.column("teff").to_numpy())
    out = tmp_path / "sub" / "x.csv"
    assert format_table(t, "csv", out) is None
    assert pd.read_csv(out).shape == (t.num_rows, 4)


def test_format_table_text_and_json(cat: Catalog) -> None:
    t = cat.query(where="isnan(teff) or teff > 7900", columns=["source_id", "teff", "n_iter"])
    text = format_table(t, "table", max_rows=5)
    lines = text.splitlines()
    assert lines[0].split() == ["source_id", "teff", "n_iter"]
    assert len(lines) == 2 + min(5, t.num_rows) + 1
    assert f"{t.num_rows:,}" in lines[-1] and "rows" in lines[-1]
    records = json.loads(format_table(t, "json"))
    assert len(records) == t.num_rows
    assert any(r["teff"] is None for r in records)  # NaN becomes null, valid JSON


def test_format_parquet(cat: Catalog, tmp_path: Path) -> None:
    t = cat.query(limit=50)
    with pytest.raises(QueryError, match="--out"):
        format_table(t, "parquet")
    out = tmp_path / "q.parquet"
    assert format_table(t, "parquet", out) is None
    assert pq.read_table(out).equals(t)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temp file renamed
    with pytest.raises(QueryError, match="format"):
        format_table(t, "xlsx")


# --- clean sample ------------------------------------------------------------------------------
def test_clean_selection_matches_numpy_mask(mock_catalog, cat: Catalog) -> None:
    from distlabels.catalog.query import CLEAN, CleanSelection
    from distlabels.fit import Flag

    df = mock_catalog.df
    every_bit = 0
    for f in Flag:  # the reject mask is every defined bit, however many the kernel defines
        every_bit |= int(f)
    ok = ((df["flags"].to_numpy() & every_bit) == 0) & (df.snr.to_numpy() >= CLEAN.min_snr) \
        & (df.chi2_red.to_numpy() <= CLEAN.max_chi2_red)
    got = cat.query(clean=True, columns=["source_id"])
    assert 0 < got.num_rows < len(df) and _ids(got) == sorted(df.source_id[ok])
    # combined with --where and a custom selection
    strict = CleanSelection(min_snr=100.0, max_chi2_red=1.0)
    ok2 = ((df["flags"].to_numpy() & every_bit) == 0) & (df.snr.to_numpy() >= 100) & (df.chi2_red.to_numpy() <= 1) \
        & (df.teff.to_numpy() > 5000)
    assert _ids(cat.query(where="teff > 5000", clean=strict, columns=["source_id"])) == sorted(df.source_id[ok2])
    assert "snr >= 100.0" in strict.where(cat.columns) and str(every_bit) in strict.where(cat.columns)


def test_clean_needs_quality_columns(tmp_path) -> None:
    root = tmp_path / "c"
    (root / "dataset" / "Norder=0" / "Dir=0" / "Npix=1").mkdir(parents=True)
    pq.write_table(pa.table({"source_id": ["a"], "teff": [5000.0]}),
                   root / "dataset" / "Norder=0" / "Dir=0" / "Npix=1" / "part-0000.parquet")
    with pytest.raises(QueryError, match="--clean needs the column"):
        open_catalog(root).query(clean=True)


# --- FITS output -------------------------------------------------------------------------------
def test_format_fits_round_trip_with_units(cat: Catalog, tmp_path: Path) -> None:
    from astropy.io import fits
    from astropy.table import Table

    t = cat.query(where="isnan(teff) or teff > 7000",
                  columns=["source_id", "survey", "ra", "dec", "teff", "logg", "mh", "rv", "flags", "n_iter"])
    with pytest.raises(QueryError, match="--out"):
        format_table(t, "fits")
    out = tmp_path / "q.fits"
    assert format_table(t, "fits", out, provenance={"model_id": "payne-test-1", "store": "/x" * 40}) is None
    with fits.open(out) as hdul:
        assert hdul[0].header["DLMODEL"] == "payne-test-1" and hdul[0].header["DLSTORE"] == "/x" * 40
        h = hdul[1].header
        units = {h[f"TTYPE{i}"]: h.get(f"TUNIT{i}") for i in range(1, h["TFIELDS"] + 1)}
    assert units["teff"] == "K" and units["ra"] == "deg" and units["rv"] == "km/s" and units["mh"] == "dex"
    assert units["flags"] is None and units["source_id"] is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns that 'dex' is not a FITS-standard unit
        back = Table.read(out, hdu="CATALOG")
    assert len(back) == t.num_rows and back.colnames == t.column_names
    assert [s.strip() for s in back["source_id"]] == t.column("source_id").to_pylist()
    np.testing.assert_array_equal(np.asarray(back["teff"]), t.column("teff").to_numpy())  # NaN kept
    assert np.isnan(np.asarray(back["teff"])).any()
    np.testing.assert_array_equal(np.asarray(back["flags"]), t.column("flags").to_numpy())
    assert back["n_iter"].dtype.kind == "i" and back["n_iter"].dtype.itemsize == 2
    assert back["ra"].dtype.kind == "f" and back["ra"].dtype.itemsize == 8


def test_format_fits_rejects_ragged_lists(tmp_path: Path) -> None:
    t = pa.table({"x": pa.array([[1.0, 2.0], [3.0]])})
    with pytest.raises(QueryError, match="lists of different lengths"):
        format_table(t, "fits", tmp_path / "x.fits")
    fixed = pa.table({"x": pa.array([[1.0, 2.0], [3.0, 4.0]]), "i": pa.array([1, None], pa.int32())})
    format_table(fixed, "fits", tmp_path / "y.fits")
    from astropy.table import Table

    back = Table.read(tmp_path / "y.fits")
    assert back["x"].shape == (2, 2) and back["i"].mask.tolist() == [False, True]


def test_cone_ra_out_of_range_and_wrap(mock_catalog, cat: Catalog) -> None:
    with pytest.raises(QueryError, match="right ascension"):
        cat.query(cone=(400.0, 0.0, 1.0))
    with pytest.raises(QueryError, match="not arcsec"):
        cat.query(cone=(10.0, 0.0, 3600.0))
    # -10 deg is 350 deg
    assert _ids(cat.query(cone=(-10.0, 5.0, 12.0), columns=["source_id"])) == \
        _brute_force_cone(mock_catalog.df, 350.0, 5.0, 12.0)
