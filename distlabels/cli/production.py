"""Production subcommands: ``distlabels fit`` (any cluster) and ``distlabels verify``.

Registered by :func:`distlabels.cli.main.build_parser` through ``EXTRA_COMMAND_MODULES``.
"""
from __future__ import annotations

import signal
import sys

from ..errors import DistlabelsError

CLUSTER_HELP = ("local (default: CPU LocalCluster), local-cuda (one dask-cuda worker per GPU), k8s (dask "
                "operator cluster from --k8s-spec), env (the scheduler in $DASK_SCHEDULER_ADDRESS, as in a "
                "DaskJob), or a scheduler address tcp://HOST:8786")


def _fix(text: str) -> tuple[str, float]:
    from .main import _fix as parse_fix

    return parse_fix(text)


def register(sub, add) -> None:
    pf = add("fit", "fit every spectrum of a store into a label catalog on a Dask cluster", cmd_fit)
    pf.add_argument("--model", help="model directory")
    pf.add_argument("--spectra", help="spectra store directory")
    pf.add_argument("--out", help="catalog: a directory, or an fsspec URL such as s3://bucket/catalog "
                                  "(re-running resumes; other inputs are refused)")
    pf.add_argument("--cluster", help=CLUSTER_HELP)
    pf.add_argument("--workers", type=int, help="LocalCluster workers (default: one per core); local-cuda: GPUs used")
    pf.add_argument("--threads-per-worker", type=int, help="torch threads per worker (default 1)")
    pf.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the kernel runs (default auto: the "
                                                                      "worker's GPU when it has one)")
    pf.add_argument("--batch-size", type=int, help="stars per kernel batch on CPU (default 64; on a GPU the "
                                                   "batch is sized from the device's free memory)")
    pf.add_argument("--task-rows", type=int, help="spectra per Dask task (default 500 on CPUs: seconds per task; "
                                                  "32768 with --cluster local-cuda or --device cuda: a GPU needs "
                                                  "batches of tens of thousands, see benchmarks/RESULTS.md)")
    pf.add_argument("--pack-rows", type=int, help="pack consecutive partitions (row ranges of store fragments) "
                                                  "into tasks of up to this many spectra, fitted in one kernel call "
                                                  "(default: --task-rows with GPU workers, off on CPUs; 0: off)")
    pf.add_argument("--retries", type=int, help="retries of a failing task before it is recorded in "
                                                "_failures.parquet (default 2)")
    pf.add_argument("--gpu-memory-fraction", type=float, help="share of a GPU's free memory a batch may use "
                                                              "(default 0.5)")
    pf.add_argument("--cuda-visible-devices", help="local-cuda: GPUs to use, e.g. 0,1 (default all)")
    pf.add_argument("--k8s-spec", help="k8s: DaskCluster manifest (default configs/k8s-cluster.yaml)")
    pf.add_argument("--k8s-namespace", help="k8s: namespace (default: the manifest's)")
    pf.add_argument("--continuum-degree", type=int, help="Chebyshev degree per segment; -1 for pre-normalised spectra")
    pf.add_argument("--labels", metavar="A,B,...", help="fit only these labels; the others are held at --fix values "
                    "or the training median (default: all)")
    pf.add_argument("--fix", type=_fix, action="append", metavar="LABEL=VALUE", help="hold a label fixed (repeatable)")
    pf.add_argument("--tie", action="append", metavar="A,B,...[=VALUE]",
                    help="fit these labels as one value (e.g. --tie mgm,sim,cam), or hold them all at VALUE "
                         "(e.g. --tie bam,cem,ndm,zrm=0); repeatable")
    pf.add_argument("--masks", metavar="SET", help="pixel masks: default (tellurics, sky lines, ISM Na D, DIBs), none, "
                    "a survey name, or comma-separated window names (distlabels/fit/masks.py)")
    pf.add_argument("--fit-vsini", action="store_true", default=None,
                    help="fit rotational broadening vsini (any emulator kind; a Cannon refuses it)")
    pf.add_argument("--vsini-max-kms", type=float, help="upper bound of the fitted vsini (default 500; a star on it is "
                                                       "flagged BROADENING_AT_BOUND)")
    pf.add_argument("--limb-darkening", type=float, help="linear limb-darkening coefficient of the rotational "
                                                         "profile (default 0.6)")
    pf.add_argument("--fit-lsf", action="store_true", default=None,
                    help="fit an extra Gaussian instrumental width (resolution mismatch)")
    pf.add_argument("--covariance", action="store_true", default=None,
                    help="store each star's covariance of labels and RV in the catalog")
    pf.add_argument("--overwrite", action="store_true", default=None, help="delete an existing catalog first")
    pf.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    pv = add("verify", "prove that a catalog holds every input star of a store exactly once (fitted or flagged)",
             cmd_verify)
    pv.add_argument("catalog", help="catalog directory or fsspec URL")
    pv.add_argument("--spectra", help="the spectra store the catalog was fitted from")


