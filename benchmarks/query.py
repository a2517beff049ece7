"""Catalog query speed: distlabels against DuckDB on the same files, cold and warm.

distlabels runs the full scan (Q1) once per ``--engines`` entry: "auto" = its DuckDB engine when
duckdb is installed (the filter pushed down as a NaN-safe superset, then its own exact Arrow
filter on the result; :mod:`distlabels.catalog.sql`), "arrow" = the pyarrow scanner only. Cones
read their few files with pyarrow whatever the engine.

Generates a label catalog directly (no fitting): ``--rows`` stars (default 10 million) uniform on
the sky with realistic columns (source_id, survey, ra, dec, _healpix_29, snr, 22 labels and their
errors, rv, rv_err, chi2_red, n_iter, flags, model_id), written through distlabels' own writer
(``write_catalog_fragment``: one fragment per ``--fragment-rows`` rows of a pixel, as a fit run
streams them; HEALPix order ``--order``) and its catalog-level files (``write_catalog_meta``).
Then, for the streamed layout, again after ``compact_catalog(max_rows=0)`` (one file per
pixel: layout "compact") and again after the default row-count-adaptive compaction (sibling
pixels merged upward while they hold at most ``--max-rows`` rows: layout "adaptive"; mixed
HEALPix orders, a few hundred files for 10 M rows):

- Q1, filter + projection: ``teff < 4500 and logg < 2.5 and mh < -1 and flags == 0`` ->
  source_id, teff, logg, mh, mgm;
- Q2, a 1-degree cone search (three fixed centres), columns source_id, ra, dec, teff, logg, mh.

DuckDB runs the same queries on the same files (``read_parquet('dataset/**/*.parquet')``; the
cone as a declination band plus the haversine distance, the best plain SQL can do). "cold": the
files' pages are dropped from the OS page cache first (``posix_fadvise(DONTNEED)`` on every
file) and fresh catalog/connection objects are used; "warm": files cached, fresh objects per query
(what the CLI does), median of ``--repeats`` runs alternating the engines; "session": one
``Catalog`` / one DuckDB connection with ``parquet_metadata_cache`` reused across queries. Both engines get the same thread count (``--threads``). Row counts (and the cone's
source_ids) are checked to agree. Files read by the cone search are counted by distlabels
(``Catalog.last_files_read``); DuckDB's glob opens every file.

The data go to ``--dir`` (default /tmp/distlabels-bench-query; never into git) and are deleted
at the end unless ``--keep``; ``--reuse`` skips generation when a catalog of the same size is
there. Run under the CPU lock: ``flock /tmp/distlabels-cpu.lock python benchmarks/query.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distlabels import paths  # noqa: E402
from distlabels.catalog.compact import compact_catalog  # noqa: E402
from distlabels.catalog.partitioning import DEFAULT_MAX_ROWS  # noqa: E402
from distlabels.catalog.query import angular_separation, open_catalog  # noqa: E402
from distlabels.catalog.writer import write_catalog_fragment, write_catalog_meta  # noqa: E402
from distlabels.fit.flags import Flag  # noqa: E402
from distlabels.healpix import healpix29, parent_pixel  # noqa: E402

LABELS = ("teff", "logg", "mh", "cm", "nm", "om", "nam", "mgm", "alm", "sim", "cam", "tim", "vm", "crm", "mnm",
          "com", "nim", "scm", "bam", "cem", "ndm", "zrm")
Q1_WHERE = "teff < 4500 and logg < 2.5 and mh < -1 and flags == 0"
Q1_SQL = "teff < 4500 AND logg < 2.5 AND mh < -1 AND flags = 0"
Q1_COLUMNS = ["source_id", "teff", "logg", "mh", "mgm"]
Q2_COLUMNS = ["source_id", "ra", "dec", "teff", "logg", "mh"]
CONES = [(150.0, 2.2, 1.0), (266.4, -29.0, 1.0), (10.7, 41.3, 1.0)]


# ------------------------------------------------------------------ data
def make_rows(rng: np.random.Generator, hp29: np.ndarray, ra: np.ndarray, dec: np.ndarray, first_id: int) -> pa.Table:
    """Catalog rows for stars at (ra, dec): a giant branch and a dwarf sequence, metallicity
    trends in the abundances, S/N-dependent errors, a realistic flag mix."""
    n = len(ra)
    giant = rng.random(n) < 0.55
    teff = np.where(giant, rng.normal(4700, 350, n), rng.normal(5600, 600, n)).clip(3500, 7500)
    logg = np.where(giant, 2.6 + (teff - 4700) / 350 * 0.45 + rng.normal(0, 0.3, n),
                    4.4 - (teff - 5600) / 600 * 0.1 + rng.normal(0, 0.15, n)).clip(0.0, 5.0)
    mh = rng.normal(-0.25, 0.45, n).clip(-2.5, 0.5)
    snr = np.exp(rng.normal(np.log(40), 0.7, n)).astype(np.float32)
    scale = (50.0 / snr).astype(np.float32)
    ids = pa.array(np.arange(first_id, first_id + n, dtype=np.int64))
    cols: dict[str, pa.Array] = {
        "source_id": pc.binary_join_element_wise("bench:", pc.utf8_lpad(pc.cast(ids, pa.string()), 10, "0"), ""),
        "survey": pa.array(np.where(rng.random(n) < 0.7, "lamost", "desi")),
        "ra": pa.array(ra), "dec": pa.array(dec), paths.HEALPIX_COLUMN: pa.array(hp29),
        "snr": pa.array(snr),
    }
    base_err = {"teff": 40.0, "logg": 0.06, "mh": 0.03}
    for lab in LABELS:
        if lab == "teff":
            v = teff
        elif lab == "logg":
            v = logg
        elif lab == "mh":
            v = mh
        else:  # [X/M]: alpha-like trend with [M/H] and element-to-element scatter
            v = 0.25 * np.clip(-mh, 0, 1.0) * (lab in ("om", "mgm", "sim", "cam", "tim")) + rng.normal(0, 0.08, n)
        cols[lab] = pa.array(v.astype(np.float32))
        cols[f"{lab}_err"] = pa.array((base_err.get(lab, 0.05) * scale * rng.uniform(0.8, 1.2, n)).astype(np.float32))
    cols["rv"] = pa.array(rng.normal(0, 45, n).astype(np.float32))
    cols["rv_err"] = pa.array((1.0 * scale).astype(np.float32))
    cols["chi2_red"] = pa.array((rng.chisquare(3000, n) / 3000 * rng.choice([1.0, 1.3], n, p=[0.9, 0.1])).astype(np.float32))
    cols["n_iter"] = pa.array(rng.integers(3, 25, n).astype(np.int16))
    flags = np.zeros(n, np.int64)
    for bit, p in ((Flag.NOT_CONVERGED, 0.01), (Flag.AT_LABEL_BOUND, 0.05), (Flag.LOW_SNR, 0.02),
                   (Flag.CHI2_HIGH, 0.01), (Flag.BAD_INPUT, 0.003)):
        flags[rng.random(n) < p] |= int(bit)
    not_fitted = (flags & int(Flag.BAD_INPUT)) != 0
    for lab in LABELS:  # unfitted stars: labels NaN, row still present
        for c in (lab, f"{lab}_err"):
            cols[c] = pc.if_else(pa.array(not_fitted), pa.scalar(np.nan, pa.float32()), cols[c])
    cols["flags"] = pa.array(flags)
    cols["model_id"] = pa.array(["payne-mlp-bench"] * n) if n else pa.array([], pa.string())
    return pa.table(cols)


def generate(root: Path, n_rows: int, order: int, fragment_rows: int, seed: int = 1) -> dict:
    """Write the catalog through distlabels' writer; return generation figures."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, n_rows)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n_rows)))
    hp = healpix29(ra, dec)
    order_idx = np.argsort(hp, kind="stable")
    ra, dec, hp = ra[order_idx], dec[order_idx], hp[order_idx]
    del order_idx
    pix = parent_pixel(hp, order)
    bounds = np.flatnonzero(np.diff(pix)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [n_rows]])
    prov = {"model_id": "payne-mlp-bench", "model_sha256": "0" * 64, "store": "(generated by benchmarks/query.py)",
            "fit_config": {"generated": True}, "distlabels_version": "bench"}
    n_files = 0
    chunk = 500_000
    lo = 0
    bar = tqdm(total=n_rows, unit="row", desc="generate", mininterval=2)
    while lo < n_rows:  # rows in chunks of whole pixels
        hi = int(stops[np.searchsorted(stops, min(lo + chunk, n_rows), side="left")])
        table = make_rows(rng, hp[lo:hi], ra[lo:hi], dec[lo:hi], lo)
        a = np.searchsorted(starts, lo)
        b = np.searchsorted(starts, hi)
        for s, e in zip(starts[a:b], stops[a:b]):
            for k in range(s, e, fragment_rows):
                m = min(k + fragment_rows, e)
                write_catalog_fragment(root, order, int(pix[s]), f"part-0000-r{k - s:07d}",
                                       table.slice(k - lo, m - k), prov)
                n_files += 1
        bar.update(hi - lo)
        lo = hi
    bar.close()
    t1 = time.perf_counter()
    meta = write_catalog_meta(root, {"label_names": list(LABELS), "model_id": "payne-mlp-bench", "provenance": prov,
                                     "catalog_name": "distlabels_bench"})
    t2 = time.perf_counter()
    return {"rows": n_rows, "files": n_files, "write_s": t1 - t0, "meta_s": t2 - t1, "n_pixels": meta["n_pixels"]}


