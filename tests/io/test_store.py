import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlabels import paths
from distlabels.errors import StoreError
from distlabels.io.store import list_column, list_to_numpy, open_store, write_store


def _table(n=500, n_pix=50, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.normal(1, 0.1, (n, n_pix)).astype(np.float32)
    ivar = rng.uniform(10, 100, (n, n_pix)).astype(np.float32)
    return pa.table({"source_id": [f"s{i}" for i in range(n)], "survey": ["t"] * n,
                     "ra": rng.uniform(0, 360, n), "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
                     "flux": list_column(flux), "ivar": list_column(ivar)}), flux, ivar


def test_round_trip_is_exact_and_partitions_cover_every_row_once(tmp_path):
    table, flux, ivar = _table()
    meta = {"wavelength_aa": list(np.linspace(4000, 5000, 50)), "wavelength_medium": "vacuum", "rv_frame": "observed"}
    store = write_store(tmp_path / "s", table, meta, max_rows_per_partition=30)
    assert store.meta["n_spectra"] == 500 and store.meta["hats_order"] == 1
    # Files live in HATS-style pixel directories and every row's pixel matches its directory.
    for f in store.fragments:
        norder, npix = paths.parse_pixel_dir(f)
        hp = pq.read_table(f, columns=[paths.HEALPIX_COLUMN]).column(0).to_numpy()
        assert np.all(hp >> (2 * (29 - norder)) == npix)
        assert f.parent.parent.name == f"Dir={(npix // 10000) * 10000}"
    back = store.read_all()
    order = np.argsort([int(s[1:]) for s in back.column("source_id").to_pylist()])
    f2, i2, _ = store.spectra(back.take(pa.array(order)))
    np.testing.assert_array_equal(f2, flux)
    np.testing.assert_array_equal(i2, ivar)
    parts = store.partitions(task_rows=7)
    seen = []
    for p in parts:
        seen += store.read(p, columns=["source_id"]).column(0).to_pylist()
    assert sorted(seen) == sorted(table.column("source_id").to_pylist())


def test_refuses_duplicates_existing_and_missing(tmp_path):
    table, _, _ = _table(10)
    meta = {"wavelength_aa": [1.0] * 50, "wavelength_medium": "vacuum", "rv_frame": "observed"}
    dup = pa.concat_tables([table, table])
    with pytest.raises(StoreError, match="not unique"):
        write_store(tmp_path / "d", dup, meta)
    write_store(tmp_path / "ok", table, meta)
    with pytest.raises(StoreError, match="already exists"):
        write_store(tmp_path / "ok", table, meta)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")


def test_list_to_numpy_marks_wrong_length_rows_nan():
    arr = pa.array([[1.0, 2.0, 3.0], [1.0, 2.0], None], pa.list_(pa.float32()))
    out = list_to_numpy(arr, 3)
    np.testing.assert_array_equal(out[0], [1, 2, 3])
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
