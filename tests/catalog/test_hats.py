"""The catalog as other tools see it: hats and LSDB open it, DuckDB/pandas/pyarrow read it.

Expectations come from the generated rows (numpy), astropy separations and the tools themselves,
never from distlabels' reader.
"""
from __future__ import annotations

import json
import warnings

import astropy.units as u
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from distlabels import paths
from distlabels.catalog.hats import read_properties
from distlabels.catalog.query import open_catalog
from distlabels.catalog.writer import write_catalog_meta
from distlabels.healpix import parent_pixel

from tests.catalog.conftest import ORDER
from tests.catalog.helpers import CountingHandler, copy_catalog

CONES = [(45.0, 30.0, 12.0), (359.0, -5.0, 9.0), (200.0, -60.0, 20.0), (10.0, 85.0, 7.0)]


def _pixels(df: pd.DataFrame) -> np.ndarray:
    return np.unique(parent_pixel(df[paths.HEALPIX_COLUMN].to_numpy(), ORDER))


def _inside(df: pd.DataFrame, ra: float, dec: float, radius: float) -> set[str]:
    sep = SkyCoord(df.ra.to_numpy() * u.deg, df.dec.to_numpy() * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
    return set(df.source_id.to_numpy()[sep.deg <= radius])


def test_catalog_level_files(hats_catalog) -> None:
    root, df = hats_catalog.root, hats_catalog.df
    props = read_properties(root)
    pix = parent_pixel(df[paths.HEALPIX_COLUMN].to_numpy(), ORDER)
    assert props["dataproduct_type"] == "object" and props["hats_npix_suffix"] == "/"
    assert int(props["hats_nrows"]) == len(df)
    assert int(props["hats_max_rows"]) == np.bincount(pix).max()
    assert props["hats_col_healpix"] == "_healpix_29" and props["hats_col_healpix_order"] == "29"
    assert props["hats_col_ra"] == "ra" and props["hats_col_dec"] == "dec" and props["hats_version"] == "v1.0"
    assert float(props["moc_sky_fraction"]) == pytest.approx(len(_pixels(df)) / (12 * 4**ORDER), rel=1e-4)
    info = pd.read_csv(root / "partition_info.csv")
    assert list(info.columns) == ["Norder", "Npix"]
    assert (info.Norder == ORDER).all() and info.Npix.tolist() == _pixels(df).tolist()
    # _common_metadata: the fragments' columns; _metadata: every footer with its relative path
    common = pq.read_schema(root / "dataset" / "_common_metadata")
    assert common.names == list(df.columns)
    md = pq.read_metadata(root / "dataset" / "_metadata")
    assert md.num_rows == len(df) and md.num_row_groups == hats_catalog.n_fragments
    rel = {md.row_group(i).column(0).file_path for i in range(md.num_row_groups)}
    assert rel == {f.relative_to(root / "dataset").as_posix() for f in open_catalog(root).fragments}
    assert not list(root.glob("**/.*.tmp")) or all("part-x" in p.name for p in root.glob("**/.*.tmp"))


def test_provenance_in_properties_and_parquet_metadata(tmp_path, mock_catalog) -> None:
    root = copy_catalog(mock_catalog.root, tmp_path / "c", with_meta=False)
    prov = {"model_id": "payne-test-1", "model_sha256": "ab" * 32, "store": "/data/spectra store",
            "fit_config": {"continuum_degree": 3}, "distlabels_version": "9.9"}
    full = write_catalog_meta(root, {"label_names": ["teff", "logg", "mh", "cm"], "provenance": prov,
                                     "n_rows": -1, "catalog_name": "my survey"})
    assert full["n_rows"] == len(mock_catalog.df) and full["hats"] is True  # computed keys win
    props = read_properties(root)
    assert props["distlabels_model_sha256"] == "ab" * 32 and props["distlabels_version"] == "9.9"
    assert props["prov_progenitor"] == "/data/spectra store" and props["obs_collection"] == "my survey"
    assert props["distlabels_label_names"].split() == ["teff", "logg", "mh", "cm"]
    kv = pq.read_schema(root / "dataset" / "_common_metadata").metadata
    assert json.loads(kv[b"distlabels"]) == prov
    assert json.loads((root / "catalog.json").read_text())["provenance"] == prov
    import hats

    extra = hats.read_hats(root).catalog_info.extra_dict()
    assert extra["distlabels_model_id"] == "payne-test-1" and extra["distlabels_input_store"] == "/data/spectra store"


def test_hats_reads_and_validates(hats_catalog) -> None:
    import hats
    from hats.io.validation import is_valid_catalog

    cat = hats.read_hats(hats_catalog.root)
    assert cat.catalog_info.total_rows == len(hats_catalog.df)
    assert cat.catalog_info.npix_suffix == "/"
    assert sorted(p.pixel for p in cat.get_healpix_pixels()) == _pixels(hats_catalog.df).tolist()
    assert cat.schema.names == list(hats_catalog.df.columns)
    assert is_valid_catalog(hats_catalog.root)


def test_lsdb_reads_every_row(hats_catalog) -> None:
    import lsdb

    got = lsdb.open_catalog(hats_catalog.root, columns=["source_id", "teff"]).compute()
    assert len(got) == len(hats_catalog.df) and set(got.source_id) == set(hats_catalog.df.source_id)
    assert got.index.name == "_healpix_29"
    exp = hats_catalog.df.set_index("source_id").teff
    np.testing.assert_array_equal(got.set_index("source_id").teff.loc[exp.index].to_numpy(), exp.to_numpy())


@pytest.mark.parametrize("cone", CONES)
def test_lsdb_cone_search_equals_ours(hats_catalog, cone) -> None:
    import lsdb

    ra, dec, radius = cone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc = lsdb.open_catalog(hats_catalog.root, columns=["source_id", "ra", "dec"],
                               search_filter=lsdb.ConeSearch(ra, dec, radius * 3600.0)).compute()
    ours = open_catalog(hats_catalog.root).query(cone=cone, columns=["source_id"])
    expected = _inside(hats_catalog.df, ra, dec, radius)
    assert len(expected) > 5
    assert sorted(lc.source_id) == sorted(ours.column("source_id").to_pylist()) == sorted(expected)


def test_duckdb_pandas_and_metadata_dataset_read_it(hats_catalog) -> None:
    root, df = hats_catalog.root, hats_catalog.df
    glob = f"{root}/dataset/**/*.parquet"
    n, n_hot, npix = duckdb.sql(f"select count(*), count(*) filter (where teff > 6000 and not isnan(teff)), count(distinct Npix) "
                                f"from read_parquet('{glob}', hive_partitioning=true)").fetchall()[0]
    assert n == len(df) and n_hot == int((df.teff > 6000).sum()) and npix == len(_pixels(df))
    pdf = pd.read_parquet(root / "dataset")
    assert len(pdf) == len(df) and set(pdf.source_id) == set(df.source_id)
    # the _metadata file alone describes the dataset (pyarrow's parquet_dataset)
    t = ds.parquet_dataset(str(root / "dataset" / "_metadata")).to_table(columns=["source_id"])
    assert t.num_rows == len(df)


def test_cone_opens_only_the_pixels_it_touches(hats_catalog) -> None:
    """Count files actually opened, through a file system that records opens."""
    handler = CountingHandler()
    cat = open_catalog(hats_catalog.root, filesystem=pafs.PyFileSystem(handler))
    ra, dec, radius = 120.0, 20.0, 3.0
    t = cat.query(cone=(ra, dec, radius), columns=["source_id"])
    assert set(t.column("source_id").to_pylist()) == _inside(hats_catalog.df, ra, dec, radius)
    opened = {p for p in handler.opened if p.endswith(".parquet")}
    # the pixels a 3-degree cone can touch at order 2 (pixels ~29 deg wide): at most 4 of 192,
    # found independently from the pixel of every point on the cone's edge and its centre
    from astropy_healpix import HEALPix

    hp = HEALPix(nside=2**ORDER, order="nested")
    edge = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(np.linspace(0, 360, 721) * u.deg, radius * u.deg)
    touched = set(hp.lonlat_to_healpix(edge.ra, edge.dec).tolist()) | {int(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg))}
    opened_pix = {paths.parse_pixel_dir(p)[1] for p in opened}
    assert touched <= opened_pix  # nothing missed ...
    assert len(opened_pix) <= len(touched) + 2 and len(opened) <= 2 * len(opened_pix)  # ... little extra
    assert len(opened) < hats_catalog.n_fragments / 20
    handler.opened.clear()
    cat.query(where="teff > 0", columns=["source_id"])  # a full scan opens every fragment once
    assert len({p for p in handler.opened if p.endswith(".parquet")}) == hats_catalog.n_fragments