# ------------------------------------------------------------------ timing
def drop_cache(root: Path) -> None:
    """Evict every file of the catalog from the OS page cache (no root needed)."""
    for dirpath, _, files in os.walk(root / paths.DATASET_DIR):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def duck_sql(root: Path, columns: list[str], where: str) -> str:
    glob = (root / paths.DATASET_DIR).as_posix() + "/**/*.parquet"
    return f"SELECT {', '.join(columns)} FROM read_parquet('{glob}', hive_partitioning=false) WHERE {where}"


def cone_sql(ra: float, dec: float, radius: float) -> str:
    return (f"dec BETWEEN {dec - radius} AND {dec + radius} AND 2 * asin(sqrt(pow(sin(radians(dec - ({dec})) / 2), 2)"
            f" + cos(radians(dec)) * cos(radians({dec})) * pow(sin(radians(ra - ({ra})) / 2), 2)))"
            f" <= radians({radius})")


def run_ours(root: Path, query: dict, cat=None, engine: str = "auto") -> tuple[pa.Table, int, str]:
    cat = cat or open_catalog(root, engine=engine)
    t = cat.query(**query)
    return t, cat.last_files_read, cat.last_engine


def duck_connect(threads: int, metadata_cache: bool = False):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={int(threads)}")
    if metadata_cache:
        con.execute("SET parquet_metadata_cache=true")
    return con


