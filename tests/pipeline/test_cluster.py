"""The --cluster backends: every way of not getting a cluster is one sentence, never a traceback."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from distlabels.config import RunConfig
from distlabels.errors import DistlabelsError
from distlabels.pipeline.cluster import check_gpu_workers, load_k8s_spec, make_client, uses_gpu_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_sentence(msg: str):
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg


def _gpu_present() -> bool:
    """Whether this machine has an NVIDIA driver, asked without touching CUDA in this process."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def test_local_cuda_without_dask_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)          # import dask_cuda -> ImportError
    with pytest.raises(DistlabelsError) as e:
        make_client(RunConfig(cluster="local-cuda"))
    assert "needs dask-cuda" in str(e.value) and "pip install 'distlabels[gpu]'" in str(e.value)
    _one_sentence(str(e.value))


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is None,
                    reason="dask-cuda is not installed (pip install 'distlabels[gpu]'): the no-GPU sentence "
                           "comes from LocalCUDACluster itself")
def test_local_cuda_without_a_gpu():
    if _gpu_present():
        pytest.skip("this machine has a GPU: see test_gpu.py")
    with pytest.raises(DistlabelsError) as e:
        make_client(RunConfig(cluster="local-cuda"))
    assert "found no usable GPU" in str(e.value) and "--cluster local" in str(e.value)
    _one_sentence(str(e.value))


def test_k8s_without_dask_kubernetes(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(DistlabelsError) as e:
        make_client(RunConfig(cluster="k8s", k8s_spec=os.path.join(REPO, "configs", "k8s-cluster.yaml")))
    assert "needs dask-kubernetes" in str(e.value)
    _one_sentence(str(e.value))


@pytest.mark.skipif(importlib.util.find_spec("dask_kubernetes") is None, reason="dask-kubernetes not installed")
def test_k8s_without_a_kubernetes_api_is_one_line(tmp_path, bossbrain_model_dir, mock_store):
    """No kubeconfig, no in-cluster service account: the CLI says so on one line and exits non-zero."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "no-kubeconfig"), HOME=str(tmp_path), PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "distlabels", "fit", "--cluster", "k8s", "--k8s-spec",
                           os.path.join(REPO, "configs", "k8s-cluster.yaml"), "--model", str(bossbrain_model_dir),
                           "--spectra", str(mock_store), "--out", str(tmp_path / "cat"), "--no-progress"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("distlabels: error: --cluster k8s could not create the Dask cluster")


def test_k8s_spec_must_be_a_daskcluster(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: x}\n")
    with pytest.raises(DistlabelsError, match="not a DaskCluster manifest"):
        load_k8s_spec(str(bad))
    with pytest.raises(DistlabelsError, match="does not exist"):
        load_k8s_spec(str(tmp_path / "missing.yaml"))


def test_env_and_unknown_and_unreachable(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(DistlabelsError, match=r"\$DASK_SCHEDULER_ADDRESS"):
        make_client(RunConfig(cluster="env"))
    with pytest.raises(DistlabelsError, match="unknown --cluster 'bogus'"):
        make_client(RunConfig(cluster="bogus"))
    with pytest.raises(DistlabelsError, match="could not connect to the Dask scheduler at tcp://127.0.0.1:9"):
        make_client(RunConfig(cluster="tcp://127.0.0.1:9", connect_timeout_s=2))


def test_env_connects_to_the_named_scheduler(monkeypatch, client):
    """--cluster env reaches the scheduler named in $DASK_SCHEDULER_ADDRESS (as a DaskJob's job pod does)."""
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", client.scheduler.address)
    c, cluster = make_client(RunConfig(cluster="env"))
    try:
        assert cluster is None and c.scheduler.address == client.scheduler.address
        assert len(c.scheduler_info()["workers"]) == 2
    finally:
        c.close()


def test_gpu_tasks_refuse_a_cluster_without_gpu_workers(client):
    assert uses_gpu_workers(RunConfig(cluster="local-cuda"))
    assert uses_gpu_workers(RunConfig(cluster="tcp://h:8786", device="cuda"))
    assert not uses_gpu_workers(RunConfig(cluster="tcp://h:8786", device="auto"))
    assert not uses_gpu_workers(RunConfig(cluster="local", device="cuda"))
    with pytest.raises(DistlabelsError, match="--resources GPU=1"):
        check_gpu_workers(client)                  # CPU workers: no GPU resource advertised
