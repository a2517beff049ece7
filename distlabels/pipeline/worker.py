"""What runs on a Dask worker: the model plugin and the per-partition task.

``ModelPlugin`` (a ``distributed.WorkerPlugin``) loads the model once per worker process, sets
torch's thread count (Dask's nanny sets OMP_NUM_THREADS=1, so torch must be told how many threads
the worker's slot owns), picks the device (``cuda:0`` on a dask-cuda worker: its rotated
``CUDA_VISIBLE_DEVICES`` makes its own GPU device 0) and sizes kernel batches from the GPU's free
memory. ``fit_packed_task`` reads one or more partitions, fits them with :func:`fit_partition` in one
kernel call (GPU runs pack several: store fragments hold a few thousand rows, a GPU wants tens of
thousands per batch) and writes each partition's catalog fragment exactly once (see
:mod:`distlabels.io.location`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..catalog.writer import write_catalog_fragment
from ..config import FitConfig
from ..io.location import Location
from ..io.store import Partition
from ..models.base import load
from .partition import GridSpec, fit_partition
from .resources import BatchShape, batch_size_for_memory, bytes_per_star

PLUGIN_NAME = "distlabels-model"


class ModelPlugin:
    """Dask WorkerPlugin: load the model once per worker process, set threads and device."""

    name = PLUGIN_NAME

    def __init__(self, model_dir: str, device: str, threads: int, gpu_memory_fraction: float = 0.5,
                 max_batch: int | None = None):
        self.model_dir, self.device_request, self.threads = model_dir, device, threads
        self.gpu_memory_fraction, self.max_batch = gpu_memory_fraction, max_batch
        self.model = None
        self.device = "cpu"
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self._configs: dict[tuple, FitConfig] = {}

    def setup(self, worker=None):
        import torch

        torch.set_num_threads(max(int(self.threads), 1))
        has_cuda = torch.cuda.is_available()        # on the worker, never in the client
        if self.device_request == "cuda" and not has_cuda:
            self.error = (f"--device cuda, but worker {getattr(worker, 'address', '?')} sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}).")
        if has_cuda and self.device_request in ("cuda", "auto"):
            torch.cuda.set_device(0)
            self.device = "cuda:0"
        try:
            self.model = load(self.model_dir)
        except Exception as e:       # reported by the client as one sentence, not a worker traceback
            self.error = (f"worker {getattr(worker, 'address', '?')} could not load the model {self.model_dir} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); is it on a path every worker sees?")
        self.info = {"pid": os.getpid(), "device": self.device, "torch_threads": torch.get_num_threads(),
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(0)
            self.info.update(gpu_name=props.name, gpu_uuid=str(getattr(props, "uuid", "")),
                             gpu_total_bytes=int(props.total_memory))

    def teardown(self, worker=None):
        self.model = None
        self._configs.clear()

    def config_for(self, config: FitConfig, grid: GridSpec) -> FitConfig:
        """``config`` with its batch size fitted to this worker's GPU (CPU: unchanged).

        Measured once per (grid, config) on the worker, before the first batch allocates anything,
        so that torch's cached blocks are not mistaken for memory in use by others.
        """
        if not self.device.startswith("cuda"):
            return config
        key = (grid.key, config)
        if key not in self._configs:
            import torch

            free, _total = torch.cuda.mem_get_info(0)
            per_star = bytes_per_star(batch_shape(self.model, grid, config))
            bs = batch_size_for_memory(free, per_star, fraction=self.gpu_memory_fraction, max_batch=self.max_batch)
            self._configs[key] = dataclasses.replace(config, batch_size=bs)
            self.info["batch_size"] = bs
        return self._configs[key]


def batch_shape(model, grid: GridSpec, config: FitConfig) -> BatchShape:
    """The sizes that set one star's memory, read from the model, the grid and the fit config."""
    weights = [p for p in model.parameters() if p.ndim == 2]
    hidden = tuple(int(w.shape[0]) for w in weights[:-1])          # the last layer maps to model pixels
    n_seg = len(grid.segments) if grid.segments else 1
    n_cont = (config.continuum_degree + 1) * n_seg if config.continuum_degree >= 0 else 0
    dtype_bytes = weights[0].element_size() if weights else 4
    return BatchShape(n_pix=len(grid.wavelength_aa), n_labels=int(model.n_labels), n_cont=n_cont, hidden=hidden,
                      oversample=config.oversample, dtype_bytes=dtype_bytes)


