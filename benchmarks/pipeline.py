"""Pipeline throughput against the kernel alone, on the same spectra, at equal thread counts.

    python benchmarks/pipeline.py                      # CPU LocalCluster, the figures in RESULTS.md
    python benchmarks/pipeline.py --cluster local-cuda --device cuda --n 200000 --task-rows 10000

For each preset of the fit kernel (``default``: FitConfig(); ``fast``: few LM iterations and a small
start library, i.e. less compute per spectrum, which makes the pipeline's fixed costs weigh more):

- kernel alone: ``SpectrumFitter.fit`` on the spectra already in memory (numpy), torch with 1 and
  with 2 threads; the fitter's one-off set-up is timed apart;
- pipeline: ``run_fit`` on a real LocalCluster (already started) with 1 worker x 1 thread and
  2 workers x 1 thread: Parquet read, fit, atomic fragment write, scheduling, the model plugin;
- ratios: pipeline throughput / kernel throughput at equal threads (target >= 0.9 for tasks of
  >= 10,000 spectra), and the fit throughput inside the pipeline (spectra per second of fit time
  per worker) against the kernel alone on one thread.

Also times ``verify`` on a large synthetic catalog (source_id and flags only). Prints a table; with
--json writes every figure. It measures whatever kernel is in the tree.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAST = {"max_iter": 4, "library_size": 32, "n_starts": 1, "n_templates": 1}


def fit_config(preset: str):
    from distlabels.config import FitConfig

    if preset == "default":
        return FitConfig()
    names = {f.name for f in dataclasses.fields(FitConfig)}
    return FitConfig(**{k: v for k, v in FAST.items() if k in names})


def kernel_alone(model, store, cfg, threads: int) -> dict:
    import torch

    from distlabels.fit.kernel import SpectrumFitter

    torch.set_num_threads(threads)
    table = store.read_all()
    flux, ivar, mask = store.spectra(table)
    c0 = time.process_time()
    t0 = time.perf_counter()
    fitter = SpectrumFitter(model, store.wavelength, wavelength_medium=store.wavelength_medium,
                            resolution=store.resolution, segments=store.segments, config=cfg, device="cpu")
    t1 = time.perf_counter()
    c1 = time.process_time()
    fitter.fit(flux, ivar, mask)
    t2 = time.perf_counter()
    c2 = time.process_time()
    return {"threads": threads, "n": len(flux), "setup_s": t1 - t0, "fit_s": t2 - t1, "spectra_per_s": len(flux) / (t2 - t1),
            "setup_cpu_s": c1 - c0, "fit_cpu_s": c2 - c1, "spectra_per_cpu_s": len(flux) / (c2 - c1)}


def pipeline(model_dir, store_root, cfg, workers: int, task_rows: int, cluster: str, device: str) -> dict:
    from distributed import Client, LocalCluster

    from distlabels.config import RunConfig
    from distlabels.pipeline import run_fit
    from distlabels.pipeline.cluster import make_client

    rcfg = RunConfig(cluster=cluster, workers=workers, threads_per_worker=1, task_rows=task_rows, progress=False,
                     fit=cfg, device=device, overwrite=True)
    t0 = time.perf_counter()
    if cluster == "local":
        lc = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR)
        client = Client(lc)
    else:
        client, lc = make_client(rcfg)
    client.wait_for_workers(workers if cluster == "local" else 1, timeout=600)
    t_cluster = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(prefix="bench-cat-"))
    try:
        # CPU seconds of the workers and of this process (client + scheduler): the pipeline's cost in
        # CPU time, which other loads on a shared machine do not change (wall time they do).
        w0, c0 = client.run(time.process_time), time.process_time()
        t0 = time.perf_counter()
        s = run_fit(model_dir, store_root, out / "cat", rcfg, client=client)
        wall = time.perf_counter() - t0
        w1, c1 = client.run(time.process_time), time.process_time()
        cpu = sum(w1[k] - w0[k] for k in w1 if k in w0) + (c1 - c0)
        run = json.loads((out / "cat" / "_run.json").read_text())
    finally:
        client.close()
        if lc is not None:
            try:
                lc.close(timeout=60)
            except TimeoutError:        # a slow nanny at shutdown does not change the figures
                pass
        shutil.rmtree(out, ignore_errors=True)
    timings = [t for t in run["partition_timings"] if not t.get("skipped")]
    n = sum(t["n_rows"] for t in timings)
    fit_s = sum(t["fit_s"] for t in timings)
    return {"workers": workers, "task_rows": task_rows, "n": n, "n_tasks": len(timings), "cluster_start_s": t_cluster,
            "run_wall_s": wall, "spectra_per_s": n / wall, "fit_s_sum": fit_s,
            "read_s_sum": sum(t["read_s"] for t in timings), "write_s_sum": sum(t["write_s"] for t in timings),
            "fit_spectra_per_s_per_worker": n / fit_s, "failed": s.n_failed, "cpu_s": cpu, "spectra_per_cpu_s": n / cpu}


def make_store(model, n: int, rows_per_fragment: int, root: Path, seed: int = 5):
    from distlabels.config import MockConfig
    from distlabels.io.store import write_store
    from distlabels.mock import make_mock

    import pyarrow as pa

    table, meta = make_mock(model, MockConfig(n=n, snr_min=20, snr_max=100, seed=seed))
    # All stars in one small patch of sky (one HEALPix order-0 pixel), so that the store's fragments,
    # and with them the tasks, hold rows_per_fragment spectra each instead of one per sky pixel.
    rng = np.random.default_rng(seed)
    for name, values in (("ra", rng.uniform(40.0, 50.0, n)), ("dec", rng.uniform(10.0, 20.0, n))):
        table = table.set_column(table.column_names.index(name), name, pa.array(values))
    if "_healpix_29" in table.column_names:
        table = table.drop_columns(["_healpix_29"])
    return write_store(root, table, meta, max_rows_per_partition=rows_per_fragment, overwrite=True)


def bench_verify(n_rows: int, n_frag: int, tmp: Path) -> dict:
    """verify on a synthetic store + catalog of n_rows ids (only the columns verify reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distlabels import paths
    from distlabels.io.store import write_json_atomic
    from distlabels.pipeline.verify import verify_catalog

    store, cat = tmp / "vstore", tmp / "vcat"
    per = n_rows // n_frag
    for i in range(n_frag):
        ids = pa.array(np.char.add("gaia:", np.arange(i * per, (i + 1) * per).astype(str)))
        for root in (store, cat):
            f = paths.fragment_path(root, 3, i, "part-0000")
            f.parent.mkdir(parents=True, exist_ok=True)
            cols = {"source_id": ids} if root == store else {"source_id": ids, "flags": pa.array(np.zeros(per, np.int64))}
            pq.write_table(pa.table(cols), f)
    write_json_atomic(store / paths.STORE_META, {"wavelength_aa": [5000.0, 5001.0]})
    t0 = time.perf_counter()
    rep = verify_catalog(str(cat), str(store))
    dt = time.perf_counter() - t0
    assert rep.ok, rep.problems
    return {"rows": per * n_frag, "fragments": n_frag, "verify_s": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="spectra per preset (default: 2000 fast, 400 default)")
    ap.add_argument("--task-rows", type=int, default=None, help="spectra per task (default: n / 2)")
    ap.add_argument("--presets", default="fast,default")
    ap.add_argument("--workers", default="1,2", help="pipeline worker counts to run")
    ap.add_argument("--threads", default="1,2", help="kernel-alone thread counts to time (default 1,2)")
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verify-rows", type=int, default=2_000_000)
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)

    from distlabels.models import load
    from distlabels.models.importers import import_bossbrain

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "loadavg_start": os.getloadavg()}, "presets": {}}
    try:
        model_dir = import_bossbrain("4000-5000", tmp / "bb45")
        model = load(model_dir)
        for preset in args.presets.split(","):
            n = args.n or (2000 if preset == "fast" else 400)
            task_rows = args.task_rows or max(n // 2, 1)
            store = make_store(model, n, task_rows, tmp / f"store-{preset}")
            cfg = fit_config(preset)
            res = {"n": n, "task_rows": task_rows, "fit_config": dataclasses.asdict(cfg), "kernel": {}, "pipeline": {}}
            for threads in (int(x) for x in args.threads.split(",")):
                res["kernel"][threads] = kernel_alone(model, store, cfg, threads)
                k = res["kernel"][threads]
                print(f"[{preset}] kernel alone, {threads} thread(s): {k['spectra_per_s']:.2f} spectra/s, "
                      f"{k['spectra_per_cpu_s']:.2f} per CPU-second (set-up {k['setup_s']:.2f} s)", flush=True)
            for w in (int(x) for x in args.workers.split(",")):
                res["pipeline"][w] = p = pipeline(model_dir, store.root, cfg, w, task_rows, args.cluster, args.device)
                k = res["kernel"].get(min(w, 2), res["kernel"][1])["spectra_per_s"]
                p["ratio_equal_threads"] = p["spectra_per_s"] / k
                p["ratio_vs_w_x_one_thread"] = p["spectra_per_s"] / (w * res["kernel"][1]["spectra_per_s"])
                p["fit_rate_ratio"] = p["fit_spectra_per_s_per_worker"] / res["kernel"][1]["spectra_per_s"]
                p["cpu_ratio"] = p["spectra_per_cpu_s"] / res["kernel"][1]["spectra_per_cpu_s"]
                print(f"[{preset}] pipeline {w} worker(s) x 1 thread, {p['n_tasks']} tasks of <= {task_rows}: "
                      f"{p['spectra_per_s']:.2f} spectra/s (run {p['run_wall_s']:.1f} s, cluster start "
                      f"{p['cluster_start_s']:.1f} s); / kernel at {min(w, 2)} thread(s) = {p['ratio_equal_threads']:.3f}; "
                      f"/ ({w} x kernel 1 thread) = {p['ratio_vs_w_x_one_thread']:.3f}; fit rate per worker "
                      f"{p['fit_spectra_per_s_per_worker']:.2f}/s = {p['fit_rate_ratio']:.3f} x kernel; "
                      f"CPU: {p['spectra_per_cpu_s']:.2f} spectra per CPU-second = {p['cpu_ratio']:.3f} x kernel "
                      f"({res['kernel'][1]['spectra_per_cpu_s']:.2f})", flush=True)
            results["presets"][preset] = res
        if args.verify_rows:
            results["verify"] = v = bench_verify(args.verify_rows, 100, tmp)
            print(f"verify: {v['rows']:,} rows in {v['fragments']} fragments: {v['verify_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {results['machine']['loadavg_start']}, at end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
