"""TransformerPayne against the Payne MLP: emulation error, training time and fitting throughput.

    flock /tmp/distlabels-cpu.lock python benchmarks/emulators.py [--sizes 1000,5000] [--budget-s 600]
        [--window 5000,5600] [--threads 2] [--json out.json]

Grids: ``make_mock(..., noiseless=True)`` (what ``distlabels mock --noiseless`` makes) from the
bossbrain 4000-5000 K emulator on the LAMOST-like grid (R 1,800, vacuum), teff, log g, [M/H] uniform
in the emulator's box and [X/M] = 0, cut to the pixels of ``--window`` (the CPU budget: 2 cores);
each size is its own grid (seed = size), 10 % of it validates (early stopping). Both emulators are
trained on the same grid under the same wall-clock budget (``--budget-s`` each; training runs in
chunks of epochs resumed from the checkpoint until the budget is spent or early stopping ends it):
TransformerPayne (``TransformerPayneTrainConfig`` defaults unless given) and the Payne MLP 300-300
(The Payne's size; Adam, lr 1e-3, batch 256, L1). MAE is measured on 1,000 further held-out grid
spectra (seed 2). Fitting: 64 mock LAMOST-like spectra at S/N 50 (the bossbrain emulator, RV within
+-100 km/s, a degree-2 continuum), cut to the window, fitted by the kernel (teff, log g, [M/H], RV,
continuum) with each trained emulator: stars per second and the scatter of fit - truth.

A 20,000-spectrum grid needs a GPU (``--sizes 20000 --device cuda``); not measured on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distlabels.config import FitConfig, MockConfig, PayneTrainConfig, TransformerPayneTrainConfig  # noqa: E402
from distlabels.fit import fit_spectra  # noqa: E402
from distlabels.io.store import write_store  # noqa: E402
from distlabels.mock import make_mock  # noqa: E402
from distlabels.models import load  # noqa: E402
from distlabels.train.data import load_training_set  # noqa: E402
from distlabels.train.payne import train_payne  # noqa: E402
from distlabels.train.transformer_payne import train_transformer_payne  # noqa: E402

LABELS = ["teff", "logg", "mh"]


def load_emulator():
    import tempfile

    from distlabels.models.importers import import_bossbrain

    d = Path(tempfile.gettempdir()) / "distlabels-bench-bb45"
    if not (d / "model.json").exists():
        import_bossbrain("4000-5000", d)
    return load(d)


def grid(em, n, seed, out: Path, window):
    """A noiseless grid (TrainingSet) of n spectra, teff/logg/[M/H] uniform, [X/M] = 0, cut to window."""
    root = out / f"grid-lamost-{n}-s{seed}"
    if not (root / "store.json").exists():
        rng = np.random.default_rng(seed)
        lab = np.zeros((n, em.n_labels))
        for nm in LABELS:
            j = em.label_names.index(nm)
            lab[:, j] = rng.uniform(*em.label_bounds[j], n)
        table, meta = make_mock(em, MockConfig(n=n, seed=seed, grid="lamost", noiseless=True), labels=lab)
        write_store(root, table, meta, overwrite=True)
    ts = load_training_set(root, LABELS, rv_column="none")
    w = ts.wavelength_aa
    sel = (w >= window[0]) & (w <= window[1])
    return dataclasses.replace(ts, flux=ts.flux[:, sel], ivar=ts.ivar[:, sel], wavelength_aa=w[sel])


def train_budget(train_fn, cfg, budget_s, out_dir, chunk_epochs):
    """Train in chunks of epochs, resuming from the checkpoint, until early stopping or the budget is spent."""
    t0 = time.perf_counter()
    epochs, resume, per_epoch = 0, False, None
    while True:
        epochs += chunk_epochs
        model, rep = train_fn(dataclasses.replace(cfg, epochs=epochs, checkpoint_every=chunk_epochs), resume)
        resume = True
        spent = time.perf_counter() - t0
        per_epoch = spent / epochs
        if rep.loop.stopped_early or epochs >= cfg.epochs or spent + per_epoch * chunk_epochs > budget_s:
            return model, rep, spent


def heldout_mae(model, test):
    usable = np.isfinite(test.flux) & (test.ivar > 0)
    err = np.abs(model.predict(test.labels) - test.flux)
    per_pix = np.nanmean(np.where(usable, err, np.nan), 0)
    return float(err[usable].mean()), np.nanpercentile(per_pix, [50, 90, 99]).tolist()


def fit_bench(models: dict, em, window, n=64, snr=50.0, seed=3):
    rng = np.random.default_rng(seed)
    lab = np.zeros((n, em.n_labels))
    box = {"teff": (4100, 4900), "logg": (1.2, 3.3), "mh": (-0.9, 0.3)}
    for nm, (a, b) in box.items():
        lab[:, em.label_names.index(nm)] = rng.uniform(a, b, n)
    table, meta = make_mock(em, MockConfig(n=n, seed=seed, grid="lamost", snr_min=snr, snr_max=snr,
                                           masked_fraction=0.0), labels=lab)
    wave = np.asarray(meta["wavelength_aa"])
    # Keep ~6 A inside the window on both sides: room for |RV| <= 300 km/s on the model's pixels.
    sel = (wave >= window[0] + 6) & (wave <= window[1] - 6)
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))[:, sel]
    ivar = np.stack(table.column("ivar").to_numpy(zero_copy_only=False))[:, sel]
    truth = lab[:, [em.label_names.index(nm) for nm in LABELS]]
    cfg = FitConfig(v_max_kms=300.0, masks="none")
    out = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        res = fit_spectra(m, wave[sel], flux, ivar, resolution=meta.get("resolution"),
                          wavelength_medium=meta["wavelength_medium"], config=cfg)
        dt = time.perf_counter() - t0
        d = res.labels - truth
        ok = res.flags == 0
        out[name] = {"stars": n, "seconds": dt, "stars_per_s": n / dt, "n_flag0": int(ok.sum()),
                     "bias": dict(zip(LABELS, np.nanmedian(d, 0).round(4).tolist())),
                     "scatter": dict(zip(LABELS, (1.4826 * np.nanmedian(np.abs(d - np.nanmedian(d, 0)), 0)).round(4).tolist())),
                     "median_error": dict(zip(LABELS, np.nanmedian(res.errors, 0).round(4).tolist())),
                     "median_chi2_red": float(np.nanmedian(res.chi2_red))}
        print(f"  fit {name}: {n} stars in {dt:.1f} s ({n / dt:.2f} stars/s), flags==0 {int(ok.sum())}/{n}; "
              f"fit-truth scatter {out[name]['scatter']}, bias {out[name]['bias']}, median chi2_red "
              f"{out[name]['median_chi2_red']:.2f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--window", default="5000,5600", help="wavelength window in A (vacuum) of the grid pixels used")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock budget per emulator and size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tp-d", type=int, default=None, help="TransformerPayne d_model (default: the config's)")
    ap.add_argument("--tp-blocks", type=int, default=None)
    ap.add_argument("--payne-hidden", default="300,300")
    ap.add_argument("--only", choices=["tp", "payne"],
                    help="train only one of the two (the other is loaded from --out if an earlier run saved it)")
    ap.add_argument("--out", default="/tmp/distlabels-bench-emulators")
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    window = tuple(float(v) for v in args.window.split(","))
    em = load_emulator()
    test = grid(em, 1000, 2, out, window)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} "
          f"threads, device {args.device}; grids: LAMOST-like, {test.flux.shape[1]} px in {window[0]:.0f}-"
          f"{window[1]:.0f} A, labels {','.join(LABELS)} uniform, [X/M] = 0; held-out {len(test)} spectra; "
          f"budget {args.budget_s:.0f} s per training", flush=True)
    tp_cfg = TransformerPayneTrainConfig(epochs=1000, patience=25)
    if args.tp_d:
        tp_cfg = dataclasses.replace(tp_cfg, d_model=args.tp_d)
    if args.tp_blocks:
        tp_cfg = dataclasses.replace(tp_cfg, n_blocks=args.tp_blocks)
    p_cfg = PayneTrainConfig(hidden=tuple(int(h) for h in args.payne_hidden.split(",")), epochs=5000, patience=200,
                             lr_patience=40, learning_rate=1e-3, batch_size=256, optimizer="adam")
    results = {"machine": platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "window_aa": window, "n_pix": int(test.flux.shape[1]),
               "budget_s": args.budget_s, "tp_config": dataclasses.asdict(tp_cfg),
               "payne_config": dataclasses.asdict(p_cfg), "runs": []}
    for n in (int(s) for s in args.sizes.split(",")):
        ts = grid(em, n, n, out, window)
        models = {}
        for kind in ("tp", "payne"):
            if args.only and kind != args.only:
                if (out / f"{kind}-{n}" / "model.json").is_file():    # trained by an earlier run: fit with it
                    models[kind] = load(out / f"{kind}-{n}")
                continue
            d = out / f"{kind}-{n}"
            if kind == "tp":
                def fn(c, resume, d=d, ts=ts):
                    return train_transformer_payne(ts, c, device=args.device, out_dir=d, resume=resume,
                                                   progress=args.progress)
                model, rep, spent = train_budget(fn, tp_cfg, args.budget_s, d, 1)
            else:
                def fn(c, resume, d=d, ts=ts):
                    return train_payne(ts, c, device=args.device, out_dir=d, resume=resume, progress=args.progress)
                model, rep, spent = train_budget(fn, p_cfg, args.budget_s, d, 100)
            model.save(d)
            models[kind] = load(d)
            mae, pp = heldout_mae(models[kind], test)
            row = {"kind": kind, "n_grid": n, "n_train": rep.n_train, "epochs": rep.loop.epochs_run,
                   "best_epoch": rep.loop.best_epoch, "train_s": spent, "validation_mae": rep.validation_mae,
                   "heldout_mae": mae, "heldout_mae_per_pixel_p50_p90_p99": pp,
                   "n_parameters": int(sum(p.numel() for p in models[kind].parameters()))}
            results["runs"].append(row)
            print(f"{kind:6s} n={n}: {rep.loop.epochs_run} epochs (best {rep.loop.best_epoch}) in {spent:.0f} s, "
                  f"{row['n_parameters']:,} parameters; held-out MAE {mae:.3e} (per pixel p50/p90/p99 "
                  f"{np.round(pp, 5).tolist()})", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
        if not args.no_fit and len(models) == 2:
            results.setdefault("fit", {})[str(n)] = fit_bench(models, em, window)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"load average at the end (1/5/15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
