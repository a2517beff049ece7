"""Reading the files of a label catalog: one dataset scanner for scans of many files, per-file
readers for a few, and cone pruning over sky pixels of mixed HEALPix orders.

Scans that touch many files (no cone, or a large one) go through one :mod:`pyarrow.dataset`
scanner (column projection, files decoded on all threads). Where ``dataset/_metadata`` is up to
date (it lists exactly the files on disk and is newer than all of them), the dataset is built
from it (:func:`pyarrow.dataset.parquet_dataset`), so no file footer is opened before its data
are read. The row filter is applied to each decoded batch, not pushed into the scanner: pyarrow
prunes row groups by their min/max statistics, which leave NaN out, so a condition like
``not (teff > 5000)`` would lose rows whose teff is NaN (it holds for them). Only the cone's
declination band, which NaN can never satisfy, is pushed down. A few files (a cone search, a
``limit``) are read one ``ParquetFile`` at a time, which costs less per file than a scanner.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from distlabels import paths
from distlabels.errors import QueryError, StoreError

__all__ = ["PARTITION_COLUMNS", "angular_separation", "apply_filter", "pixels_touching_cone", "scan_dataset", "read_files"]

PARTITION_COLUMNS = ("Norder", "Dir", "Npix")  # from directory names, int32, queryable on request
PART_SCHEMA = pa.schema([(n, pa.int32()) for n in PARTITION_COLUMNS])
SCAN_MIN_FILES = 16  # from this many files on, one dataset scanner reads them
_FILTER_ROWS = 1_000_000  # rows decoded by the scanner between two filter calls


class Vanished(Exception):
    """A listed file disappeared, or the dataset tree was swapped, while a query read it."""


def angular_separation(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Great-circle distance in degrees between positions in degrees (haversine, broadcast)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(x, np.float64)) for x in (ra1, dec1, ra2, dec2))
    h = np.sin((d1 - d2) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r1 - r2) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _pixels_near_cone(norder: int, npix: np.ndarray, ra: float, dec: float, radius: float) -> np.ndarray:
    """Mask over ``npix`` (nested, order ``norder``) of pixels that may intersect the cone (degrees).

    Conservative: keep a pixel whose centre is within radius + the pixel's own radius (centre to
    sampled boundary points, plus 5% for the curved edges between samples)."""
    from astropy_healpix import boundaries_lonlat, healpix_to_lonlat

    nside = 2 ** int(norder)
    lon, lat = healpix_to_lonlat(npix, nside, dx=0.5, dy=0.5, order="nested")
    clon, clat = lon.deg, lat.deg
    blon, blat = boundaries_lonlat(npix, 4, nside, order="nested")  # (n, 16) boundary samples
    edge = angular_separation(blon.deg, blat.deg, clon[:, None], clat[:, None])
    return angular_separation(clon, clat, ra, dec) <= radius + edge.max(axis=1) * 1.05 + 1e-9


def _fine_order(radius: float) -> int:
    """An order whose pixels (~58.6 deg / 2**order across) are about a quarter of the radius."""
    return int(min(max(math.ceil(math.log2(4 * 58.6 / radius)), 0), 14))


def pixels_touching_cone(keys: Iterable[tuple[int, int]], ra: float, dec: float,
                         radius: float) -> set[tuple[int, int]]:
    """The (Norder, Npix) of ``keys`` whose pixel may intersect the cone (degrees); orders may mix.

    A coarse pixel is kept when one of its descendants at a fine order (pixels about a quarter
    of the radius across) is near the cone: the fine pixels near the cone come from a HEALPix
    cone search with the radius widened by two fine pixels, so the test is conservative and,
    for pixels much larger than the cone, far tighter than a test on the coarse pixel's size.
    Pixels finer than that order are tested one by one (:func:`_pixels_near_cone`).
    """
    keys = {(int(k), int(p)) for k, p in keys}
    if radius >= 180.0:
        return keys
    fine = _fine_order(radius)
    kept: set[tuple[int, int]] = set()
    coarse = [key for key in keys if key[0] <= fine]
    if coarse:
        import astropy.units as u
        from astropy_healpix.core import healpix_cone_search

        side = math.degrees(math.sqrt(4 * math.pi / (12 * 4 ** fine)))
        wide = radius + 2.0 * side
        if wide >= 180.0:
            kept.update(coarse)
        else:
            near = np.asarray(healpix_cone_search(ra * u.deg, dec * u.deg, wide * u.deg, 2 ** fine, order="nested"),
                              np.int64)
            by_order = {k: set((near >> (2 * (fine - k))).tolist()) for k in {k for k, _ in coarse}}
            kept.update(key for key in coarse if key[1] in by_order[key[0]])
    for norder in sorted({k for k, _ in keys if k > fine}):
        pix = np.array(sorted(p for k, p in keys if k == norder), np.int64)
        mask = _pixels_near_cone(norder, pix, ra, dec, radius)
        kept.update((norder, int(p)) for p in pix[mask])
    return kept


# ------------------------------------------------------------------ many files: one scanner
def _metadata_dataset(dataset_dir: Path, files: Sequence[Path], schema: pa.Schema, filesystem: Any,
                      cache: dict) -> ds.Dataset | None:
    """The dataset of ``dataset/_metadata`` if it lists exactly ``files`` and is newer than all of
    them (else None: a run or compact changed files since it was written)."""
    md = dataset_dir / paths.PARQUET_METADATA
    try:
        st = md.stat()
        newest = max((os.stat(f).st_mtime_ns for f in files), default=0)
    except FileNotFoundError:
        return None
    if newest > st.st_mtime_ns:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size, schema)
    if cache.get("key") != key:
        try:
            dset = ds.parquet_dataset(str(md), schema=schema, filesystem=filesystem,
                                      partitioning=ds.partitioning(PART_SCHEMA, flavor="hive"))
        except (OSError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        cache.clear()
        cache.update(key=key, dataset=dset, files={os.path.normpath(f) for f in dset.files})
    if cache["files"] != {os.path.normpath(str(f)) for f in files}:
        return None
    return cache["dataset"]


def file_dataset(root: Path, files: Sequence[Path], schema: pa.Schema, filesystem: Any) -> ds.Dataset:
    """A dataset of ``files`` with the catalog schema and the Norder/Dir/Npix partition columns."""
    return ds.dataset([str(f) for f in files], format="parquet", filesystem=filesystem, schema=schema,
                      partitioning=ds.partitioning(PART_SCHEMA, flavor="hive"),
                      partition_base_dir=str(root / paths.DATASET_DIR))


def apply_filter(t: pa.Table | pa.RecordBatch, filt: pc.Expression, where: str | None, root: Path):
    """``t`` filtered by ``filt``; an expression Arrow cannot evaluate is a QueryError naming ``where``."""
    try:
        return t.filter(filt)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        if where is None:
            raise StoreError(f"cannot read the catalog at {root}: {first}.") from None
        raise QueryError(f"could not evaluate --where {where!r}: {first}.") from None


def scan_dataset(root: Path, files: Sequence[Path], full_schema: pa.Schema, out_schema: pa.Schema,
                 filt: pc.Expression | None, pushdown: pc.Expression | None, where: str | None,
                 filesystem: Any, cache: dict, use_metadata: bool) -> pa.Table | None:
    """The rows of ``files`` that pass ``filt``, columns of ``out_schema``, read by one scanner.

    Returns None when the files cannot be read as one dataset (fragments whose column types
    differ from the catalog's): the caller then reads them one by one, casting each.
    """
    dset = _metadata_dataset(root / paths.DATASET_DIR, files, full_schema, filesystem, cache) if use_metadata else None
    dset = dset or file_dataset(root, files, full_schema, filesystem)
    parts, pending, n_pending = [], [], 0

    def flush() -> None:
        t = pa.Table.from_batches(pending, schema=out_schema)
        parts.append(t if filt is None else apply_filter(t, filt, where, root))
        pending.clear()

    try:
        # pre-buffering coalesces reads for object stores; on local files it only adds copies (~10 %)
        opts = ds.ParquetFragmentScanOptions(pre_buffer=filesystem is not None)
        scanner = dset.scanner(columns=out_schema.names, filter=pushdown, use_threads=True, fragment_scan_options=opts)
        for batch in scanner.to_batches():
            if batch.num_rows:
                pending.append(batch)
                n_pending += batch.num_rows
            if n_pending >= _FILTER_ROWS:
                # one filter call per ~1e6 rows: the expression is bound to the schema per
                # call (~0.5 ms), which would dominate on batches of a few thousand rows
                flush()
                n_pending = 0
        if pending:
            flush()
    except FileNotFoundError as e:
        raise Vanished(str(e).strip().splitlines()[0] if str(e).strip() else "a file vanished") from None
    except OSError as e:
        if "No such file" in str(e) or "not found" in str(e).lower():
            raise Vanished(str(e).strip().splitlines()[0]) from None
        raise StoreError(f"cannot read the catalog at {root}: {str(e).strip().splitlines()[0]}.") from None
    except (pa.ArrowTypeError, pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return None
    return pa.concat_tables(parts) if parts else out_schema.empty_table()


# ------------------------------------------------------------------ a few files: one reader each
def read_files(root: Path, files: Sequence[Path], out_schema: pa.Schema, filt: pc.Expression | None,
               where: str | None, filesystem: Any) -> pa.Table:
    """The rows of ``files`` that pass ``filt``, with the columns of ``out_schema``: one
    ``ParquetFile`` per file and one filter per call. Columns a fragment lacks are null;
    partition columns come from its path."""
    tables = [read_file(f, out_schema, filesystem) for f in files]
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return t if filt is None else apply_filter(t, filt, where, root)


def read_file(path: Path, out_schema: pa.Schema, filesystem: Any) -> pa.Table:
    names = out_schema.names
    try:
        src = filesystem.open_input_file(str(path)) if filesystem is not None else pa.OSFile(str(path))
        try:
            pf = pq.ParquetFile(src)
            file_schema = pf.schema_arrow
            t = pf.read(columns=[c for c in names if file_schema.get_field_index(c) >= 0], use_threads=False)
        finally:
            src.close()
    except FileNotFoundError as e:
        raise Vanished(str(e).strip().splitlines()[0] if str(e).strip() else "a file vanished") from None
    except OSError as e:
        if "No such file" in str(e) or "not found" in str(e).lower():
            raise Vanished(str(e).strip().splitlines()[0]) from None
        raise StoreError(f"cannot read {path}: {e}.") from None
    except pa.ArrowInvalid as e:
        raise StoreError(f"cannot read {path}: {e}.") from None
    if t.schema.equals(out_schema):
        return t  # the usual case: every fragment written alike
    cols, part = [], None
    for field in out_schema:
        if field.name in t.column_names:
            col = t.column(field.name)
            cols.append(col if col.type == field.type else col.cast(field.type))
        elif field.name in PARTITION_COLUMNS:
            if part is None:
                norder, npix = paths.parse_pixel_dir(path)
                part = {"Norder": norder, "Dir": (npix // 10000) * 10000, "Npix": npix}
            cols.append(pa.array(np.full(t.num_rows, part[field.name], np.int32)))
        else:
            cols.append(pa.nulls(t.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=out_schema)
