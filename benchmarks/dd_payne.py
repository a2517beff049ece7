"""DD-Payne on mocks: why the gradient prior matters.

Truth ("the real stars"): the bossbrain 3500-4200 K emulator. Prior ("the ab initio model"): the
bossbrain 4000-5000 K emulator, an independently trained network on its own grid; in the overlap
(4000-4200 K) the two agree to ~2e-3 in flux and their gradient spectra correlate at 0.85-0.99 at
R 1800, so the prior is good but not the truth (``--prior same`` uses the truth itself: an upper
bound). Reference stars: Teff 4000-4200 K, log g 0.8-2.5, [M/H] -1..+0.3, [C/M] independent in
-0.2..+0.2, and [Mg/M], [Ca/M] following [M/H] as alpha elements do in real surveys
([Mg/M] = -0.25 [M/H], [Ca/M] = -0.20 [M/H], each + N(0, 0.03)); the other 16 [X/M] = 0. Test stars:
the same, except [Mg/M] and [Ca/M] uniform over the reference range, independent of [M/H].
Spectra: LAMOST-like mock (3,909 px, R 1,800, vacuum), S/N per pixel ``--snr``, random continua,
reference stars with RVs in +-100 km/s (removed with their true RV), test stars at RV 0.

Two DD-Payne networks are trained on the same reference stars and seed, without (D = 0) and with the
prior (D = ``--gradient-weight``). Printed, per label: the median over test stars of the correlation
between each network's gradient spectra and the truth's (after removing what a fitted continuum
absorbs), and the labels of the test stars fitted by the kernel (``fit_spectra``, continuum degree 3):
bias, scatter and slope of fitted vs true; the truth emulator itself fitted the same way is the
reference (what a perfect model gives at this S/N).

    python benchmarks/dd_payne.py [--n-ref 1500 --n-test 300 --snr 50 --epochs 300 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ("teff", "logg", "mh", "cm", "mgm", "cam")
CORRELATED = {"mgm": -0.25, "cam": -0.20}


def draw_labels(model, n, rng, correlated: bool):
    """(n, 22) physical labels (see the module docstring)."""
    lab = np.zeros((n, model.n_labels))
    col = {name: model.label_names.index(name) for name in LABELS}
    lab[:, col["teff"]] = rng.uniform(4000, 4200, n)
    lab[:, col["logg"]] = rng.uniform(0.8, 2.5, n)
    lab[:, col["mh"]] = rng.uniform(-1.0, 0.3, n)
    lab[:, col["cm"]] = rng.uniform(-0.2, 0.2, n)
    for name, slope in CORRELATED.items():
        if correlated:
            lab[:, col[name]] = slope * lab[:, col["mh"]] + rng.normal(0, 0.03, n)
        else:      # uniform over the range the correlated reference labels span
            lab[:, col[name]] = rng.uniform(slope * 0.3 - 0.06, slope * -1.0 + 0.06, n)
    return lab, [col[name] for name in LABELS]


def mock(model, labels, snr, seed, rv_max):
    from distlabels.config import MockConfig
    from distlabels.io.store import list_to_numpy
    from distlabels.mock import make_mock

    t, meta = make_mock(model, MockConfig(n=len(labels), snr_min=snr, snr_max=snr, seed=seed, rv_max_kms=rv_max,
                                          masked_fraction=0.0), labels=labels)
    n_pix = len(meta["wavelength_aa"])
    return (list_to_numpy(t.column("flux"), n_pix), list_to_numpy(t.column("ivar"), n_pix),
            t.column("true_rv").to_numpy(), meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-ref", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--hidden", default="64,64")
    ap.add_argument("--gradient-weight", type=float, default=30.0)
    ap.add_argument("--prior", choices=["other", "same"], default="other",
                    help="other: bossbrain 4000-5000 K (default); same: the truth network itself")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out-dir", default=None, help="models and a PNG go here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from distlabels.config import DDPayneTrainConfig, FitConfig
    from distlabels.fit import fit_spectra
    from distlabels.fit.working_grid import chebyshev_basis
    from distlabels.models import load
    from distlabels.models.importers import import_bossbrain
    from distlabels.train.cannon import training_set_from_arrays
    from distlabels.train.dd_payne import gradient_correlation, gradient_spectra, train_dd_payne

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="ddpayne-"))
    out.mkdir(parents=True, exist_ok=True)
    truth = load(import_bossbrain("3500-4200", out / "truth_bb35"))
    prior = truth if args.prior == "same" else load(import_bossbrain("4000-5000", out / "prior_bb45"))
    rng = np.random.default_rng(args.seed)
    ref_lab, cols = draw_labels(truth, args.n_ref, rng, correlated=True)
    test_lab, _ = draw_labels(truth, args.n_test, rng, correlated=False)
    t0 = time.perf_counter()
    f_ref, i_ref, rv_ref, meta = mock(truth, ref_lab, args.snr, args.seed + 10, 100.0)
    f_test, i_test, _, _ = mock(truth, test_lab, args.snr, args.seed + 20, 0.0)
    wave, res, segs = np.asarray(meta["wavelength_aa"]), meta["resolution"], meta["segments"]
    print(f"# DD-Payne benchmark: {args.n_ref} reference / {args.n_test} test stars, S/N {args.snr:g}, LAMOST-like grid "
          f"({len(wave)} px, R {res:g}); truth bossbrain 3500-4200 K, prior "
          f"{'the truth itself' if args.prior == 'same' else 'bossbrain 4000-5000 K'}; torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} cores; mocks {time.perf_counter() - t0:.1f} s")
    r = np.corrcoef(ref_lab[:, cols[2]], ref_lab[:, cols[4]])[0, 1]
    print(f"# reference labels: corr([M/H], [Mg/M]) = {r:.2f}; test stars: "
          f"{np.corrcoef(test_lab[:, cols[2]], test_lab[:, cols[4]])[0, 1]:.2f}")
    ts = training_set_from_arrays(f_ref, i_ref, ref_lab[:, cols], LABELS, wave, resolution=res, segments=segs,
                                  rv_kms=rv_ref)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    models, reports = {}, {}
    for name, D in (("no prior", 0.0), ("prior", args.gradient_weight)):
        cfg = DDPayneTrainConfig(hidden=hidden, epochs=args.epochs, gradient_weight=D, seed=args.seed)
        m, rep = train_dd_payne(ts, prior, cfg, progress=False)
        m.save(out / name.replace(" ", "_"))
        models[name], reports[name] = load(out / name.replace(" ", "_")), rep
        print(f"# {name}: {rep.summary()}")

    # Gradient spectra at the test stars: each network's against the truth's (on the data grid, R 1800).
    basis, _ = chebyshev_basis(wave, segs, 3)
    f_true, g_true = gradient_spectra(truth, test_lab, LABELS, wave, "vacuum", res)
    _, g_prior = gradient_spectra(prior, np.clip(test_lab, *prior.label_bounds.T), LABELS, wave, "vacuum", res)
    corr = {"prior emulator": np.median(gradient_correlation(g_prior, g_true, f_true, basis), 0)}
    grads = {}
    for name, m in models.items():
        _, g = gradient_spectra(m, test_lab[:, cols], LABELS)
        grads[name] = g
        corr[f"DD-Payne, {name}"] = np.median(gradient_correlation(g, g_true, f_true, basis), 0)
    print("\n## gradient spectra vs the truth's at the test stars (median correlation over stars)")
    print("| model | " + " | ".join(LABELS) + " |")
    print("| --- |" + " --- |" * len(LABELS))
    for name, c in corr.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c) + " |")

    # Abundances of the test stars (labels off the reference correlation), fitted by the kernel.
    print(f"\n## test stars fitted by the kernel (S/N {args.snr:g}, continuum degree 3): bias / scatter / slope of "
          "fit vs truth")
    fits = {"truth emulator (reference)": (truth, FitConfig(labels=LABELS))}
    fits.update({f"DD-Payne, {name}": (m, FitConfig()) for name, m in models.items()})
    print("| model | fit s | " + " | ".join(LABELS) + " |")
    print("| --- | --- |" + " --- |" * len(LABELS))
    results = {}
    for name, (m, fc) in fits.items():
        t1 = time.perf_counter()
        res_fit = fit_spectra(m, wave, f_test, i_test, resolution=res, segments=segs, config=fc)
        dt = time.perf_counter() - t1
        lab = res_fit.labels if res_fit.labels.shape[1] == len(LABELS) else res_fit.labels[:, cols]
        ok = np.isfinite(lab).all(1)
        true = test_lab[:, cols]
        results[name] = (lab, ok)
        cells = []
        for j, ln in enumerate(LABELS):
            d = lab[ok, j] - true[ok, j]
            slope = np.polyfit(true[ok, j], lab[ok, j], 1)[0]
            fmt = "{:+.0f} / {:.0f} K / {:.2f}" if ln == "teff" else "{:+.3f} / {:.3f} / {:.2f}"
            cells.append(fmt.format(d.mean(), d.std(), slope))
        print(f"| {name} | {dt:.0f} | " + " | ".join(cells) + " |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, 2, figsize=(12, 7))
        win = (wave > 5120) & (wave < 5250)
        k = LABELS.index("mgm")
        for a, (lab_name, g) in zip(ax[0], (("no prior", grads["no prior"]), ("prior", grads["prior"]))):
            a.plot(wave[win], g_true[0, k, win], "k", lw=1.5, label="truth")
            a.plot(wave[win], g_prior[0, k, win], "C0", lw=1, label="prior emulator")
            a.plot(wave[win], g[0, k, win], "C3", lw=1, label=f"DD-Payne, {lab_name}")
            a.set_title(f"d flux / d[Mg/M], test star 0 ({lab_name})")
            a.set_xlabel("wavelength [A]")
            a.legend(fontsize=8)
        for a, name in zip(ax[1], ("DD-Payne, no prior", "DD-Payne, prior")):
            lab, ok = results[name]
            a.scatter(test_lab[ok, cols[k]], lab[ok, k], s=5)
            lo, hi = test_lab[:, cols[k]].min(), test_lab[:, cols[k]].max()
            a.plot([lo, hi], [lo, hi], "k--", lw=1)
            a.set_xlabel("true [Mg/M]")
            a.set_ylabel("fitted [Mg/M]")
            a.set_title(name)
        fig.tight_layout()
        fig.savefig(out / "dd_payne.png", dpi=100)
        print(f"\n# plot: {out / 'dd_payne.png'}; models in {out}")
    except Exception as e:  # a plot must never fail the benchmark
        print(f"# no plot ({e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
