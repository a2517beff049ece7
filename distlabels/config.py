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
    """Settings of the fitting kernel (:mod:`distlabels.fit`). Hashed into a run's identity."""

    # --- what is fitted -----------------------------------------------------------------------
    labels: tuple[str, ...] | None = None     # labels fitted (None: all); the others are held (see fix)
    fix: tuple[tuple[str, float], ...] = ()   # labels held at a value, e.g. (("cm", 0.0),)
    ties: tuple[tuple[str, ...], ...] = ()    # groups of labels fitted as one value, e.g. (("mgm", "sim", "cam"),)
    continuum_degree: int = 3          # Chebyshev degree of the multiplicative continuum, per segment; -1: none (pre-normalised)
    fit_vsini: bool = False            # fit rotational broadening vsini (km/s, linear limb darkening)
    fit_lsf: bool = False              # fit an extra Gaussian instrumental width (resolution mismatch)
    limb_darkening: float = 0.6        # linear limb-darkening coefficient of the rotational kernel
    vsini_max_kms: float = 500.0       # upper bound of vsini
    lsf_headroom: float = 1.3          # fit_lsf: the grid is convolved to R * headroom; the fit adds the rest
    masks: str | tuple = "default"     # pixel masks (distlabels.fit.masks): "default", "none", a survey, or windows
    # --- optimiser ----------------------------------------------------------------------------
    max_iter: int = 30                 # Levenberg-Marquardt iterations at most (per start)
    chi2_tol: float = 1.0              # converged when the next step could lower chi^2 by less than this
    lambda_init: float = 1e-3          # initial LM damping (relative to diag(J^T W J))
    v_max_kms: float = 500.0           # |RV| search range, km/s
    oversample: float = 2.0            # working-grid pixels per observed pixel (uniform log grid)
    working_grid: str = "auto"         # auto | uniform | native (the model's own pixels, when no LSF is needed)
    library_size: int = 1024           # emulator spectra in the chi^2 library start
    n_templates: int = 4               # templates in the RV cross-correlation
    n_starts: int = 2                  # library candidates tried at most; beyond starts_always only for stars that
                                       # would be flagged CHI2_HIGH or NOT_CONVERGED; the lowest chi^2 wins
    starts_always: int = 1             # starts every star gets
    restart_all_labels: bool = True    # then a star whose chi^2 is above its dof by > restart_chi2_sigma sigma
    restart_chi2_sigma: float = 3.0    # (sqrt(2 dof)) is refitted from its best start with all labels free at once
    start_labels: tuple[str, ...] | None = None  # labels the start library varies (None: the n_start_labels that move the spectrum most)
    n_start_labels: int = 5            # (5: Teff, log g, [M/H] and the two strongest others; 4 left CO-degenerate minima)
    start_max_iter: int = 10           # stage 1 of a start (start labels only): iterations at most ...
    start_chi2_tol: float = 10.0       # ... and its (loose) convergence tolerance
    start_decimate: int = 2            # ... on every k-th pixel when the model's own pixels are the working grid
    approx_curvature: bool | str = "auto"  # LM steps on J^T W J with its label block from one (H, H) matrix per batch
                                       # (exact gradient; the exact matrix before a star stops and for its errors);
                                       # auto: on when it pulls back few rows next to a full Jacobian (pre-normalised,
                                       # one continuum segment; SpectrumFitter.use_approx_curvature); true | false
    batch_size: int = 64               # stars per batch in the kernel
    jacobian_chunk: int = 8192         # full Jacobians for this many stars at a time: their buffers (chunk x
                                       # (labels + 1) x working pixels x 4 bytes, ~6.5 GB on LAMOST-like grids),
                                       # not the batch, set a GPU batch's memory; no effect below it (CPU batches)
    fused_kernels: bool | str = "auto"  # Doppler taps on aligned log-uniform grids fused into one kernel by
                                       # torch.compile: auto (on CUDA with Triton) | true | false
    cpu_matmul: str = "auto"           # CPU backend of the network's big products: auto (timed once) | torch | numpy
    # --- flags --------------------------------------------------------------------------------
    min_good_pixels: int = 50          # fewer usable pixels: not fitted, flagged
    low_snr: float = 5.0               # S/N per pixel below this: flagged LOW_SNR
    chi2_red_high: float = 1.2         # CHI2_HIGH: reduced chi^2 above this ...
    chi2_sigma_high: float = 5.0       # ... and above 1 + this * sqrt(2 / dof) (not a noise fluctuation)
    far_from_training: float = 2.0     # FAR_FROM_TRAINING beyond this x the training set's own 99th-pct NN distance
    rv_err_max_kms: float = 50.0       # RV_FAILED above this RV error
    rv_min_ccf_delta_chi2: float = 25.0  # RV_FAILED when the cross-correlation peak improves chi^2 by less
    covariance: bool = False           # also return the full covariance of labels and RV
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
    labels_from: str = "training"      # training: the model's training labels; uniform: uniform in its label box
    normalized: bool = False           # pre-normalised spectra: continuum 1 (noise still relative to it)
    resolution: float | None = None    # resolving power of the mock (None: the survey grid's own)
    vsini_max_kms: float = 0.0         # rotational broadening, vsini uniform in [0, max] (0: none)
    limb_darkening: float = 0.6        # linear limb darkening of the rotational profile


