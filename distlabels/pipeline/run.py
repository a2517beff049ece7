"""The graph builder of a fit run: map :func:`fit_partition` over store partitions on Dask.

One task per partition (a row range of a store fragment, sized by ``task_rows`` so that a task
computes for seconds); the model is loaded once per worker by a ``WorkerPlugin``; every finished
task writes its own catalog fragment atomically under a deterministic name, so a re-run skips what
exists and a retried task cannot duplicate rows. ``_run.json`` records what the catalog was made
from (model sha256, config hash, store manifest) and refuses a re-run with other inputs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, paths
from ..catalog.writer import fragment_done, write_catalog_fragment, write_catalog_meta
from ..config import FitConfig, RunConfig, config_hash, to_dict
from ..errors import DistlabelsError
from ..io.store import Partition, SpectraStore, open_store, write_json_atomic
from ..models.base import load, read_model_dir
from .cluster import make_client
from .partition import GridSpec, fit_partition

log = logging.getLogger("distlabels.pipeline")
PLUGIN_NAME = "distlabels-model"


class ModelPlugin:
    """Dask WorkerPlugin: load the model once per worker process, set torch's thread count.

    Dask's nanny sets OMP_NUM_THREADS=1; torch must be told explicitly how many threads the
    worker's slot owns, else it would oversubscribe the cores shared with other workers.
    """

    name = PLUGIN_NAME

    def __init__(self, model_dir: str, device: str, threads: int):
        self.model_dir, self.device_request, self.threads = model_dir, device, threads
        self.model = None
        self.device = "cpu"

    def setup(self, worker=None):
        import torch

        torch.set_num_threads(max(int(self.threads), 1))
        if self.device_request == "cuda" or (self.device_request == "auto" and torch.cuda.is_available()):
            self.device = "cuda"
        self.model = load(self.model_dir)

    def teardown(self, worker=None):
        self.model = None


def _plugin_class():
    """ModelPlugin as a real distributed.WorkerPlugin subclass (distributed imported lazily)."""
    from distributed import WorkerPlugin

    return type("DistlabelsModelPlugin", (ModelPlugin, WorkerPlugin), {})


def fit_task(part: Partition, store_root: str, catalog_root: str, config: FitConfig, grid: GridSpec,
             provenance: dict[str, Any]) -> dict[str, Any]:
    """One task: read a partition, fit it, write its catalog fragment (skipped if already there)."""
    from distributed import get_worker

    if fragment_done(catalog_root, part.norder, part.npix, part.name):  # own file, or merged by compact
        return {"partition": part.name, "n_rows": part.n_rows, "skipped": True}
    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    t0 = time.perf_counter()
    table = pq.read_table(Path(store_root) / part.fragment).slice(part.row_start, part.n_rows)
    t1 = time.perf_counter()
    out = fit_partition(table, plugin.model, config, grid, plugin.device)
    t2 = time.perf_counter()
    write_catalog_fragment(catalog_root, part.norder, part.npix, part.name, out, provenance)
    t3 = time.perf_counter()
    return {"partition": part.name, "n_rows": part.n_rows, "skipped": False, "read_s": t1 - t0,
            "fit_s": t2 - t1, "write_s": t3 - t2, "worker": worker.address}


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
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Spectra fitted per second of wall time (whole run, all workers)."""
        return self.n_rows_fitted / self.wall_s if self.wall_s > 0 else 0.0


def _run_identity(model_sha: str, fit_cfg: FitConfig, task_rows: int, store: SpectraStore,
                  manifest_hash: str) -> dict[str, Any]:
    return {"model_sha256": model_sha, "config_hash": config_hash(fit_cfg), "task_rows": int(task_rows),
            "store": str(store.root.resolve()), "store_manifest_sha256": manifest_hash}


