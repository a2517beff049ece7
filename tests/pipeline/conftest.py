"""Fixtures of the production-run tests: a small mock store, a cheap kernel config (these tests are
about exactly-once bookkeeping under faults, not accuracy), and one real 2-process LocalCluster
shared by the tests of this folder."""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlabels.config import FitConfig, MockConfig, RunConfig
from distlabels.io.store import open_store, write_store

# Few LM iterations, a small start library: a star costs a fraction of the default.
CHEAP_FIT = FitConfig(max_iter=4, library_size=32, n_starts=1, n_templates=1)
TASK_ROWS = 4
CHEAP_YAML = """\
workers: 1
task_rows: 4
retries: 1
fit:
  max_iter: 4
  library_size: 32
  n_starts: 1
  n_templates: 1
"""


def cheap_run(**kw) -> RunConfig:
    kw.setdefault("task_rows", TASK_ROWS)
    kw.setdefault("progress", False)
    kw.setdefault("retries", 1)
    return RunConfig(fit=CHEAP_FIT, **kw)


@pytest.fixture(scope="session")
def small_mock(bossbrain_model):
    from distlabels.mock import make_mock

    return make_mock(bossbrain_model, MockConfig(n=40, snr_min=40, snr_max=60, seed=11))


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, small_mock):
    """40 LAMOST-like mock spectra in about ten sky-pixel fragments (about 12 tasks of 4 rows)."""
    table, meta = small_mock
    root = tmp_path_factory.mktemp("prod-stores") / "small"
    write_store(root, table, meta, max_rows_per_partition=16)
    return root


@pytest.fixture(scope="session")
def interrupt_store(tmp_path_factory, bossbrain_model):
    """160 mock spectra (about 40 tasks of 4 rows): enough work that a run is still going when a
    test interrupts it after its first fragment (40 stars no longer were, once the kernel got faster)."""
    from distlabels.mock import make_mock

    table, meta = make_mock(bossbrain_model, MockConfig(n=160, snr_min=40, snr_max=60, seed=12))
    root = tmp_path_factory.mktemp("prod-stores") / "interrupt"
    write_store(root, table, meta, max_rows_per_partition=16)
    return root


@pytest.fixture(scope="session")
def poison_store(tmp_path_factory, small_mock):
    """The small store with one fragment whose ``flux`` column has the wrong type (strings)."""
    table, meta = small_mock
    root = tmp_path_factory.mktemp("prod-stores") / "poison"
    store = write_store(root, table, meta, max_rows_per_partition=16)
    victim = max(store.fragments, key=lambda f: pq.ParquetFile(f).metadata.num_rows)
    t = pq.read_table(victim)
    bad = pa.array([f"not a spectrum {i}" for i in range(len(t))])
    t = t.set_column(t.column_names.index("flux"), "flux", bad)
    pq.write_table(t, victim)
    return root, victim


@pytest.fixture(scope="session")
def dask_client():
    """A real LocalCluster: 2 worker processes (with nannies), 1 thread each."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.CRITICAL)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def client(dask_client):
    """The shared client with both workers up (a test may have killed one)."""
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client


def store_ids(root) -> list[str]:
    return sorted(open_store(root).source_ids().tolist())
