"""Ingest stages 2 and 3 (pure functions; the Dask graph is in :mod:`distlabels.pipeline.ingest`):
the plan (store grid, duplicates, primary spectra, sky partitions) and the per-partition reduce.

Store grid (``--grid native``): every map row carries its position on its survey's pixel lattice
(``_lat_pos`` = log10(lambda_0) / step for log-lambda grids, lambda_0 / step for linear ones).
The majority grid (family, kind, step, medium, frame) and lattice phase define the store; each row
sits at the whole-pixel offset ``round(_lat_pos - phase) - p0`` of the union grid and is padded
with NaN flux, ivar 0 and mask True. Rows on another grid or phase are quarantined.

Primary spectrum: among the spectra of one ``star_id``, the one without ingest flags, then with the
highest ``snr``, then with the smallest ``source_id`` (deterministic). Duplicate ``source_id`` values
(a file listed twice, one spectrum in two releases) keep the first by (map task, row) and send the
others to the quarantine.

Sky partitions follow HATS: counts at order :data:`HIST_ORDER` are merged into parent pixels while
a parent holds at most ``max_rows`` rows, so dense regions get small pixels and sparse ones large
pixels; a pixel over ``max_rows`` at the finest order is written as several fragments.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import paths
from ..healpix import ORDER_MAX, parent_pixel
from .ingest import DICT_COLUMNS, TargetGrid, write_intermediate, write_quarantine
from .store import list_column, write_fragment, write_json_atomic

HIST_ORDER = 8
PHASE_TOL = 0.02                # pixels: rows further from the store's lattice phase are off-grid
MIXED_SHARE = 0.1               # a second grid with this share of the rows: refuse the run
INDEX_COLUMNS = ["source_id", "star_id", "snr", "ingest_flags", paths.HEALPIX_COLUMN, "_row_key", "_lat_pos",
                 "_n_pix", "_grid_key", "file_path", "file_hdu", "file_row"]
STORE_COLUMN_ORDER = ["source_id", "star_id", "primary", "survey", "ra", "dec", paths.HEALPIX_COLUMN, "snr", "flux",
                      "ivar", "mask", "ingest_flags", "mjd", "bary_corr_kms", "survey_rv_kms", "survey_snr",
                      "survey_class", "survey_subclass", "survey_flags", "resolution", "resolution_segments",
                      "file_path", "file_hdu", "file_row"]
INTERNAL = ("_row_key", "_lat_pos", "_n_pix", "_grid_key")


@dataclass(frozen=True)
class GridPlan:
    """The store's one wavelength grid."""

    key: str                        # family|kind|step|medium|frame[|hash]  or  model|hash|frame
    kind: str                       # loglam | linear | table | model
    step: float
    phase: float                    # lattice phase (pixels) of the store grid
    p0: int                         # lattice index of store pixel 0
    n_pix: int
    medium: str
    rv_frame: str
    table: tuple[float, ...] | None = None   # table/model grids: the wavelengths

    def wavelength_aa(self) -> np.ndarray:
        i = np.arange(self.n_pix, dtype=np.float64) + self.p0 + self.phase
        if self.kind == "loglam":
            return 10.0 ** (i * self.step)
        if self.kind == "linear":
            return i * self.step
        return np.asarray(self.table, dtype=np.float64)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), default=str).encode()).hexdigest()[:16]


def parse_key(key: str) -> dict[str, Any]:
    parts = key.split("|")
    if parts[0] == "model":
        return {"kind": "model", "step": 1.0, "medium": None, "rv_frame": parts[2] if len(parts) > 2 else "observed"}
    return {"family": parts[0], "kind": parts[1], "step": float(parts[2]), "medium": parts[3], "rv_frame": parts[4]}


def _cyclic(d: np.ndarray) -> np.ndarray:
    return np.abs((d + 0.5) % 1.0 - 0.5)


