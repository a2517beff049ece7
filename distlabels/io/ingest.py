"""Survey FITS -> spectra store, the pure per-task functions (no Dask; the graph is in
:mod:`distlabels.pipeline.ingest`).

An ingest run has three stages, each a set of idempotent tasks writing under deterministic names:

1. **map** (:func:`map_task`, one task per batch of files): read every file with the run's loader,
   select stars, flag unusable spectra, resample onto a model grid if asked, and write one
   intermediate Parquet file ``_ingest/map/<task>.parquet`` (rows sorted by ``_healpix_29``, each
   spectrum at its own length with its position on the survey's pixel lattice) plus one quarantine
   fragment ``_quarantine/<task>.parquet`` for the files and spectra it could not use.
2. **plan** (:func:`distlabels.io.ingest_plan.plan_task`, one task): pick the store grid, drop
   duplicate source_ids, choose one primary spectrum per star, count rows per sky pixel.
3. **reduce** (:func:`distlabels.io.ingest_plan.reduce_partition`, one task per sky partition):
   gather the partition's rows from the map files, align them by index on the store grid (padding
   with ivar 0) and write ``dataset/Norder=K/Dir=D/Npix=N/part-XXXX.parquet``.

``ingest_flags`` (int32 column; 0 = fine) marks spectra that were read but cannot be used, so that
they reach the catalog flagged rather than vanish (bits of :class:`IngestFlag`).
"""
from __future__ import annotations

import enum
import glob
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..errors import DistlabelsError
from ..healpix import healpix29
from .loaders import LOADERS, LayoutError, LoadedFile, LoaderOptions, identify_file, read_file
from .loaders.base import ROW_FIELDS, SELECTION_ONLY, median_snr
from .resample import Resampler
from .store import list_column, write_fragment, write_json_atomic
from .wavelength import to_vacuum

FORMAT_VERSION = "distlabels-ingest/1"
# Dictionary encoding only where values repeat: on float lists it triples the write time.
DICT_COLUMNS = ("survey", "survey_class", "survey_subclass", "file_path", "_grid_key")
MAP_ROW_GROUP = 128             # rows per row group of a map output (~4 MB of LAMOST spectra)
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fits.fz", ".fz", ".fits.bz2")
LIST_SUFFIXES = (".txt", ".lst", ".list")


class IngestFlag(enum.IntFlag):
    """Bits of the store's ``ingest_flags`` column (the spectrum is kept; the fit flags it too)."""

    NO_FINITE_FLUX = 1 << 0      # no pixel has a finite flux
    NO_POSITIVE_IVAR = 1 << 1    # no pixel has ivar > 0 after masking
    BAD_COORDS = 1 << 2          # RA/Dec missing or out of range: placed in HEALPix pixel 0
    SURVEY_FLAGGED = 1 << 3      # the survey's own spectrum-level flag is set (survey_flags != 0)
    LOW_COVERAGE = 1 << 4        # under half of the spectrum's pixels (within its span) are usable

    @classmethod
    def describe(cls, value: int) -> list[str]:
        return [f.name for f in cls if value & f]


# Columns a --select expression may use (types for the safe translator); is_star is the default.
SELECT_SCHEMA = pa.schema([
    ("source_id", pa.string()), ("star_id", pa.string()), ("ra", pa.float64()), ("dec", pa.float64()),
    ("snr", pa.float32()), ("mjd", pa.float64()), ("survey_snr", pa.float32()), ("survey_rv_kms", pa.float32()),
    ("survey_class", pa.string()), ("survey_subclass", pa.string()), ("survey_flags", pa.int64()),
    ("resolution", pa.float32()), ("ingest_flags", pa.int32()), ("file_row", pa.int32()), ("is_star", pa.bool_()),
    ("desi_target", pa.int64()), ("bgs_target", pa.int64()), ("mws_target", pa.int64()),
])
DEFAULT_SELECT = "is_star"

QUARANTINE_SCHEMA = pa.schema([("path", pa.string()), ("hdu", pa.int32()), ("row", pa.int32()),
                               ("source_id", pa.string()), ("reason", pa.string()), ("stage", pa.string()),
                               ("task", pa.string())])


