"""``distlabels train dd-payne``: a Payne network trained on observed spectra of reference stars, its
gradient spectra tied to an ab initio emulator's (:mod:`distlabels.train.dd_payne`). Added to the
``train`` command by :func:`distlabels.cli.train.register`."""
from __future__ import annotations

from ..errors import DistlabelsError

HELP = ("train DD-Payne: a Payne network on observed spectra of reference stars (labels from another survey), "
        "with its gradient spectra tied to an ab initio emulator's (--prior)")


def _fixed(text) -> tuple[tuple[str, float], ...]:
    if isinstance(text, dict):
        return tuple((str(k), float(v)) for k, v in text.items())
    out = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep:
            raise DistlabelsError(f"--prior-fix expects NAME=VALUE[,NAME=VALUE...], got {item!r}.")
    return tuple(out)


def cmd_train_dd_payne(args) -> int:
    from ..config import DDPayneTrainConfig
    from ..models import load
    from ..train.data import load_training_set
    from ..train.dd_payne import train_dd_payne
    from ..train.loop import CHECKPOINT_DIR, STATE_META
    from .train import _all_labels, _csv, _ints, _labels, _prepare_out

    if not (args.spectra and args.out):
        raise DistlabelsError("train dd-payne needs --spectra STORE, --labels ..., --prior MODEL_DIR and --out MODEL_DIR.")
    base = DDPayneTrainConfig()
    D = base.gradient_weight if args.gradient_weight is None else float(args.gradient_weight)
    if not args.prior and D > 0:
        raise DistlabelsError("train dd-payne needs --prior MODEL_DIR (an ab initio emulator), or --gradient-weight 0 "
                              "for a network without the gradient prior.")
    labels = _all_labels(args.spectra) if args.labels == "all" and not args.label_table else _labels(args)
    cfg = DDPayneTrainConfig(
        hidden=_ints(args.hidden) if args.hidden else base.hidden,
        gradient_weight=D,
        gradient_labels=tuple(_csv(args.gradient_labels)) if args.gradient_labels else None,
        prior_fixed=_fixed(args.prior_fix) if args.prior_fix else (),
        continuum_degree=base.continuum_degree if args.continuum_degree is None else int(args.continuum_degree),
        epochs=int(args.epochs) if args.epochs is not None else base.epochs,
        batch_size=int(args.batch_size) if args.batch_size else base.batch_size,
        learning_rate=float(args.learning_rate) if args.learning_rate else base.learning_rate,
        validation_fraction=float(args.validation_fraction) if args.validation_fraction is not None
        else base.validation_fraction,
        patience=int(args.patience) if args.patience is not None else base.patience,
        seed=int(args.seed) if args.seed is not None else base.seed)
    prior = load(args.prior) if args.prior else None
    out = _prepare_out(args.out, bool(args.overwrite), resume=bool(args.resume))
    if args.resume and not (out / CHECKPOINT_DIR / STATE_META).is_file():
        raise DistlabelsError(f"--resume: {out} has no checkpoint to resume ({CHECKPOINT_DIR}/{STATE_META}).")
    ts = load_training_set(args.spectra, labels, label_table=args.label_table, join=args.join,
                           rv_column=args.rv_column)
    model, report = train_dd_payne(
        ts, prior, cfg, device=args.device or "auto", out_dir=out, resume=bool(args.resume),
        progress=not args.no_progress,
        meta={"source": {"trainer": "distlabels train dd-payne", "spectra": str(args.spectra),
                         "label_table": str(args.label_table) if args.label_table else None,
                         "prior": str(args.prior) if args.prior else None}})
    model.save(out)
    m = load(out)
    print(f"wrote {out}: payne-mlp (DD-Payne), {report.summary()}; id {m.model_id}")
    if ts.notes.get("n_dropped_no_labels"):
        print(f"  {ts.notes['n_dropped_no_labels']} of {ts.notes['n_store_rows']} store rows had no label for every "
              f"training label and were left out")
    print(f"  fit it like any emulator: distlabels fit --model {out} --spectra STORE --out CATALOG")
    return 0


def add_dd_payne(kind) -> None:
    """Add ``train dd-payne``; ``kind(name, help, func)`` makes a ``train`` action parser."""
    from .train import add_network_run_options

    pd = kind("dd-payne", HELP, cmd_train_dd_payne)
    pd.add_argument("--spectra", help="spectra store of the reference stars (observed spectra)")
    pd.add_argument("--labels", help="comma-separated labels, e.g. teff,logg,mh,mgm (columns LABEL or true_LABEL)")
    pd.add_argument("--label-table", help="table with the reference labels (Parquet, CSV, FITS...), joined to the store")
    pd.add_argument("--join", help="how to match --label-table rows: source_id (default), another shared id column, "
                                   "or sky:ARCSEC")
    pd.add_argument("--rv-column", help="column (store or label table) with each star's RV in km/s, removed before "
                                        "training (default: true_rv for mocks; 'none' for rest-frame spectra)")
    pd.add_argument("--prior", help="ab initio emulator (MODEL_DIR, e.g. from 'distlabels models import bossbrain') "
                                    "whose gradient spectra the network's are tied to; labels matched by name")
    pd.add_argument("--gradient-weight", type=float,
                    help="D: weight of sum |dF_NN/dx - dF_prior/dx| against chi^2, per pixel and star, x = labels "
                         "scaled to the reference box (default 30; 0 = no prior)")
    pd.add_argument("--gradient-labels", help="labels whose gradients are tied to the prior (default: every label "
                                              "the prior has)")
    pd.add_argument("--prior-fix", help="prior labels the network lacks, held at NAME=VALUE,... (default: the "
                                        "prior's training-label median)")
    pd.add_argument("--continuum-degree", type=int,
                    help="Chebyshev degree per segment of each star's continuum, solved in the loss as the fit "
                         "kernel does (default 3)")
    pd.add_argument("--hidden", help="hidden layer widths (default 128,128)")
    pd.add_argument("--epochs", type=int, help="epochs at most (default 1000)")
    pd.add_argument("--batch-size", type=int, help="minibatch size (default 128)")
    pd.add_argument("--learning-rate", type=float, help="initial learning rate (default 1e-3; halved on plateaus)")
    pd.add_argument("--validation-fraction", type=float, help="reference stars held out (default 0.1)")
    pd.add_argument("--patience", type=int, help="stop after this many epochs without a better held-out loss (100)")
    pd.add_argument("--seed", type=int, help="random seed (default 0)")
    pd.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    add_network_run_options(pd)
