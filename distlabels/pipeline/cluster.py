"""Dask clusters behind one switch (``--cluster``):

- ``local``: a CPU LocalCluster on this machine (the default).
- ``local-cuda``: dask-cuda's LocalCUDACluster, one worker per GPU. Each worker gets a rotated
  ``CUDA_VISIBLE_DEVICES``, so its own GPU is ``cuda:0``; no RMM pool is made, torch's caching
  allocator is in charge of device memory (an RMM pool would compete with it for the same memory).
  Nothing here touches CUDA: a CUDA context made in the client before the workers start would put
  every worker's model on GPU 0.
- ``k8s``: dask-kubernetes' operator ``KubeCluster`` from a DaskCluster manifest (``configs/``).
- ``env``: the scheduler named by ``$DASK_SCHEDULER_ADDRESS`` (what a DaskJob's job pod receives).
- ``tcp://host:8786`` (or ``host:8786``): an existing scheduler (``dask scheduler`` + ``dask cuda worker``).

Every failure to get a cluster is one sentence (:class:`DistlabelsError`), never a traceback.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import RunConfig, load_yaml
from ..errors import DistlabelsError

DEFAULT_K8S_SPEC = "configs/k8s-cluster.yaml"
KINDS = ("local", "local-cuda", "k8s", "env")


def is_address(kind: str) -> bool:
    return "://" in kind or (":" in kind and kind not in KINDS)


def uses_gpu_workers(cfg: RunConfig) -> bool:
    """Tasks carry resources={"GPU": 1}: on local-cuda, and on remote clusters asked for --device cuda."""
    return cfg.cluster == "local-cuda" or (cfg.device == "cuda" and cfg.cluster != "local")


def make_client(cfg: RunConfig):
    """(client, cluster or None) for ``cfg.cluster``. The caller closes both."""
    from distributed import Client

    kind = cfg.cluster
    if kind == "local":
        return _local(cfg)
    if kind == "local-cuda":
        cluster = local_cuda_cluster(cfg)
        return Client(cluster), cluster
    if kind == "k8s":
        cluster = k8s_cluster(cfg)
        return Client(cluster), cluster
    if kind == "env":
        address = os.environ.get("DASK_SCHEDULER_ADDRESS", "").strip()
        if not address:
            raise DistlabelsError("--cluster env needs the scheduler address in $DASK_SCHEDULER_ADDRESS "
                                  "(a DaskJob sets it for its job pod).")
        return _connect(address, cfg), None
    if is_address(kind):
        return _connect(kind, cfg), None
    raise DistlabelsError(f"unknown --cluster {kind!r}: use local, local-cuda, k8s, env or a scheduler address "
                          "like tcp://host:8786.")


def _local(cfg: RunConfig):
    from distributed import Client, LocalCluster

    n = cfg.workers or max((os.cpu_count() or 1) // max(cfg.threads_per_worker, 1), 1)
    cluster = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    return Client(cluster), cluster


def local_cuda_cluster(cfg: RunConfig):
    """One dask-cuda worker per GPU, each advertising resources={"GPU": 1}, no RMM pool."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise DistlabelsError("--cluster local-cuda needs dask-cuda, which is not installed: "
                              "pip install 'distlabels[gpu]'.") from None
    try:
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=cfg.cuda_visible_devices, n_workers=cfg.workers,
                                threads_per_worker=1, rmm_pool_size=None, dashboard_address=":0",
                                silence_logs=logging.ERROR, resources={"GPU": 1})
    except Exception as e:  # NVML missing, no driver, no device: one sentence, not a traceback
        raise DistlabelsError(f"--cluster local-cuda found no usable GPU on this machine ({_why(e)}); "
                              "use --cluster local to run on CPU.") from None


def load_k8s_spec(path: str | None) -> dict:
    """The DaskCluster manifest for ``--cluster k8s``, checked for the fields KubeCluster needs."""
    p = Path(path or DEFAULT_K8S_SPEC)
    if not p.is_file():
        raise DistlabelsError(f"--cluster k8s needs a DaskCluster manifest: {p} does not exist (pass --k8s-spec).")
    spec = load_yaml(p)
    if spec.get("kind") != "DaskCluster" or not spec.get("metadata", {}).get("name"):
        raise DistlabelsError(f"{p} is not a DaskCluster manifest with metadata.name (see {DEFAULT_K8S_SPEC}).")
    return spec


def k8s_cluster(cfg: RunConfig):
    """A DaskCluster made by the dask-kubernetes operator from ``cfg.k8s_spec``."""
    spec = load_k8s_spec(cfg.k8s_spec)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise DistlabelsError("--cluster k8s needs dask-kubernetes, which is not installed: "
                              "pip install 'distlabels[k8s]'.") from None
    name = spec["metadata"]["name"]
    namespace = cfg.k8s_namespace or spec["metadata"].get("namespace")
    try:
        return KubeCluster(custom_cluster_spec=spec, namespace=namespace, shutdown_on_close=True, quiet=True)
    except Exception as e:
        # The half-made cluster registered itself for an at-exit teardown that would print a traceback.
        for c in list(KubeCluster._instances):
            if getattr(c, "name", None) == name:
                KubeCluster._instances.discard(c)
        raise DistlabelsError(f"--cluster k8s could not create the Dask cluster {name!r} ({_why(e)}); "
                              "check kubectl access and that the dask operator is installed.") from None


def _connect(address: str, cfg: RunConfig):
    from distributed import Client

    try:
        return Client(address, timeout=f"{cfg.connect_timeout_s}s")
    except (OSError, TimeoutError) as e:
        raise DistlabelsError(f"could not connect to the Dask scheduler at {address} ({_why(e)}).") from None


def wait_for_workers(client, cfg: RunConfig, cluster) -> None:
    """Remote clusters start empty (pods pulling images): wait for one worker, with a clear timeout."""
    if cfg.cluster == "local":
        return
    try:
        client.wait_for_workers(1, timeout=cfg.wait_for_workers_s)
    except TimeoutError:
        raise DistlabelsError(f"no Dask worker joined {cfg.cluster} within {cfg.wait_for_workers_s:.0f} s; "
                              "check the workers' pods or logs.") from None


def check_gpu_workers(client) -> None:
    """Tasks that need resources={"GPU": 1} would wait forever if no worker advertises that resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise DistlabelsError("GPU tasks need workers started with --resources GPU=1 (dask cuda worker "
                              "--resources GPU=1), but no worker of this cluster advertises it.")


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:200]}"


__all__ = ["KINDS", "check_gpu_workers", "is_address", "k8s_cluster", "load_k8s_spec", "local_cuda_cluster",
           "make_client", "uses_gpu_workers", "wait_for_workers"]
