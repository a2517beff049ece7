"""Building and writing label-catalog fragments.

A catalog fragment holds one row per input spectrum of a store partition, fitted or flagged:
identifiers and sky position copied from the store, every label and ``<label>_err``, ``rv``,
``rv_err``, ``chi2_red``, ``n_iter``, ``flags``, ``model_id`` and, when the store has them, the
``true_*`` columns of a mock. Fragments are written atomically (see
:func:`distlabels.io.store.write_fragment`), so a reader never sees half a file and a retried
task overwrites the same path with the same content.

At the end of each run (and after ``distlabels compact``) :func:`write_catalog_meta` rewrites the
catalog-level files: ``catalog.json`` and the HATS files of :mod:`.hats`. A fragment that
``compact`` merged into its pixel's ``Npix=N.parquet`` no longer exists under its own name;
:func:`fragment_done` still reports it as written, so a re-run skips it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import paths
from ..io.store import write_fragment, write_json_atomic
from .hats import write_hats_files

if TYPE_CHECKING:  # torch is not needed to write or read a catalog
    from ..fit.kernel import FitResult

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
    for c in ("star_id", "primary", "bary_corr_kms"):   # stores made by `distlabels ingest`
        if c in inputs.column_names:
            cols[c] = inputs.column(c)
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


# catalog.json keys computed from the files (a caller's values for them are replaced)
COMPUTED_KEYS = ("n_rows", "n_fragments", "n_pixels", "healpix_order", "hats_max_rows", "moc_sky_fraction",
                 "parquet_metadata", "hats", "format", "updated")


def write_catalog_meta(root: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the catalog-level files: ``catalog.json`` and the HATS files (see :mod:`.hats`).

    meta: the description of the catalog: ``label_names``, ``model_id``, ``provenance`` (model
    id and sha256, model path, input store, fit config, distlabels version), ``store_meta`` and
    optionally ``catalog_name``. Counts are recomputed from the fragment footers. Returns the
    full catalog.json content.
    """
    root = Path(root)
    base = {k: v for k, v in meta.items() if k not in COMPUTED_KEYS}
    counts = write_hats_files(root, base)
    full = dict(base)
    full.update(counts, format="distlabels-catalog/1", updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json_atomic(root / paths.CATALOG_META, full)
    return full


def fragment_done(root: str | os.PathLike, norder: int, npix: int, name: str) -> bool:
    """Whether fragment ``name`` of pixel (norder, npix) is in the catalog: as its own file, or
    merged by ``distlabels compact`` into the pixel's file (listed in ``_compaction.json``)."""
    final = paths.fragment_path(root, norder, npix, name)
    return final.exists() or paths.is_compacted(root, final.relative_to(root).as_posix())
