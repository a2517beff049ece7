"""HotPayne's check: does the fit reach the Cramer-Rao bound? Empirical scatter of repeated fits of mocks
against the CRB that ``distlabels crb`` reports, per label, at one S/N.

Run from the repository root (under the shared CPU lock on the development machine)::

    flock /tmp/distlabels-cpu.lock python benchmarks/crb.py                       # ~5 min on 2 cores
    python benchmarks/crb.py --stars 2 --realisations 10                           # smoke run
    python benchmarks/crb.py --vsini-kms 150                                        # rotating stars, vsini fitted

What it does:

* picks ``--stars`` stars from the bossbrain 4000-5000 K emulator's training labels (seeded);
* HotPayne's selection: per star, the labels whose CRB at this S/N (``distlabels.fit.crb_grid``'s
  criterion: below ``--max-fraction`` of the label's range) is measurable are fitted, the others are
  held at the truth (so no fit ends on the bound of a label the data cannot measure);
* makes ``--realisations`` LAMOST-like mocks of each star (``distlabels.mock``: independent noise,
  RV in +-100 km/s, a random smooth continuum, 0.5 % masked pixels; with ``--vsini-kms`` rotated by the
  mock's own sampled kernel), fits them with the production kernel (continuum, RV, default masks,
  vsini when rotating);
* prints per label: the median over stars of std(fit) / CRB (the bound at the true labels, RV 0,
  continuum 1; the mock's noise is relative to its continuum, so the S/N is the same), of the robust
  scatter (1.4826 MAD) / CRB, of the median formal error / CRB, and the fraction of fits on a bound.

A ratio of 1 means the fit is as precise as any unbiased estimator can be; > 1 means scatter the bound
does not capture (local minima, start, LM stopping rule, model/mock mismatch).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snr", type=float, default=50.0, help="S/N per pixel (default 50)")
    ap.add_argument("--stars", type=int, default=6, help="stars (default 6)")
    ap.add_argument("--realisations", type=int, default=40, help="noise realisations per star (default 40)")
    ap.add_argument("--vsini-kms", type=float, default=None, help="rotate the stars and fit vsini")
    ap.add_argument("--max-fraction", type=float, default=0.1, help="measurable: CRB < this x label range")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--model", default=None, help="model directory (default: import bossbrain 4000-5000 K)")
    ap.add_argument("--seed", type=int, default=5)
    return ap.parse_args()


def main() -> int:
    args = parse()
    sys.path.insert(0, os.getcwd())
    import torch

    torch.set_num_threads(args.threads)
    from distlabels.config import FitConfig, MockConfig
    from distlabels.fit import SpectrumFitter, crb
    from distlabels.io.store import list_to_numpy
    from distlabels.io.wavelength import survey_grid
    from distlabels.mock import make_mock
    from distlabels.models import load

    if args.model:
        model = load(args.model)
    else:
        import tempfile

        from distlabels.models.importers import import_bossbrain

        model = load(import_bossbrain("4000-5000", os.path.join(tempfile.mkdtemp(), "bb45")))
    wave, res_r, seg = survey_grid("lamost")
    names = list(model.label_names)
    span = np.asarray(model.label_span)
    rng = np.random.default_rng(args.seed)
    # Stars away from the box edges (else the bound, a local quantity, is cut by the box).
    x = model.scale(torch.as_tensor(model.training_labels)).numpy()
    inner = np.flatnonzero(np.all(np.abs(x[:, :3]) < 0.35, axis=1))
    stars = model.training_labels[rng.choice(inner, args.stars, replace=False)]
    rot = args.vsini_kms is not None and args.vsini_kms > 0
    probe = FitConfig(fit_vsini=rot, library_size=8)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, torch {torch.__version__} {args.threads} threads; "
          f"model {model.model_id} ({len(names)} labels); LAMOST-like grid ({len(wave)} px, R {res_r:g}); "
          f"S/N {args.snr:g}; {args.stars} stars x {args.realisations} realisations"
          f"{f'; vsini {args.vsini_kms:g} km/s fitted' if rot else ''}")
    t0 = time.perf_counter()
    ratios, rob, formal, bound_frac, crb_vals, vs_ratio = {}, {}, {}, {}, {}, []
    n_fit_total = 0
    for k, star in enumerate(stars):
        sd_all = crb(model, star, args.snr, wave, resolution=res_r, segments=seg, config=probe,
                     vsini_kms=args.vsini_kms if rot else None)[0]
        fit_names = tuple(n for n, s, w in zip(names, sd_all, span) if s < args.max_fraction * w)
        cfg = FitConfig(labels=fit_names, fix=tuple((n, float(v)) for n, v in zip(names, star) if n not in fit_names),
                        fit_vsini=rot)
        fitter = SpectrumFitter(model, wave, resolution=res_r, segments=seg, config=cfg)
        bound = crb(model, star, args.snr, wave, fitter=fitter, vsini_kms=args.vsini_kms if rot else None)[0]
        n = args.realisations
        table, meta = make_mock(model, MockConfig(n=n, seed=args.seed * 1000 + k, snr_min=args.snr, snr_max=args.snr),
                                labels=np.repeat(star[None], n, 0),
                                vsini_kms=np.full(n, args.vsini_kms) if rot else None)
        npx = len(meta["wavelength_aa"])
        res = fitter.fit(list_to_numpy(table["flux"], npx), list_to_numpy(table["ivar"], npx),
                         list_to_numpy(table["mask"], npx, np.bool_))
        n_fit_total += n
        for n_ in fit_names:
            j = names.index(n_)
            on_bound = (res.labels_at_bound >> j) & 1 == 1
            v = res.labels[~on_bound, j]
            if len(v) < 5:
                continue
            ratios.setdefault(n_, []).append(np.std(v, ddof=1) / bound[j])
            rob.setdefault(n_, []).append(1.4826 * np.median(np.abs(v - np.median(v))) / bound[j])
            formal.setdefault(n_, []).append(np.median(res.errors[~on_bound, j]) / bound[j])
            bound_frac.setdefault(n_, []).append(on_bound.mean())
            crb_vals.setdefault(n_, []).append(bound[j])
        if rot:
            from distlabels.fit.crb import crb_parameters

            sv = crb_parameters(fitter, star, args.snr, vsini_kms=args.vsini_kms)[2][0]
            vs_ratio.append((np.std(res.vsini, ddof=1) / sv, np.median(res.vsini_err) / sv,
                             np.mean(res.vsini) - args.vsini_kms, sv))
        print(f"  star {k}: teff {star[0]:.0f} logg {star[1]:.2f} mh {star[2]:.2f}: {len(fit_names)} labels fitted "
              f"({', '.join(fit_names)}); {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print("| label | stars | std(fit) / CRB | robust scatter / CRB | formal error / CRB | fits on a bound | CRB (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n_ in names:
        if n_ not in ratios:
            continue
        print(f"| {n_} | {len(ratios[n_])} | {np.median(ratios[n_]):.2f} | {np.median(rob[n_]):.2f} | "
              f"{np.median(formal[n_]):.2f} | {np.mean(bound_frac[n_]):.1%} | "
              f"{np.median(crb_vals[n_]):.3g} |")
    if vs_ratio:
        a = np.array(vs_ratio)
        print(f"| vsini | {len(a)} | {np.median(a[:, 0]):.2f} | - | {np.median(a[:, 1]):.2f} | - | "
              f"{np.median(a[:, 3]):.3g} km/s (mean bias {np.median(a[:, 2]):+.2f} km/s) |")
    el = time.perf_counter() - t0
    print(f"\n{n_fit_total} fits in {el:.0f} s ({n_fit_total / el:.1f} spectra/s including mocks and set-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
