"""New kernel outputs reach the catalog rows: vsini, resolution, per-label bound bits, covariance."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from distlabels.catalog.writer import result_table
from distlabels.fit import FitResult


def test_optional_fit_outputs_become_columns():
    n, L = 3, 2
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, L + 1, L + 1))
    cov = a @ a.transpose(0, 2, 1)
    res = FitResult(("teff", "logg"), rng.normal(size=(n, L)), np.ones((n, L)), np.zeros(n), np.ones(n), np.ones(n),
                    np.full(n, 5), np.array([0, 2, 0]), np.ones((n, 4)), np.full(n, 50.0), covariance=cov,
                    vsini=np.array([10.0, 200.0, 0.0]), vsini_err=np.array([3.0, 4.0, 5.0]),
                    labels_at_bound=np.array([0, 2, 0]))
    inputs = pa.table({"source_id": ["a", "b", "c"], "snr": pa.array([50.0, 50.0, 50.0], pa.float32())})
    t = result_table(inputs, res, "m")
    assert t.column("vsini").to_pylist() == [10.0, 200.0, 0.0]
    assert "resolution" not in t.column_names                 # not fitted: no column
    assert t.column("labels_at_bound").to_pylist() == [0, 2, 0]
    back = np.array(t.column("covariance").to_pylist()).reshape(n, L + 1, L + 1)
    np.testing.assert_allclose(back, cov, rtol=1e-6)
    plain = result_table(inputs, FitResult(("teff", "logg"), np.zeros((n, L)), np.ones((n, L)), np.zeros(n), np.ones(n),
                                           np.ones(n), np.full(n, 5), np.zeros(n, int), np.ones((n, 4)),
                                           np.full(n, 50.0)), "m")
    assert "covariance" not in plain.column_names and "vsini" not in plain.column_names
    assert plain.column("labels_at_bound").to_pylist() == [0, 0, 0]
