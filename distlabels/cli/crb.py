"""``distlabels crb``: the Cramer-Rao bound of each label over a grid of stars at one S/N.

HotPayne's analysis (Xiang et al. 2022): before fitting a survey, ask which labels its spectra can
measure at all. Registered through ``EXTRA_COMMAND_MODULES`` in :mod:`distlabels.cli.main`.
"""
from __future__ import annotations

import argparse

from ..errors import DistlabelsError

DESCRIPTION = """\
Cramer-Rao bound (CRB) of each label: the smallest error any unbiased fit of these spectra could
have, sqrt(diag(F^-1)) with F = J^T W J built by the fit kernel's own forward model: the same
fitted labels (--labels; the others held at the training median), RV, a Chebyshev continuum per
segment (--continuum-degree), vsini when --vsini-kms is given, the default pixel masks, and
S/N per pixel relative to the continuum.

Stars: --stars training (default) draws --n stars from the model's training labels; --stars
teff-logg puts ~sqrt(n) x sqrt(n) points on a regular grid over the inner 90 % of the model's
Teff and log g box, every other label at the training median.

Printed per fitted label: the 16th, 50th and 84th percentile of the bound over the stars, the
threshold and whether the label is measurable: median bound below --max-fraction (default 0.1) of
the label's range in the model (its label box; e.g. bossbrain 4000-5000 K: 100 K in Teff, 0.35 dex
in log g, 0.30 dex in [M/H], 0.12 dex in [X/M]), or below an absolute --max-sigma LABEL=VALUE.
--out FILE.csv writes every star's labels and bounds; --out FILE.png plots the bound against Teff.
"""

EXAMPLES = """\
examples:
  distlabels crb --model models/bb45 --snr 50
  distlabels crb --model models/bb45 --snr 20 --grid lamost --labels teff,logg,mh,cm,nm,mgm,cam
  distlabels crb --model models/bb45 --snr 100 --stars teff-logg --n 100 --vsini-kms 150 --out crb.png --out crb.csv
"""


def _max_sigma(text: str) -> tuple[str, float]:
    from .main import parse_label_value     # main imports this module's parser lazily

    return parse_label_value(text, "--max-sigma")


def register(sub, add) -> None:
    p = add("crb", "Cramer-Rao bound of each label over a grid of stars: which labels a survey measures at an S/N",
            cmd_crb)
    p.description = DESCRIPTION
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", help="model directory (any emulator kind the general kernel fits)")
    p.add_argument("--snr", type=float, help="S/N per pixel, relative to the continuum (required)")
    p.add_argument("--labels", metavar="A,B,...", help="labels fitted (default: all); the others are held at the "
                                                       "training median, as distlabels fit --labels does")
    p.add_argument("--grid", choices=["lamost", "desi", "model"],
                   help="observed pixels: lamost (3,909 px, R 1800; default), desi (R 3000), or the model's own grid")
    p.add_argument("--resolution", type=float, help="resolving power instead of the grid's own (lamost, desi)")
    p.add_argument("--stars", choices=["training", "teff-logg"],
                   help="training (default): stars drawn from the model's training labels; teff-logg: a regular grid")
    p.add_argument("--n", type=int, help="number of stars (default 200; teff-logg: about n grid points)")
    p.add_argument("--vsini-kms", type=float, help="stars rotate at this vsini, and vsini is fitted too (its bound "
                                                   "is printed); default: no rotation, vsini not fitted")
    p.add_argument("--limb-darkening", type=float, help="linear limb-darkening coefficient (default 0.6)")
    p.add_argument("--masks", metavar="SET", help="pixel masks as for distlabels fit (default: default)")
    p.add_argument("--continuum-degree", type=int, help="Chebyshev continuum degree per segment (default 3)")
    p.add_argument("--max-fraction", type=float, help="measurable when the median bound is below this fraction of "
                                                      "the label's range in the model (default 0.1)")
    p.add_argument("--max-sigma", type=_max_sigma, action="append", metavar="LABEL=VALUE",
                   help="absolute threshold for one label instead, e.g. teff=100 (repeatable)")
    p.add_argument("--seed", type=int, help="seed of the star draw (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where the Jacobians are computed (default cpu)")
    p.add_argument("--out", action="append", metavar="FILE.csv|FILE.png",
                   help="write the per-star bounds (.csv) or sigma against Teff (.png); repeatable")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


