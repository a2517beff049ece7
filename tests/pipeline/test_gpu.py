"""--cluster local-cuda on real GPUs: one worker per GPU, each on its own device, batches sized
from the device's free memory, every star exactly once. Skipped on machines without a GPU or
without dask-cuda (then test_cluster.py checks the one-sentence errors instead)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from distlabels.pipeline import run_fit
from distlabels.pipeline.verify import verify_catalog
from tests.pipeline.conftest import cheap_run

HAS_DRIVER = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
pytestmark = [
    pytest.mark.skipif(not HAS_DRIVER, reason="no NVIDIA GPU on this machine"),
    pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is None,
                       reason="dask-cuda is not installed (pip install 'distlabels[gpu]')"),
]


def _n_gpus() -> int:
    import pynvml       # NVML, not CUDA: no context in this (client) process

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def test_local_cuda_run_one_worker_per_gpu(tmp_path, bossbrain_model_dir, small_store):
    import json

    import torch

    from distlabels import paths

    n_gpu = _n_gpus()
    # Other CUDA tests of this session (tests/fit, tests/train) may already have made a context in
    # this process; the check at the end can only speak for run_fit when none existed before.
    had_context = torch.cuda.is_initialized()
    out = tmp_path / "cat"
    # Packs of three 4-row partitions: one kernel call each, written back to one fragment per partition.
    s = run_fit(bossbrain_model_dir, small_store, out, cheap_run(cluster="local-cuda", device="cuda", pack_rows=12))
    assert s.status == "complete" and s.n_failed == 0
    rep = verify_catalog(str(out), str(small_store))
    assert rep.ok, rep.problems
    run = json.loads((out / paths.RUN_FILE).read_text())
    workers = list(run["workers"].values())
    assert len(workers) == n_gpu
    assert all(w["device"] == "cuda:0" and not w["error"] for w in workers)
    # Each worker's own GPU is device 0 of its rotated CUDA_VISIBLE_DEVICES: all different GPUs.
    assert len({w["cuda_visible_devices"].split(",")[0] for w in workers}) == n_gpu
    assert len({w["gpu_uuid"] for w in workers}) == n_gpu
    # Batches were sized from free memory (capped by the task size), not the CPU default.
    assert all(t["device"] == "cuda:0" for t in run["partition_timings"] if not t.get("skipped"))
    assert max(t.get("packed_with", 1) for t in run["partition_timings"]) > 1
    assert all(w["batch_size"] == cheap_run().task_rows for w in workers if "batch_size" in w)
    # The client process itself never made a CUDA context (run this file alone to check it).
    if not had_context:
        assert not torch.cuda.is_initialized()


def test_gpu_fit_matches_cpu_fit(bossbrain_model, small_mock):
    """The same kernel on the GPU gives the CPU's labels to well within their errors."""
    import numpy as np

    from distlabels.config import FitConfig
    from distlabels.pipeline.partition import GridSpec, fit_partition

    table, meta = small_mock
    grid = GridSpec.from_store_meta(meta)
    cfg = FitConfig()
    cpu = fit_partition(table.slice(0, 16), bossbrain_model, cfg, grid, "cpu")
    gpu = fit_partition(table.slice(0, 16), bossbrain_model, cfg, grid, "cuda:0")
    for name in ("teff", "logg", "mh", "rv"):
        a, b = cpu.column(name).to_numpy(), gpu.column(name).to_numpy()
        err = cpu.column(f"{name}_err").to_numpy()
        ok = np.isfinite(a) & np.isfinite(b)
        assert ok.mean() > 0.9
        assert np.all(np.abs(a[ok] - b[ok]) < 0.1 * err[ok] + 1e-3), name