@dataclass(frozen=True)
class TargetGrid:
    """A model's grid for ``--grid MODEL_DIR``: spectra are resampled onto it."""

    wavelength_aa: tuple[float, ...]
    medium: str                       # medium of wavelength_aa (air or vacuum)
    source: str = ""                  # model directory / id, for store.json
    sha256: str = ""

    @property
    def key(self) -> str:
        h = hashlib.sha256(np.asarray(self.wavelength_aa, np.float64).tobytes() + self.medium.encode())
        return f"model|{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class IngestSpec:
    """Everything a map task needs (pickled to the workers)."""

    family: str                       # loader name, e.g. "lamost", "apogee-apstar"
    select: Any = None                # pyarrow Expression over SELECT_SCHEMA (None: is_star)
    select_text: str = DEFAULT_SELECT
    target: TargetGrid | None = None  # None: the survey's native grid
    options: LoaderOptions = field(default_factory=LoaderOptions)

    @property
    def key(self) -> str:
        """Identity of everything that changes a map output (not the files)."""
        d = {"family": self.family, "select": self.select_text, "target": self.target.key if self.target else "native",
             "options": asdict(self.options), "format": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- inputs
def expand_inputs(items: list[str]) -> list[str]:
    """Absolute paths of the input files named by ``items``, sorted, unique.

    Each item is a file, a directory (searched recursively for FITS names: .fits, .fit, .fz and
    their .gz), a glob pattern, or a text file (.txt/.lst/.list) listing such items one per line
    (relative to the list's folder; '#' starts a comment). Raises DistlabelsError naming an item
    that matches nothing.
    """
    out: set[str] = set()

    def add(item: str, base: Path | None, depth: int) -> None:
        p = Path(item).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir():
            for q in p.rglob("*"):
                if q.is_file() and q.name.lower().endswith(FITS_SUFFIXES) and not q.name.startswith("."):
                    out.add(str(q.resolve()))
            return
        if p.is_file():
            if p.name.lower().endswith(LIST_SUFFIXES):
                if depth > 3:
                    raise DistlabelsError(f"list file {p} nests lists too deeply.")
                for line in p.read_text(errors="replace").splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line:
                        add(line, p.parent, depth + 1)
            else:
                out.add(str(p.resolve()))
            return
        matches = glob.glob(str(p), recursive=True)
        if not matches:
            where = f" (listed in a file under {base})" if base else ""
            raise DistlabelsError(f"input {item} does not exist and matches no file{where}.")
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                add(m, None, depth)
            elif mp.is_file():
                out.add(str(mp.resolve()))

    for it in items:
        add(str(it), None, 0)
    return sorted(out)


def inputs_fingerprint(files: list[str]) -> str:
    """sha256 over (path, size, mtime) of every input: a re-run with the same inputs matches."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def choose_family(files: list[str], survey: str = "auto", sample: int = 48, min_share: float = 0.2) -> tuple[str, dict]:
    """The loader family of a run, from identifying a spread sample of the inputs (headers only).

    Returns (family, {family: count in sample}). Raises DistlabelsError when no sampled file is a
    known survey file, or when two families each make up ``min_share`` of the identified sample
    (one store holds one survey's grid). A minority of other files is left to the quarantine.
    """
    idx = np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).round().astype(int)) if files else []
    counts: dict[str, int] = {}
    for i in idx:
        ld, _ = identify_file(files[i], survey)
        if ld is not None:
            counts[ld.name] = counts.get(ld.name, 0) + 1
    if not counts:
        what = "survey" if survey == "auto" else f"{survey} "
        raise DistlabelsError(f"none of the {len(idx)} sampled input files is a {what}file distlabels can read "
                              f"(first: {files[0] if files else 'none'}).")
    total = sum(counts.values())
    big = sorted((k for k, v in counts.items() if v >= max(2, min_share * total) or v == total),
                 key=lambda k: -counts[k])
    if len(big) > 1:
        parts = ", ".join(f"{k} ({counts[k]} of {total} sampled)" for k in big)
        raise DistlabelsError(f"the inputs mix files of several surveys or grids ({parts}) and one store holds one "
                              "survey's grid: ingest each into its own --out store.")
    family = max(counts, key=lambda k: counts[k])
    return family, counts


def make_batches(files: list[str], n_workers: int, files_per_task: int | None = None,
                 target_bytes: float = 256e6) -> list[list[str]]:
    """Split the sorted inputs into contiguous batches: at most ``target_bytes`` of input per task,
    and at least four tasks per worker (balance, progress) when there are files enough."""
    if not files:
        return []
    if files_per_task is None:
        sizes = [os.path.getsize(f) if os.path.exists(f) else 0 for f in files[:: max(len(files) // 200, 1)]]
        mean = max(float(np.mean(sizes)) if sizes else 1.0, 1.0)
        by_bytes = max(int(target_bytes // mean), 1)
        by_balance = max(int(np.ceil(len(files) / (4 * max(n_workers, 1)))), 1)
        files_per_task = max(min(by_bytes, by_balance), 1)
    return [files[i:i + files_per_task] for i in range(0, len(files), files_per_task)]


def task_name(index: int, batch: list[str], spec: IngestSpec) -> str:
    h = hashlib.sha256((spec.key + "\n" + "\n".join(batch)).encode()).hexdigest()[:12]
    return f"map-{index:05d}-{h}"


# ----------------------------------------------------------------------------------- map stage
def grid_key(lf: LoadedFile) -> str:
    g, f = lf.grid, lf.facts
    k = f"{f.family}|{g.kind}|{g.step:.12g}|{f.wavelength_medium}|{f.rv_frame}"
    if g.kind == "table":
        k += "|" + hashlib.sha256(np.asarray(g.table, np.float64).tobytes()).hexdigest()[:12]
    return k


def _flags(flux, ivar, mask, ra, dec, survey_flags, span=None) -> np.ndarray:
    n = len(flux)
    fl = np.zeros(n, np.int32)
    fl[~np.isfinite(flux).any(1)] |= IngestFlag.NO_FINITE_FLUX
    fl[~(ivar > 0).any(1)] |= IngestFlag.NO_POSITIVE_IVAR
    with np.errstate(invalid="ignore"):
        badc = ~np.isfinite(ra) | ~np.isfinite(dec) | (np.abs(dec) > 90)
    fl[badc] |= IngestFlag.BAD_COORDS
    fl[np.asarray(survey_flags) != 0] |= IngestFlag.SURVEY_FLAGGED
    use = ~mask if span is None else (~mask & span[None, :])
    n_span = mask.shape[1] if span is None else max(int(span.sum()), 1)
    fl[use.sum(1) < 0.5 * n_span] |= IngestFlag.LOW_COVERAGE
    return fl


class _Resamplers:
    """Resampler per distinct input grid (LAMOST files differ by offsets: a few distinct grids)."""

    def __init__(self, target: TargetGrid):
        self.target = target
        self.cache: dict[tuple, Resampler] = {}

    def get(self, lf: LoadedFile) -> Resampler:
        g = lf.grid
        key = (g.kind, g.start, g.step, g.n_pix, lf.facts.wavelength_medium,
               hash(g.table) if g.table is not None else 0)
        r = self.cache.get(key)
        if r is None:
            w_in = to_vacuum(g.wavelength_aa(), lf.facts.wavelength_medium)
            w_out = to_vacuum(np.asarray(self.target.wavelength_aa), self.target.medium)
            r = Resampler(w_in, w_out)
            if len(self.cache) > 64:
                self.cache.clear()
            self.cache[key] = r
        return r


@dataclass
class _Acc:
    """Rows collected by one map task before selection (per-row arrays and flat pixel values)."""

    cols: dict[str, list] = field(default_factory=lambda: {k: [] for k in ROW_FIELDS})
    flux: list = field(default_factory=list)
    ivar: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    n_pix: list = field(default_factory=list)
    lat_pos: list = field(default_factory=list)
    gkey: list = field(default_factory=list)
    path: list = field(default_factory=list)
    snr: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    res_seg: list = field(default_factory=list)     # (n, n_segments) R per arm/chip
    facts: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)     # grid key -> wavelengths, for table grids
    n_rows: int = 0


def _check_loaded(lf: LoadedFile) -> None:
    """A loader's output must be self-consistent before it joins the task's rows."""
    n, m = lf.flux.shape
    if lf.ivar.shape != (n, m) or lf.mask.shape != (n, m) or m != lf.grid.n_pix:
        raise LayoutError(f"flux {lf.flux.shape}, ivar {lf.ivar.shape}, mask {lf.mask.shape} and the "
                          f"{lf.grid.n_pix}-pixel grid disagree")
    bad = [k for k, v in lf.rows.items() if len(v) != n]
    if bad:
        raise LayoutError(f"per-spectrum fields {', '.join(bad)} do not have {n} rows")
    if any(not s for s in lf.rows["source_id"]):
        raise LayoutError("a spectrum has no identifier")


def _collect(acc: _Acc, lf: LoadedFile, path: str, spec: IngestSpec, resamplers: _Resamplers | None) -> bool:
    """Add one file's spectra to ``acc``; returns True if the run resampled onto a finer grid."""
    flux, ivar, mask = lf.flux, lf.ivar, lf.mask
    up, span = False, None
    if resamplers is not None:
        r = resamplers.get(lf)
        flux, ivar, mask = r(flux, ivar)
        up, span = r.upsampling, r.inside
        key, lat = resamplers.target.key + f"|{lf.facts.rv_frame}", np.zeros(lf.n)
    else:
        key, lat = grid_key(lf), np.full(lf.n, lf.grid.lattice_pos)
        if lf.grid.kind == "table" and key not in acc.tables:
            acc.tables[key] = list(lf.grid.table)
    snr = median_snr(flux, ivar)
    fl = _flags(flux, ivar, mask, lf.rows["ra"], lf.rows["dec"], lf.rows["survey_flags"], span)
    n_seg = len(lf.facts.split_aa) + 1
    rs = lf.resolution_segments
    if rs is None or rs.shape != (lf.n, n_seg):
        rs = np.repeat(np.asarray(lf.rows["resolution"], np.float64)[:, None], n_seg, axis=1)
    for k in ROW_FIELDS:
        acc.cols[k].append(lf.rows[k])
    acc.flux.append(np.ascontiguousarray(flux, np.float32).ravel())
    acc.ivar.append(np.ascontiguousarray(ivar, np.float32).ravel())
    acc.mask.append(np.ascontiguousarray(mask, bool).ravel())
    acc.n_pix.append(np.full(lf.n, flux.shape[1], np.int32))
    acc.lat_pos.append(lat)
    acc.gkey += [key] * lf.n
    acc.path += [path] * lf.n
    acc.snr.append(snr)
    acc.flags.append(fl)
    acc.res_seg.append(np.asarray(rs, np.float32))
    acc.facts.setdefault(lf.facts.family, asdict(lf.facts))
    acc.n_rows += lf.n
    return up


def _select(acc: _Acc, spec: IngestSpec, cols: dict[str, np.ndarray], snr, flags) -> np.ndarray:
    """Boolean keep mask of the collected rows under the run's selection."""
    n = acc.n_rows
    if n == 0:
        return np.zeros(0, bool)
    if spec.select is None:
        return np.asarray(cols["is_star"], bool)
    data = {}
    for f in SELECT_SCHEMA:
        if f.name == "snr":
            v = snr
        elif f.name == "ingest_flags":
            v = flags
        else:
            v = cols[f.name]
        data[f.name] = pa.array(list(v) if v.dtype == object else v, type=f.type)
    t = pa.table(data, schema=SELECT_SCHEMA).append_column("_i", pa.array(np.arange(n, dtype=np.int64)))
    kept = t.filter(spec.select).column("_i").to_numpy()
    keep = np.zeros(n, bool)
    keep[kept] = True
    return keep


def _list_array(flat_parts: list[np.ndarray], lengths: np.ndarray, idx: np.ndarray, dtype) -> pa.Array:
    """list<dtype> of rows ``idx`` (in that order) from per-file flattened arrays and per-row lengths."""
    flat = np.concatenate(flat_parts) if flat_parts else np.zeros(0, dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    if len(idx) == len(lengths) and np.array_equal(idx, np.arange(len(lengths))):
        values, kl = flat, lengths
    else:
        values = np.concatenate([flat[starts[i]:starts[i] + lengths[i]] for i in idx]) if len(idx) else flat[:0]
        kl = lengths[idx]
    offsets = np.concatenate([[0], np.cumsum(kl)]).astype(np.int32 if values.size < 2**31 else np.int64)
    typ = pa.bool_() if dtype == np.bool_ else pa.float32()
    arr = pa.array(values, type=typ)
    return (pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray).from_arrays(pa.array(offsets), arr)


def map_task(index: int, name: str, files: list[str], spec: IngestSpec, store_root: str) -> dict[str, Any]:
    """Read a batch of files into ``_ingest/map/<name>.parquet``; quarantine what cannot be used.

    Idempotent: if the task's summary (written last) exists, it is returned without work.
    """
    work = paths.ingest_work_dir(store_root) / "map"
    done = work / f"{name}.json"
    if done.is_file():
        try:
            return json.loads(done.read_text())
        except json.JSONDecodeError:
            pass
    t0 = time.perf_counter()
    loaders = [LOADERS[spec.family]]
    resamplers = _Resamplers(spec.target) if spec.target is not None else None
    acc, quarantine = _Acc(), []
    n_files_ok = n_bytes = 0
    upsampled = False
    layouts: dict[str, int] = {}
    for path in files:
        try:
            n_bytes += os.path.getsize(path)
            _, lf = read_file(path, loaders, spec.options)
            if spec.target is None and not lf.facts.native_ok:
                raise LayoutError(f"{lf.layout} spectra have per-file wavelengths: ingest them with --grid MODEL_DIR")
            if lf.n == 0:
                raise LayoutError("the file holds no spectra")
            _check_loaded(lf)
            up = _collect(acc, lf, path, spec, resamplers)
        except Exception as e:  # any failure to read one file quarantines that file, never the run
            quarantine.append(dict(path=path, hdu=None, row=None, source_id=None, reason=_reason(e)))
            continue
        upsampled |= up
        n_files_ok += 1
        layouts[lf.layout] = layouts.get(lf.layout, 0) + 1
        for hdu, row, why in lf.rejected:
            quarantine.append(dict(path=path, hdu=hdu, row=row, source_id=None, reason=why))
    cols = {k: (np.concatenate(v) if v else np.zeros(0, ROW_FIELDS[k][0])) for k, v in acc.cols.items()}
    snr = np.concatenate(acc.snr) if acc.snr else np.zeros(0, np.float32)
    flags = np.concatenate(acc.flags) if acc.flags else np.zeros(0, np.int32)
    try:
        keep = _select(acc, spec, cols, snr, flags)
    except Exception as e:
        raise DistlabelsError(f"--select {spec.select_text!r} failed on the data ({_reason(e)}).") from None
    n_pix = np.concatenate(acc.n_pix) if acc.n_pix else np.zeros(0, np.int32)
    table = _map_table(index, LOADERS[spec.family].survey, acc, cols, snr, flags, keep, n_pix)
    out = work / f"{name}.parquet"
    write_intermediate(table, out, row_group_size=MAP_ROW_GROUP)
    _write_quarantine(store_root, name, quarantine, "map")
    result = {"task": name, "index": index, "n_files": len(files), "n_files_ok": n_files_ok,
              "n_files_quarantined": len(files) - n_files_ok, "n_spectra_read": int(acc.n_rows),
              "n_selected": int(keep.sum()), "n_excluded": int((~keep).sum()),
              "n_rows_quarantined": sum(1 for q in quarantine if q["hdu"] is not None or q["row"] is not None),
              "bytes_in": int(n_bytes), "bytes_out": out.stat().st_size, "map_file": str(out.relative_to(store_root)),
              "facts": acc.facts, "tables": acc.tables, "layouts": layouts, "upsampled": bool(upsampled),
              "seconds": time.perf_counter() - t0}
    write_json_atomic(done, result)
    return result


def _map_table(index: int, survey: str, acc: _Acc, cols, snr, flags, keep, n_pix) -> pa.Table:
    """The task's kept rows, sorted by sky position (then row): one Arrow table."""
    sel = np.flatnonzero(keep)
    hp_sel = healpix29(cols["ra"][sel], cols["dec"][sel])
    order = np.lexsort((sel, hp_sel))            # build every column in sorted order: no take() later
    idx, hp = sel[order], hp_sel[order]
    data: dict[str, pa.Array] = {
        "source_id": pa.array(list(cols["source_id"][idx]), pa.string()),
        "star_id": pa.array(list(cols["star_id"][idx]), pa.string()),
        "survey": pa.array([survey] * len(idx), pa.string()),
        "ra": pa.array(cols["ra"][idx], pa.float64()), "dec": pa.array(cols["dec"][idx], pa.float64()),
        paths.HEALPIX_COLUMN: pa.array(hp, pa.int64()), "snr": pa.array(snr[idx], pa.float32()),
        "flux": _list_array(acc.flux, n_pix, idx, np.float32),
        "ivar": _list_array(acc.ivar, n_pix, idx, np.float32),
        "mask": _list_array(acc.mask, n_pix, idx, np.bool_),
        "ingest_flags": pa.array(flags[idx], pa.int32()),
    }
    rs = np.concatenate(acc.res_seg)[idx] if acc.res_seg else np.zeros((0, 1), np.float32)
    data["resolution_segments"] = list_column(rs.astype(np.float32))
    for k, (dtype, _) in ROW_FIELDS.items():
        if k in data or k in SELECTION_ONLY:
            continue
        v = cols[k][idx]
        data[k] = pa.array(list(v), pa.string()) if dtype is object else pa.array(v)
    data["file_path"] = pa.array([acc.path[i] for i in idx], pa.string())
    data["_row_key"] = pa.array((np.int64(index) << 32) + idx.astype(np.int64), pa.int64())
    data["_lat_pos"] = pa.array(np.concatenate(acc.lat_pos)[idx] if acc.lat_pos else np.zeros(0), pa.float64())
    data["_n_pix"] = pa.array(n_pix[idx], pa.int32())
    data["_grid_key"] = pa.array([acc.gkey[i] for i in idx], pa.string())
    return pa.table(data)


def write_intermediate(table: pa.Table, final: Path, row_group_size: int) -> Path:
    """Atomic write of a work file: small row groups so a reduce task reads only its sky range
    (rows are sorted by _healpix_29, so row-group statistics prune the rest)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temp_path(final, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")     # one temp file per writer
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(int(row_group_size), 1),
                   use_dictionary=[c for c in DICT_COLUMNS if c in table.column_names])
    os.replace(tmp, final)
    return final


def _reason(e: BaseException) -> str:
    msg = str(e).strip().replace("\n", " ")
    if isinstance(e, (LayoutError, DistlabelsError)):
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _write_quarantine(store_root: str, task: str, entries: list[dict], stage: str) -> None:
    """One fragment per task; a re-run of the task replaces it (or removes it if now empty)."""
    path = paths.quarantine_path(store_root, task)
    if not entries:
        if path.exists():
            path.unlink()
        return
    rows = [{**{k: e.get(k) for k in ("path", "hdu", "row", "source_id", "reason")}, "stage": stage, "task": task}
            for e in entries]
    write_fragment(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), path)


def write_quarantine(store_root: str, task: str, entries: list[dict], stage: str) -> None:
    _write_quarantine(store_root, task, entries, stage)


def read_quarantine(store_root: str | os.PathLike) -> pa.Table:
    """Every quarantine fragment of a store as one table (empty with the schema if none)."""
    files = paths.list_quarantine(store_root)
    if not files:
        return QUARANTINE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=QUARANTINE_SCHEMA) for f in files])


__all__ = ["DEFAULT_SELECT", "IngestFlag", "IngestSpec", "SELECT_SCHEMA", "TargetGrid", "choose_family",
           "expand_inputs", "inputs_fingerprint", "make_batches", "map_task", "read_quarantine", "task_name"]
