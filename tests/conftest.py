"""Shared fixtures: a real trained emulator (bossbrain, imported through the safe unpickler) and
small mock stores made from it. Session-scoped: built once, read by many tests."""
from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pytest

from distlabels.config import MockConfig
from distlabels.io.store import list_column, write_store


def _have(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="session")
def bossbrain_model_dir(tmp_path_factory):
    if not _have("bossbrain"):
        pytest.skip("bossbrain is not installed (pip install 'distlabels[test]')")
    from distlabels.models.importers import import_bossbrain

    return import_bossbrain("4000-5000", tmp_path_factory.mktemp("models") / "bb45")


@pytest.fixture(scope="session")
def bossbrain_model(bossbrain_model_dir):
    from distlabels.models import load

    return load(bossbrain_model_dir)


BAD_ROWS = {"bad:nan-flux": "all-NaN flux", "bad:zero-ivar": "ivar zero everywhere",
            "bad:few-pixels": "only 20 usable pixels"}


def add_bad_rows(table: pa.Table, n_pix: int) -> pa.Table:
    """Append three unusable spectra (NaN flux, zero ivar, too few pixels) to a store table."""
    flux = np.ones((3, n_pix), np.float32)
    ivar = np.full((3, n_pix), 100.0, np.float32)
    flux[0] = np.nan
    ivar[1] = 0.0
    ivar[2, 20:] = 0.0
    rows = {c: table.column(c).slice(0, 3) for c in table.column_names}
    rows["source_id"] = pa.array(list(BAD_ROWS))
    rows["flux"] = list_column(flux)
    rows["ivar"] = list_column(ivar)
    rows["mask"] = list_column(np.zeros((3, n_pix), bool), pa.bool_())
    extra = pa.table({c: rows[c] for c in table.column_names}).cast(table.schema)
    return pa.concat_tables([table, extra])


@pytest.fixture(scope="session")
def mock_snr50(bossbrain_model):
    """(table, meta) of 240 LAMOST-like mock stars at S/N 50."""
    from distlabels.mock import make_mock

    return make_mock(bossbrain_model, MockConfig(n=240, snr_min=50, snr_max=50, seed=7))


@pytest.fixture(scope="session")
def mock_store(tmp_path_factory, mock_snr50):
    """A store of the S/N 50 mock plus three unusable spectra."""
    table, meta = mock_snr50
    table = add_bad_rows(table, len(meta["wavelength_aa"]))
    root = tmp_path_factory.mktemp("stores") / "snr50"
    write_store(root, table, meta, max_rows_per_partition=60)
    return root


@pytest.fixture(scope="session")
def fitted_catalog(tmp_path_factory, bossbrain_model_dir, mock_store):
    """The S/N 50 mock store fitted on a real 2-worker LocalCluster: (catalog path, RunSummary)."""
    from distlabels.config import RunConfig
    from distlabels.pipeline import run_fit

    out = tmp_path_factory.mktemp("catalogs") / "snr50"
    summary = run_fit(bossbrain_model_dir, mock_store, out, RunConfig(workers=2, task_rows=40, progress=False))
    return out, summary
