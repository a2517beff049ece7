"""Outputs of ``distlabels crb``: the per-star bounds as CSV and sigma against Teff as a figure.

The bounds themselves come from :func:`distlabels.fit.crb.crb_grid`; this module only writes them.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from .columns import axis_label
from .plot import _save

__all__ = ["write_crb_csv", "plot_crb"]


def write_crb_csv(grid, out_csv: str | os.PathLike) -> Path:
    """One row per star: its labels, then sigma_<label> for every fitted label, sigma_rv_kms and
    (when vsini was fitted) sigma_vsini_kms. Written to a temporary name and renamed into place."""
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fitted = [j for j in range(len(grid.label_names)) if grid.fitted[j]]
    head = list(grid.label_names) + [f"sigma_{grid.label_names[j]}" for j in fitted] + ["sigma_rv_kms"]
    if grid.sigma_vsini is not None:
        head.append("sigma_vsini_kms")
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for i in range(len(grid.stars)):
            row = [f"{v:.6g}" for v in grid.stars[i]] + [f"{grid.sigma[i, j]:.6g}" for j in fitted]
            row.append(f"{grid.sigma_rv[i]:.6g}")
            if grid.sigma_vsini is not None:
                row.append(f"{grid.sigma_vsini[i]:.6g}")
            w.writerow(row)
    os.replace(tmp, out)
    return out


def plot_crb(grid, out_png: str | os.PathLike, *, x: str = "teff") -> Path:
    """sigma_CRB of every fitted label against ``x`` (Teff by default), one panel per label, log
    scale, with the measurability threshold as a dashed line (red panel title: not measurable)."""
    from matplotlib.figure import Figure

    names = list(grid.label_names)
    ix = names.index(x) if x in names else 0
    fitted = [j for j in range(len(names)) if grid.fitted[j]]
    meas = grid.measurable()
    cols = min(5, max(len(fitted), 1))
    rows = int(math.ceil(len(fitted) / cols))
    fig = Figure(figsize=(2.8 * cols + 0.6, 2.3 * rows + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    xv = grid.stars[:, ix]
    c = grid.stars[:, names.index("logg")] if "logg" in names and names[ix] != "logg" else None
    for k, j in enumerate(fitted):
        ax = axes.flat[k]
        sc = ax.scatter(xv, grid.sigma[:, j], s=8, c=c, cmap="viridis", linewidths=0)
        ax.axhline(grid.threshold[j], color="tab:red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{names[j]}: median {np.median(grid.sigma[:, j]):.3g}", fontsize=9,
                     color="k" if meas[j] else "tab:red")
        ax.set_ylabel(axis_label(f"{names[j]}_err"), fontsize=8)
        ax.grid(alpha=0.2, which="both")
    for ax in axes.flat[len(fitted):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(axis_label(names[ix]))
    if c is not None and fitted:
        fig.colorbar(sc, ax=axes, shrink=0.6, label=axis_label("logg"))
    cfg = grid.config
    fig.suptitle(f"Cramer-Rao bounds at S/N {cfg.snr:g} ({cfg.grid} grid, {len(grid.stars)} stars"
                 f"{'' if cfg.vsini_kms is None else f', vsini {cfg.vsini_kms:g} km/s fitted'}); "
                 f"dashed: measurable threshold")
    return _save(fig, out_png)