def fit_config(args):
    from ..config import FitConfig, from_dict

    opts = dict(getattr(args, "fit_options", None) or {})
    if args.batch_size:
        opts["batch_size"] = int(args.batch_size)
    if args.continuum_degree is not None:
        opts["continuum_degree"] = int(args.continuum_degree)
    fix = dict(opts.get("fix") or {})
    fix.update(dict(args.fix or ()))
    if getattr(args, "labels", None):
        opts["labels"] = [t.strip() for t in args.labels.split(",") if t.strip()]
    ties = list(opts.get("ties") or ())
    for text in getattr(args, "tie", None) or ():
        names, eq, value = text.partition("=")
        group = [t.strip() for t in names.split(",") if t.strip()]
        if eq:          # tied and held: every member at VALUE
            try:
                fix.update({n: float(value) for n in group})
            except ValueError:
                raise DistlabelsError(f"--tie expects LABEL,LABEL[,...][=VALUE], got {text!r}.") from None
        else:
            ties.append(group)
    if fix:
        opts["fix"] = fix
    if ties:
        opts["ties"] = ties
    masks = getattr(args, "masks", None)
    if masks:
        opts["masks"] = masks if "," not in masks else [t.strip() for t in masks.split(",") if t.strip()]
    for name in ("vsini_max_kms", "limb_darkening"):
        if getattr(args, name, None) is not None:
            opts[name] = float(getattr(args, name))
    for flag in ("fit_vsini", "fit_lsf", "covariance"):
        if getattr(args, flag, None):
            opts[flag] = True
    return from_dict(FitConfig, opts)


def check_fit_labels(model_dir, cfg) -> None:
    """Refuse, in one sentence and before any cluster starts, fit options that name unknown labels."""
    import json
    from pathlib import Path

    from ..fit.labels import check_label_options

    if not (cfg.labels or cfg.fix or cfg.ties or cfg.start_labels):
        return
    path = Path(str(model_dir)) / "model.json"
    try:
        names = json.loads(path.read_text()).get("label_names") or []
    except (ValueError, OSError):
        return          # a missing or malformed model is reported by the run itself
    if names:
        check_label_options(names, labels=cfg.labels, fix=cfg.fix, ties=cfg.ties, start_labels=cfg.start_labels)


def run_config(args):
    """The RunConfig that ``distlabels fit`` would run with (command line over YAML over defaults)."""
    from ..config import RunConfig

    def opt(name, default, cast=lambda v: v):
        value = getattr(args, name, None)
        return default if value is None else cast(value)

    return RunConfig(cluster=opt("cluster", "local", str), workers=opt("workers", None, int),
                     threads_per_worker=opt("threads_per_worker", 1, int), device=opt("device", "auto", str),
                     task_rows=opt("task_rows", None, int), pack_rows=opt("pack_rows", None, int),
                     retries=opt("retries", 2, int),
                     overwrite=bool(args.overwrite), progress=not args.no_progress, fit=fit_config(args),
                     cuda_visible_devices=opt("cuda_visible_devices", None, str),
                     gpu_memory_fraction=opt("gpu_memory_fraction", 0.5, float),
                     k8s_spec=opt("k8s_spec", None, str), k8s_namespace=opt("k8s_namespace", None, str))


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt          # Kubernetes stops a pod with SIGTERM: finish like Ctrl-C


def cmd_fit(args) -> int:
    from ..pipeline import run_fit

    if not (args.model and args.spectra and args.out):
        raise DistlabelsError("fit needs --model MODEL_DIR, --spectra STORE and --out CATALOG.")
    cfg = run_config(args)
    check_fit_labels(args.model, cfg.fit)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise DistlabelsError(f"--device must be auto, cpu or cuda, not {cfg.device!r}.")
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        s = run_fit(args.model, args.spectra, args.out, cfg, echo=print)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{s.catalog}: {s.n_rows_fitted} spectra fitted in {s.wall_s:.1f} s ({s.throughput:.1f}/s); "
          f"{s.n_done} partitions written, {s.n_skipped} already there, {s.n_failed} failed")
    if s.n_failed:
        attempts = max(f["attempts"] for f in s.failures)
        print(f"distlabels: error: {s.n_failed} partition(s) failed after {attempts} attempts (listed in "
              f"{s.failures_file}); re-run the same command to retry them.", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args) -> int:
    from ..pipeline.verify import verify_catalog

    if not args.spectra:
        raise DistlabelsError("verify needs --spectra STORE, the store the catalog was fitted from.")
    rep = verify_catalog(args.catalog, args.spectra)
    print("\n".join(rep.lines()))
    if not rep.ok:
        raise DistlabelsError(f"catalog {rep.catalog} does not hold every input exactly once: "
                              + "; ".join(rep.problems) + " (re-run distlabels fit with the same arguments to "
                              "finish missing partitions).")
    return 0


__all__ = ["cmd_fit", "cmd_verify", "fit_config", "register", "run_config"]
