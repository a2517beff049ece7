"""Fit kernel benchmark: distlabels' kernel against The Payne's published fitter, same spectra, one core.

Run from the repository root (under the shared CPU lock on the development machine)::

    flock /tmp/distlabels-cpu.lock python benchmarks/fit_kernel.py                 # full run (~40 min)
    python benchmarks/fit_kernel.py --n-stars 100 --ref-stars 10 --snr 50          # smoke run
    python benchmarks/fit_kernel.py --device cuda --skip-reference                 # on a GPU machine

What it does, for each grid (the model's own 14,001 pixels; the 3,909-pixel LAMOST-like grid) and
each S/N (20, 50, 100 per pixel):

* makes ``--n-stars`` mock spectra from bossbrain's 4000-5000 K emulator, pre-normalised, |RV| < 5
  km/s (the conditions The Payne's fitter was designed for; ``distlabels.mock``);
* fits all of them with distlabels (``--ours-modes``: ``prenorm`` = the same information as the
  reference: no continuum, no sky masks; ``full`` = the production setting: Chebyshev continuum per
  segment fitted jointly, default masks) and ``--ref-stars`` of them with our implementation of The
  Payne's fitter (``reference_payne.py``; variant ``resample`` = the 14,001-pixel network resampled
  onto the observed pixels each call, ``folded`` = that resampling folded into the network once);
  the two methods run interleaved, chunk by chunk, so that a change in machine load hits both;
* reports spectra/s per core (torch and BLAS on one thread), the ratio, scatter of (fit - truth) for
  teff, logg, mh with paired-bootstrap 95 % intervals of ours/reference on the same stars, the pull
  std, the fraction of |pull| > 5, and at S/N 50 the pooled std((fit - truth)/CRB) over stars not at
  a bound (CRB from ``distlabels.fit.crb`` with the fit's own nuisance parameters and mask);
* prints the FLOP count of one LM iteration, so that a GPU run can be compared (``--device cuda``
  also reports the fraction of the GPU's peak FLOP/s reached).
"""
from __future__ import annotations

import argparse
import os
import sys

LABELS = ("teff", "logg", "mh")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-stars", type=int, default=1000, help="mock stars per S/N and grid (default 1000)")
    ap.add_argument("--ref-stars", type=int, default=150,
                    help="of these, how many the reference fits (default 150: the reference takes ~0.5-2 s each)")
    ap.add_argument("--snr", default="20,50,100", help="S/N per pixel values (default 20,50,100)")
    ap.add_argument("--grids", default="model,lamost", help="model and/or lamost (default both)")
    ap.add_argument("--ours-modes", default="prenorm,full", help="prenorm and/or full (default both)")
    ap.add_argument("--ref-variants", default="resample,folded", help="reference variants on survey grids")
    ap.add_argument("--skip-reference", action="store_true", help="only our kernel (e.g. on a GPU machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (our kernel; the reference is CPU-only)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch and BLAS (default 1: per core)")
    ap.add_argument("--batch-size", type=int, default=None, help="kernel batch size (default: FitConfig's; 4096 on cuda)")
    ap.add_argument("--chunks", type=int, default=5, help="interleaving rounds per S/N (default 5)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--model-dir", help="an imported bossbrain model directory (default: import 4000-5000 K to a temp dir)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU FP32 peak for the utilisation figure")
    ap.add_argument("--json", help="write every figure to this JSON file")
    return ap.parse_args()


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_payne import from_model  # noqa: E402

from distlabels.config import FitConfig, MockConfig  # noqa: E402
from distlabels.fit import Flag, SpectrumFitter, crb  # noqa: E402
from distlabels.io.store import list_to_numpy  # noqa: E402
from distlabels.mock import make_mock  # noqa: E402
from distlabels.models import load  # noqa: E402


def arrays(table, meta):
    n_pix = len(meta["wavelength_aa"])
    return (list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix),
            list_to_numpy(table["mask"], n_pix, np.bool_))