def test_empty_catalog_has_no_hats_files(tmp_path) -> None:
    (tmp_path / "dataset").mkdir()
    full = write_catalog_meta(tmp_path, {"label_names": ["teff"]})
    assert full["n_rows"] == 0 and full["hats"] is False
    assert not (tmp_path / "hats.properties").exists() and (tmp_path / "catalog.json").exists()


def test_fragments_of_two_schemas_drop_metadata_file(tmp_path, mock_catalog) -> None:
    root = copy_catalog(mock_catalog.root, tmp_path / "c")
    assert (root / "dataset" / "_metadata").exists()
    one = open_catalog(root).fragments[0]
    t = pq.read_table(one)
    pq.write_table(t.append_column("extra", pa.array(np.ones(t.num_rows))), one.with_name("part-9999.parquet"))
    full = write_catalog_meta(root, json.loads((root / "catalog.json").read_text()))
    assert full["parquet_metadata"] is False and not (root / "dataset" / "_metadata").exists()
    assert "extra" in pq.read_schema(root / "dataset" / "_common_metadata").names
    cat = open_catalog(root)  # the union schema: the new column reads as null elsewhere
    got = cat.query(columns=["source_id", "extra"])
    assert got.num_rows == len(mock_catalog.df) + t.num_rows
    assert got.column("extra").null_count == len(mock_catalog.df)
