"""``distlabels info``: what a catalog is made of and what it holds, in one screen.

Provenance (model id and sha256, code version, config hash, input store), layout (HEALPix order,
pixels, files, whether compact and HATS-valid), row counts (fitted, not fitted, clean), a count
per flag bit (names from :class:`distlabels.fit.Flag`) and, per label, the number of finite
values, min, median and max, and the median formal error. One pass over the needed columns;
medians come from every k-th row when the catalog has more than ``MEDIAN_SAMPLE`` rows.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from .. import paths
from ..fit.flags import NOT_FITTED, Flag
from .hats import read_properties, scan_catalog
from .query import CLEAN, Catalog

__all__ = ["catalog_summary", "format_summary", "MEDIAN_SAMPLE"]

MEDIAN_SAMPLE = 2_000_000


def _flag_name(bit: int) -> str:
    try:
        return Flag(bit).name or f"bit {bit}"
    except ValueError:
        return f"unknown bit {int(math.log2(bit))}"


def catalog_summary(cat: Catalog) -> dict[str, Any]:
    """Everything ``distlabels info`` prints, as a JSON-serialisable dict."""
    scan = scan_catalog(cat.root)
    props = read_properties(cat.root)
    prov = cat.meta.get("provenance") or {}
    labels = [n for n in cat.label_names if n in cat.columns]
    stat_cols = [c for c in labels + ["rv"] if c in cat.columns]
    err_cols = [f"{c}_err" for c in stat_cols if f"{c}_err" in cat.columns]
    flag_cols = [c for c in ("flags", "ingest_flags") if c in cat.columns]
    cols = list(dict.fromkeys(flag_cols + stat_cols + err_cols))
    n_rows = scan.n_rows
    step = max(1, math.ceil(n_rows / MEDIAN_SAMPLE))

    bits: dict[int, int] = {}
    n_fitted = n_flag0 = 0
    acc = {c: {"n": 0, "min": np.inf, "max": -np.inf, "sample": []} for c in stat_cols + err_cols}
    seen = 0
    if scan.fragments and cols:
        dataset = ds.dataset([str(f.path) for f in scan.fragments], format="parquet", schema=cat.schema)
        for batch in dataset.to_batches(columns=cols, batch_size=1 << 18):
            if "flags" in flag_cols:
                fl = batch.column("flags").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                n_fitted += int(np.count_nonzero((fl & int(NOT_FITTED)) == 0))
                n_flag0 += int(np.count_nonzero(fl == 0))
                for b in range(63):
                    k = int(np.count_nonzero(fl & (1 << b)))
                    if k:
                        bits[1 << b] = bits.get(1 << b, 0) + k
            take = np.arange((-seen) % step, batch.num_rows, step)
            for c in stat_cols + err_cols:
                v = batch.column(c).cast("float64").fill_null(np.nan).to_numpy(zero_copy_only=False)
                ok = np.isfinite(v)
                a = acc[c]
                if ok.any():
                    a["n"] += int(ok.sum())
                    a["min"] = min(a["min"], float(v[ok].min()))
                    a["max"] = max(a["max"], float(v[ok].max()))
                sub = v[take]
                a["sample"].append(sub[np.isfinite(sub)])
            seen += batch.num_rows
    n_clean = None
    if all(c in cat.columns for c in ("flags", "snr", "chi2_red")):
        n_clean = cat.query(columns=["flags"], clean=True).num_rows
    label_stats = []
    for c in stat_cols:
        a = acc[c]
        sample = np.concatenate(a["sample"]) if a["sample"] else np.array([])
        e = acc.get(f"{c}_err")
        esample = np.concatenate(e["sample"]) if e and e["sample"] else np.array([])
        label_stats.append({"label": c, "n_finite": a["n"], "min": a["min"] if a["n"] else None,
                            "median": float(np.median(sample)) if sample.size else None,
                            "max": a["max"] if a["n"] else None,
                            "median_err": float(np.median(esample)) if esample.size else None})
    per_pixel = scan.files_per_pixel
    orders = sorted({k for k, _ in per_pixel})
    # a run that streamed into a pixel inside a coarser compacted one leaves overlapping pixels
    nested = any(a in per_pixel for key in per_pixel for a in paths.ancestors(*key))
    return {
        "catalog": str(cat.root),
        "provenance": {"model_id": prov.get("model_id") or cat.meta.get("model_id"),
                       "model_sha256": prov.get("model_sha256"), "model_path": prov.get("model_path"),
                       "code_version": prov.get("distlabels_version"),
                       "config_sha256": props.get("distlabels_config_sha256"),
                       "input_store": prov.get("store"), "fit_config": prov.get("fit_config")},
        "layout": {"healpix_orders": orders, "n_pixels": len(per_pixel), "n_files": len(scan.fragments),
                   "n_bytes": scan.n_bytes, "compact": all(v == 1 for v in per_pixel.values()) and not nested,
                   "hats_properties": bool(props), "hats_nrows": int(props["hats_nrows"]) if "hats_nrows" in props
                   else None, "hats_up_to_date": props.get("hats_nrows") == str(n_rows)},
        "rows": {"total": n_rows, "fitted": n_fitted, "not_fitted": n_rows - n_fitted, "flags_zero": n_flag0,
                 "clean": n_clean, "clean_selection": CLEAN.where(cat.columns) if n_clean is not None else None},
        "flags": [{"bit": b, "value": b, "name": _flag_name(b), "count": bits[b]} for b in sorted(bits)],
        "labels": label_stats,
        "median_sample_step": step,
    }


def _num(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else f"{v:{spec}}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    p, lay, rows = s["provenance"], s["layout"], s["rows"]
    total = max(rows["total"], 1)
    out = [f"catalog   {s['catalog']}",
           f"model     {p['model_id'] or '-'}  sha256 {p['model_sha256'] or '-'}",
           f"code      distlabels {p['code_version'] or '-'}  config sha256 {p['config_sha256'] or '-'}",
           f"store     {p['input_store'] or '-'}",
           f"layout    HEALPix order {','.join(map(str, lay['healpix_orders'])) or '-'}, {lay['n_pixels']:,} pixels, "
           f"{lay['n_files']:,} files, {lay['n_bytes'] / 2**20:,.1f} MiB, "
           f"{'compact' if lay['compact'] else 'not compact (distlabels compact merges fragments)'}; HATS files "
           + ("up to date" if lay["hats_up_to_date"] else "stale (rewritten at the end of a run or by compact)"
              if lay["hats_properties"] else "absent"),
           f"rows      {rows['total']:,}: fitted {rows['fitted']:,} ({100 * rows['fitted'] / total:.1f} %), "
           f"not fitted {rows['not_fitted']:,}, flags == 0 {rows['flags_zero']:,}"
           + (f", clean {rows['clean']:,} ({100 * rows['clean'] / total:.1f} %)" if rows["clean"] is not None else ""),
           ]
    if rows.get("clean_selection"):
        out.append(f"clean     {rows['clean_selection']}")
    if s["flags"]:
        out.append("flags     value  name              stars")
        for f in s["flags"]:
            out.append(f"          {f['value']:>5}  {f['name']:<16} {f['count']:>8,} ({100 * f['count'] / total:.1f} %)")
    if s["labels"]:
        out.append("labels    name        finite          min       median          max   median err")
        for r in s["labels"]:
            out.append(f"          {r['label']:<8} {r['n_finite']:>9,} {_num(r['min']):>12} {_num(r['median']):>12} "
                       f"{_num(r['max']):>12} {_num(r['median_err']):>12}")
        if s["median_sample_step"] > 1:
            out.append(f"          (medians from every {s['median_sample_step']}th row)")
    return "\n".join(out) + "\n"