def crb_config(args):
    """The CRBConfig of a ``distlabels crb`` command line (command line over YAML over defaults)."""
    from ..config import CRBConfig, from_dict

    opts = {}
    for name in ("snr", "grid", "resolution", "stars", "n", "vsini_kms", "limb_darkening", "continuum_degree",
                 "max_fraction", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if getattr(args, "labels", None):
        labels = args.labels
        opts["labels"] = [t.strip() for t in labels.split(",") if t.strip()] if isinstance(labels, str) else list(labels)
    masks = getattr(args, "masks", None)
    if masks:
        opts["masks"] = masks if "," not in masks else [t.strip() for t in masks.split(",") if t.strip()]
    if getattr(args, "max_sigma", None):
        ms = args.max_sigma
        opts["max_sigma"] = ms if isinstance(ms, dict) else [tuple(x) for x in ms]
    return from_dict(CRBConfig, opts)


def format_table(grid) -> list[str]:
    """The printed report: conditions, one row per fitted label, RV/vsini, measurable labels."""
    cfg = grid.config
    lo, hi = grid.wavelength_range_aa
    res = "the model's own resolution" if grid.resolution is None else f"R {grid.resolution:g}"
    stars = ("drawn from the model's training labels" if cfg.stars == "training"
             else "on a regular Teff-log g grid (others at the training median)")
    n_fit = int(grid.fitted.sum())
    nuis = "RV, continuum (Chebyshev degree %d per segment)" % cfg.continuum_degree
    if cfg.vsini_kms is not None:
        nuis += f", vsini (stars at {cfg.vsini_kms:g} km/s, limb darkening {cfg.limb_darkening:g})"
    lines = [f"Cramer-Rao bounds at S/N {cfg.snr:g} per pixel: {len(grid.stars)} stars {stars}; "
             f"{cfg.grid} grid ({grid.n_pix:,} px, {lo:.0f}-{hi:.0f} A, {res}); masks {cfg.masks}; "
             f"fitted: {n_fit} labels + {nuis}.",
             "",
             f"{'label':<8} {'sigma p16':>11} {'median':>11} {'p84':>11} {'threshold':>11}  measurable"]
    for r in grid.table_rows():
        lines.append(f"{r['label']:<8} {r['sigma_p16']:>11.4g} {r['sigma_median']:>11.4g} {r['sigma_p84']:>11.4g} "
                     f"{r['threshold']:>11.4g}  {'yes' if r['measurable'] else 'no'}")
    import numpy as np

    p16, p50, p84 = np.percentile(grid.sigma_rv, [16, 50, 84])
    lines.append(f"{'rv_kms':<8} {p16:>11.4g} {p50:>11.4g} {p84:>11.4g}")
    if grid.sigma_vsini is not None:
        v16, v50, v84 = np.percentile(grid.sigma_vsini, [16, 50, 84])
        lines.append(f"{'vsini':<8} {v16:>11.4g} {v50:>11.4g} {v84:>11.4g}  (km/s; rotation is unresolved below "
                     f"{grid.vsini_limit_kms:.0f} km/s on this grid)")
    meas = [r["label"] for r in grid.table_rows() if r["measurable"]]
    not_meas = [r["label"] for r in grid.table_rows() if not r["measurable"]]
    crit = f"median sigma < {cfg.max_fraction:g} x the label's range in the model"
    if cfg.max_sigma:
        crit += " (absolute: " + ", ".join(f"{a} {b:g}" for a, b in cfg.max_sigma) + ")"
    lines += ["", f"measurable at S/N {cfg.snr:g} ({crit}): {len(meas)} of {n_fit}: {', '.join(meas) or 'none'}"]
    if not_meas:
        lines.append(f"not measurable: {', '.join(not_meas)}")
    return lines


def cmd_crb(args) -> int:
    from ..fit.crb import check_crb_config, crb_grid
    from ..models import load

    if not args.model or args.snr is None:
        raise DistlabelsError("crb needs --model MODEL_DIR and --snr S.")
    outs = list(args.out or [])
    for o in outs:
        if not str(o).lower().endswith((".csv", ".png")):
            raise DistlabelsError(f"--out {o}: give a .csv (per-star bounds) or .png (sigma against Teff) file.")
    cfg = crb_config(args)
    model = load(args.model)
    check_crb_config(model, cfg)                    # one-line errors before the progress bar starts
    from tqdm.auto import tqdm

    n_expected = cfg.n if cfg.stars == "training" else max(int(round(cfg.n ** 0.5)), 1) ** 2
    if cfg.stars == "training" and len(model.training_labels):
        n_expected = min(n_expected, len(model.training_labels))
    with tqdm(total=n_expected, unit="star", desc="crb", disable=bool(args.no_progress)) as bar:
        grid = crb_grid(model, cfg, device=args.device or "cpu", progress=bar.update)
    print("\n".join(format_table(grid)))
    if outs:
        from ..catalog.crb_report import plot_crb, write_crb_csv

        for o in outs:
            path = write_crb_csv(grid, o) if str(o).lower().endswith(".csv") else plot_crb(grid, o)
            print(f"wrote {path}")
    return 0


__all__ = ["cmd_crb", "crb_config", "format_table", "register"]