def bootstrap_ratio(a_err, b_err, n_boot=2000, seed=0):
    """Paired bootstrap 95 % interval of std(a)/std(b) over the same stars."""
    rng = np.random.default_rng(seed)
    n = len(a_err)
    idx = rng.integers(0, n, size=(n_boot, n))
    r = np.std(a_err[idx], axis=1) / np.std(b_err[idx], axis=1)
    return float(np.std(a_err) / np.std(b_err)), float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def flops_per_iteration(fitter) -> dict:
    """FLOPs of one LM iteration per star: Jacobian (network + interpolation) + normal equations + trial."""
    g = fitter.grid
    sizes = [w.shape for w in fitter.work.weights]
    K = fitter.lmap.n_theta
    hidden = sum(2 * o * i * (K + 1) for o, i in sizes[:-1])
    last = 2 * sizes[-1][0] * sizes[-1][1] * (K + 1)
    normal = 2 * fitter.n_pix * fitter.n_par ** 2
    trial = sum(2 * o * i for o, i in sizes)
    return {"n_work": g.n_work, "jacobian": hidden + last, "normal_equations": normal, "trial_forward": trial,
            "total": hidden + last + normal + trial}


def fit_ours(fitter, flux, ivar, mask):
    if fitter.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fitter.fit(flux, ivar, mask)
    if fitter.device.type == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def main():
    a = ARGS
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    snrs = [float(s) for s in a.snr.split(",")]
    if a.model_dir:
        model_dir = a.model_dir
    else:
        from distlabels.models.importers import import_bossbrain

        model_dir = import_bossbrain("4000-5000", os.path.join(tempfile.mkdtemp(prefix="bench-"), "bb45"))
    model = load(model_dir)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    conditions = {"cpu": cpu, "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                  "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                  "n_stars": a.n_stars, "ref_stars": 0 if a.skip_reference else a.ref_stars, "snr": snrs,
                  "model": model.model_id, "n_labels": model.n_labels, "mock": "pre-normalised, |RV| < 5 km/s"}
    print("conditions:", json.dumps(conditions))
    report = {"conditions": conditions, "rows": [], "flops": {}}
    for grid in a.grids.split(","):
        mocks = {}
        for snr in snrs:
            table, meta = make_mock(model, MockConfig(n=a.n_stars, snr_min=snr, snr_max=snr, seed=a.seed + int(snr),
                                                      grid=grid, normalized=True, rv_max_kms=5.0))
            mocks[snr] = (table, meta, *arrays(table, meta))
        meta = mocks[snrs[0]][1]
        wave, medium, res_r, seg = meta["wavelength_aa"], meta["wavelength_medium"], meta["resolution"], meta["segments"]
        fitters = {}
        for mode in a.ours_modes.split(","):
            kw = dict(continuum_degree=-1, masks="none") if mode == "prenorm" else {}
            if a.batch_size or dev.type == "cuda":
                kw["batch_size"] = a.batch_size or 4096
            t0 = time.perf_counter()
            fitters[mode] = SpectrumFitter(model, wave, wavelength_medium=medium, resolution=res_r, segments=seg,
                                           config=FitConfig(**kw), device=dev)
            print(f"[{grid}] ours/{mode}: fitter built in {time.perf_counter() - t0:.2f} s, working grid "
                  f"{fitters[mode].grid.n_work} px ({'native' if not fitters[mode].grid.uniform else 'uniform log'}), "
                  f"{fitters[mode].n_par} parameters, CPU matmul: {fitters[mode].matmul_backend}")
            report["flops"][f"{grid}/{mode}"] = flops_per_iteration(fitters[mode])
            if dev.type == "cuda":
                # Kernel loading and cuBLAS/cuSOLVER handles stay out of the timed fits.
                _, _, fw, iw, mw = mocks[snrs[0]]
                fitters[mode].fit(fw[:64], iw[:64], mw[:64])
        refs = {}
        if not a.skip_reference:
            variants = ["resample"] if grid == "model" else a.ref_variants.split(",")
            for v in variants:
                refs[v] = from_model(model, None if grid == "model" else wave, medium, res_r, folded=(v == "folded"))
        for snr in snrs:
            table, _, flux, ivar, mask = mocks[snr]
            n = len(flux)
            n_ref = min(a.ref_stars, n) if refs else 0
            chunks = np.array_split(np.arange(n), max(a.chunks, 1))
            ref_chunks = np.array_split(np.arange(n_ref), max(a.chunks, 1))
            ours = {m: [] for m in fitters}
            t_ours = {m: 0.0 for m in fitters}
            ref_out = {v: [] for v in refs}
            t_ref = {v: 0.0 for v in refs}
            for ch, rch in zip(chunks, ref_chunks):          # interleaved rounds
                for m, f in fitters.items():
                    r, el = fit_ours(f, flux[ch], ivar[ch], mask[ch])
                    ours[m].append(r)
                    t_ours[m] += el
                for v, ref in refs.items():
                    if len(rch):
                        t0 = time.perf_counter()
                        ref_out[v].append(ref.fit(flux[rch], ivar[rch], mask[rch]))
                        t_ref[v] += time.perf_counter() - t0
            truth = np.stack([table[f"true_{nm}"].to_numpy().astype(float) for nm in model.label_names], 1)
            li = [model.label_names.index(nm) for nm in LABELS]
            crb_sd = {}
            if snr == 50:
                # The bound for each fit setting (its own nuisance parameters and mask); the reference
                # has the information of the pre-normalised setting.
                for m, f in fitters.items():
                    crb_sd[m] = crb(model, truth, snr, wave, rv_kms=table["true_rv"].to_numpy().astype(float), fitter=f)
            results = {}
            for m in fitters:
                labels = np.concatenate([r.labels for r in ours[m]])
                errors = np.concatenate([r.errors for r in ours[m]])
                flags = np.concatenate([r.flags for r in ours[m]])
                n_iter = np.concatenate([r.n_iter for r in ours[m]])
                results[f"ours/{m}"] = dict(labels=labels, errors=errors, inside=(flags & Flag.AT_LABEL_BOUND) == 0,
                                            fit_ok=(flags & (Flag.NOT_CONVERGED | Flag.CHI2_HIGH)) == 0,
                                            seconds=t_ours[m], n=n, iters=float(np.mean(n_iter)),
                                            clean=float(np.mean(flags == 0)))
            for v in refs:
                if not ref_out[v]:
                    continue
                labels = np.concatenate([r.labels for r in ref_out[v]])
                errors = np.concatenate([r.errors for r in ref_out[v]])
                at_b = np.concatenate([r.at_bound for r in ref_out[v]])
                n_eval = np.concatenate([r.n_eval for r in ref_out[v]])
                results[f"ref/{v}"] = dict(labels=labels, errors=errors, inside=~at_b, fit_ok=np.ones(len(labels), bool),
                                           seconds=t_ref[v], n=len(labels),
                                           iters=float(np.mean(n_eval)), clean=float(np.mean(~at_b)))
            for name, r in results.items():
                k = r["n"]
                mode = name.split("/")[1]
                sd = crb_sd.get(mode, crb_sd.get("prenorm")) if crb_sd else None
                d = r["labels"][:, li] - truth[:k, li]
                pull = d / r["errors"][:, li]
                row = dict(grid=grid, snr=snr, method=name, n=k, spectra_per_s=k / r["seconds"],
                           iters_or_evals=r["iters"], not_at_bound=float(np.mean(r["inside"])))
                for j, nm in enumerate(LABELS):
                    row[f"scatter_{nm}"] = float(np.std(d[:, j]))
                    row[f"pull_std_{nm}"] = float(np.std(pull[:, j]))
                    row[f"beyond5_{nm}"] = float(np.mean(np.abs(pull[:, j]) > 5))
                    # Over the stars a catalog user keeps: not flagged NOT_CONVERGED or CHI2_HIGH.
                    ok = r["fit_ok"]
                    row[f"pull_std_fitok_{nm}"] = float(np.std(pull[ok, j]))
                    row[f"beyond5_fitok_{nm}"] = float(np.mean(np.abs(pull[ok, j]) > 5))
                    row[f"pull_robust_{nm}"] = float(1.4826 * np.median(np.abs(pull[:, j] - np.median(pull[:, j]))))
                    if sd is not None:
                        z = d[r["inside"], j] / sd[:k][r["inside"], li[j]]
                        row[f"crb_ratio_{nm}"] = float(np.std(z))
                row["fit_ok"] = float(np.mean(r["fit_ok"]))
                if name.startswith("ours") and refs:
                    for v in refs:
                        rr = results.get(f"ref/{v}")
                        if rr is None:
                            continue
                        kr = rr["n"]
                        row[f"speedup_vs_{v}"] = row["spectra_per_s"] / (kr / rr["seconds"])
                        for j, nm in enumerate(LABELS):
                            ours_d = r["labels"][:kr, li[j]] - truth[:kr, li[j]]
                            ref_d = rr["labels"][:, li[j]] - truth[:kr, li[j]]
                            row[f"scatter_ratio_{nm}_vs_{v}"] = bootstrap_ratio(ours_d, ref_d)
                report["rows"].append(row)
                line = (f"[{grid} S/N {snr:g}] {name:15s} n={k:5d} {row['spectra_per_s']:8.2f} spectra/s  "
                        f"iters/evals {r['iters']:6.1f}  " + "  ".join(
                            f"{nm}: {row[f'scatter_{nm}']:.4g} (pull {row[f'pull_std_{nm}']:.2f}"
                            + (f", crb {row[f'crb_ratio_{nm}']:.2f}" if f"crb_ratio_{nm}" in row else "") + ")"
                            for nm in LABELS))
                for key, val in row.items():
                    if key.startswith("speedup"):
                        line += f"  {key} {val:.1f}x"
                print(line, flush=True)
                print("      pulls all (std, >5 sigma) | fit-ok stars (%.1f %%) | robust std: " % (100 * row["fit_ok"]) + "  ".join(
                    f"{nm}: {row[f'pull_std_{nm}']:.2f}, {100 * row[f'beyond5_{nm}']:.1f} % | {row[f'pull_std_fitok_{nm}']:.2f}, "
                    f"{100 * row[f'beyond5_fitok_{nm}']:.1f} % | {row[f'pull_robust_{nm}']:.2f}" for nm in LABELS), flush=True)
                for key, val in row.items():
                    if key.startswith("scatter_ratio"):
                        print(f"      {key}: {val[0]:.3f} [{val[1]:.3f}, {val[2]:.3f}]")
    for key, fl in report["flops"].items():
        print(f"FLOPs per LM iteration per star ({key}): {fl['total'] / 1e6:.1f} MFLOP "
              f"(Jacobian {fl['jacobian'] / 1e6:.1f}, normal equations {fl['normal_equations'] / 1e6:.1f}, "
              f"trial forward {fl['trial_forward'] / 1e6:.1f}; working grid {fl['n_work']} px)")
    if dev.type == "cuda":
        peak = a.peak_tflops
        for row in report["rows"]:
            if row["method"].startswith("ours"):
                fl = report["flops"][f"{row['grid']}/{row['method'].split('/')[1]}"]["total"]
                achieved = row["spectra_per_s"] * row["iters_or_evals"] * fl
                row["achieved_tflops"] = achieved / 1e12
                msg = (f"[{row['grid']} S/N {row['snr']:g}] {row['method']}: ~{achieved / 1e12:.2f} TFLOP/s by the FLOP "
                       "model (a full Jacobian per iteration: an upper bound with the approximate curvature; "
                       "gpu_profile.py counts the products actually run)")
                if peak:
                    row["peak_fraction"] = achieved / 1e12 / peak
                    msg += f" = {row['peak_fraction']:.1%} of {peak} TFLOP/s"
                print(msg)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