def run_duck(root: Path, sql: str, threads: int, con=None) -> pa.Table:
    own = con is None
    con = con or duck_connect(threads)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        if own:
            con.close()


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def bench_layout(root: Path, name: str, threads: int, repeats: int, engines: list[str]) -> list[dict]:
    n_files = len(paths.list_fragments(root))
    cases = [("Q1 filter+projection", {"where": Q1_WHERE, "columns": Q1_COLUMNS}, duck_sql(root, Q1_COLUMNS, Q1_SQL), None,
              engines)]
    for c in CONES:  # a cone reads its few files directly, whatever the engine
        cases.append((f"Q2 cone r=1 deg at ({c[0]:g}, {c[1]:g})", {"cone": c, "columns": Q2_COLUMNS},
                      duck_sql(root, Q2_COLUMNS, cone_sql(*c)), c, engines[:1]))
    return [bench_case(root, name, n_files, label, ours_q, sql, cone, engine, threads, repeats)
            for label, ours_q, sql, cone, case_engines in cases for engine in case_engines]


def bench_case(root: Path, name: str, n_files: int, label: str, ours_q: dict, sql: str, cone, engine: str,
               threads: int, repeats: int) -> dict:
    """One query timed for distlabels (with ``engine``) and DuckDB: cold, warm, session."""
    drop_cache(root)
    cold_ours, (t_ours, files_ours, used) = timed(run_ours, root, ours_q, None, engine)
    drop_cache(root)
    cold_duck, t_duck = timed(run_duck, root, sql, threads)
    # warm: files in the page cache, new objects per query (as the CLI and a fresh script);
    # alternated so that drifts of a shared machine hit both engines alike
    warm_ours, warm_duck = [], []
    for _ in range(repeats):
        warm_ours.append(timed(run_ours, root, ours_q, None, engine)[0])
        warm_duck.append(timed(run_duck, root, sql, threads)[0])
    # session: one Catalog / one DuckDB connection (with its Parquet metadata cache) reused
    cat, con = open_catalog(root, engine=engine), duck_connect(threads, metadata_cache=True)
    run_ours(root, ours_q, cat), run_duck(root, sql, threads, con)
    sess_ours, sess_duck = [], []
    for _ in range(repeats):
        sess_ours.append(timed(run_ours, root, ours_q, cat)[0])
        sess_duck.append(timed(run_duck, root, sql, threads, con)[0])
    con.close()
    warm_ours, warm_duck = statistics.median(warm_ours), statistics.median(warm_duck)
    sess_ours, sess_duck = statistics.median(sess_ours), statistics.median(sess_duck)
    if t_ours.num_rows != t_duck.num_rows:
        raise SystemExit(f"{label}: distlabels returned {t_ours.num_rows} rows, DuckDB {t_duck.num_rows}")
    if cone is not None:
        a = sorted(t_ours.column("source_id").to_pylist())
        b = sorted(t_duck.column("source_id").to_pylist())
        sep = angular_separation(t_ours["ra"].to_numpy(), t_ours["dec"].to_numpy(), cone[0], cone[1])
        if a != b or (sep > cone[2]).any():
            raise SystemExit(f"{label}: the two engines disagree on the rows inside the cone")
    print(f"  {name:<9} {label:<36} {used:<6} rows {t_ours.num_rows:>8,}  files read {files_ours:>6,}/{n_files:,}  "
          f"cold {cold_ours:6.3f} vs DuckDB {cold_duck:6.3f} s   warm {warm_ours:6.3f} vs {warm_duck:6.3f} s   "
          f"session {sess_ours:6.3f} vs {sess_duck:6.3f} s", flush=True)
    return {"layout": name, "query": label, "engine": used, "rows": t_ours.num_rows, "files": n_files,
            "files_read": files_ours, "ours_cold_s": cold_ours, "duck_cold_s": cold_duck,
            "ours_warm_s": warm_ours, "duck_warm_s": warm_duck, "ours_session_s": sess_ours,
            "duck_session_s": sess_duck}


