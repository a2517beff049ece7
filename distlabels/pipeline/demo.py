"""``distlabels demo``: the whole path once, on this machine, with a real trained emulator.

bossbrain's 4000-5000 K network is imported (safe unpickler, once), a LAMOST-like mock survey is
made from it, fitted on a Dask LocalCluster into a catalog, and the recovery against the truth is
printed together with an example query and a Kiel diagram.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..catalog.plot import kiel_diagram, recovery_plot
from ..catalog.query import format_table, open_catalog
from ..config import MockConfig, RunConfig
from ..fit.flags import NOT_FITTED, Flag
from ..io.store import write_store
from ..models.base import load, read_model_dir
from ..mock import make_mock
from .run import run_fit

DEMO_LABELS = ("teff", "logg", "mh", "cm", "mgm")
EXAMPLE_QUERY = "teff < 4500 and logg < 2.0 and flags & 1 == 0"


def recovery_rows(table, labels) -> list[dict]:
    """Bias (median), scatter (std), median formal error and pull std per label, over fitted stars."""
    flags = table.column("flags").to_numpy()
    fitted = (flags & int(NOT_FITTED)) == 0
    rows = []
    for name in labels:
        if f"true_{name}" not in table.column_names:
            continue
        fit = table.column(name).to_numpy(zero_copy_only=False).astype(float)[fitted]
        err = table.column(f"{name}_err").to_numpy(zero_copy_only=False).astype(float)[fitted]
        true = table.column(f"true_{name}").to_numpy(zero_copy_only=False).astype(float)[fitted]
        d = fit - true
        ok = np.isfinite(d) & np.isfinite(err) & (err > 0)
        pull = d[ok] / err[ok]
        rows.append({"label": name, "n": int(ok.sum()), "bias": float(np.median(d[ok])),
                     "scatter": float(np.std(d[ok])), "median_err": float(np.median(err[ok])),
                     "pull_std": float(np.std(pull)), "frac_pull_lt3": float(np.mean(np.abs(pull) < 3))})
    return rows


def run_demo(out_dir: str | Path = "demo_output", *, n: int = 10000, workers: int | None = 2, seed: int = 42,
             snr_range=(20.0, 100.0), task_rows: int = 250, echo: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    """Run the demo end to end; returns a dict of timings and recovery figures."""
    from ..models.importers import import_bossbrain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings = {}
    model_dir = out / "model-bossbrain-4000-5000"
    t = time.perf_counter()
    try:
        read_model_dir(model_dir)
        echo(f"[1/5] model: reusing {model_dir}")
    except Exception:
        echo("[1/5] model: importing bossbrain's 4000-5000 K emulator through the allow-listed unpickler")
        import_bossbrain("4000-5000", model_dir)
    model = load(model_dir)
    timings["import_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mcfg = MockConfig(n=n, snr_min=snr_range[0], snr_max=snr_range[1], seed=seed, grid="lamost",
                      max_rows_per_partition=max(task_rows * 2, 100))
    echo(f"[2/5] mock: {n} LAMOST-like spectra (3,909 px, R=1800, S/N {snr_range[0]:g}-{snr_range[1]:g}, "
         f"RV +-{mcfg.rv_max_kms:g} km/s)")
    table, meta = make_mock(model, mcfg)
    store_dir = out / "spectra"
    write_store(store_dir, table, meta, max_rows_per_partition=mcfg.max_rows_per_partition, overwrite=True)
    timings["mock_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cat_dir = out / "catalog"
    rcfg = RunConfig(workers=workers, task_rows=task_rows, overwrite=True, progress=progress)
    echo(f"[3/5] fit: {n} stars, {model.n_labels} labels + RV + continuum, on a LocalCluster "
         f"({rcfg.workers or 'all'} workers x {rcfg.threads_per_worker} thread)")
    summary = run_fit(model_dir, store_dir, cat_dir, rcfg)
    timings["fit_s"] = time.perf_counter() - t
    if summary.dashboard:
        echo(f"      dashboard was at {summary.dashboard}")
    echo(f"      {summary.n_rows_fitted} spectra in {summary.wall_s:.1f} s = {summary.throughput:.1f} spectra/s "
         f"({summary.n_done} tasks, {summary.n_failed} failed)")

    cat = open_catalog(cat_dir)
    full = cat.query()
    echo(f"[4/5] recovery against the truth ({len(full)} catalog rows, one per input star):")
    rows = recovery_rows(full, [*DEMO_LABELS, "rv"])
    echo(f"      {'label':<6} {'n':>5} {'bias':>9} {'scatter':>9} {'med err':>9} {'pull std':>8} {'|pull|<3':>8}")
    for r in rows:
        echo(f"      {r['label']:<6} {r['n']:>5} {r['bias']:>9.4g} {r['scatter']:>9.4g} {r['median_err']:>9.4g} "
             f"{r['pull_std']:>8.2f} {r['frac_pull_lt3']:>8.1%}")
    flags = full.column("flags").to_numpy()
    echo(f"      flags: {int((flags == 0).sum())} clean, {int(((flags & int(NOT_FITTED)) != 0).sum())} not fitted")
    if "labels_at_bound" in full.column_names:
        # With 22 labels drawn uniformly up to the edges of the box, a weakly measured abundance often
        # ends on its bound (AT_LABEL_BOUND) while Teff, log g and [M/H] are fine: count those too.
        bits = full.column("labels_at_bound").to_numpy()
        names = [n for n in ("teff", "logg", "mh") if n in full.column_names]
        lab = list(meta.get("label_names") or [])
        main = sum(1 << lab.index(n) for n in names if n in lab)
        ok = ((flags & ~int(Flag.AT_LABEL_BOUND)) == 0) & ((bits & main) == 0)
        echo(f"      {int(ok.sum())} with {', '.join(names)} inside the model's box and no other flag")

    echo(f"[5/5] example query: distlabels query {cat_dir} --where \"{EXAMPLE_QUERY}\" "
         "--columns source_id,teff,logg,mh,rv --limit 5")
    sel = cat.query(where=EXAMPLE_QUERY, columns=["source_id", "teff", "logg", "mh", "rv"])
    echo(f"      {len(sel)} stars match; first rows:")
    echo("\n".join("      " + line for line in format_table(sel.slice(0, 5), "table").splitlines()))
    kiel = kiel_diagram(full, out / "kiel.png", title="distlabels demo: mock LAMOST-like stars")
    rec = recovery_plot(full, out / "recovery.png")
    timings["total_s"] = time.perf_counter() - t_start
    echo(f"      Kiel diagram: {kiel}; recovery plot: {rec}")
    echo(f"done in {timings['total_s']:.0f} s (import {timings['import_s']:.1f} s, mock {timings['mock_s']:.1f} s, "
         f"fit {timings['fit_s']:.1f} s)")
    return {"timings": timings, "recovery": rows, "summary": summary, "n_query": len(sel),
            "catalog": str(cat_dir), "kiel": str(kiel)}


__all__ = ["run_demo", "recovery_rows"]
