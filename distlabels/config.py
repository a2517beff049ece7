"""Typed, frozen configurations, loadable from YAML (``configs/*.yaml``).

Every stage takes one of these instead of loose keyword arguments, so that a run's behaviour is
the config plus the inputs, and ``config_hash`` identifies it (used by ``_run.json`` to refuse a
re-run into a catalog made with other settings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DistlabelsError


@dataclass(frozen=True)
class FitConfig:
    """Settings of the fitting kernel (:mod:`distlabels.fit`)."""

    continuum_degree: int = 3          # Chebyshev degree of the multiplicative continuum, per segment; -1: none (pre-normalised)
    max_iter: int = 40                 # Levenberg-Marquardt iterations at most
    chi2_tol: float = 1e-2             # converged when an accepted step lowers chi^2 by less than this
    step_tol: float = 1e-3             # ... or moves every parameter by less than this many sigma
    lambda_init: float = 1e-2          # initial LM damping (relative to diag(J^T W J))
    v_max_kms: float = 500.0           # |RV| search range, km/s
    oversample: int = 2                # working-grid pixels per observed pixel
    library_size: int = 512            # emulator spectra in the chi^2 library start
    n_templates: int = 4               # templates in the RV cross-correlation
    n_starts: int = 3                  # library candidates tried for stars whose first fit is poor
    restart_sigma: float = 5.0         # "poor": reduced chi^2 above 1 + restart_sigma * sqrt(2 / dof)
    batch_size: int = 256              # stars per batch in the kernel
    min_good_pixels: int = 50          # fewer usable pixels: not fitted, flagged
    low_snr: float = 5.0               # S/N per pixel below this: flagged LOW_SNR
    chi2_red_high: float = 5.0         # reduced chi^2 above this: flagged CHI2_HIGH
    fix: tuple[tuple[str, float], ...] = ()   # labels held at a value, e.g. (("cm", 0.0),)
    seed: int = 0                      # library selection

    def fixed(self) -> dict[str, float]:
        return dict(self.fix)


@dataclass(frozen=True)
class MockConfig:
    """Settings of ``distlabels mock``."""

    n: int = 2000
    snr_min: float = 20.0
    snr_max: float = 100.0
    seed: int = 42
    grid: str = "lamost"               # lamost | desi | model
    rv_max_kms: float = 100.0
    masked_fraction: float = 0.005     # pixels flagged bad at random
    continuum_degree: int = 2
    max_rows_per_partition: int = 1000
    noiseless: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Settings of a distributed fit run (:mod:`distlabels.pipeline`)."""

    cluster: str = "local"             # local | local-cuda | k8s | env | tcp://scheduler:8786
    workers: int | None = None         # LocalCluster workers (default: one per core; local-cuda: one per GPU)
    threads_per_worker: int = 1
    device: str = "auto"               # auto | cpu | cuda
    task_rows: int = 500               # spectra per task (aim: seconds of compute per task)
    retries: int = 2                   # Dask retries of a failed task before it goes to _failures.parquet
    overwrite: bool = False
    progress: bool = True
    fit: FitConfig = field(default_factory=FitConfig)
    # Production runs (pipeline/cluster.py, pipeline/worker.py)
    cuda_visible_devices: str | None = None   # local-cuda: which GPUs, e.g. "0,1" (default: all)
    gpu_memory_fraction: float = 0.5   # share of a GPU's free memory one kernel batch may use
    k8s_spec: str | None = None        # k8s: DaskCluster manifest (default configs/k8s-cluster.yaml)
    k8s_namespace: str | None = None   # k8s: namespace (default: the manifest's, else the context's)
    wait_for_workers_s: float = 600.0  # remote clusters: how long to wait for the first worker
    connect_timeout_s: float = 30.0    # scheduler addresses: how long to try to connect


def _coerce(cls, data: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DistlabelsError(f"unknown {cls.__name__} option(s): {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))}).")
    kwargs = {}
    for k, v in data.items():
        if k == "fit" and isinstance(v, dict):
            v = _coerce(FitConfig, v)
        elif k == "fix" and isinstance(v, dict):
            v = tuple((str(a), float(b)) for a, b in v.items())
        kwargs[k] = v
    return cls(**kwargs)


def from_dict(cls, data: dict[str, Any] | None):
    """Build ``cls`` from a plain dict, refusing unknown keys with one sentence."""
    return _coerce(cls, dict(data or {}))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (sections per subcommand are the caller's choice)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DistlabelsError(f"config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistlabelsError(f"config file {p} is not valid YAML ({e.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise DistlabelsError(f"config file {p} must hold a mapping of option: value.")
    return data


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """sha256 of the canonical JSON of a config: equal settings, equal hash."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()
