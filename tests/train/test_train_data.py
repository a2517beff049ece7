"""Training-set assembly: labels from store columns or a joined table (source_id, a shared id, sky
position), and spectra brought to the rest frame."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.table import Table

from distlabels.errors import DistlabelsError
from distlabels.io.store import list_column, write_store
from distlabels.train.data import load_training_set, shift_to_rest

WAVE = 5000.0 * 10 ** (1e-4 * np.arange(400))           # log-uniform, ~23 km/s per 1/3 pixel


def _spectrum(rv_kms):
    """Analytic spectrum (Gaussian lines, FWHM ~4 px) observed at rv_kms, exact at every pixel."""
    b = np.asarray(rv_kms, float)[:, None] / 299792.458
    rest = WAVE[None] / np.sqrt((1 + b) / (1 - b))
    centres = np.array([5020.0, 5060.0, 5100.0, 5150.0, 5190.0, 5300.0, 5400.0])
    sig = 5050 * 1e-4 * np.log(10) * 1.7
    return 1 - 0.5 * np.exp(-0.5 * ((rest[..., None] - centres) / sig) ** 2).sum(-1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 30
    rv = rng.uniform(-80, 80, n)
    flux = _spectrum(rv).astype(np.float32)
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-60, 60, n)
    t = pa.table({"source_id": [f"s{i:03d}" for i in range(n)], "ra": ra, "dec": dec,
                  "gaia_id": np.arange(1000, 1000 + n, dtype=np.int64),
                  "flux": list_column(flux), "ivar": list_column(np.full(flux.shape, 1e4, np.float32)),
                  "true_teff": rng.uniform(4000, 5000, n), "true_rv": rv})
    meta = {"wavelength_aa": WAVE.tolist(), "wavelength_medium": "vacuum", "rv_frame": "observed"}
    root = write_store(tmp_path_factory.mktemp("s") / "store", t, meta, max_rows_per_partition=10).root
    return root, t


def test_labels_from_store_columns_and_rv(store):
    root, t = store
    ts = load_training_set(root, ["teff"])
    assert ts.label_names == ("teff",) and len(ts) == 30
    order = np.argsort(ts.source_id)
    np.testing.assert_allclose(ts.labels[order, 0], t["true_teff"].to_numpy())
    np.testing.assert_allclose(ts.rv_kms[order], t["true_rv"].to_numpy())
    with pytest.raises(DistlabelsError, match="no label column 'logg'"):
        load_training_set(root, ["teff", "logg"])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "fits"])
def test_join_on_source_id_and_on_a_shared_id(store, tmp_path, fmt):
    root, t = store
    ids = t["source_id"].to_pylist()
    rng = np.random.default_rng(1)
    take = rng.choice(30, 20, replace=False)           # labels for 20 of the 30 stars only
    lab = Table({"source_id": [ids[i] for i in take], "gaia_id": t["gaia_id"].to_numpy()[take],
                 "logg": rng.uniform(1, 3, 20), "mh": rng.uniform(-1, 0, 20)})
    path = tmp_path / f"labels.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({c: np.asarray(lab[c]) for c in lab.colnames}), path)
    else:
        lab.write(path, format="ascii.csv" if fmt == "csv" else "fits")
    truth = {ids[i]: (lab["logg"][k], lab["mh"][k]) for k, i in enumerate(take)}
    for join in ("source_id", "gaia_id"):
        ts = load_training_set(root, ["logg", "mh"], label_table=path, join=join)
        assert len(ts) == 20 and ts.notes["n_dropped_no_labels"] == 10
        for sid, row in zip(ts.source_id, ts.labels):
            np.testing.assert_allclose(row, truth[sid])


def test_join_by_sky_position_within_tolerance(store, tmp_path):
    root, t = store
    ra, dec = t["ra"].to_numpy(), t["dec"].to_numpy()
    rng = np.random.default_rng(2)
    sep = np.r_[rng.uniform(0, 0.8, 15), rng.uniform(3, 5, 15)]      # arcsec: 15 within 1", 15 beyond
    pa_ = rng.uniform(0, 2 * np.pi, 30)
    dra = sep * np.sin(pa_) / 3600 / np.cos(np.radians(dec))
    ddec = sep * np.cos(pa_) / 3600
    teffs = rng.uniform(4000, 5000, 30)
    pq.write_table(pa.table({"ra": ra + dra, "dec": dec + ddec, "teff": teffs}), tmp_path / "lab.parquet")
    ts = load_training_set(root, ["teff"], label_table=tmp_path / "lab.parquet", join="sky:1.0")
    ids = t["source_id"].to_pylist()
    expect = {ids[i]: teffs[i] for i in range(15)}
    assert sorted(ts.source_id) == sorted(expect)
    for sid, row in zip(ts.source_id, ts.labels):
        assert row[0] == pytest.approx(expect[sid])
    with pytest.raises(DistlabelsError, match="sky:ARCSEC"):
        load_training_set(root, ["teff"], label_table=tmp_path / "lab.parquet", join="sky:abc")


def test_shift_to_rest_recovers_the_rest_spectrum():
    rng = np.random.default_rng(3)
    rv = rng.uniform(-100, 100, 8)
    obs = _spectrum(rv)
    f, w = shift_to_rest(obs, np.full(obs.shape, 1e4), WAVE, rv)
    rest = _spectrum(np.zeros(8))
    inner = slice(10, -10)                               # the ends fall off the observed grid
    assert np.abs(f.numpy()[:, inner] - rest[:, inner]).max() < 5e-3   # cubic: lines keep their depth
    assert (w.numpy()[:, inner] >= 1e4 * 0.99).all()     # sum c^2 <= 1: variance never grows
    # Linear interpolation would lose several per cent of line depth at half-pixel shifts.
    depth_err_linear = np.abs(0.5 * (rest[:, 1:] + rest[:, :-1]) - _spectrum(np.full(8, -34.5))[:, :-1])
    assert depth_err_linear.max() > 0.02