def plugin_class():
    """ModelPlugin as a real distributed.WorkerPlugin subclass (distributed imported lazily)."""
    from distributed import WorkerPlugin

    return type("DistlabelsModelPlugin", (ModelPlugin, WorkerPlugin), {})


def plugin_info(dask_worker) -> dict[str, Any]:
    """Run on every worker by ``client.run``: the plugin's device report (or its error)."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        return {"error": "model plugin not registered"}
    return {**plugin.info, "error": plugin.error}


def fragment_rel(part: Partition) -> str:
    """The catalog fragment of a partition, relative to the catalog root (deterministic)."""
    return paths.fragment_path("", part.norder, part.npix, part.name).as_posix()


def partition_id(part: Partition) -> str:
    """A partition's name, unique in the run: ``Norder=K/Npix=N/<fragment stem>-r<row_start>``."""
    return f"Norder={part.norder}/Npix={part.npix}/{part.name}"


def read_rows(store_root: str, part: Partition) -> pa.Table:
    """Rows [row_start, row_stop) of a store fragment, reading only the row groups that hold them."""
    pf = pq.ParquetFile(Path(store_root) / part.fragment)
    md = pf.metadata
    groups, first, start = [], None, 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if start < part.row_stop and start + n > part.row_start:
            groups.append(i)
            first = start if first is None else first
        start += n
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(part.row_start - first, part.n_rows)


def fit_packed_task(parts: list[Partition], store_root: str, catalog_url: str, config: FitConfig, grid: GridSpec,
                    provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """Partitions fitted in one kernel call (a GPU batch from several store fragments), each written to
    its own catalog fragment exactly once (those already complete are skipped). One record each."""
    import json

    from distributed import get_worker

    loc = Location.cached(catalog_url)
    records: list[dict[str, Any]] = []
    todo = []
    for part in parts:
        if loc.is_complete(fragment_rel(part)):
            records.append({"partition": partition_id(part), "fragment": part.fragment, "n_rows": part.n_rows,
                            "skipped": True})
        else:
            todo.append(part)
    if not todo:
        return records
    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    if plugin.error:
        raise RuntimeError(plugin.error)
    cfg = plugin.config_for(config, grid)
    t0 = time.perf_counter()
    tables = [read_rows(store_root, part) for part in todo]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    t1 = time.perf_counter()
    out = fit_partition(table, plugin.model, cfg, grid, plugin.device)
    t2 = time.perf_counter()
    start = 0
    for part, piece in zip(todo, tables):
        rows = out.slice(start, piece.num_rows)
        start += piece.num_rows
        tw = time.perf_counter()
        if loc.is_url:
            loc.write_table(fragment_rel(part), rows, {"distlabels": json.dumps(provenance, default=str)})
        else:   # temp name + fsync + atomic rename, through the catalog's own writer
            write_catalog_fragment(loc.path, part.norder, part.npix, part.name, rows, provenance)
        share = piece.num_rows / max(table.num_rows, 1)        # a packed task's read and fit time, by rows
        records.append({"partition": partition_id(part), "fragment": part.fragment, "row_start": part.row_start,
                        "n_rows": part.n_rows, "skipped": False, "read_s": (t1 - t0) * share,
                        "fit_s": (t2 - t1) * share, "write_s": time.perf_counter() - tw,
                        "fit_spectra_per_s": table.num_rows / (t2 - t1) if t2 > t1 else None,
                        "worker": worker.address, "device": plugin.device, "batch_size": cfg.batch_size,
                        "packed_with": len(todo)})
    return records


def pack_partitions(parts: list[Partition], max_rows: int) -> list[list[Partition]]:
    """Consecutive partitions in groups of at most ``max_rows`` rows (a partition larger than that alone)."""
    groups: list[list[Partition]] = []
    rows = 0
    for part in parts:
        if groups and rows + part.n_rows <= max_rows:
            groups[-1].append(part)
            rows += part.n_rows
        else:
            groups.append([part])
            rows = part.n_rows
    return groups


__all__ = ["ModelPlugin", "PLUGIN_NAME", "batch_shape", "fit_packed_task", "fragment_rel", "pack_partitions",
           "partition_id", "plugin_class", "plugin_info", "read_rows"]
