"""A small label catalog on disk, written with pyarrow in the exact layout of distlabels.paths.

The generated rows are also returned as a pandas DataFrame so that tests can compute their
expectations independently of distlabels' reader (numpy masks, astropy separations, DuckDB).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlabels import paths
from distlabels.healpix import healpix29, parent_pixel
from tests.catalog.helpers import copy_catalog

N_ROWS = 3000
ORDER = 2
LABELS = ("teff", "logg", "mh", "cm")
SURVEYS = ("apogee", "boss", "lamost")


@dataclass
class MockCatalog:
    """Where the catalog lies, what it holds, and how many fragment files it has."""

    root: Path
    df: pd.DataFrame
    n_fragments: int


def make_rows(n: int, seed: int = 7) -> pd.DataFrame:
    """Random stars uniform on the sky with plausible labels; about 2% failed fits (NaN)."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    true = {
        "teff": rng.uniform(3500.0, 8000.0, n),
        "logg": rng.uniform(0.5, 5.0, n),
        "mh": rng.uniform(-2.5, 0.5, n),
        "cm": rng.uniform(-0.5, 0.5, n),
    }
    noise = {"teff": 50.0, "logg": 0.1, "mh": 0.05, "cm": 0.05}
    cols: dict[str, np.ndarray] = {
        "source_id": np.array([f"src{i:05d}" for i in range(n)]),
        "survey": rng.choice(SURVEYS, n),
        "ra": ra,
        "dec": dec,
        paths.HEALPIX_COLUMN: healpix29(ra, dec),
        "snr": rng.uniform(5.0, 200.0, n).astype(np.float32),
    }
    failed = rng.random(n) < 0.02
    for lab in LABELS:
        fit = (true[lab] + rng.normal(0.0, noise[lab], n) + 0.1 * noise[lab]).astype(np.float32)
        fit[failed] = np.nan
        cols[lab] = fit
        cols[f"{lab}_err"] = np.full(n, noise[lab], np.float32)
    true_rv = rng.normal(0.0, 40.0, n)
    cols["rv"] = (true_rv + rng.normal(0.0, 1.0, n)).astype(np.float32)
    cols["rv_err"] = np.full(n, 1.0, np.float32)
    cols["chi2_red"] = rng.chisquare(3, n).astype(np.float32) / 3
    cols["n_iter"] = rng.integers(1, 30, n).astype(np.int16)
    cols["flags"] = rng.integers(0, 16, n).astype(np.int64)
    cols["model_id"] = np.array(["payne-test-1"] * n)
    for lab in LABELS:
        cols[f"true_{lab}"] = true[lab].astype(np.float32)
    cols["true_rv"] = true_rv.astype(np.float32)
    return pd.DataFrame(cols)


def write_catalog(root: Path, df: pd.DataFrame, order: int = ORDER) -> int:
    """Write ``df`` as root/dataset/Norder=K/Dir=D/Npix=N/part-*.parquet; return fragment count."""
    # explicit Arrow types (not pandas' inference): strings as string, labels as float32
    table = pa.table({c: pa.array(df[c].to_numpy()) for c in df.columns})
    assert table.schema.field("source_id").type == pa.string()
    npix = parent_pixel(df[paths.HEALPIX_COLUMN].to_numpy(), order)
    n_fragments = 0
    for pix in np.unique(npix):
        rows = np.flatnonzero(npix == pix)
        # even pixels get two fragments, so the reader must combine files within a directory
        pieces = np.array_split(rows, 2 if pix % 2 == 0 and len(rows) > 1 else 1)
        for k, idx in enumerate(pieces):
            final = paths.fragment_path(root, order, int(pix), f"part-{k:04d}")
            final.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.take(pa.array(idx)), final)
            n_fragments += 1
    # a half-written fragment: hidden, so every reader must skip it
    junk = paths.pixel_dir(root, order, int(npix[0])) / ".part-x.parquet.tmp"
    junk.write_bytes(b"not a parquet file")
    meta = {"label_names": list(LABELS), "model_id": "payne-test-1", "n_rows": int(len(df)),
            "healpix_order": order}
    (root / paths.CATALOG_META).write_text(json.dumps(meta))
    (root / paths.RUN_FILE).write_text(json.dumps({"model_sha256": "0" * 64}))
    return n_fragments


@pytest.fixture(scope="session")
def mock_catalog(tmp_path_factory: pytest.TempPathFactory) -> MockCatalog:
    """A 3,000-row catalog at HEALPix order 2 (read-only: tests must not modify it)."""
    root = tmp_path_factory.mktemp("catalog")
    df = make_rows(N_ROWS)
    n = write_catalog(root, df)
    return MockCatalog(root=root, df=df, n_fragments=n)


@pytest.fixture(scope="module")
def hats_catalog(mock_catalog, tmp_path_factory) -> MockCatalog:
    """The mock catalog with its HATS catalog-level files (read-only for tests)."""
    root = copy_catalog(mock_catalog.root, tmp_path_factory.mktemp("hats") / "cat")
    return MockCatalog(root=root, df=mock_catalog.df, n_fragments=mock_catalog.n_fragments)
