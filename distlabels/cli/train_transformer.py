"""``distlabels train transformer-payne``: train TransformerPayne on a grid store, or fine-tune one.

Added to the ``train`` command by :func:`distlabels.cli.train.register` through :func:`register_kind`.
"""
from __future__ import annotations

import dataclasses

from ..errors import DistlabelsError

# CLI option -> TransformerPayneTrainConfig field (same name with dashes); every one optional.
_INT = ("d_model", "n_tokens", "n_heads", "n_blocks", "token_hidden", "mlp_ratio", "n_freq", "pixels_per_sample",
        "batch_size", "epochs", "patience", "lr_patience", "checkpoint_every", "seed")
_FLOAT = ("learning_rate", "weight_decay", "min_learning_rate", "validation_fraction")


def _config(args):
    from ..config import TransformerPayneTrainConfig

    over = {}
    for name in _INT + _FLOAT + ("optimizer",):
        v = getattr(args, name, None)
        if v is None:
            continue
        try:
            over[name] = int(v) if name in _INT else float(v) if name in _FLOAT else str(v)
        except (TypeError, ValueError):
            raise DistlabelsError(f"--{name.replace('_', '-')} expects a number, got {v!r}.") from None
    cfg = TransformerPayneTrainConfig(**over)
    if cfg.d_model % cfg.n_heads:
        raise DistlabelsError(f"--d-model ({cfg.d_model}) must be a multiple of --n-heads ({cfg.n_heads}).")
    if min(cfg.d_model, cfg.n_tokens, cfg.n_heads, cfg.n_blocks, cfg.pixels_per_sample, cfg.batch_size) < 1:
        raise DistlabelsError("network sizes, --pixels-per-sample and --batch-size must be positive.")
    if cfg.optimizer not in ("adam", "radam"):
        raise DistlabelsError(f"--optimizer must be adam or radam, not {cfg.optimizer!r}.")
    return cfg


def cmd_train_transformer_payne(args) -> int:
    from ..models import TransformerPayne, load
    from ..train.data import load_training_set
    from ..train.loop import CHECKPOINT_DIR, STATE_META
    from ..train.payne import write_validation
    from ..train.transformer_payne import train_transformer_payne
    from .train import _all_labels, _labels, _prepare_out

    if not (args.grid and args.out):
        raise DistlabelsError("train transformer-payne needs --grid STORE, --labels ... and --out MODEL_DIR.")
    init = None
    if args.init:
        init = load(args.init)
        if not isinstance(init, TransformerPayne):
            raise DistlabelsError(f"--init {args.init} is a {init.kind} model; fine-tuning needs a transformer-payne.")
    if args.labels:
        labels = _all_labels(args.grid) if args.labels == "all" else _labels(args)
    elif init is not None:
        labels = list(init.label_names)
    else:
        labels = _labels(args)
    cfg = _config(args)
    out = _prepare_out(args.out, bool(args.overwrite), resume=bool(args.resume))
    if args.resume and not (out / CHECKPOINT_DIR / STATE_META).is_file():
        raise DistlabelsError(f"--resume: {out} has no checkpoint to resume ({CHECKPOINT_DIR}/{STATE_META}).")
    ts = load_training_set(args.grid, labels, rv_column="none")
    if args.wave_range:
        from .train import _floats

        lo_hi = _floats(args.wave_range)
        if len(lo_hi) != 2 or not lo_hi[1] > lo_hi[0]:
            raise DistlabelsError(f"--wave-range expects LO,HI in Angstrom, got {args.wave_range!r}.")
        sel = (ts.wavelength_aa >= lo_hi[0]) & (ts.wavelength_aa <= lo_hi[1])
        if sel.sum() < 2:
            raise DistlabelsError(f"--wave-range {args.wave_range} keeps fewer than two of the grid's pixels "
                                  f"({ts.wavelength_aa.min():.1f}-{ts.wavelength_aa.max():.1f} A).")
        ts = dataclasses.replace(ts, flux=ts.flux[:, sel], ivar=ts.ivar[:, sel], wavelength_aa=ts.wavelength_aa[sel])
    model, report = train_transformer_payne(
        ts, cfg, device=args.device or "auto", out_dir=out, resume=bool(args.resume), progress=not args.no_progress,
        init=init, meta={"source": {"trainer": "distlabels train transformer-payne", "grid": str(args.grid),
                                    "init": str(args.init) if args.init else None}})
    model.save(out)
    write_validation(out, report, ts.wavelength_aa)
    m = load(out)
    print(f"wrote {out}: transformer-payne, {report.summary()}; id {m.model_id}")
    print(f"  evaluates on any wavelength grid in {m.meta['training_wavelength_range_aa'][0]:.1f}-"
          f"{m.meta['training_wavelength_range_aa'][1]:.1f} A; per-pixel validation MAE: {out / 'validation.json'}; "
          f"resume or extend with --resume --epochs N")
    return 0


def register_kind(kind) -> None:
    """Add the ``transformer-payne`` action; ``kind(name, help, func)`` is the train command's adder."""
    from .train import add_network_run_options

    sp = kind("transformer-payne", "train TransformerPayne (wavelength-query transformer, any wavelength grid) on a "
                                   "grid store, or fine-tune a trained one (--init)", cmd_train_transformer_payne)
    sp.add_argument("--grid", help="grid store: noiseless spectra with true_* label columns")
    sp.add_argument("--labels", help="comma-separated labels (columns LABEL or true_LABEL); 'all' = every true_* "
                                     "column; default with --init: the initial model's")
    sp.add_argument("--init", metavar="MODEL_DIR", help="fine-tune from this trained transformer-payne (its network "
                                                        "shape, label scaling and wavelength embedding)")
    sp.add_argument("--wave-range", metavar="LO,HI", help="train on the grid's pixels in this range only (Angstrom)")
    sp.add_argument("--d-model", type=int, help="width of queries, tokens and blocks (default 64)")
    sp.add_argument("--n-tokens", type=int, help="label tokens (default 8)")
    sp.add_argument("--n-heads", type=int, help="attention heads (default 4)")
    sp.add_argument("--n-blocks", type=int, help="cross-attention + MLP blocks (default 2)")
    sp.add_argument("--token-hidden", type=int, help="hidden width of the labels -> tokens MLP (default 128)")
    sp.add_argument("--pixels-per-sample", type=int, help="random pixels of one spectrum per sample (default 128)")
    sp.add_argument("--epochs", type=int, help="epochs at most; one epoch sees every pixel of every spectrum (100)")
    sp.add_argument("--batch-size", type=int, help="samples per step (default 32)")
    sp.add_argument("--learning-rate", type=float, help="initial learning rate (default 1e-3; halved on plateaus)")
    sp.add_argument("--optimizer", choices=["adam", "radam"], help="default adam")
    sp.add_argument("--validation-fraction", type=float, help="spectra held out for validation (default 0.1)")
    sp.add_argument("--patience", type=int, help="stop after this many epochs without a better validation MAE (25)")
    sp.add_argument("--lr-patience", type=int, help="halve the learning rate after this many epochs without "
                                                    "improvement (6)")
    sp.add_argument("--seed", type=int, help="random seed (default 0)")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: cuda if present)")
    add_network_run_options(sp)
