"""The graph builder of a fit run: map :func:`fit_partition` over store partitions on Dask.

One task per partition (a row range of a store fragment, sized by ``task_rows`` so that a task
computes for seconds), or on GPUs per pack of consecutive partitions (``pack_rows``: one kernel call
for several fragments' rows, each partition still its own catalog fragment); the model is loaded
once per worker by a ``WorkerPlugin``; every finished partition is written to its own catalog
fragment exactly once under a deterministic name (temporary name and atomic rename on a file
system, one whole-object write plus a completion marker on object storage:
:mod:`distlabels.io.location`), so a re-run processes only what is missing and a retried
or duplicated task cannot duplicate rows. ``_run.json`` records what the catalog was made from
(model sha256, config hash, store manifest) and refuses a re-run with other inputs; it also keeps
per-partition timings and every run's summary. ``_run.log.jsonl`` has one JSON record per finished
or failed partition. A partition that keeps failing after Dask's retries goes to
``_failures.parquet`` (partition, error, attempts) while the others finish.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, paths
from ..catalog.writer import write_catalog_meta
from ..config import FitConfig, RunConfig, config_hash, to_dict
from ..errors import DistlabelsError
from ..fit.registry import check_fit_options
from ..io.location import Location
from ..io.store import Partition, SpectraStore, open_store
from ..models.base import load, read_model_dir
from .cluster import check_gpu_workers, make_client, uses_gpu_workers, wait_for_workers
from .partition import GridSpec
from .runlog import close_run_log, event, open_run_log
from .worker import PLUGIN_NAME, fit_packed_task, fragment_rel, pack_partitions, partition_id, plugin_class, plugin_info

log = logging.getLogger("distlabels.pipeline")


@dataclass
class RunSummary:
    catalog: str
    n_partitions: int
    n_done: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    n_rows_fitted: int = 0
    wall_s: float = 0.0
    fit_s: float = 0.0
    dashboard: str | None = None
    status: str = "running"
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Spectra fitted per second of wall time (whole run, all workers)."""
        return self.n_rows_fitted / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def failures_file(self) -> str:
        return f"{self.catalog.rstrip('/')}/{paths.FAILURES_FILE}"


def _run_identity(model_sha: str, fit_cfg: FitConfig, task_rows: int, store: SpectraStore,
                  manifest_hash: str) -> dict[str, Any]:
    return {"model_sha256": model_sha, "config_hash": config_hash(fit_cfg), "task_rows": int(task_rows),
            "store": str(store.root.resolve()), "store_manifest_sha256": manifest_hash}


