"""The Parquet spectra store: one row per spectrum, partitioned on the sky like a HATS catalog.

Columns: ``source_id`` (unique string), ``survey``, ``ra``/``dec`` (deg), ``_healpix_29``, ``snr``,
``flux`` and ``ivar`` (list<float32>, all on the store's one wavelength grid), optional ``mask``
(list<bool>, True = bad pixel), optional ``ingest_flags`` (int32) and, for mocks, ``true_<label>``
and ``true_rv``. ``store.json`` at the root describes the grid (``wavelength_aa``,
``wavelength_medium``, ``rv_frame``, ``resolution``, continuum ``segments``) and the counts.
Paths come from :mod:`distlabels.paths`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..errors import StoreError
from ..healpix import choose_order, healpix29, parent_pixel

REQUIRED_COLUMNS = ("source_id", "ra", "dec", "flux", "ivar")


def list_column(arr: np.ndarray, dtype=pa.float32()) -> pa.Array:
    """(n, n_pix) numpy -> list<dtype> Arrow array without per-row Python objects."""
    arr = np.ascontiguousarray(arr)
    n, m = arr.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(arr.reshape(-1), type=dtype))


def list_to_numpy(col: pa.ChunkedArray | pa.Array, n_pix: int, dtype=np.float32) -> np.ndarray:
    """list column -> (n, n_pix) numpy; rows of another length come back all-NaN (caller flags them)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    fill = False if dtype == np.bool_ else np.nan
    if n and np.all(lengths == n_pix) and arr.null_count == 0:
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        return np.array(flat, dtype=dtype).reshape(n, n_pix)  # a writable copy, not a view of Arrow memory
    out = np.full((n, n_pix), fill, dtype=dtype)
    for i in range(n):
        if lengths[i] == n_pix and arr[i].is_valid:
            out[i] = np.asarray(arr[i].values.to_numpy(zero_copy_only=False), dtype=dtype)
    return out