def plan_task(store_root: str, map_files: list[str], target: TargetGrid | None,
              tables: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Read the small index columns of every map file; decide grid, duplicates, primaries, counts.

    Writes ``_ingest/keep.parquet`` (kept rows: _row_key, _healpix_29, primary; sorted by sky
    position) and the quarantine fragment ``plan``; returns the plan (see :func:`plan_summary`).
    """
    root = Path(store_root)
    parts = [pq.read_table(root / f, columns=INDEX_COLUMNS) for f in map_files]
    idx = pa.concat_tables(parts) if parts else None
    if idx is None or idx.num_rows == 0:
        write_quarantine(store_root, "plan", [], "plan")
        return {"n_rows": 0, "keys": {}}
    keys = idx.column("_grid_key").combine_chunks()
    keys = keys.cast(pa.string()) if pa.types.is_dictionary(keys.type) else keys
    vc = pc.value_counts(keys).to_pylist()
    counts = {d["values"]: int(d["counts"]) for d in vc}
    major = max(sorted(counts), key=lambda k: counts[k])
    n = idx.num_rows
    lat = idx.column("_lat_pos").to_numpy()
    npx = idx.column("_n_pix").to_numpy().astype(np.int64)
    is_major = np.asarray(pc.equal(keys, major).to_numpy(zero_copy_only=False), bool)
    ph = lat - np.round(lat)
    phr = np.round(ph[is_major], 2) % 1.0
    vals, cnt = np.unique(phr, return_counts=True)
    phase_c = float(vals[np.argmax(cnt)])
    # refine: mean of the rows near the mode (float noise in headers), kept within (-0.5, 0.5]
    near = is_major & (_cyclic(ph - phase_c) <= PHASE_TOL)
    phase = float(np.angle(np.mean(np.exp(2j * np.pi * ph[near]))) / (2 * np.pi)) if near.any() else 0.0
    valid = is_major & (_cyclic(ph - phase) <= PHASE_TOL)
    pos = np.round(lat - phase).astype(np.int64)
    kinfo = parse_key(major)
    if kinfo["kind"] in ("table", "model"):
        p0, n_pix = 0, int(npx[valid].max()) if valid.any() else 0
    else:
        p0 = int(pos[valid].min())
        n_pix = int((pos[valid] + npx[valid]).max() - p0)
    table = None
    if kinfo["kind"] == "model":
        table = tuple(target.wavelength_aa)
        medium = target.medium
    else:
        medium = kinfo["medium"]
        if kinfo["kind"] == "table":
            table = tuple((tables or {})[major])
    plan = GridPlan(major, kinfo["kind"], kinfo["step"], phase if kinfo["kind"] in ("loglam", "linear") else 0.0,
                    p0, n_pix, medium, kinfo["rv_frame"], table)
    quarantine = []
    sid = idx.column("source_id").to_numpy(zero_copy_only=False)
    fpath = idx.column("file_path").combine_chunks()
    fpath = (fpath.cast(pa.string()) if pa.types.is_dictionary(fpath.type) else fpath).to_numpy(zero_copy_only=False)
    fhdu = idx.column("file_hdu").to_numpy()
    frow = idx.column("file_row").to_numpy()
    for i in np.flatnonzero(~valid):
        why = (f"grid {keys[i].as_py()} differs from the store's {major}" if not is_major[i] else
               f"pixels are off the store's lattice by {_cyclic(ph[i] - phase):.2f} pixel")
        quarantine.append(dict(path=fpath[i], hdu=int(fhdu[i]), row=int(frow[i]), source_id=sid[i], reason=why))
    # duplicates: first by row key wins
    rk = idx.column("_row_key").to_numpy()
    vi = np.flatnonzero(valid)
    order = vi[np.lexsort((rk[vi], sid[vi]))]
    first = np.ones(len(order), bool)
    first[1:] = sid[order][1:] != sid[order][:-1]
    kept = np.sort(order[first])
    n_dup, w = 0, -1
    for j, i in enumerate(order):
        if first[j]:
            w = i
        else:
            n_dup += 1
            # source_id stays empty: the spectrum itself is in the store (verify checks that no
            # quarantined id reaches the catalog); the reason names it
            quarantine.append(dict(path=fpath[i], hdu=int(fhdu[i]), row=int(frow[i]), source_id=None,
                                   reason=f"duplicate of {sid[i]} already read from {fpath[w]} (HDU {fhdu[w]}, "
                                          f"row {frow[w]})"))
    write_quarantine(store_root, "plan", quarantine, "plan")
    primary = choose_primary(idx.column("star_id").to_numpy(zero_copy_only=False)[kept],
                             idx.column("ingest_flags").to_numpy()[kept], idx.column("snr").to_numpy()[kept],
                             sid[kept])
    hp = idx.column(paths.HEALPIX_COLUMN).to_numpy()[kept]
    srt = np.argsort(hp, kind="stable")
    keep = pa.table({"_row_key": pa.array(rk[kept][srt]), paths.HEALPIX_COLUMN: pa.array(hp[srt]),
                     "primary": pa.array(primary[srt])})
    keep_path = paths.ingest_work_dir(store_root) / "keep.parquet"
    write_intermediate(keep, keep_path, row_group_size=8192)
    pix, cnt = np.unique(parent_pixel(hp, HIST_ORDER), return_counts=True)
    return {"n_rows": n, "keys": counts, "major": major, "grid": asdict(plan), "n_kept": int(len(kept)),
            "n_duplicates": n_dup, "n_offgrid": int((~valid).sum()), "hist_pix": pix.tolist(),
            "hist_counts": cnt.tolist(), "n_stars": int(len(np.unique(idx.column("star_id").to_numpy(
                zero_copy_only=False)[kept]))) if len(kept) else 0}


def choose_primary(star_id: np.ndarray, ingest_flags: np.ndarray, snr: np.ndarray, source_id: np.ndarray) -> np.ndarray:
    """(n,) bool: one True per star_id: unflagged first, then highest snr, then smallest source_id."""
    n = len(star_id)
    if n == 0:
        return np.zeros(0, bool)
    s = np.where(np.isfinite(snr), snr, -np.inf)
    order = np.lexsort((source_id, -s, ingest_flags != 0, star_id))
    first = np.ones(n, bool)
    first[1:] = star_id[order][1:] != star_id[order][:-1]
    out = np.zeros(n, bool)
    out[order[first]] = True
    return out


def plan_partitions(pix: np.ndarray, counts: np.ndarray, order: int, max_rows: int) -> list[tuple[int, int, int]]:
    """HATS-style partitions [(norder, npix, n_rows)] from row counts at ``order``.

    Children are merged into their parent while the parent holds at most ``max_rows`` rows and
    none of its descendants had to stay finer (partitions never overlap).
    """
    current = {int(p): int(c) for p, c in zip(pix, counts) if c > 0}
    blocked: set[int] = set()            # pixels (at the current order) with finer partitions below
    out: list[tuple[int, int, int]] = []
    for o in range(order, 0, -1):
        groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for p, c in current.items():
            groups[p >> 2].append((p, c))
        nblocked = {b >> 2 for b in blocked}
        nxt = {}
        for par, kids in groups.items():
            total = sum(c for _, c in kids)
            if par in nblocked or total > max_rows:
                out += [(o, p, c) for p, c in kids]
                nblocked.add(par)
            else:
                nxt[par] = total
        current, blocked = nxt, nblocked
    out += [(0, p, c) for p, c in current.items()]
    return sorted(out, key=lambda t: (t[0], t[1]))


def pixel_range(norder: int, npix: int) -> tuple[int, int]:
    """[lo, hi) of order-29 indices inside pixel ``npix`` at ``norder``."""
    shift = 2 * (ORDER_MAX - int(norder))
    return int(npix) << shift, (int(npix) + 1) << shift


def _done_marker(store_root: str, norder: int, npix: int) -> Path:
    return paths.ingest_work_dir(store_root) / "done" / f"Norder={norder}-Npix={npix}.json"


def plan_id(grid: dict[str, Any], map_files: dict[int, str], max_rows: int, parts) -> str:
    """Identity of a reduce plan: a done marker from another plan is stale."""
    blob = json.dumps([grid, sorted(map_files.items()), int(max_rows), [list(p) for p in parts]], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reduce_partition(store_root: str, norder: int, npix: int, grid: dict[str, Any], map_files: dict[int, str],
                     max_rows: int, plan_hash: str = "") -> dict[str, Any]:
    """Write the store fragments of one sky partition; idempotent (done marker with the plan's id)."""
    plan = GridPlan(**{**grid, "table": tuple(grid["table"]) if grid.get("table") else None})
    marker = _done_marker(store_root, norder, npix)
    if marker.is_file():
        prev = json.loads(marker.read_text())
        if prev.get("plan") == plan_hash and all((Path(store_root) / f).is_file() for f in prev["fragments"]):
            return prev
    t0 = time.perf_counter()
    root = Path(store_root)
    lo, hi = pixel_range(norder, npix)
    flt = [(paths.HEALPIX_COLUMN, ">=", lo), (paths.HEALPIX_COLUMN, "<", hi)]
    keep = pq.read_table(paths.ingest_work_dir(store_root) / "keep.parquet", filters=flt)
    rk_keep = keep.column("_row_key").to_numpy()
    prim_keep = keep.column("primary").to_numpy(zero_copy_only=False)
    tables = []
    for task in np.unique(rk_keep >> 32):
        t = pq.read_table(root / map_files[int(task)], filters=flt)
        rk = t.column("_row_key").to_numpy()
        t = t.filter(pa.array(np.isin(rk, rk_keep)))
        if t.num_rows:
            for c in ("file_path", "_grid_key"):
                col = t.column(c)
                if pa.types.is_dictionary(col.type):
                    t = t.set_column(t.schema.get_field_index(c), c, col.cast(pa.string()))
            tables.append(t)
    t = pa.concat_tables(tables, promote_options="default") if tables else None
    fragments: list[str] = []
    res_counts: dict[int, int] = {}
    seg_counts: list[dict[int, int]] = []
    if t is not None and t.num_rows:
        rk = t.column("_row_key").to_numpy()
        srt_k = np.argsort(rk_keep)
        primary = prim_keep[srt_k][np.searchsorted(rk_keep[srt_k], rk)]
        t = _aligned(t, plan, primary)
        order = np.lexsort((t.column("source_id").to_numpy(zero_copy_only=False),
                            t.column(paths.HEALPIX_COLUMN).to_numpy()))
        t = t.take(pa.array(order))
        for k, start in enumerate(range(0, t.num_rows, max(int(max_rows), 1))):
            final = paths.fragment_path(store_root, norder, npix, f"part-{k:04d}")
            write_fragment(t.slice(start, max_rows), final, {"distlabels_grid": plan.hash},
                           use_dictionary=[c for c in DICT_COLUMNS if c in t.column_names])
            fragments.append(str(final.relative_to(root)))
        res_counts = _round_counts(t.column("resolution").to_numpy(zero_copy_only=False))
        rs = t.column("resolution_segments").combine_chunks()
        n_seg = len(rs[0]) if len(rs) else 0
        flat = rs.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_seg) if n_seg else np.zeros((0, 0))
        seg_counts = [_round_counts(flat[:, k]) for k in range(n_seg)]
    result = {"norder": norder, "npix": npix, "n_rows": 0 if t is None else t.num_rows, "fragments": fragments,
              "plan": plan_hash, "resolution_counts": res_counts, "resolution_segment_counts": seg_counts,
              "seconds": time.perf_counter() - t0}
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, result)
    return result


