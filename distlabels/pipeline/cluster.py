"""Dask clusters behind one switch: ``local`` (CPU LocalCluster, the default), ``local-cuda``
(one worker per GPU, dask-cuda, optional) or the address of a running scheduler."""
from __future__ import annotations

import logging
import os

from ..config import RunConfig
from ..errors import DistlabelsError


def make_client(cfg: RunConfig):
    """(client, cluster or None) for ``cfg.cluster``. The caller closes both."""
    from distributed import Client, LocalCluster

    kind = cfg.cluster
    if kind == "local":
        n = cfg.workers or max((os.cpu_count() or 1) // max(cfg.threads_per_worker, 1), 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        return Client(cluster), cluster
    if kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise DistlabelsError("--cluster local-cuda needs dask-cuda: pip install 'distlabels[gpu]'.") from None
        try:
            cluster = LocalCUDACluster(n_workers=cfg.workers, threads_per_worker=1, dashboard_address=":0",
                                       silence_logs=logging.ERROR, resources={"GPU": 1})
        except Exception as e:  # NVML missing, no driver, no device: one sentence, not a traceback
            raise DistlabelsError(f"--cluster local-cuda found no usable GPU ({type(e).__name__}: {e}).") from None
        return Client(cluster), cluster
    if "://" in kind or ":" in kind:
        try:
            return Client(kind, timeout="20s"), None
        except (OSError, TimeoutError) as e:
            raise DistlabelsError(f"could not connect to the Dask scheduler at {kind} ({e}).") from None
    raise DistlabelsError(f"unknown --cluster {kind!r}: use local, local-cuda or a scheduler address like tcp://host:8786.")