@dataclass(frozen=True)
class CRBConfig:
    """Settings of ``distlabels crb`` (:func:`distlabels.fit.crb.crb_grid`): the Cramer-Rao bound of each
    label over a grid of stars, and which labels a survey measures at one S/N."""

    snr: float = 50.0                  # S/N per pixel relative to the continuum (sigma = continuum / snr)
    labels: tuple[str, ...] | None = None     # labels fitted (None: all); the others held at the training median
    grid: str = "lamost"               # observed pixels: lamost | desi | model (the model's own grid, no LSF)
    resolution: float | None = None    # resolving power (None: the grid's own; ignored for grid=model)
    stars: str = "training"            # training: n stars drawn from the model's training labels;
                                       # teff-logg: a regular ~sqrt(n) x sqrt(n) grid in Teff and log g, others at the median
    n: int = 200
    vsini_kms: float | None = None     # stars rotate at this vsini and vsini is fitted too (None: not fitted)
    limb_darkening: float = 0.6        # linear limb darkening of the rotational kernel
    masks: str | tuple = "default"     # pixel masks as for the fit (distlabels.fit.masks)
    continuum_degree: int = 3          # Chebyshev continuum per segment fitted alongside (nuisance)
    max_fraction: float = 0.1          # measurable: median sigma < max_fraction x the label's range (model box) ...
    max_sigma: tuple[tuple[str, float], ...] = ()   # ... or below these absolute values (e.g. (("teff", 100.0),))
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class CannonTrainConfig:
    """Settings of ``distlabels train cannon`` (:mod:`distlabels.train.cannon`)."""

    normalise: str = "chebyshev"       # chebyshev: pseudo-continuum on continuum pixels, stored in the model; none: pre-normalised
    continuum_degree: int = 3          # Chebyshev degree per segment
    continuum_fraction: float = 0.07   # share of pixels chosen as continuum pixels (spread over chunks of each segment)
    continuum_chunks: int = 8          # chunks per segment the continuum pixels are spread over
    scatter: str = "ml"                # ml: intrinsic scatter s^2 by maximum likelihood (dof-corrected); none: s^2 = 0
    scatter_iter: int = 8              # theta <-> s^2 alternations at most
    l1: tuple[float, ...] = ()         # L1 strengths (chi^2 units) to choose from per pixel on a validation set; () = none
    validation_fraction: float = 0.2   # stars held out to choose the L1 strength and to measure the error floor
    systematics: bool = False          # measure a per-label error floor (model inadequacy) on held-out stars
    admm_iter: int = 300               # ADMM iterations per L1 strength
    pixel_chunk: int = 4096            # pixels per batch (bounds memory: chunk x n_star floats)
    seed: int = 0


@dataclass(frozen=True)
class PayneTrainConfig:
    """Settings of ``distlabels train payne`` (:mod:`distlabels.train.payne`)."""

    hidden: tuple[int, ...] = (300, 300)   # hidden layer widths
    activation: str = "leaky_relu"         # leaky_relu (The Payne, bossbrain) | sigmoid | tanh
    negative_slope: float = 0.01
    loss: str = "l1"                       # l1 (The Payne) | l2 (inverse-variance weighted if ivar is given)
    optimizer: str = "radam"               # radam (The Payne) | adam
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 2000                     # at most
    patience: int = 200                    # stop after this many epochs without a better validation MAE
    lr_patience: int = 40                  # halve the learning rate after this many epochs without improvement
    min_learning_rate: float = 1e-5
    validation_fraction: float = 0.1
    checkpoint_every: int = 20             # epochs between resumable checkpoints
    seed: int = 0


@dataclass(frozen=True)
class DDPayneTrainConfig:
    """Settings of ``distlabels train dd-payne`` (:mod:`distlabels.train.dd_payne`)."""

    hidden: tuple[int, ...] = (128, 128)   # hidden layer widths
    activation: str = "leaky_relu"         # leaky_relu | sigmoid | tanh
    negative_slope: float = 0.01
    gradient_weight: float = 30.0          # D: weight of sum |dF_NN/dx - dF_prior/dx| against chi^2 (per pixel, per star)
    gradient_labels: tuple[str, ...] | None = None   # labels whose gradient is tied to the prior (None: all the prior has)
    prior_fixed: tuple[tuple[str, float], ...] = ()  # prior labels the network lacks, held at these values (default: the
                                                     # prior's training-label median)
    continuum_degree: int = 3              # Chebyshev degree per segment of the per-star continuum solved in the loss
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 1000                     # at most
    patience: int = 100                    # stop after this many epochs without a better validation loss
    lr_patience: int = 25                  # halve the learning rate after this many epochs without improvement
    min_learning_rate: float = 1e-5
    validation_fraction: float = 0.1
    checkpoint_every: int = 20
    prior_cache_mb: float = 2048.0         # keep the prior's gradient spectra of all stars in memory below this size
    seed: int = 0


