"""Where the fit kernel's time goes on a CUDA GPU, and how fast it runs there.

Run on a machine with a CUDA GPU, from the repository root::

    python benchmarks/gpu_profile.py --model-dir DIR                   # ~2-3 minutes on one H100
    python benchmarks/gpu_profile.py --model-dir DIR --grids lamost --n 4096 --batch-sizes 4096

For each grid (the 3,909-pixel LAMOST-like grid, the model's own 14,001 pixels) it makes ``--n``
pre-normalised mock spectra at one S/N (CPU), then on the GPU:

* spectra/s of ``SpectrumFitter.fit`` over all of them (host arrays in, results out, synchronised), for
  each batch size, with the approximate curvature on and off, and for each way of doing the Doppler
  taps on aligned grids (``--taps``: ``fused``, one torch.compile kernel; ``eager``, batched gathers;
  ``legacy``, per-pixel weights as before the aligned GPU path), after a warm-up fit, with the peak
  GPU memory of each;
* the places in our code that wait for the GPU (``torch.cuda.set_sync_debug_mode``), counted by line;
* a ``torch.profiler`` table of one fit (CUDA time by operator) with the FLOPs of the matrix products,
  the achieved FLOP/s over the fit's wall time, and that as a fraction of the FP32 matrix-product rate
  measured on this GPU (TF32 off, as in the fit) and of ``--peak-tflops`` (the datasheet figure).

Everything printed is also written to ``--json``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from distlabels.config import FitConfig, MockConfig
from distlabels.fit import Flag, SpectrumFitter
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock
from distlabels.models import load


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="an imported bossbrain model directory")
    ap.add_argument("--grids", default="lamost,model", help="lamost and/or model (default both)")
    ap.add_argument("--modes", default="prenorm,full", help="prenorm and/or full (continuum + masks)")
    ap.add_argument("--n", type=int, default=16384, help="mock stars per grid (default 16384)")
    ap.add_argument("--mock-n", type=int, default=8192, help="distinct mocks (repeated up to --n; default 8192)")
    ap.add_argument("--snr", type=float, default=50.0, help="S/N per pixel (default 50)")
    ap.add_argument("--batch-sizes", default="4096,8192,16384", help="kernel batch sizes to time")
    ap.add_argument("--approx", default="on,off", help="approximate curvature settings to time: on, off, auto")
    ap.add_argument("--taps", default="fused,eager,legacy",
                    help="Doppler taps on aligned grids to time: fused (torch.compile), eager, legacy (per-pixel)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed fits per setting; the fastest counts (the first may include compilation at a new size)")
    ap.add_argument("--profile-n", type=int, default=4096, help="stars in the profiled fit (default 4096)")
    ap.add_argument("--peak-tflops", type=float, default=67.0, help="datasheet FP32 peak (H100 SXM: 67)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a quick smoke run of this script")
    return ap.parse_args()


DEV = torch.device("cuda")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def gemm_tflops(dtype=torch.float32, n=8192, reps=10, tf32=False) -> float:
    """Measured dense matrix-product rate (TFLOP/s) on this GPU, random operands, CUDA events."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=DEV, dtype=dtype)
        b = torch.randn(n, n, device=DEV, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def copy_tbs(nbytes=2 << 30, reps=10) -> float:
    """Device-to-device copy rate (TB/s, bytes read plus written)."""
    x = torch.empty(nbytes // 4, device=DEV)
    x.normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    return 2 * nbytes * reps / (time.perf_counter() - t0) / 1e12


def set_taps(fitter, how: str, saved: dict) -> bool:
    """Switch the fitter's Doppler taps (see --taps); False when that setting is not available here."""
    for fw in (fitter.fwd, fitter.fwd_main):
        saved.setdefault(id(fw), (fw.aligned, fw.fused.enabled))
        aligned, fused = saved[id(fw)]
        fw.aligned = None if how == "legacy" else aligned
        fw.fused.enabled = fused and how == "fused"
    if saved[id(fitter.fwd)][0] is None:            # not an aligned grid: one path, whatever the setting
        return how == "legacy"
    return fitter.fwd.fused.enabled if how == "fused" else True


def timed_fit(fitter, flux, ivar, mask):
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    res = fitter.fit(flux, ivar, mask)
    sync()
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else float("nan")
    return res, time.perf_counter() - t0, mem


def sync_sites(fitter, flux, ivar, mask, root: str) -> list[tuple[str, int]]:
    """Lines of distlabels that made the host wait for the GPU during one fit, with counts."""
    counts: collections.Counter = collections.Counter()
    if DEV.type != "cuda":
        return []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            fitter.fit(flux, ivar, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in got:
        if "synchroniz" in str(w.message).lower():
            counts[f"{os.path.relpath(w.filename, root)}:{w.lineno}"] += 1
    return counts.most_common(20)


def profile_fit(fitter, flux, ivar, mask):
    from torch.profiler import ProfilerActivity, profile

    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts, with_flops=True) as prof:
        t0 = time.perf_counter()
        fitter.fit(flux, ivar, mask)
        sync()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    flops = sum(getattr(e, "flops", 0) or 0 for e in ka)
    dev_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0 for e in ka)
    key = "self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    try:
        table = ka.table(sort_by=key, row_limit=25)
    except Exception:                                        # noqa: BLE001 (renamed keys across versions)
        table = ka.table(sort_by="self_device_time_total", row_limit=25)
    n_kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return dict(wall_s=wall, flops=flops, gpu_busy_s=dev_us / 1e6, n_gpu_events=n_kernels), table


def main():
    global DEV
    a = parse()
    DEV = torch.device(a.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA GPU visible to torch (or --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = False             # the fit's own setting (FP32 products)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if DEV.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, sms, mem = torch.cuda.get_device_name(0), props.multi_processor_count, props.total_memory / 2**30
    else:
        name, sms, mem = "cpu", 0, 0.0
    report = {"device": name, "torch": torch.__version__, "sms": sms,
              "memory_gib": mem, "n": a.n, "snr": a.snr, "runs": [], "profiles": {}}
    small = DEV.type == "cpu"
    report["gemm_fp32_tflops"] = gemm_tflops(n=1024 if small else 8192)
    report["gemm_tf32_tflops"] = gemm_tflops(n=1024 if small else 8192, tf32=True)
    report["copy_tbs"] = copy_tbs(nbytes=(64 << 20) if small else (2 << 30))
    print(f"GPU {report['device']} ({report['sms']} SMs, {report['memory_gib']:.0f} GiB), torch {torch.__version__}; "
          f"measured: FP32 GEMM {report['gemm_fp32_tflops']:.1f} TFLOP/s, TF32 GEMM {report['gemm_tf32_tflops']:.1f}, "
          f"copy {report['copy_tbs']:.2f} TB/s", flush=True)
    model = load(a.model_dir)
    for grid in a.grids.split(","):
        t0 = time.perf_counter()
        n_unique = min(a.n, a.mock_n)
        table, meta = make_mock(model, MockConfig(n=n_unique, snr_min=a.snr, snr_max=a.snr, seed=11, grid=grid,
                                                  normalized=True, rv_max_kms=5.0))
        n_pix = len(meta["wavelength_aa"])
        # Mocks are made on the CPU (~2 ms each on the LAMOST grid): beyond --mock-n the set repeats.
        reps = -(-a.n // n_unique)
        tile = lambda x: np.concatenate([x] * reps)[: a.n]                  # noqa: E731
        flux = tile(list_to_numpy(table["flux"], n_pix))
        ivar = tile(list_to_numpy(table["ivar"], n_pix))
        mask = tile(list_to_numpy(table["mask"], n_pix, np.bool_))
        truth = tile(np.stack([table[f"true_{k}"].to_numpy().astype(float) for k in ("teff", "logg", "mh")], 1))
        print(f"[{grid}] {n_unique} mocks of {n_pix} px made in {time.perf_counter() - t0:.1f} s (CPU)"
              + (f", repeated to {a.n}" if reps > 1 else ""), flush=True)
        for mode in a.modes.split(","):
            kw = dict(continuum_degree=-1, masks="none") if mode == "prenorm" else {}
            t0 = time.perf_counter()
            fitter = SpectrumFitter(model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                                    resolution=meta["resolution"], segments=meta["segments"],
                                    config=FitConfig(batch_size=4096, **kw), device=DEV)
            sync()
            print(f"[{grid}/{mode}] fitter built in {time.perf_counter() - t0:.1f} s: working grid "
                  f"{fitter.grid.n_work} px, {fitter.n_par} parameters", flush=True)
            base_cfg = fitter.config
            saved: dict = {}
            print(f"[{grid}/{mode}] aligned grid: {fitter.fwd.aligned is not None}; fused taps: "
                  f"{fitter.fwd.fused.enabled or fitter.fwd.fused.reason}", flush=True)
            for taps, approx, bs in ((t, ap_, int(b)) for t in a.taps.split(",") for ap_ in a.approx.split(",")
                                     for b in a.batch_sizes.split(",")):
                if not set_taps(fitter, taps, saved):
                    print(f"[{grid}/{mode}] taps {taps}: not available "
                          f"({fitter.fwd.fused.reason or 'not an aligned grid: only legacy runs'})", flush=True)
                    continue
                ac = "auto" if approx == "auto" else approx == "on"
                fitter.config = dataclasses.replace(base_cfg, batch_size=4096, approx_curvature=ac)
                t0 = time.perf_counter()
                fitter.fit(flux[:256], ivar[:256], mask[:256])    # warm-up: kernels, cuBLAS handles, compilation
                warm = time.perf_counter() - t0
                fitter.config = dataclasses.replace(base_cfg, batch_size=bs, approx_curvature=ac)
                try:
                    times = []
                    for _ in range(max(a.repeats, 1)):
                        res, sec, mem = timed_fit(fitter, flux, ivar, mask)
                        times.append(sec)
                    sec = min(times)
                except torch.OutOfMemoryError:
                    print(f"[{grid}/{mode}] batch {bs}: out of GPU memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                d = res.labels[:, :3] - truth
                row = dict(grid=grid, mode=mode, taps=taps, approx=approx, approx_used=fitter.use_approx_curvature,
                           batch_size=bs, n=a.n, seconds=sec,
                           warmup_s=warm, all_seconds=times,
                           spectra_per_s=a.n / sec, peak_mem_gib=mem, iters=float(np.mean(res.n_iter)),
                           fit_ok=float(np.mean((res.flags & (Flag.NOT_CONVERGED | Flag.CHI2_HIGH | Flag.FIT_ERROR)) == 0)),
                           scatter=[float(x) for x in np.nanstd(d, 0)],
                           pull_std=[float(x) for x in np.nanstd(d / res.errors[:, :3], 0)])
                report["runs"].append(row)
                used = "on" if row["approx_used"] else "off"
                print(f"[{grid}/{mode}] taps {taps:6s} approx {approx}->{used} batch {bs:6d}: {row['spectra_per_s']:9.0f} spectra/s "
                      f"({'/'.join(f'{t:.2f}' for t in times)} s), peak {mem:.1f} GiB, iters {row['iters']:.1f}, fit-ok {row['fit_ok']:.1%}, "
                      f"scatter teff/logg/mh {row['scatter'][0]:.1f} / {row['scatter'][1]:.3f} / {row['scatter'][2]:.3f}, "
                      f"pull std {row['pull_std'][0]:.2f} / {row['pull_std'][1]:.2f} / {row['pull_std'][2]:.2f}",
                      flush=True)
            fitter.config = dataclasses.replace(base_cfg, batch_size=4096)
            if not set_taps(fitter, a.taps.split(",")[0], saved):
                set_taps(fitter, "legacy", saved)
            if a.skip_profile:
                continue
            k = min(a.profile_n, a.n)
            sites = sync_sites(fitter, flux[:k], ivar[:k], mask[:k], root)
            print(f"[{grid}/{mode}] host waits for the GPU during a {k}-star fit (line: count):", flush=True)
            for site, c in sites:
                print(f"    {site}: {c}")
            prof, table_txt = profile_fit(fitter, flux[:k], ivar[:k], mask[:k])
            achieved = prof["flops"] / prof["wall_s"] / 1e12
            prof.update(sync_sites=sites, achieved_tflops=achieved,
                        fraction_of_measured_fp32=achieved / report["gemm_fp32_tflops"],
                        fraction_of_datasheet=achieved / a.peak_tflops, spectra_per_s_profiled=k / prof["wall_s"])
            report["profiles"][f"{grid}/{mode}"] = prof
            print(f"[{grid}/{mode}] profiled fit of {k}: {prof['wall_s']:.2f} s wall (under the profiler), GPU busy "
                  f"{prof['gpu_busy_s']:.2f} s, {prof['n_gpu_events']} GPU events; matrix-product FLOPs "
                  f"{prof['flops'] / 1e12:.2f} T -> {achieved:.2f} TFLOP/s = {prof['fraction_of_measured_fp32']:.1%} of "
                  f"the measured FP32 GEMM rate, {prof['fraction_of_datasheet']:.1%} of {a.peak_tflops:g} TFLOP/s",
                  flush=True)
            print(table_txt, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
        print(f"wrote {a.json}")
    print("summary (spectra/s):")
    for r in report["runs"]:
        print(f"  {r['grid']:6s} {r['mode']:7s} taps {r['taps']:6s} approx {r['approx']:3s} batch {r['batch_size']:6d}: "
              f"{r['spectra_per_s']:9.0f}")


if __name__ == "__main__":
    main()