def markdown(rows: list[dict]) -> str:
    out = ["| layout | query | distlabels engine | rows | files read / files | cold: distlabels / DuckDB | "
           "warm: distlabels / DuckDB | session: distlabels / DuckDB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = 100.0 * r["files_read"] / r["files"]
        pct_text = f"{pct:.0f}" if pct >= 10 else f"{pct:.2g}"
        out.append(f"| {r['layout']} | {r['query']} | {r.get('engine', 'arrow')} | {r['rows']:,} | {r['files_read']:,} / {r['files']:,} "
                   f"({pct_text} %) | {r['ours_cold_s']:.2f} s / {r['duck_cold_s']:.2f} s | "
                   f"{r['ours_warm_s']:.2f} s / {r['duck_warm_s']:.2f} s | "
                   f"{r['ours_session_s']:.2f} s / {r['duck_session_s']:.2f} s |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--order", type=int, default=5, help="HEALPix order of the pixel directories (default 5)")
    ap.add_argument("--fragment-rows", type=int, default=500, help="rows per streamed fragment (a fit task)")
    ap.add_argument("--dir", default="/tmp/distlabels-bench-query")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", default="streamed,compact,adaptive",
                    help="in this order; each compaction rewrites the catalog, so with --reuse start "
                         "from the layout the kept catalog has")
    ap.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="compact's max_rows for 'adaptive'")
    ap.add_argument("--keep", action="store_true", help="keep the generated catalog")
    ap.add_argument("--reuse", action="store_true", help="reuse a catalog of the same size in --dir")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--engines", default="auto,arrow",
                    help="distlabels engines timed on the full scan (Q1), comma-separated: auto (DuckDB when "
                         "installed), duckdb, arrow (default auto,arrow); cones use the first")
    args = ap.parse_args(argv)

    import duckdb

    pa.set_cpu_count(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    root = Path(args.dir) / f"catalog-{args.rows}-o{args.order}"
    need = args.rows * 260 * 1.3  # compressed data ~ 150 B/row; room for the compact copy of one pixel
    free = shutil.disk_usage(Path(args.dir).parent if not Path(args.dir).exists() else args.dir).free
    if free < need:
        raise SystemExit(f"not enough space in {args.dir}: {free / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB needed")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"pyarrow {pa.__version__}, duckdb {duckdb.__version__}; threads {args.threads}", flush=True)
    gen = None
    meta_file = root / paths.CATALOG_META
    if args.reuse and meta_file.is_file() and json.loads(meta_file.read_text()).get("n_rows") == args.rows:
        print(f"reusing {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        gen = generate(root, args.rows, args.order, args.fragment_rows)
        print(f"generated {gen['rows']:,} rows in {gen['files']:,} fragments over {gen['n_pixels']:,} pixels "
              f"(order {args.order}) in {gen['write_s']:.1f} s; catalog-level files {gen['meta_s']:.1f} s", flush=True)
    results, compact_s = [], {}
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    try:
        if "streamed" in layouts and len(paths.list_fragments(root)) > json.loads(meta_file.read_text())["n_pixels"]:
            results += bench_layout(root, "streamed", args.threads, args.repeats, engines)
        for name, max_rows in (("compact", 0), ("adaptive", args.max_rows)):
            if name not in layouts:
                continue
            t0 = time.perf_counter()
            s = compact_catalog(root, max_rows=max_rows, progress=True)
            compact_s[name] = time.perf_counter() - t0
            orders = sorted({k for k, _ in (paths.parse_pixel_dir(f.relative_to(root)) for f in paths.list_fragments(root))})
            print(f"compact (max_rows={max_rows}): {s.n_files_before:,} -> {s.n_files_after:,} files, "
                  f"{s.n_partitions:,} partitions at orders {orders}, in {compact_s[name]:.1f} s", flush=True)
            results += bench_layout(root, name, args.threads, args.repeats, engines)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else None
    print()
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"generate": gen, "compact_s": compact_s, "bytes": size,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
