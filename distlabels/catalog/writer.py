"""Building and writing label-catalog fragments.

A catalog fragment holds one row per input spectrum of a store partition, fitted or flagged:
identifiers and sky position copied from the store, every label and ``<label>_err``, ``rv``,
``rv_err``, ``chi2_red``, ``n_iter``, ``flags``, ``model_id`` and, when the store has them, the
``true_*`` columns of a mock. Fragments are written atomically (see
:func:`distlabels.io.store.write_fragment`), so a reader never sees half a file and a retried
task overwrites the same path with the same content.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..fit.kernel import FitResult
from ..io.store import write_fragment, write_json_atomic

PASSTHROUGH = ("source_id", "survey", "ra", "dec", paths.HEALPIX_COLUMN)


def result_table(inputs: pa.Table, result: FitResult, model_id: str) -> pa.Table:
    """Catalog rows for ``inputs`` (a store table) and their fit ``result`` (same order)."""
    n = len(inputs)
    if len(result) != n:
        raise ValueError(f"{len(result)} fit results for {n} input rows")
    cols: dict[str, pa.Array] = {}
    for c in PASSTHROUGH:
        if c in inputs.column_names:
            cols[c] = inputs.column(c)
    snr = result.snr.astype(np.float32)
    if "snr" in inputs.column_names:
        given = inputs.column("snr").to_numpy(zero_copy_only=False).astype(np.float32)
        snr = np.where(np.isfinite(given), given, snr)
    cols["snr"] = pa.array(snr)
    for j, name in enumerate(result.label_names):
        cols[name] = pa.array(result.labels[:, j].astype(np.float32))
        cols[f"{name}_err"] = pa.array(result.errors[:, j].astype(np.float32))
    cols["rv"] = pa.array(result.rv.astype(np.float32))
    cols["rv_err"] = pa.array(result.rv_err.astype(np.float32))
    for name in ("vsini", "vsini_err", "resolution", "resolution_err"):
        value = getattr(result, name, None)
        if value is not None:
            cols[name] = pa.array(np.asarray(value).astype(np.float32))
    cols["chi2_red"] = pa.array(result.chi2_red.astype(np.float32))
    cols["n_iter"] = pa.array(result.n_iter.astype(np.int16))
    flags = result.flags.astype(np.int64)
    if "ingest_flags" in inputs.column_names:
        cols["ingest_flags"] = inputs.column("ingest_flags")
    cols["flags"] = pa.array(flags)
    if getattr(result, "labels_at_bound", None) is not None:
        cols["labels_at_bound"] = pa.array(result.labels_at_bound.astype(np.int64))   # bit j: label j on its bound
    if getattr(result, "covariance", None) is not None:
        # Row-major (n_labels + 1)^2 matrix over the labels (physical units) and RV (km/s).
        cov = result.covariance.astype(np.float32).reshape(n, -1)
        cols["covariance"] = pa.FixedSizeListArray.from_arrays(pa.array(cov.ravel()), cov.shape[1])
    cols["model_id"] = pa.array([model_id] * n, pa.string())
    for c in inputs.column_names:
        if c.startswith("true_"):
            cols[c] = inputs.column(c)
    return pa.table(cols)


def write_catalog_fragment(root: str | os.PathLike, norder: int, npix: int, name: str, table: pa.Table,
                           provenance: dict[str, Any] | None = None) -> Path:
    """Write one fragment into ``root/dataset/Norder=K/Dir=D/Npix=N/name.parquet`` atomically."""
    md = {"distlabels": json.dumps(provenance, default=str)} if provenance else None
    return write_fragment(table, paths.fragment_path(root, norder, npix, name), md)


def write_catalog_meta(root: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``catalog.json``: label names, model, store, counts (recomputed from the files)."""
    root = Path(root)
    frags = paths.list_fragments(root)
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in frags)
    full = dict(meta)
    full.update(n_rows=n_rows, n_fragments=len(frags), format="distlabels-catalog/1",
                updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json_atomic(root / paths.CATALOG_META, full)
    return full