def prepare_catalog(catalog: Location | str | os.PathLike, identity: dict[str, Any], overwrite: bool) -> dict:
    """Create the catalog root or check that an existing one was made from the same inputs.

    Returns the previous ``_run.json`` (empty for a new catalog).
    """
    loc = catalog if isinstance(catalog, Location) else Location.parse(catalog)
    if overwrite and loc.exists():
        loc.remove_all()
    previous: dict = {}
    if loc.exists(paths.RUN_FILE):
        try:
            previous = json.loads(loc.read_text(paths.RUN_FILE))
        except json.JSONDecodeError:
            previous = {}
        before = previous.get("identity", {})
        diff = sorted(k for k in identity if before.get(k) != identity[k])
        if diff:
            raise DistlabelsError(f"catalog {loc} was made from other inputs ({', '.join(diff)} differ); "
                                  "use another --out or pass --overwrite.")
    elif not loc.is_empty():
        raise DistlabelsError(f"{loc} exists and is not a distlabels catalog; use another --out or --overwrite.")
    loc.mkdir()
    return previous


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_fit(model_dir: str | os.PathLike, store_path: str | os.PathLike, catalog_path: str | os.PathLike,
            config: RunConfig | None = None, *, client=None, echo: Callable[[str], None] | None = None) -> RunSummary:
    """Fit every spectrum of a store into a catalog on a Dask cluster. Returns a RunSummary.

    catalog_path: a directory, or an fsspec URL (``s3://bucket/catalog``, ``file:///...``).
    client: an existing ``distributed.Client`` (tests, notebooks); otherwise one is made from
    ``config.cluster`` and closed at the end. echo: where status lines go (the dashboard link).
    """
    cfg = config or RunConfig()
    say = echo or (lambda s: None)
    store = open_store(store_path)
    read_model_dir(model_dir)                          # fail fast, with the model's own message
    model = load(model_dir)
    check_fit_options(model.kind, cfg.fit)             # e.g. fit_vsini with a Cannon: refused before any cluster
    grid = GridSpec.from_store_meta(store.meta)
    manifest = store.manifest()
    manifest_hash = SpectraStore.manifest_hash(manifest)
    identity = _run_identity(model.meta["weights_sha256"], cfg.fit, cfg.task_rows, store, manifest_hash)
    loc = Location.parse(catalog_path)
    previous = prepare_catalog(loc, identity, cfg.overwrite)
    parts = store.partitions(cfg.task_rows)
    done = loc.completed()
    todo = [p for p in parts if fragment_rel(p) not in done]
    loc.clean_temps()                                  # leftovers of writers that died; no task runs yet
    provenance = {"model_id": model.model_id, "model_sha256": model.meta["weights_sha256"],
                  "model_path": str(Path(model_dir).resolve()), "store": str(store.root.resolve()),
                  "fit_config": to_dict(cfg.fit), "distlabels_version": __version__}
    run_record = {"identity": identity, "provenance": provenance, "n_partitions": len(parts),
                  "history": list(previous.get("history", [])), "started": _now(), "status": "running",
                  "cluster": cfg.cluster}
    loc.write_json(paths.RUN_FILE, run_record)
    summary = RunSummary(loc.url, len(parts), n_skipped=len(parts) - len(todo))
    logger, handler = open_run_log(loc)
    event(logger, logging.INFO, "run_start", f"{len(todo)} of {len(parts)} partitions to fit",
          n_partitions=len(parts), n_todo=len(todo), cluster=cfg.cluster, catalog=loc.url)
    t0 = time.perf_counter()
    timings: list[dict[str, Any]] = []
    workers: dict[str, Any] = {}
    own = client is None
    cluster = None
    try:
        if todo:
            if own:
                client, cluster = make_client(cfg)
            wait_for_workers(client, cfg, cluster)
            summary.dashboard = getattr(client, "dashboard_link", None)
            say(f"fit: {len(todo)} of {len(parts)} partitions to do ({summary.n_skipped} already in the catalog) "
                f"on {cfg.cluster}; dashboard: {summary.dashboard}")
            event(logger, logging.INFO, "cluster", "cluster ready", dashboard=summary.dashboard)
            workers = _register_model(client, model_dir, cfg)
            if uses_gpu_workers(cfg):
                check_gpu_workers(client)
            timings = _execute(client, todo, store, loc, cfg, grid, provenance, summary, logger)
        summary.status = "failed" if summary.failures else "complete"
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    except BaseException:
        summary.status = "error"
        raise
    finally:
        if own and client is not None:
            client.close()
            if cluster is not None:
                cluster.close()
        summary.wall_s = time.perf_counter() - t0
        summary.fit_s = sum(t.get("fit_s", 0.0) for t in timings)
        _write_failures(loc, summary.failures)
        run = {k: v for k, v in asdict(summary).items() if k != "failures"}
        run.update(started=run_record["started"], finished=_now(), throughput_spectra_per_s=summary.throughput,
                   fit_spectra_per_s_per_worker=(sum(t["n_rows"] for t in timings if not t.get("skipped"))
                                                 / summary.fit_s if summary.fit_s else None))
        run_record.update(status=summary.status, finished=run["finished"], summary=run,
                          throughput_spectra_per_s=summary.throughput, workers=workers, partition_timings=timings)
        run_record["history"].append(run)
        loc.write_json(paths.RUN_FILE, run_record)
        event(logger, logging.INFO if summary.status == "complete" else logging.WARNING, "run_end",
              f"run {summary.status}", status=summary.status, n_done=summary.n_done, n_failed=summary.n_failed,
              n_skipped=summary.n_skipped, wall_s=round(summary.wall_s, 3),
              throughput_spectra_per_s=round(summary.throughput, 3))
        close_run_log(logger, handler)
    _write_meta(loc, model, provenance, store)
    return summary


def _register_model(client, model_dir, cfg: RunConfig) -> dict[str, Any]:
    """Load the model once per worker (also on workers that join later); return each worker's report."""
    plugin = plugin_class()(str(Path(model_dir).resolve()), cfg.device, cfg.threads_per_worker,
                            cfg.gpu_memory_fraction, max_batch=cfg.task_rows)
    client.register_plugin(plugin, name=PLUGIN_NAME)
    infos = client.run(plugin_info)
    errors = sorted({i["error"] for i in infos.values() if i.get("error")})
    if errors:
        raise DistlabelsError(errors[0])
    return infos


def pack_rows_for(cfg: RunConfig) -> int:
    """Rows per packed task: ``cfg.pack_rows``, or by default ``task_rows`` with GPU workers, 0 (no packing) on CPUs."""
    if cfg.pack_rows is not None:
        return max(int(cfg.pack_rows), 0)
    return int(cfg.task_rows) if uses_gpu_workers(cfg) else 0


