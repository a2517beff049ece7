"""Figures of a label catalog: the Kiel diagram, abundance planes and, for mock runs, recovery.

Figures are built on :class:`matplotlib.figure.Figure` directly and saved with the Agg
renderer; pyplot is never imported, so a caller's backend and global figure state are left
alone (no ``matplotlib.use`` switch needed, safe inside Dask workers and notebooks).

Readable at any size: up to ``DENSE_N`` stars are drawn as points whose size and alpha shrink
with their number (:func:`point_style`); above it, as hexagonal bins (density, or the median of
the colour quantity per bin), so 10^5-10^7 stars show structure instead of a blot. Every axis
carries its quantity and unit (:mod:`.columns`). A :class:`~distlabels.catalog.Catalog` passed in
is queried for the needed columns only (with ``where`` and ``clean`` applied).

The observed spectrum with its best-fit model (``residuals``) is in :mod:`.spectrum`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from distlabels.errors import QueryError

from .columns import abundance_labels, axis_label, unit

if TYPE_CHECKING:  # matplotlib is imported lazily: the CLI should start fast without it
    from matplotlib.figure import Figure

__all__ = ["kiel_diagram", "abundance_planes", "recovery_plot", "recovery_stats", "point_style", "DENSE_N"]

DENSE_N = 20_000   # above this many stars, hexagonal bins instead of points


def point_style(n: int) -> tuple[float, float]:
    """Marker area (points^2) and alpha for a scatter of ``n`` points.

    Large and opaque for a hundred stars, small and translucent for a million, so that dense
    regions still show structure instead of a solid blob.
    """
    n = max(int(n), 1)
    size = float(np.clip(100.0 / n ** 0.45, 0.3, 8.0))
    alpha = float(np.clip(1.3 - 0.15 * np.log10(n), 0.35, 0.9))
    return size, alpha


def _as_table(data: Any, columns: Sequence[str], where: str | None = None, clean: Any = False) -> pa.Table:
    """A Catalog is queried for just ``columns`` (with ``where``/``clean``); a Table (or pandas
    DataFrame) is used as is."""
    from distlabels.catalog.query import Catalog

    if isinstance(data, Catalog):
        cols = list(dict.fromkeys(c for c in columns if c in data.columns))
        return data.query(where=where, columns=cols, clean=clean)
    if where is not None or clean:
        raise QueryError("where/clean apply to a Catalog; filter a table before plotting it.")
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "columns") and hasattr(data, "to_numpy"):  # pandas DataFrame
        return pa.Table.from_pandas(data, preserve_index=False)
    raise QueryError(f"cannot plot an object of type {type(data).__name__}; pass a pyarrow Table or a Catalog.")


def _column(table: pa.Table, name: str, why: str) -> np.ndarray:
    if name not in table.column_names:
        raise QueryError(f"{why} needs column '{name}', which is not in the table; available: "
                         f"{', '.join(table.column_names)}.")
    col = table.column(name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise QueryError(f"{why} needs a numeric column '{name}', but it is {col.type}.")
    # nulls become NaN so one finite-mask handles both
    return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def _save(fig: "Figure", out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # renamed into place: no half-written PNG is seen
    fig.savefig(tmp, format="png", dpi=fig.dpi)
    os.replace(tmp, out)
    return out


def _robust_limits(v: np.ndarray, lo: float = 0.5, hi: float = 99.5, pad: float = 0.05) -> tuple[float, float]:
    """Percentile range of the finite values, padded; (-1, 1) when there are none."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    if a == b:
        a, b = a - 0.5, b + 0.5
    span = b - a
    return float(a - pad * span), float(b + pad * span)