@dataclass(frozen=True)
class TransformerPayneTrainConfig:
    """Settings of ``distlabels train transformer-payne`` (:mod:`distlabels.train.transformer_payne`).

    The defaults are a small network that trains on 2 CPU cores in minutes; the paper's networks are
    several times wider and deeper and train on GPUs for hours.
    """

    d_model: int = 64                      # width of queries, tokens and blocks
    n_tokens: int = 8                      # label tokens
    n_heads: int = 4
    n_blocks: int = 2                      # cross-attention + MLP blocks
    token_hidden: int = 128                # hidden width of the label -> tokens MLP
    mlp_ratio: int = 2                     # block MLP width / d_model
    n_freq: int = 32                       # sin/cos pairs of the wavelength embedding
    pixels_per_sample: int = 128           # random pixels of one spectrum per training sample
    batch_size: int = 32                   # samples (spectra x pixels_per_sample) per step
    optimizer: str = "adam"                # adam | radam
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 100                      # at most; one epoch sees every (spectrum, pixel) once
    patience: int = 25                     # stop after this many epochs without a better validation MAE
    lr_patience: int = 6                   # halve the learning rate after this many epochs without improvement
    min_learning_rate: float = 1e-5
    validation_fraction: float = 0.1
    checkpoint_every: int = 2              # epochs between resumable checkpoints
    seed: int = 0


CPU_TASK_ROWS = 500       # RunConfig.task_rows defaults
GPU_TASK_ROWS = 32768


@dataclass(frozen=True)
class RunConfig:
    """Settings of a distributed fit run (:mod:`distlabels.pipeline`)."""

    cluster: str = "local"             # local | local-cuda | k8s | env | tcp://scheduler:8786
    workers: int | None = None         # LocalCluster workers (default: one per core; local-cuda: one per GPU)
    threads_per_worker: int = 1
    device: str = "auto"               # auto | cpu | cuda
    task_rows: int | None = None       # spectra per task; None: 500 on CPUs (seconds of compute per task),
                                       # 32,768 with GPU workers (an H100 fits ~7,000 spectra/s in batches of
                                       # 8,192, ~20,000 at 49,152: benchmarks/RESULTS.md)
    pack_rows: int | None = None       # consecutive partitions (a few thousand rows each with 128 MB store
                                       # fragments) packed into one task, fitted as one kernel call, of up to
                                       # this many spectra; each still writes its own catalog fragment.
                                       # None: task_rows with GPU workers, no packing on CPUs; 0: never
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

    def __post_init__(self):
        if self.task_rows is None:
            gpu = self.cluster == "local-cuda" or self.device == "cuda"
            object.__setattr__(self, "task_rows", GPU_TASK_ROWS if gpu else CPU_TASK_ROWS)


@dataclass(frozen=True)
class IngestConfig:
    """Settings of ``distlabels ingest`` (:mod:`distlabels.pipeline.ingest`)."""

    survey: str = "auto"               # auto | lamost | desi | boss | apogee
    grid: str = "native"               # native | a model directory (resample onto its grid)
    select: str | None = None          # row filter over distlabels.io.ingest.SELECT_SCHEMA; None: is_star
    visits: bool = False               # also ingest single-visit spectra a file holds (apStar)
    cluster: str = "local"             # as for fit: local | k8s | env | tcp://scheduler:8786
    workers: int | None = None         # LocalCluster workers (default: one per core)
    threads_per_worker: int = 1
    files_per_task: int | None = None  # default: <= 256 MB of input per task, >= 4 tasks per worker
    fragment_mb: float = 128.0         # target size of a store fragment (rows per sky partition follow)
    max_rows_per_fragment: int | None = None   # overrides fragment_mb (tests, small stores)
    retries: int = 2
    overwrite: bool = False
    progress: bool = True


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
        elif k in ("fix", "max_sigma") and isinstance(v, dict):
            v = tuple((str(a), float(b)) for a, b in v.items())
        elif k in ("fix", "max_sigma") and isinstance(v, (list, tuple)):
            v = tuple((str(a), float(b)) for a, b in v)
        elif k in ("labels", "start_labels") and isinstance(v, (list, tuple)):
            v = tuple(str(a) for a in v)
        elif k == "labels" and isinstance(v, str):
            v = tuple(a.strip() for a in v.split(",") if a.strip())
        elif k == "ties" and isinstance(v, (list, tuple)):
            v = tuple(tuple(str(a) for a in (g.split(",") if isinstance(g, str) else g)) for g in v)
        elif k == "masks" and isinstance(v, (list, tuple)):
            v = tuple(a if isinstance(a, str) else tuple(float(b) for b in a) for a in v)
        elif k == "prior_fixed" and isinstance(v, dict):
            v = tuple((str(a), float(b)) for a, b in v.items())
        elif k == "gradient_labels" and isinstance(v, (list, tuple, str)):
            v = tuple(a.strip() for a in (v.split(",") if isinstance(v, str) else v) if str(a).strip())
        elif k in ("l1", "hidden") and isinstance(v, (list, tuple)):
            v = tuple(v)
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
