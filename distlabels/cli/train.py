"""``distlabels train cannon|payne``: train an emulator into a model directory that ``distlabels fit``
uses unchanged. Registered through ``EXTRA_COMMAND_MODULES`` in :mod:`distlabels.cli.main`."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import DistlabelsError

EPILOG = "Docs: README.md (Training emulators) and DESIGN.md. Options can also come from --config YAML."


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _floats(text) -> tuple[float, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(float(x) for x in text)
    try:
        return tuple(float(x) for x in _csv(text))
    except ValueError:
        raise DistlabelsError(f"expected comma-separated numbers, got {text!r}.") from None


def _ints(text) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(int(x) for x in text)
    try:
        out = tuple(int(x) for x in _csv(text))
    except ValueError:
        raise DistlabelsError(f"--hidden expects comma-separated layer widths like 300,300, got {text!r}.") from None
    if not out or min(out) < 1:
        raise DistlabelsError("--hidden needs at least one positive layer width.")
    return out


def _prepare_out(out: str, overwrite: bool, resume: bool = False) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise DistlabelsError(f"--out {p} is a file, not a directory.")
    if p.exists() and any(p.iterdir()) and not (overwrite or resume):
        raise DistlabelsError(f"{p} already exists; choose another --out, pass --overwrite"
                              f"{' or --resume' if resume is not None else ''}.")
    if p.exists() and overwrite and not resume:
        shutil.rmtree(p)
    return p


def _labels(args, ts_columns=None) -> list[str]:
    if not args.labels:
        raise DistlabelsError("give --labels, e.g. --labels teff,logg,mh (or 'all' for every true_* column).")
    return _csv(args.labels)


def _all_labels(store_root) -> list[str]:
    """Every ``true_<label>`` column of a store except the RV (the 'all' shorthand)."""
    import pyarrow.parquet as pq

    from ..io.store import open_store

    st = open_store(store_root)
    frags = st.fragments
    if not frags:
        raise DistlabelsError(f"spectra store {store_root} has no fragments.")
    names = pq.ParquetFile(frags[0]).schema_arrow.names
    out = [c[5:] for c in names if c.startswith("true_") and c != "true_rv"]
    if not out:
        raise DistlabelsError(f"--labels all: store {store_root} has no true_<label> columns.")
    return out


def cmd_train_cannon(args) -> int:
    from ..config import CannonTrainConfig
    from ..train.cannon import train_cannon
    from ..train.data import load_training_set

    if not (args.spectra and args.out):
        raise DistlabelsError("train cannon needs --spectra STORE, --labels ... and --out MODEL_DIR.")
    labels = _all_labels(args.spectra) if args.labels == "all" else _labels(args)
    l1 = ()
    if args.l1:
        l1 = (1e1, 1e2, 1e3, 1e4, 1e5) if str(args.l1) == "auto" else _floats(args.l1)
    cfg = CannonTrainConfig(normalise=args.normalise or "chebyshev",
                            continuum_degree=3 if args.continuum_degree is None else int(args.continuum_degree),
                            scatter="none" if args.no_scatter else "ml", l1=l1,
                            systematics=bool(args.error_floor),
                            validation_fraction=0.2 if args.validation_fraction is None else float(args.validation_fraction))
    out = _prepare_out(args.out, bool(args.overwrite), resume=None)
    ts = load_training_set(args.spectra, labels, label_table=args.label_table, join=args.join,
                           rv_column=args.rv_column)
    model, report = train_cannon(ts, cfg, device=args.device or "auto", progress=not args.no_progress,
                                 meta={"source": {"trainer": "distlabels train cannon", "spectra": str(args.spectra),
                                                  "label_table": str(args.label_table) if args.label_table else None}})
    model.save(out)
    from ..models import load

    m = load(out)
    print(f"wrote {out}: cannon, {report.summary()}; id {m.model_id}")
    if ts.notes.get("n_dropped_no_labels"):
        print(f"  {ts.notes['n_dropped_no_labels']} of {ts.notes['n_store_rows']} store rows had no label for every "
              f"training label and were left out")
    return 0


def cmd_train_payne(args) -> int:
    from ..config import PayneTrainConfig
    from ..train.data import load_training_set
    from ..train.payne import train_payne, write_validation

    if not (args.grid and args.out):
        raise DistlabelsError("train payne needs --grid STORE, --labels ... and --out MODEL_DIR.")
    labels = _all_labels(args.grid) if args.labels == "all" else _labels(args)
    base = PayneTrainConfig()
    cfg = PayneTrainConfig(
        hidden=_ints(args.hidden) if args.hidden else base.hidden,
        epochs=int(args.epochs) if args.epochs is not None else base.epochs,
        batch_size=int(args.batch_size) if args.batch_size else base.batch_size,
        learning_rate=float(args.learning_rate) if args.learning_rate else base.learning_rate,
        loss=args.loss or base.loss, optimizer=args.optimizer or base.optimizer,
        validation_fraction=float(args.validation_fraction) if args.validation_fraction is not None
        else base.validation_fraction,
        patience=int(args.patience) if args.patience is not None else base.patience,
        seed=int(args.seed) if args.seed is not None else base.seed)
    out = _prepare_out(args.out, bool(args.overwrite), resume=bool(args.resume))
    from ..train.loop import CHECKPOINT_DIR, STATE_META

    if args.resume and not (out / CHECKPOINT_DIR / STATE_META).is_file():
        raise DistlabelsError(f"--resume: {out} has no checkpoint to resume ({CHECKPOINT_DIR}/{STATE_META}).")
    ts = load_training_set(args.grid, labels, rv_column="none")
    model, report = train_payne(ts, cfg, device=args.device or "auto", out_dir=out, resume=bool(args.resume),
                                progress=not args.no_progress,
                                meta={"source": {"trainer": "distlabels train payne", "grid": str(args.grid)}})
    model.save(out)
    write_validation(out, report, ts.wavelength_aa)
    from ..models import load

    m = load(out)
    print(f"wrote {out}: payne-mlp, {report.summary()}; id {m.model_id}")
    print(f"  per-pixel validation MAE: {out / 'validation.json'}, {out / 'validation_mae.png'}; "
          f"resume or extend with --resume --epochs N")
    return 0


def register(sub, add) -> None:
    """Add ``train`` with its ``cannon`` and ``payne`` actions to the top-level subparsers."""
    pt = sub.add_parser("train", help="train an emulator: The Cannon on labelled spectra, The Payne on a grid",
                        description="Train an emulator into MODEL_DIR (weights.safetensors + model.json) that "
                                    "'distlabels fit' uses unchanged.", epilog=EPILOG)
    pt.set_defaults(parser=pt)
    tsub = pt.add_subparsers(dest="train_command", metavar="KIND")

    def kind(name, help_, func):
        sp = tsub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.add_argument("--config", metavar="YAML", help="read options from a YAML file (see configs/)")
        sp.set_defaults(func=func, parser=sp)
        return sp

    pc = kind("cannon", "train The Cannon (quadratic in labels, intrinsic scatter by maximum likelihood) on "
                        "spectra with known labels", cmd_train_cannon)
    pc.add_argument("--spectra", help="spectra store of the training stars")
    pc.add_argument("--labels", help="comma-separated labels, e.g. teff,logg,mh (columns LABEL or true_LABEL); "
                                     "'all' = every true_* column")
    pc.add_argument("--label-table", help="table with the labels (Parquet, CSV, FITS...) instead of store columns")
    pc.add_argument("--join", help="how to match --label-table rows: source_id (default), another shared id "
                                   "column (e.g. gaia_source_id), or sky:ARCSEC (nearest within ARCSEC; needs ra, dec)")
    pc.add_argument("--rv-column", help="column (store or label table) with each star's RV in km/s, removed before "
                                        "training (default: true_rv for mocks; 'none' if the spectra are in the rest "
                                        "frame). The kernel's own RVs: --label-table CATALOG/dataset --rv-column rv")
    pc.add_argument("--normalise", choices=["chebyshev", "none"],
                    help="pseudo-continuum: Chebyshev fits on continuum pixels chosen from the training set "
                         "(default; stored in the model), or none for spectra that come normalised")
    pc.add_argument("--continuum-degree", type=int, help="Chebyshev degree per segment (default 3)")
    pc.add_argument("--l1", help="L1 regularisation strengths to choose from per pixel on a validation set, "
                                 "comma-separated, or 'auto' (1e1..1e5); default none")
    pc.add_argument("--no-scatter", action="store_true", default=None, help="no intrinsic scatter (s^2 = 0)")
    pc.add_argument("--error-floor", action="store_true", default=None,
                    help="measure a per-label error floor (model inadequacy) on held-out stars and add it to "
                         "fitted errors")
    pc.add_argument("--validation-fraction", type=float, help="stars held out for --l1 and --error-floor (0.2)")
    pc.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    pc.add_argument("--out", help="output model directory")
    pc.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    pc.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")

    pp = kind("payne", "train The Payne's MLP emulator on a grid store (e.g. distlabels mock --noiseless)",
              cmd_train_payne)
    pp.add_argument("--grid", help="grid store: noiseless spectra with true_* label columns")
    pp.add_argument("--labels", help="comma-separated labels (columns LABEL or true_LABEL); 'all' = every true_* column")
    pp.add_argument("--hidden", help="hidden layer widths (default 300,300)")
    pp.add_argument("--epochs", type=int, help="epochs at most (default 2000)")
    pp.add_argument("--batch-size", type=int, help="minibatch size (default 512)")
    pp.add_argument("--learning-rate", type=float, help="initial learning rate (default 1e-3; halved on plateaus)")
    pp.add_argument("--loss", choices=["l1", "l2"], help="l1 (The Payne's; default) or ivar-weighted l2")
    pp.add_argument("--optimizer", choices=["radam", "adam"], help="default radam")
    pp.add_argument("--validation-fraction", type=float, help="spectra held out for validation (default 0.1)")
    pp.add_argument("--patience", type=int, help="stop after this many epochs without a better validation MAE (200)")
    pp.add_argument("--seed", type=int, help="random seed (default 0)")
    pp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    add_network_run_options(pp)

    from .train_dd_payne import add_dd_payne

    add_dd_payne(kind)

    from .train_transformer import register_kind   # TransformerPayne's action lives in its own module

    register_kind(kind)


def add_network_run_options(p) -> None:
    """--resume, --out, --overwrite, --no-progress: the same for every network trainer."""
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from MODEL_DIR/checkpoint (raise --epochs to train longer)")
    p.add_argument("--out", help="output model directory (checkpoints in OUT/checkpoint)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
