"""Quick-look figures of a label catalog: the Kiel diagram and, for mock runs, label recovery.

Figures are built on :class:`matplotlib.figure.Figure` directly and saved with the Agg
renderer; pyplot is never imported, so a caller's backend and global figure state are left
alone (no ``matplotlib.use`` switch needed, safe inside Dask workers and notebooks).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from distlabels.errors import QueryError

if TYPE_CHECKING:  # matplotlib is imported lazily: the CLI should start fast without it
    from matplotlib.figure import Figure

__all__ = ["kiel_diagram", "recovery_plot", "recovery_stats", "point_style"]

AXIS_LABELS = {"teff": "Teff [K]", "logg": "log g [dex, cgs]", "mh": "[M/H]", "cm": "[C/M]",
               "nm": "[N/M]", "am": "[α/M]", "alpha_m": "[α/M]", "vmic": "vmic [km/s]",
               "vsini": "v sin i [km/s]", "rv": "RV [km/s]"}
UNITS = {"teff": "K", "rv": "km/s", "vmic": "km/s", "vsini": "km/s"}  # others are dex


def _label(name: str) -> str:
    return AXIS_LABELS.get(name, name)


def _unit(name: str) -> str:
    return UNITS.get(name, "dex")


def point_style(n: int) -> tuple[float, float]:
    """Marker area (points^2) and alpha for a scatter of ``n`` points.

    Large and opaque for a hundred stars, small and translucent for a million, so that dense
    regions still show structure instead of a solid blob.
    """
    n = max(int(n), 1)
    size = float(np.clip(100.0 / n ** 0.45, 0.3, 8.0))
    alpha = float(np.clip(1.3 - 0.15 * np.log10(n), 0.35, 0.9))
    return size, alpha


def _as_table(data: Any, columns: Sequence[str]) -> pa.Table:
    """A Catalog is queried for just ``columns``; a Table (or pandas DataFrame) is used as is."""
    from distlabels.catalog.query import Catalog

    if isinstance(data, Catalog):
        return data.query(columns=list(dict.fromkeys(c for c in columns if c in data.columns)))
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


def kiel_diagram(table_or_catalog: Any, out_png: str | os.PathLike, *, teff: str = "teff",
                 logg: str = "logg", color: str | None = "mh", title: str | None = None,
                 return_fig: bool = False) -> Path | tuple[Path, "Figure"]:
    """Kiel diagram (log g against Teff) of the stars with finite Teff and log g, saved as PNG.

    Teff [K] runs hot to cool from left to right and log g [dex] low to high from top to
    bottom, as astronomers draw it; points are coloured by ``color`` (default [M/H], 1-99th
    percentile range; None for one colour). Returns the path, or (path, Figure) with
    ``return_fig`` (the caller then owns the figure).
    """
    from matplotlib.figure import Figure

    need = [teff, logg] + ([color] if color else [])
    table = _as_table(table_or_catalog, need)
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
    if c is not None:
        c = c[ok][order]
        finite = c[np.isfinite(c)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        sc = ax.scatter(x, y, c=c, s=size, alpha=alpha, cmap="viridis", vmin=vmin, vmax=vmax,
                        linewidths=0, rasterized=True, plotnonfinite=True)
        cbar = fig.colorbar(sc, ax=ax)
        cbar.solids.set_alpha(1.0)  # the bar shows the colour scale, not the point alpha
        cbar.set_label(_label(color))
    else:
        ax.scatter(x, y, s=size, alpha=alpha, color="k", linewidths=0, rasterized=True)
    ax.set_xlabel(_label(teff) if teff == "teff" else f"{teff} (Teff)")
    ax.set_ylabel(_label(logg) if logg == "logg" else f"{logg} (log g)")
    ax.invert_xaxis()  # hot stars on the left
    ax.invert_yaxis()  # giants (low log g) at the top
    ax.set_title(f"{title or 'Kiel diagram'} (N = {n:,})")
    ax.grid(alpha=0.2)
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
                  *, title: str | None = None, return_fig: bool = False) -> Path | tuple[Path, "Figure"]:
    """One panel per label: fit - truth against truth (needs ``true_<label>`` columns), with
    the zero line and bias (median) and scatter (1.4826 MAD) written in each panel. Returns the
    path, or (path, Figure) with ``return_fig``.
    """
    from matplotlib.figure import Figure

    labels = list(labels)
    if not labels:
        raise QueryError("the recovery plot needs at least one label.")
    t = _as_table(table, [c for lab in labels for c in (lab, f"true_{lab}")])
    stats = recovery_stats(t, labels)
    fig = Figure(figsize=(4.2 * len(labels), 3.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, lab in zip(axes, labels):
        fit, true = _column(t, lab, "the recovery plot"), _column(t, f"true_{lab}", "the recovery plot")
        ok = np.isfinite(fit) & np.isfinite(true)
        d = fit[ok] - true[ok]
        size, alpha = point_style(d.size)
        ax.scatter(true[ok], d, s=size, alpha=alpha, color="tab:blue", linewidths=0, rasterized=True)
        ax.axhline(0.0, color="k", lw=0.8)
        s = stats[lab]
        if s["n"]:
            ax.axhline(s["bias"], color="tab:red", lw=0.8, ls="--")
            # y range from robust scatter so a few failed fits do not flatten the panel
            half = max(6 * s["scatter"], 1e-6) + abs(s["bias"])
            ax.set_ylim(s["bias"] - half, s["bias"] + half)
        unit = _unit(lab)
        ax.text(0.03, 0.97, f"bias (median) = {s['bias']:.3g} {unit}\n"
                f"scatter (1.4826 MAD) = {s['scatter']:.3g} {unit}\nN = {s['n']:,}",
                transform=ax.transAxes, va="top", ha="left", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_xlabel(f"true {_label(lab)}")
        ax.set_ylabel(f"fit - true {lab} [{unit}]")
        ax.grid(alpha=0.2)
    fig.suptitle(title or "Label recovery (fit - truth)")
    path = _save(fig, out_png)
    return (path, fig) if return_fig else path
