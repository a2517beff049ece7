"""Ingest throughput: files/s and MB/s for LAMOST-layout files, against a bare astropy read loop.

Writes N LAMOST DR1-7 (primary image) files into a temporary directory (tests/io/fits_factory.py
layout; spectra of 3,909 pixels with noise, masks and whole-pixel offsets), then times on the same
files, page cache warm (the files were just written):

  1. bare astropy loop (the ceiling): fits.open, read the 5 x 3909 image and the header keys the
     loader needs; one process, and the files split over P processes;
  2. the LAMOST loader alone (identify + read + sanitise), one process, nothing written;
  3. ``run_ingest`` (map -> plan -> reduce, Parquet store written) on a LocalCluster of 1 and of 2
     workers; clusters are started (and worker imports done) before the clock.

Every method runs ``--repeats`` times, interleaved; the table shows the fastest wall time (the
machine is shared: the minimum is the least disturbed run) and the CPU seconds used per 1000 files
(all processes: workers, scheduler and client), which contention does not inflate.

    flock /tmp/distlabels-cpu.lock python benchmarks/ingest.py --n-files 5000 --workers 1,2
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astropy.io import fits  # noqa: E402

from distlabels.config import IngestConfig  # noqa: E402
from distlabels.io.loaders import loaders_for, read_file  # noqa: E402
from distlabels.pipeline.ingest import run_ingest  # noqa: E402
from tests.io import fits_factory as ff  # noqa: E402


def make_files(out: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    base, ivar, _ = ff._spectrum(rng, ff.LAMOST_NPIX, snr=40)
    files = []
    for k in range(n):
        flux = (base * rng.uniform(0.5, 2.0) + rng.normal(0, 2.5, ff.LAMOST_NPIX)).astype(np.float32)
        andmask = np.zeros(ff.LAMOST_NPIX, np.int32)
        andmask[rng.integers(0, ff.LAMOST_NPIX, 8)] = 4
        shift = int(rng.integers(-3, 4))
        p = out / f"spec-{56000 + k // 4000}-PLAN{k // 250:04d}_sp{k % 16 + 1:02d}-{k % 250 + 1:03d}.fits"
        ff.write_lamost(p, obsid=100000000 + k, ra=float(rng.uniform(0, 360)),
                        dec=float(np.degrees(np.arcsin(rng.uniform(-0.5, 0.95)))), flux=flux, ivar=ivar,
                        andmask=andmask, coeff0=round(ff.LAMOST_COEFF0 + shift * 1e-4, 4), snr=40.0)
        files.append(str(p))
    return files


def bare_read(files: list[str]) -> float:
    """What any reader must do: open, parse the header, read the image, get the keys; returns CPU s."""
    c0 = time.process_time()
    for p in files:
        with fits.open(p, memmap=False) as h:
            hdr = h[0].header
            _ = h[0].data
            _ = [hdr.get(k) for k in ("OBSID", "RA", "DEC", "DESIG", "CLASS", "SUBCLASS", "Z", "SNRR", "MJD",
                                      "FIB_MASK", "HELIO_RV", "VACUUM", "COEFF0", "COEFF1")]
    return time.process_time() - c0


def loader_read(files: list[str]) -> float:
    c0 = time.process_time()
    lds = loaders_for("lamost")
    for p in files:
        read_file(p, lds)
    return time.process_time() - c0


def _warm() -> None:
    """Import what a map task needs (astropy.io.fits, astropy_healpix, pyarrow) once per worker."""
    import distlabels.io.ingest  # noqa: F401
    from distlabels.healpix import healpix29

    healpix29(np.array([1.0]), np.array([1.0]))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cluster_cpu(client) -> float:
    """CPU seconds used so far by the workers and by this process (client + scheduler)."""
    return sum(client.run(_cpu).values()) + _cpu()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-files", type=int, default=5000)
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to time, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    work = Path(args.dir or tempfile.mkdtemp(prefix="dl-ingest-bench-"))
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    from distributed import Client, LocalCluster

    clusters = {}
    try:
        t0 = time.perf_counter()
        files = make_files(work / "fits", args.n_files)
        size = sum(os.path.getsize(f) for f in files)
        mb = size / 1e6
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"astropy {__import__('astropy').__version__}, pyarrow {__import__('pyarrow').__version__}")
        print(f"input: {len(files)} LAMOST DR1-7 image files, {mb:.1f} MB ({size / len(files) / 1e3:.1f} kB/file), "
              f"written in {time.perf_counter() - t0:.1f} s; page cache warm; {args.repeats} interleaved repeats")
        print(f"load average (1, 5, 15 min) at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for w in workers:
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client = Client(cluster)
            client.run(_warm)
            clusters[w] = (cluster, client, time.perf_counter() - t0)
        bare_read(files[:50])
        loader_read(files[:50])
        pools = {p: mp.get_context("spawn").Pool(p) for p in sorted({w for w in workers if w > 1})}
        for p, pool in pools.items():
            pool.map(bare_read, [files[:5]] * p)
        runs: dict[str, list[tuple[float, float]]] = {}
        stores = {}
        for _ in range(args.repeats):
            t = time.perf_counter()
            cpu = bare_read(files)
            runs.setdefault("bare astropy loop, 1 process", []).append((time.perf_counter() - t, cpu))
            for p, pool in pools.items():
                t = time.perf_counter()
                cpu = sum(pool.map(bare_read, [files[i::p] for i in range(p)]))
                runs.setdefault(f"bare astropy loop, {p} processes", []).append((time.perf_counter() - t, cpu))
            t = time.perf_counter()
            cpu = loader_read(files)
            runs.setdefault("distlabels LAMOST loader only, 1 process", []).append((time.perf_counter() - t, cpu))
            for w, (_, client, t_start) in clusters.items():
                out = work / f"store-{w}"
                c0 = cluster_cpu(client)
                t = time.perf_counter()
                s = run_ingest([str(work / "fits")], out, IngestConfig(progress=False, overwrite=True), client=client)
                wall = time.perf_counter() - t
                name = f"distlabels ingest, LocalCluster {w} worker(s) (start-up {t_start:.1f} s, not counted)"
                runs.setdefault(name, []).append((wall, cluster_cpu(client) - c0))
                stores[w] = (s, sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6)
        for p in pools.values():
            p.close()
        for w, (s, store_mb) in stores.items():
            print(f"  ingest {w} worker(s): {s.n_spectra_written} spectra, {s.n_fragments} fragments, "
                  f"{store_mb:.1f} MB store, {s.n_files_quarantined} quarantined")
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"\n{'method':<80} {'best s':>7} {'median':>7} {'files/s':>8} {'MB/s':>6} {'CPU s/1000 files':>17}")
        for name, rs in runs.items():
            walls = sorted(r[0] for r in rs)
            best = walls[0]
            cpu = min(r[1] for r in rs)
            print(f"{name:<80} {best:7.2f} {np.median(walls):7.2f} {len(files) / best:8.0f} {mb / best:6.1f} "
                  f"{1000 * cpu / len(files):17.2f}")
    finally:
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
