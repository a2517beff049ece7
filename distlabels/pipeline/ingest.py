"""The graph builder of an ingest run: survey FITS files -> spectra store, on Dask.

Stages (pure functions in :mod:`distlabels.io.ingest` and :mod:`distlabels.io.ingest_plan`):
map (one task per batch of files) -> plan (one task) -> reduce (one task per sky partition).
Every task writes under a deterministic name and skips work already done, so a retried task or a
re-run of an interrupted ingest resumes; ``store.json`` is written last and records the inputs'
fingerprint, so ingesting the same inputs again does nothing, and other inputs into an existing
store are refused unless ``--overwrite``. The work area ``_ingest/`` is removed at the end.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, paths
from ..config import IngestConfig, RunConfig
from ..errors import DistlabelsError, QueryError
from ..io.ingest import (DEFAULT_SELECT, FORMAT_VERSION, SELECT_SCHEMA, IngestSpec, TargetGrid, choose_family,
                         expand_inputs, inputs_fingerprint, make_batches, map_task, read_quarantine, task_name,
                         write_quarantine)
from ..io.ingest_plan import (HIST_ORDER, MIXED_SHARE, GridPlan, median_from_counts, plan_id, plan_partitions,
                              plan_task, reduce_partition, segments_for)
from ..io.loaders import SURVEYS
from ..io.loaders.base import LoaderOptions
from ..io.store import write_json_atomic
from .cluster import make_client

log = logging.getLogger("distlabels.pipeline.ingest")
OUR_ENTRIES = {paths.DATASET_DIR, paths.QUARANTINE_DIR, paths.INGEST_DIR, paths.STORE_META}


@dataclass
class IngestSummary:
    store: str
    n_files: int = 0
    n_files_read: int = 0
    n_files_quarantined: int = 0
    n_spectra_read: int = 0
    n_excluded: int = 0              # read, but not selected (not stars, or --select)
    n_duplicates: int = 0            # source_id already read from another file (quarantined)
    n_spectra_quarantined: int = 0   # spectra quarantined (duplicates and off-grid included)
    n_spectra_written: int = 0
    n_stars: int = 0
    n_partitions: int = 0
    n_fragments: int = 0
    bytes_in: int = 0
    wall_s: float = 0.0
    skipped: bool = False            # the store already held exactly these inputs
    family: str = ""
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        rate = f" ({self.n_files / self.wall_s:.0f} files/s)" if self.wall_s > 0 and not self.skipped else ""
        head = "already ingested, nothing to do: " if self.skipped else ""
        return (f"{self.store}: {head}{self.n_files_read} files read, {self.n_files_quarantined} files quarantined; "
                f"{self.n_spectra_written} spectra written ({self.n_stars} stars, {self.n_fragments} fragments), "
                f"{self.n_spectra_quarantined} spectra quarantined ({self.n_duplicates} duplicates), "
                f"{self.n_excluded} not selected; {self.wall_s:.1f} s{rate}")


def _target_grid(grid: str) -> TargetGrid | None:
    if grid in (None, "", "native"):
        return None
    from ..models.base import read_model_dir

    meta, _ = read_model_dir(grid)
    wave = meta.get("wavelength_aa")
    if not wave:
        raise DistlabelsError(f"model directory {grid} has no wavelength_aa grid to resample onto.")
    return TargetGrid(tuple(float(x) for x in wave), meta.get("wavelength_medium", "vacuum"),
                      source=str(Path(grid).resolve()), sha256=meta.get("weights_sha256", ""))


def _select(text: str | None):
    if text is None or text.strip() in ("", DEFAULT_SELECT):
        return None, DEFAULT_SELECT
    from ..catalog.query import parse_where

    try:
        return parse_where(text, SELECT_SCHEMA), text.strip()
    except QueryError as e:
        raise DistlabelsError(str(e).replace("--where", "--select")) from None


def _prepare_root(root: Path, identity: dict[str, Any], overwrite: bool) -> IngestSummary | None:
    """Create, resume or refuse ``root``; returns a summary when the store is already complete."""
    meta_path = root / paths.STORE_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        ing = meta.get("ingest", {})
        if not overwrite and ing.get("identity") == identity:
            s = IngestSummary(str(root), skipped=True, family=meta.get("family", ""))
            for k in ("n_files", "n_files_read", "n_files_quarantined", "n_spectra_read", "n_excluded",
                      "n_duplicates", "n_spectra_quarantined", "n_stars"):
                setattr(s, k, int(ing.get(k, 0)))
            s.n_spectra_written, s.n_fragments = int(meta.get("n_spectra", 0)), int(meta.get("n_fragments", 0))
            return s
        if not overwrite:
            what = "from other inputs or settings" if ing else "by another command (not ingest)"
            raise DistlabelsError(f"{root} is a spectra store made {what}; use another --out, ingest all paths "
                                  "together, or pass --overwrite.")
        shutil.rmtree(root)
    elif root.exists():
        if not root.is_dir():
            raise DistlabelsError(f"--out {root} is a file, not a directory.")
        entries = {p.name for p in root.iterdir()}
        if entries - OUR_ENTRIES and not overwrite:
            raise DistlabelsError(f"{root} exists and is not a spectra store; use another --out or pass --overwrite.")
        ident = paths.ingest_work_dir(root) / "identity.json"
        same = ident.is_file() and json.loads(ident.read_text()) == identity
        if overwrite or not same:        # a partial run of other inputs, or a forced restart
            for name in entries & OUR_ENTRIES if not overwrite else entries:
                p = root / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    paths.ingest_work_dir(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.ingest_work_dir(root) / "identity.json", identity)
    return None


def run_ingest(inputs: list[str], out: str | os.PathLike, config: IngestConfig | None = None, *,
               client=None) -> IngestSummary:
    """Ingest survey FITS files (paths, directories, globs or list files) into the store ``out``.

    client: an existing ``distributed.Client``; otherwise one is made from ``config.cluster``.
    """
    cfg = config or IngestConfig()
    t0 = time.perf_counter()
    if cfg.survey not in ("auto",) + SURVEYS:
        raise DistlabelsError(f"unknown --survey {cfg.survey!r}: use auto, {', '.join(SURVEYS)}.")
    files = expand_inputs(list(inputs))
    if not files:
        raise DistlabelsError(f"no FITS files found in {', '.join(map(str, inputs))}.")
    family, _ = choose_family(files, cfg.survey)
    select_expr, select_text = _select(cfg.select)
    spec = IngestSpec(family=family, select=select_expr, select_text=select_text, target=_target_grid(cfg.grid),
                      options=LoaderOptions(visits=bool(cfg.visits)))
    identity = {"inputs_sha256": inputs_fingerprint(files), "n_files": len(files), "spec": spec.key,
                "fragment": cfg.max_rows_per_fragment or cfg.fragment_mb, "format": FORMAT_VERSION}
    root = Path(out).resolve()
    done = _prepare_root(root, identity, cfg.overwrite)
    if done is not None:
        return done
    summary = IngestSummary(str(root), n_files=len(files), family=family)
    own = client is None
    cluster = None
    if own:
        client, cluster = make_client(RunConfig(cluster=cfg.cluster, workers=cfg.workers,
                                                threads_per_worker=cfg.threads_per_worker))
    try:
        n_workers = max(len(client.scheduler_info().get("workers", {})), 1)
        batches = make_batches(files, n_workers, cfg.files_per_task)
        results = _map_stage(client, batches, spec, root, cfg, summary)
        if summary.n_spectra_read - summary.n_excluded <= 0:
            summary.wall_s = time.perf_counter() - t0
            return summary
        _finish(client, results, spec, root, cfg, summary, identity, t0)
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _map_stage(client, batches, spec: IngestSpec, root: Path, cfg: IngestConfig, summary: IngestSummary):
    from distributed import as_completed

    futures = {}
    for i, b in enumerate(batches):
        name = task_name(i, b, spec)
        f = client.submit(map_task, i, name, b, spec, str(root), retries=cfg.retries, pure=False, key=f"ingest-{name}")
        futures[f] = (i, name, b)
    results = []
    bar = _progress(sum(len(b) for b in batches), "ingest: read", "file", cfg.progress)
    try:
        for fut in as_completed(list(futures)):
            i, name, batch = futures[fut]
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, DistlabelsError):
                    raise exc
                reason = f"the task reading this file failed {cfg.retries + 1} times ({type(exc).__name__}: {exc})"
                write_quarantine(str(root), name, [dict(path=p, hdu=None, row=None, source_id=None, reason=reason)
                                                   for p in batch], "map")
                summary.n_files_quarantined += len(batch)
                log.error("ingest task %s failed: %s", name, exc)
            else:
                r = fut.result()
                results.append(r)
                for k in ("n_files_quarantined", "n_spectra_read", "n_excluded"):
                    setattr(summary, k, getattr(summary, k) + r[k])
                summary.n_files_read += r["n_files_ok"]
                summary.bytes_in += r["bytes_in"]
            bar.update(len(batch))
            fut.release()
    finally:
        bar.close()
    if any(r["upsampled"] for r in results):
        msg = ("--grid: the model's pixels are finer than the data's, so the spectra were upsampled; neighbouring "
               "pixels are now correlated and fitted errors will be too small (prefer --grid native).")
        summary.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)
    return sorted(results, key=lambda r: r["index"])


def _finish(client, results, spec: IngestSpec, root: Path, cfg: IngestConfig, summary: IngestSummary,
            identity: dict[str, Any], t0: float) -> None:
    from distributed import as_completed

    map_files = {r["index"]: r["map_file"] for r in results}
    tables = {k: v for r in results for k, v in r.get("tables", {}).items()}
    plan = client.submit(plan_task, str(root), [map_files[i] for i in sorted(map_files)], spec.target, tables,
                         pure=False, retries=cfg.retries, key="ingest-plan").result()
    keys = plan.get("keys", {})
    if len(keys) > 1:
        total = sum(keys.values())
        second = sorted(keys.values())[-2]
        if second >= MIXED_SHARE * total:
            parts = ", ".join(f"{k} ({v} spectra)" for k, v in sorted(keys.items(), key=lambda kv: -kv[1]))
            raise DistlabelsError(f"the inputs hold spectra on several grids ({parts}) and one store holds one grid: "
                                  "ingest each kind into its own --out store.")
    n_sel = sum(r["n_selected"] for r in results)
    bytes_per_row = max(sum(r["bytes_out"] for r in results) / max(n_sel, 1), 1.0)
    max_rows = cfg.max_rows_per_fragment or max(int(cfg.fragment_mb * 1e6 / bytes_per_row), 1)
    parts = plan_partitions(np.asarray(plan["hist_pix"], np.int64), np.asarray(plan["hist_counts"], np.int64),
                            HIST_ORDER, max_rows)
    pid = plan_id(plan["grid"], map_files, max_rows, parts)
    futures = {client.submit(reduce_partition, str(root), o, p, plan["grid"], map_files, max_rows, pid, pure=False,
                             retries=cfg.retries, key=f"ingest-reduce-{o}-{p}"): (o, p, n) for o, p, n in parts}
    bar = _progress(sum(n for *_, n in parts), "ingest: write", "spec", cfg.progress)
    reduced, failed = [], []
    try:
        for fut in as_completed(list(futures)):
            o, p, n = futures[fut]
            if fut.status == "error":
                failed.append((o, p, fut.exception()))
            else:
                reduced.append(fut.result())
            bar.update(n)
            fut.release()
    finally:
        bar.close()
    if failed:
        o, p, e = failed[0]
        raise DistlabelsError(f"{len(failed)} sky partition(s) could not be written (first: Norder={o} Npix={p}: "
                              f"{type(e).__name__}: {e}); re-run the same command to resume.")
    fragments = sorted(f for r in reduced for f in r["fragments"])
    for stale in set(str(f.relative_to(root)) for f in paths.list_fragments(root)) - set(fragments):
        (root / stale).unlink()
    summary.n_partitions, summary.n_fragments = len(parts), len(fragments)
    summary.n_spectra_written = sum(r["n_rows"] for r in reduced)
    summary.n_duplicates = plan.get("n_duplicates", 0)
    summary.n_stars = plan.get("n_stars", 0)
    q = read_quarantine(root)
    rows_q = q.filter(q.column("row").is_valid()) if q.num_rows else q
    summary.n_spectra_quarantined = rows_q.num_rows
    res_counts: dict[int, int] = {}
    seg_counts: list[dict[int, int]] = []
    for r in reduced:
        for k, v in r["resolution_counts"].items():
            res_counts[int(k)] = res_counts.get(int(k), 0) + v
        for j, d in enumerate(r.get("resolution_segment_counts", [])):
            while len(seg_counts) <= j:
                seg_counts.append({})
            for k, v in d.items():
                seg_counts[j][int(k)] = seg_counts[j].get(int(k), 0) + v
    res_counts = {"all": res_counts, "segments": seg_counts}
    summary.wall_s = time.perf_counter() - t0
    meta = _store_meta(results, plan, spec, summary, res_counts, identity, max_rows, parts)
    write_json_atomic(root / paths.STORE_META, meta)
    shutil.rmtree(paths.ingest_work_dir(root), ignore_errors=True)


def _store_meta(results, plan, spec: IngestSpec, summary: IngestSummary, res_counts, identity, max_rows, parts):
    facts = next(iter(next(r["facts"] for r in results if r["facts"]).values()))
    grid = GridPlan(**{**plan["grid"], "table": tuple(plan["grid"]["table"]) if plan["grid"].get("table") else None})
    wave = grid.wavelength_aa()
    layouts: dict[str, int] = {}
    for r in results:
        for k, v in r["layouts"].items():
            layouts[k] = layouts.get(k, 0) + v
    resolution = median_from_counts(res_counts["all"]) or facts.get("resolution")
    segments = segments_for(wave, tuple(facts["split_aa"]))
    per_seg = [median_from_counts(c) for c in res_counts["segments"] if c]
    per_seg = per_seg if len(per_seg) == len(segments) else None
    grid_desc = {"kind": grid.kind, "n_pix": grid.n_pix}
    if grid.kind == "loglam":
        grid_desc.update(log10_start=(grid.p0 + grid.phase) * grid.step, log10_step=grid.step)
    elif grid.kind == "linear":
        grid_desc.update(start_aa=(grid.p0 + grid.phase) * grid.step, step_aa=grid.step)
    elif grid.kind == "model" and spec.target is not None:
        grid_desc.update(model=spec.target.source, model_weights_sha256=spec.target.sha256)
    norders = sorted({o for o, _, _ in parts})
    return {
        "survey": facts["survey"], "family": facts["family"], "layouts": layouts,
        "wavelength_aa": wave.tolist(), "wavelength_medium": grid.medium, "rv_frame": facts["rv_frame"],
        "velocity_frame": facts["velocity_frame"], "bary_corr_applied": bool(facts["bary_corr_applied"]),
        "resolution": resolution, "resolution_per_segment": per_seg, "resolution_source": facts["resolution_source"],
        "segments": segments, "flux_normalized": bool(facts["flux_normalized"]),
        "grid": grid_desc, "n_spectra": summary.n_spectra_written, "n_stars": summary.n_stars,
        "n_fragments": summary.n_fragments, "n_pix": grid.n_pix, "hats_order": max(norders) if norders else 0,
        "hats_orders": norders, "max_rows_per_fragment": max_rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "format": "distlabels-store/1",
        "ingest": {"identity": identity, "select": spec.select_text, "visits": spec.options.visits,
                   "grid_mode": "model" if spec.target is not None else "native",
                   **{k: getattr(summary, k) for k in ("n_files", "n_files_read", "n_files_quarantined",
                                                       "n_spectra_read", "n_excluded", "n_duplicates",
                                                       "n_spectra_quarantined", "n_stars")},
                   "n_offgrid": plan.get("n_offgrid", 0), "warnings": summary.warnings,
                   "wall_s": round(summary.wall_s, 3),
                   "distlabels_version": __version__, "ingest_flags": {f.name: int(f) for f in _flags()}},
    }


def _flags():
    from ..io.ingest import IngestFlag

    return list(IngestFlag)


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, smoothing=0.1)


__all__ = ["IngestSummary", "run_ingest"]