def _round_counts(values) -> dict[int, int]:
    """{round(R): count} of the finite values: a compact, mergeable summary for medians."""
    r = np.asarray(values, np.float64)
    r = np.round(r[np.isfinite(r)]).astype(np.int64)
    u, c = np.unique(r, return_counts=True)
    return {int(a): int(b) for a, b in zip(u, c)}


def _aligned(t: pa.Table, plan: GridPlan, primary: np.ndarray) -> pa.Table:
    """Store columns with flux/ivar/mask placed on the store grid (NaN / 0 / True outside the data)."""
    n, N = t.num_rows, plan.n_pix
    flux = np.full((n, N), np.nan, np.float32)
    ivar = np.zeros((n, N), np.float32)
    mask = np.ones((n, N), bool)
    lat = t.column("_lat_pos").to_numpy()
    offs = (np.round(lat - plan.phase).astype(np.int64) - plan.p0) if plan.kind in ("loglam", "linear") \
        else np.zeros(n, np.int64)
    for name, dst in (("flux", flux), ("ivar", ivar), ("mask", mask)):
        col = t.column(name).combine_chunks()
        vals = col.flatten().to_numpy(zero_copy_only=False)
        off = col.offsets.to_numpy()
        for i in range(n):
            seg = vals[off[i]:off[i + 1]]
            a = int(offs[i])
            dst[i, a:a + len(seg)] = seg
    cols = {}
    for c in STORE_COLUMN_ORDER:
        if c == "primary":
            cols[c] = pa.array(primary, pa.bool_())
        elif c == "flux":
            cols[c] = list_column(flux)
        elif c == "ivar":
            cols[c] = list_column(ivar)
        elif c == "mask":
            cols[c] = list_column(mask, pa.bool_())
        elif c in t.column_names:
            cols[c] = t.column(c)
    for c in t.column_names:                       # anything a loader added that is not listed
        if c not in cols and c not in INTERNAL:
            cols[c] = t.column(c)
    return pa.table(cols)


def segments_for(wave: np.ndarray, split_aa: tuple[float, ...]) -> list[list[float]]:
    """Continuum segments covering the whole grid, split at the arm/chip joins inside it."""
    lo, hi = float(np.min(wave)), float(np.max(wave))
    cuts = [s for s in sorted(split_aa) if lo < s < hi]
    edges = [lo] + cuts + [hi]
    return [[edges[i], edges[i + 1]] for i in range(len(edges) - 1)]


def median_from_counts(counts: dict[int, int]) -> float | None:
    if not counts:
        return None
    v = np.array(sorted(counts), dtype=np.float64)
    c = np.array([counts[int(x)] for x in v], dtype=np.int64)
    cs = np.cumsum(c)
    return float(v[np.searchsorted(cs, (cs[-1] + 1) // 2)])