def prepare_catalog(catalog: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Create the catalog root or check that an existing one was made from the same inputs."""
    run_file = catalog / paths.RUN_FILE
    if catalog.exists() and overwrite:
        shutil.rmtree(catalog)
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text()).get("identity", {})
        except json.JSONDecodeError:
            previous = {}
        diff = sorted(k for k in identity if previous.get(k) != identity[k])
        if diff:
            raise DistlabelsError(f"catalog {catalog} was made from other inputs ({', '.join(diff)} differ); "
                                  "use another --out or pass --overwrite.")
    elif catalog.exists() and any(catalog.iterdir()):
        raise DistlabelsError(f"{catalog} exists and is not a distlabels catalog; use another --out or --overwrite.")
    catalog.mkdir(parents=True, exist_ok=True)


def run_fit(model_dir: str | os.PathLike, store_path: str | os.PathLike, catalog_path: str | os.PathLike,
            config: RunConfig | None = None, *, client=None) -> RunSummary:
    """Fit every spectrum of a store into a catalog on a Dask cluster. Returns a RunSummary.

    client: an existing ``distributed.Client`` (tests, notebooks); otherwise one is made from
    ``config.cluster`` and closed at the end.
    """
    cfg = config or RunConfig()
    store = open_store(store_path)
    meta, _ = read_model_dir(model_dir)               # fail fast, with the model's own message
    model = load(model_dir)
    grid = GridSpec.from_store_meta(store.meta)
    manifest = store.manifest()
    manifest_hash = SpectraStore.manifest_hash(manifest)
    identity = _run_identity(model.meta["weights_sha256"], cfg.fit, cfg.task_rows, store, manifest_hash)
    catalog = Path(catalog_path)
    prepare_catalog(catalog, identity, cfg.overwrite)
    parts = store.partitions(cfg.task_rows)
    todo = [p for p in parts if not fragment_done(catalog, p.norder, p.npix, p.name)]
    provenance = {"model_id": model.model_id, "model_sha256": model.meta["weights_sha256"],
                  "model_path": str(Path(model_dir).resolve()), "store": str(store.root.resolve()),
                  "fit_config": to_dict(cfg.fit), "distlabels_version": __version__}
    run_record = {"identity": identity, "provenance": provenance, "n_partitions": len(parts),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(catalog / paths.RUN_FILE, run_record)
    summary = RunSummary(str(catalog), len(parts), n_skipped=len(parts) - len(todo))
    t0 = time.perf_counter()
    timings: list[dict[str, Any]] = []
    if todo:
        own = client is None
        cluster = None
        if own:
            client, cluster = make_client(cfg)
        try:
            summary.dashboard = getattr(client, "dashboard_link", None)
            client.register_plugin(_plugin_class()(str(Path(model_dir).resolve()), cfg.device, cfg.threads_per_worker),
                                   name=PLUGIN_NAME)
            timings = _execute(client, todo, store, catalog, cfg, grid, provenance, summary)
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
    summary.wall_s = time.perf_counter() - t0
    summary.fit_s = sum(t.get("fit_s", 0.0) for t in timings)
    if summary.failures:
        pq.write_table(pa.Table.from_pylist(summary.failures), catalog / paths.FAILURES_FILE)
    elif (catalog / paths.FAILURES_FILE).exists():
        (catalog / paths.FAILURES_FILE).unlink()
    label_names = list(model.label_names)
    write_catalog_meta(catalog, {"label_names": label_names, "model_id": model.model_id,
                                 "provenance": provenance, "store_meta": {k: v for k, v in store.meta.items()
                                                                          if k != "wavelength_aa"}})
    run_record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      summary={k: v for k, v in asdict(summary).items() if k != "failures"},
                      throughput_spectra_per_s=summary.throughput, partition_timings=timings)
    write_json_atomic(catalog / paths.RUN_FILE, run_record)
    return summary


def _execute(client, todo: list[Partition], store: SpectraStore, catalog: Path, cfg: RunConfig,
             grid: GridSpec, provenance: dict[str, Any], summary: RunSummary) -> list[dict[str, Any]]:
    """Submit the tasks, stream results with as_completed, record failures; return timings."""
    from distributed import as_completed

    resources = {"GPU": 1} if cfg.device == "cuda" and cfg.cluster != "local" else None
    grid_f = client.scatter(grid, broadcast=True)
    futures = {}
    for p in todo:
        f = client.submit(fit_task, p, str(store.root), str(catalog), cfg.fit, grid_f, provenance,
                          retries=cfg.retries, resources=resources, pure=False)
        futures[f] = p
    timings = []
    bar = _progress(sum(p.n_rows for p in todo), cfg.progress)
    try:
        for fut in as_completed(list(futures)):
            part = futures[fut]
            if fut.status == "error":
                exc = fut.exception()
                summary.n_failed += 1
                summary.failures.append({"partition": part.fragment, "row_start": part.row_start,
                                         "row_stop": part.row_stop, "error": f"{type(exc).__name__}: {exc}",
                                         "attempts": cfg.retries + 1})
                log.error("partition %s rows %d-%d failed: %s", part.fragment, part.row_start, part.row_stop, exc)
            else:
                res = fut.result()
                timings.append(res)
                if res.get("skipped"):
                    summary.n_skipped += 1
                else:
                    summary.n_done += 1
                    summary.n_rows_fitted += res["n_rows"]
            bar.update(part.n_rows)
            fut.release()
    finally:
        bar.close()
    return timings


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="spec", desc="fit", disable=not enabled, smoothing=0.1)