def write_fragment(table: pa.Table, final: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``table`` to ``final`` atomically: hidden temporary file, fsync, rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temp_path(final, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = paths.temp_path(path)
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_store(root: str | os.PathLike, table: pa.Table, meta: dict[str, Any], *,
                max_rows_per_partition: int = 1000, overwrite: bool = False) -> "SpectraStore":
    """Partition ``table`` on the sky and write it as a store under ``root``.

    meta must hold ``wavelength_aa`` (list), ``wavelength_medium``, ``rv_frame`` and may hold
    ``resolution``, ``segments``, ``survey``. The HEALPix order is the lowest whose mean pixel
    holds at most ``max_rows_per_partition`` rows; fuller pixels are split into several fragments.
    """
    root = Path(root)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise StoreError(f"cannot write a store without column(s) {', '.join(missing)}.")
    if root.exists():
        if not overwrite:
            raise StoreError(f"{root} already exists; choose another --out or pass --overwrite.")
        shutil.rmtree(root)
    ids = table.column("source_id").to_numpy(zero_copy_only=False)
    if len(np.unique(ids)) != len(ids):
        raise StoreError("source_id values are not unique; every spectrum needs its own id.")
    if paths.HEALPIX_COLUMN not in table.column_names:
        hp = healpix29(table.column("ra").to_numpy(), table.column("dec").to_numpy())
        table = table.append_column(paths.HEALPIX_COLUMN, pa.array(hp, pa.int64()))
    hp = table.column(paths.HEALPIX_COLUMN).to_numpy()
    order = choose_order(len(table), max_rows_per_partition)
    pix = parent_pixel(hp, order)
    # Sort by the spatial index so that a pixel is a contiguous, sky-ordered run of rows.
    sort = np.argsort(hp, kind="stable")
    table, pix = table.take(pa.array(sort)), pix[sort]
    bounds = np.flatnonzero(np.diff(pix)) + 1
    starts = np.concatenate([[0], bounds]) if len(pix) else np.array([], int)
    stops = np.concatenate([bounds, [len(pix)]]) if len(pix) else np.array([], int)
    n_frag = 0
    for a, b in zip(starts, stops):
        for k, lo in enumerate(range(a, b, max_rows_per_partition)):
            hi = min(lo + max_rows_per_partition, b)
            write_fragment(table.slice(lo, hi - lo), paths.fragment_path(root, order, int(pix[a]), f"part-{k:04d}"))
            n_frag += 1
    full = dict(meta)
    full.update(n_spectra=len(table), n_fragments=n_frag, hats_order=order, n_pix=len(meta["wavelength_aa"]),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), format="distlabels-store/1")
    write_json_atomic(root / paths.STORE_META, full)
    return open_store(root)


@dataclass(frozen=True)
class Partition:
    """A unit of work: rows [row_start, row_stop) of one store fragment."""

    fragment: str        # path relative to the store root
    row_start: int
    row_stop: int
    norder: int
    npix: int

    @property
    def name(self) -> str:
        """Deterministic catalog fragment name (so a retried task writes the same file)."""
        return f"{Path(self.fragment).stem}-r{self.row_start:07d}"

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


class SpectraStore:
    """A spectra store opened for reading."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / paths.STORE_META
        if not self.root.exists():
            raise StoreError(f"spectra store {self.root} does not exist.")
        if not meta_path.is_file():
            raise StoreError(f"{self.root} is not a spectra store (no {paths.STORE_META}).")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path} is not valid JSON ({e}).") from None
        if "wavelength_aa" not in self.meta:
            raise StoreError(f"{meta_path} has no wavelength_aa grid.")
        self.wavelength = np.asarray(self.meta["wavelength_aa"], dtype=np.float64)

    @property
    def fragments(self) -> list[Path]:
        return paths.list_fragments(self.root)

    @property
    def wavelength_medium(self) -> str:
        return self.meta.get("wavelength_medium", "vacuum")

    @property
    def resolution(self) -> float | None:
        return self.meta.get("resolution")

    @property
    def segments(self):
        s = self.meta.get("segments")
        return tuple(tuple(x) for x in s) if s else None

    def manifest(self) -> list[dict[str, Any]]:
        """Every fragment with its row count and size: the run's record of its input."""
        out = []
        for f in self.fragments:
            md = pq.ParquetFile(f).metadata
            out.append({"path": f.relative_to(self.root).as_posix(), "n_rows": md.num_rows,
                        "bytes": f.stat().st_size})
        return out

    @staticmethod
    def manifest_hash(manifest: list[dict[str, Any]]) -> str:
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()

    def partitions(self, task_rows: int) -> list[Partition]:
        """Split every fragment into row ranges of at most ``task_rows`` rows (tasks of seconds)."""
        parts = []
        for f in self.manifest():
            norder, npix = paths.parse_pixel_dir(f["path"])
            for lo in range(0, f["n_rows"], max(int(task_rows), 1)):
                parts.append(Partition(f["path"], lo, min(lo + task_rows, f["n_rows"]), norder, npix))
        return parts

    def read(self, part: Partition | str, columns: list[str] | None = None) -> pa.Table:
        """Rows of one partition (or a whole fragment given by relative path)."""
        if isinstance(part, Partition):
            t = pq.read_table(self.root / part.fragment, columns=columns)
            return t.slice(part.row_start, part.n_rows)
        return pq.read_table(self.root / part, columns=columns)

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in self.fragments])

    def source_ids(self) -> np.ndarray:
        return self.read_all(columns=["source_id"]).column("source_id").to_numpy(zero_copy_only=False)

    def spectra(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(flux, ivar, mask) as (n, n_pix) arrays from a table of this store."""
        n_pix = len(self.wavelength)
        flux = list_to_numpy(table.column("flux"), n_pix)
        ivar = list_to_numpy(table.column("ivar"), n_pix)
        mask = list_to_numpy(table.column("mask"), n_pix, np.bool_) if "mask" in table.column_names else None
        return flux, ivar, mask


def open_store(root: str | os.PathLike) -> SpectraStore:
    return SpectraStore(root)