def _density(ax, x: np.ndarray, y: np.ndarray, *, c: np.ndarray | None = None, gridsize: int = 90,
             vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis"):
    """Hexagonal bins: the star count per bin (log scale) or, with ``c``, its median per bin."""
    if c is None:
        return ax.hexbin(x, y, gridsize=gridsize, bins="log", mincnt=1, cmap=cmap, linewidths=0, rasterized=True)
    return ax.hexbin(x, y, C=c, reduce_C_function=np.nanmedian, gridsize=gridsize, mincnt=3, cmap=cmap,
                     vmin=vmin, vmax=vmax, linewidths=0, rasterized=True)


def kiel_diagram(table_or_catalog: Any, out_png: str | os.PathLike, *, teff: str = "teff",
                 logg: str = "logg", color: str | None = "mh", title: str | None = None,
                 return_fig: bool = False, where: str | None = None,
                 clean: Any = False) -> Path | tuple[Path, "Figure"]:
    """Kiel diagram (log g against Teff) of the stars with finite Teff and log g, saved as PNG.

    Teff [K] runs hot to cool from left to right and log g [dex] low to high from top to
    bottom, as astronomers draw it; points are coloured by ``color`` (default [M/H], 1-99th
    percentile range; None for one colour). Above ``DENSE_N`` stars, hexagonal bins coloured by
    the median of ``color`` per bin (or by star count). Returns the path, or (path, Figure)
    with ``return_fig`` (the caller then owns the figure).
    """
    from matplotlib.figure import Figure

    need = [teff, logg] + ([color] if color else [])
    table = _as_table(table_or_catalog, need, where, clean)
    x = _column(table, teff, "the Kiel diagram")
    y = _column(table, logg, "the Kiel diagram")
    c = _column(table, color, "the Kiel diagram colour") if color else None
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    # random draw order: a sorted catalog would otherwise paint one sky region on top
    order = np.random.default_rng(0).permutation(n)
    x, y = x[order], y[order]
    size, alpha = point_style(n)

    fig = Figure(figsize=(6.4, 5.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    dense = n > DENSE_N
    if c is not None:
        c = c[ok][order]
        finite = c[np.isfinite(c)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        if dense:
            sc = _density(ax, x, y, c=c, gridsize=110, vmin=vmin, vmax=vmax)
        else:
            sc = ax.scatter(x, y, c=c, s=size, alpha=alpha, cmap="viridis", vmin=vmin, vmax=vmax,
                            linewidths=0, rasterized=True, plotnonfinite=True)
        cbar = fig.colorbar(sc, ax=ax)
        if cbar.solids is not None:
            cbar.solids.set_alpha(1.0)  # the bar shows the colour scale, not the point alpha
        cbar.set_label(("median " if dense else "") + axis_label(color) + (" per bin" if dense else ""))
    elif dense:
        cbar = fig.colorbar(_density(ax, x, y, gridsize=110, cmap="Greys"), ax=ax)
        cbar.set_label("stars per bin")
    else:
        ax.scatter(x, y, s=size, alpha=alpha, color="k", linewidths=0, rasterized=True)
    ax.set_xlabel(axis_label("teff") if teff == "teff" else f"{teff} (Teff)")
    ax.set_ylabel(axis_label("logg") if logg == "logg" else f"{logg} (log g)")
    ax.invert_xaxis()  # hot stars on the left
    ax.invert_yaxis()  # giants (low log g) at the top
    ax.set_title(f"{title or 'Kiel diagram'} (N = {n:,})")
    ax.grid(alpha=0.2)
    path = _save(fig, out_png)
    return (path, fig) if return_fig else path


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return int(math.ceil(n / cols)), cols


def abundance_planes(table_or_catalog: Any, out_png: str | os.PathLike, *, labels: Sequence[str] | None = None,
                     x: str = "mh", title: str | None = None, return_fig: bool = False, where: str | None = None,
                     clean: Any = False) -> Path | tuple[Path, "Figure"]:
    """[X/M] against [M/H]: one panel per abundance label, sharing the [M/H] axis.

    labels: default every abundance label of the catalog (see
    :func:`distlabels.catalog.columns.abundance_labels`). Panels show points for up to
    ``DENSE_N`` stars, else hexagonal bins of star counts on one shared logarithmic colour
    scale. y ranges are the 0.5-99.5 percentiles, so a few failed fits do not flatten a panel.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    if labels is None:
        if hasattr(table_or_catalog, "label_names"):
            names = list(table_or_catalog.label_names)
        else:
            tab = _as_table(table_or_catalog, [])
            names = [c for c in tab.column_names if f"{c}_err" in tab.column_names]
        labels = abundance_labels(names)
    labels = [str(lab) for lab in labels]
    if not labels:
        raise QueryError("the abundance plot found no abundance labels ([X/M]) in this catalog.")
    table = _as_table(table_or_catalog, [x, *labels], where, clean)
    xv = _column(table, x, "the abundance plot")
    rows, cols = _grid(len(labels), 5)
    fig = Figure(figsize=(3.0 * cols + 0.8, 2.5 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    xlim = _robust_limits(xv)
    hexes, n_max = [], 0
    for k, lab in enumerate(labels):
        ax = axes.flat[k]
        yv = _column(table, lab, "the abundance plot")
        ok = np.isfinite(xv) & np.isfinite(yv)
        n = int(ok.sum())
        if n > DENSE_N:
            hb = _density(ax, xv[ok], yv[ok], gridsize=60, cmap="viridis")
            hexes.append(hb)
            n_max = max(n_max, int(np.max(hb.get_array())) if hb.get_array().size else 1)
        else:
            size, alpha = point_style(n)
            ax.scatter(xv[ok], yv[ok], s=size, alpha=alpha, color="k", linewidths=0, rasterized=True)
        ax.axhline(0.0, color="tab:red", lw=0.6, alpha=0.6)
        ax.set_ylim(*_robust_limits(yv[ok]))
        ax.set_ylabel(axis_label(lab))
        ax.text(0.03, 0.95, f"N = {n:,}", transform=ax.transAxes, va="top", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        ax.grid(alpha=0.2)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for k in range(len(labels)):  # x labels on the lowest visible panel of each column
        r, cidx = divmod(k, cols)
        if r == rows - 1 or k + cols >= len(labels):
            axes[r, cidx].set_xlabel(axis_label(x))
            axes[r, cidx].tick_params(labelbottom=True)
    axes.flat[0].set_xlim(*xlim)
    if hexes:
        norm = LogNorm(vmin=1, vmax=max(n_max, 2))
        for hb in hexes:
            hb.set_norm(norm)
        fig.colorbar(hexes[0], ax=axes, shrink=0.6, label="stars per bin")
    fig.suptitle(f"{title or 'Abundance ratios against ' + axis_label(x).split(' [')[0]} "
                 f"(N = {table.num_rows:,})")
    path = _save(fig, out_png)
    return (path, fig) if return_fig else path


def recovery_stats(table: Any, labels: Sequence[str] = ("teff", "logg", "mh")) -> dict[str, dict[str, float]]:
    """Fit minus truth per label over rows where both are finite.

    Returns {label: {"n", "bias" (median), "scatter" (1.4826 MAD, robust sigma), "mean",
    "std"}}, in the label's unit (K for teff, dex for abundances and log g, km/s for rv).
    """
    t = _as_table(table, [c for lab in labels for c in (lab, f"true_{lab}")])
    out: dict[str, dict[str, float]] = {}
    for lab in labels:
        fit = _column(t, lab, "the recovery plot")
        true = _column(t, f"true_{lab}", "the recovery plot (mock runs only)")
        ok = np.isfinite(fit) & np.isfinite(true)
        d = fit[ok] - true[ok]
        if d.size == 0:
            out[lab] = {"n": 0, "bias": np.nan, "scatter": np.nan, "mean": np.nan, "std": np.nan}
            continue
        med = float(np.median(d))
        out[lab] = {"n": int(d.size), "bias": med, "scatter": float(1.4826 * np.median(np.abs(d - med))),
                    "mean": float(np.mean(d)), "std": float(np.std(d))}
    return out


def recovery_plot(table: Any, out_png: str | os.PathLike, labels: Sequence[str] = ("teff", "logg", "mh"),
                  *, title: str | None = None, return_fig: bool = False, where: str | None = None,
                  clean: Any = False) -> Path | tuple[Path, "Figure"]:
    """One panel per label: fit - truth against truth (needs ``true_<label>`` columns), with
    the zero line and bias (median) and scatter (1.4826 MAD) written in each panel; hexagonal
    bins above ``DENSE_N`` stars. Returns the path, or (path, Figure) with ``return_fig``.
    """
    from matplotlib.figure import Figure

    labels = list(labels)
    if not labels:
        raise QueryError("the recovery plot needs at least one label.")
    t = _as_table(table, [c for lab in labels for c in (lab, f"true_{lab}")], where, clean)
    stats = recovery_stats(t, labels)
    rows, cols = _grid(len(labels), 4)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows + 0.3), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        fit, true = _column(t, lab, "the recovery plot"), _column(t, f"true_{lab}", "the recovery plot")
        ok = np.isfinite(fit) & np.isfinite(true)
        d = fit[ok] - true[ok]
        s = stats[lab]
        # y range from robust scatter so a few failed fits do not flatten the panel
        half = max(6 * s["scatter"], 1e-6) + abs(s["bias"]) if s["n"] else 1.0
        if d.size > DENSE_N:
            inside = np.abs(d - s["bias"]) <= half
            _density(ax, true[ok][inside], d[inside], gridsize=70, cmap="Blues")
        else:
            size, alpha = point_style(d.size)
            ax.scatter(true[ok], d, s=size, alpha=alpha, color="tab:blue", linewidths=0, rasterized=True)
        ax.axhline(0.0, color="k", lw=0.8)
        if s["n"]:
            ax.axhline(s["bias"], color="tab:red", lw=0.8, ls="--")
            ax.set_ylim(s["bias"] - half, s["bias"] + half)
        u = unit(lab) or ""
        ax.text(0.03, 0.97, f"bias (median) = {s['bias']:.3g} {u}\n"
                f"scatter (1.4826 MAD) = {s['scatter']:.3g} {u}\nN = {s['n']:,}",
                transform=ax.transAxes, va="top", ha="left", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_xlabel(f"true {axis_label(lab)}")
        ax.set_ylabel(f"fit - true {axis_label(lab).split(' [')[0]}" + (f" [{u}]" if u else ""))
        ax.grid(alpha=0.2)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    fig.suptitle(title or "Label recovery (fit - truth)")
    path = _save(fig, out_png)
    return (path, fig) if return_fig else path