def _execute(client, todo: list[Partition], store: SpectraStore, loc: Location, cfg: RunConfig,
             grid: GridSpec, provenance: dict[str, Any], summary: RunSummary, logger) -> list[dict[str, Any]]:
    """Submit one task per partition, or per pack of consecutive partitions (GPU runs), stream results with
    as_completed, record failures; return timings. A pack that fails after its retries is submitted
    again one partition per task, so that one bad partition cannot take its pack mates down."""
    import dask
    from distributed import as_completed

    resources = {"GPU": 1} if uses_gpu_workers(cfg) else None
    grid_f = client.scatter(grid, broadcast=True)
    token = os.urandom(4).hex()
    pack = pack_rows_for(cfg)
    groups = pack_partitions(todo, pack) if pack else [[p] for p in todo]
    kw = dict(store_root=str(store.root.resolve()), catalog_url=loc.url, config=cfg.fit, grid=grid_f,
              provenance=provenance, retries=cfg.retries, resources=resources, pure=False)
    futures = client.map(fit_packed_task, groups, key=[f"fit-{partition_id(g[0])}-x{len(g)}-{token}" for g in groups],
                         **kw)
    by_key = {f.key: g for f, g in zip(futures, groups)}
    killed_attempts = int(dask.config.get("distributed.scheduler.allowed-failures", 3)) + 1
    timings = []
    bar = _progress(sum(p.n_rows for p in todo), cfg.progress)
    done = as_completed(futures)
    try:
        for fut in done:
            group = by_key[fut.key]
            if fut.status == "cancelled":             # the scheduler was lost or restarted under us
                raise DistlabelsError(f"the Dask cluster dropped partition {partition_id(group[0])} (scheduler lost or "
                                      "restarted); finished partitions are kept, re-run the same command to resume.")
            if fut.status == "error" and len(group) > 1:
                exc = fut.exception()
                event(logger, logging.WARNING, "pack_failed", f"a pack of {len(group)} partitions failed; "
                      "fitting them one per task", partitions=[partition_id(p) for p in group], error=_one_line(exc))
                for part in group:
                    f = client.submit(fit_packed_task, [part], key=f"fit-{partition_id(part)}-alone-{token}", **kw)
                    by_key[f.key] = [part]
                    futures.append(f)
                    done.add(f)
                fut.release()
                continue
            if fut.status == "error":
                part = group[0]
                exc = fut.exception()
                attempts = killed_attempts if type(exc).__name__ == "KilledWorker" else cfg.retries + 1
                error = _one_line(exc)
                summary.n_failed += 1
                summary.failures.append({"partition": partition_id(part), "fragment": part.fragment,
                                         "row_start": part.row_start, "row_stop": part.row_stop,
                                         "error": error, "attempts": attempts})
                event(logger, logging.ERROR, "partition_failed", f"partition {partition_id(part)} failed",
                      partition=partition_id(part),
                      fragment=part.fragment, row_start=part.row_start, row_stop=part.row_stop, error=error,
                      attempts=attempts)
            else:
                for res in fut.result():
                    timings.append(res)
                    if res.get("skipped"):
                        summary.n_skipped += 1
                    else:
                        summary.n_done += 1
                        summary.n_rows_fitted += res["n_rows"]
                    event(logger, logging.INFO, "partition_done", f"partition {res['partition']} done", **res)
            bar.update(sum(p.n_rows for p in group))
            fut.release()
    finally:
        bar.close()
        pending = [f for f in futures if not f.done()]
        if pending:                                   # interrupted: stop the cluster's work now
            client.cancel(pending)
    return timings


def _one_line(exc: BaseException) -> str:
    """An exception as one line of at most 2,000 characters (for the run log and _failures.parquet)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]


def _write_failures(loc: Location, failures: list[dict[str, Any]]) -> None:
    if failures:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(failures), buf)
        loc.write_bytes(paths.FAILURES_FILE, buf.getvalue())
    elif loc.exists(paths.FAILURES_FILE):
        loc.remove(paths.FAILURES_FILE)


def _write_meta(loc: Location, model, provenance: dict[str, Any], store: SpectraStore) -> None:
    meta = {"label_names": list(model.label_names), "model_id": model.model_id, "provenance": provenance,
            "store_meta": {k: v for k, v in store.meta.items() if k != "wavelength_aa"}}
    local = loc.local_path()
    if local is not None:
        write_catalog_meta(local, meta)
        return
    # Object storage: the same description, counts from the fragments' footers.
    frags = sorted(loc.completed())
    meta.update(n_rows=sum(loc.parquet_rows(f) for f in frags), n_fragments=len(frags),
                format="distlabels-catalog/1", updated=_now())
    loc.write_json(paths.CATALOG_META, meta)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="spec", desc="fit", disable=not enabled, smoothing=0.1)


__all__ = ["RunSummary", "pack_rows_for", "prepare_catalog", "run_fit"]
