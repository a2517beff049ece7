"""Ingest throughput: files/s and MB/s for LAMOST-layout files, against a bare astropy read loop.

Writes N LAMOST DR1-7 (primary image) files into a temporary directory (tests/io/fits_factory.py
layout; spectra of 3,909 pixels with noise, masks and whole-pixel offsets), then times on the same
files, page cache warm (the files were just written):

  1. bare astropy loop (the ceiling): fits.open, read the 5 x 3909 image and the header keys the
     loader uses; one process, and the same split over P processes;
  2. the LAMOST loader alone (identify + read + sanitise), one process, no writing;
  3. ``run_ingest`` (map -> plan -> reduce, Parquet store written) on a LocalCluster of 1 and of 2
     workers; the cluster is started before the clock (its start-up is printed separately).

    flock /tmp/distlabels-cpu.lock python benchmarks/ingest.py --n-files 5000 --workers 1,2
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
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


def bare_read(files: list[str]) -> int:
    """What any reader must do: open, parse the header, read the image, get the keys; returns bytes read."""
    n = 0
    for p in files:
        with fits.open(p, memmap=False) as h:
            hdr = h[0].header
            d = h[0].data
            _ = (hdr["OBSID"], hdr["RA"], hdr["DEC"], hdr["COEFF0"], hdr["COEFF1"], hdr["CLASS"])
            n += d.nbytes
    return n


def loader_read(files: list[str]) -> int:
    lds = loaders_for("lamost")
    n = 0
    for p in files:
        _, lf = read_file(p, lds)
        n += lf.flux.nbytes
    return n


def _warm() -> None:
    """Import what a map task needs (astropy.io.fits, astropy_healpix, pyarrow) once per worker."""
    import distlabels.io.ingest  # noqa: F401
    from distlabels.healpix import healpix29

    healpix29(np.array([1.0]), np.array([1.0]))


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t, r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-files", type=int, default=5000)
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to time, e.g. 1,2")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="dl-ingest-bench-"))
    try:
        t_gen, files = timed(make_files, work / "fits", args.n_files)
        size = sum(os.path.getsize(f) for f in files)
        mb = size / 1e6
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"astropy {__import__('astropy').__version__}, pyarrow {__import__('pyarrow').__version__}")
        print(f"load average (1, 5, 15 min) at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"input: {len(files)} LAMOST DR1-7 image files, {mb:.1f} MB ({size / len(files) / 1e3:.1f} kB/file), "
              f"written in {t_gen:.1f} s; page cache warm")
        rows = []
        bare_read(files[:50])                                     # warm imports
        t, _ = timed(bare_read, files)
        rows.append(("bare astropy loop, 1 process", t))
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
        for p in sorted(set(w for w in workers if w > 1)):
            chunks = [files[i::p] for i in range(p)]
            with mp.get_context("spawn").Pool(p) as pool:
                pool.map(bare_read, [c[:5] for c in chunks])          # start-up outside the clock
                t0 = time.perf_counter()
                pool.map(bare_read, chunks)
                rows.append((f"bare astropy loop, {p} processes", time.perf_counter() - t0))
        t, _ = timed(loader_read, files)
        rows.append(("distlabels LAMOST loader only, 1 process", t))
        from distributed import Client, LocalCluster

        for w in workers:
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client = Client(cluster)
            client.run(_warm)                                           # worker imports outside the clock
            t_start = time.perf_counter() - t0
            out = work / f"store-{w}"
            t, s = timed(run_ingest, [str(work / "fits")], out, IngestConfig(progress=False, overwrite=True),
                         client=client)
            store_mb = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6
            rows.append((f"distlabels ingest, LocalCluster {w} worker(s) (start-up {t_start:.1f} s, not counted)", t))
            print(f"  ingest {w} worker(s): {s.n_spectra_written} spectra, {s.n_fragments} fragments, "
                  f"{store_mb:.1f} MB store, {s.n_files_quarantined} quarantined")
            client.close()
            cluster.close()
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"\n{'method':<80} {'s':>7} {'files/s':>9} {'MB/s':>7}")
        for name, t in rows:
            print(f"{name:<80} {t:7.2f} {len(files) / t:9.0f} {mb / t:7.1f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
