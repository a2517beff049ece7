"""The ``distlabels`` command line: each subcommand builds a config and calls one function.

Options can also come from a YAML file (``--config configs/NAME.yaml``): keys are the option
names with dashes or underscores (``task_rows: 500``), and a ``fit:`` mapping sets kernel options
(``fit: {continuum_degree: 3, fix: {cm: 0.0}}``). Options given on the command line win.
Errors caused by input are printed as one line, ``distlabels: error: ...``, with exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import DistlabelsError

EPILOG = "Docs: README.md and DESIGN.md. Every subcommand has --help."

# Modules (under distlabels.cli) that add subcommands; see build_parser.
EXTRA_COMMAND_MODULES: list[str] = [
    "distlabels.cli.production",
    "distlabels.cli.ingest",
    "distlabels.cli.catalog",
    "distlabels.cli.train",
    "distlabels.cli.crb",
]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _range(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.replace(":", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 20,100, got {text!r}") from None
    if not (0 < a <= b):
        raise argparse.ArgumentTypeError(f"expected 0 < low <= high, got {text!r}")
    return a, b


def parse_label_value(text: str, option: str) -> tuple[str, float]:
    """``LABEL=VALUE`` of a command-line option as (label, float); argparse's error otherwise."""
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} expects LABEL=VALUE, got {text!r}") from None


def _fix(text: str) -> tuple[str, float]:
    return parse_label_value(text, "--fix")


def _apply_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill options the user did not give on the command line from ``--config``."""
    path = getattr(args, "config", None)
    if not path:
        return args
    from ..config import load_yaml

    data = load_yaml(path)
    dests = {a.dest for a in parser._actions}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest == "fit" and isinstance(value, dict):
            args.fit_options = {**value, **(getattr(args, "fit_options", None) or {})}
            continue
        if dest not in dests:
            raise DistlabelsError(f"config file {path}: unknown option {key!r} for this subcommand.")
        if getattr(args, dest, None) is None:
            if dest == "snr_range" and isinstance(value, (list, tuple)):
                value = tuple(float(v) for v in value)
            setattr(args, dest, value)
    return args


# ------------------------------------------------------------------------------ subcommands
def cmd_models_import(args) -> int:
    from ..models.importers import import_bossbrain, import_payne_npz

    if args.source == "bossbrain":
        out = import_bossbrain(args.teff_range or "4000-5000", args.out)
    else:
        if not args.file:
            raise DistlabelsError("models import payne-npz needs the network file: distlabels models import "
                                  "payne-npz FILE --wavelength FILE --out DIR.")
        out = import_payne_npz(args.file, args.out, wavelength=args.wavelength, wavelength_medium=args.medium,
                               label_names=_csv(args.labels) if args.labels else None, resolution=args.resolution,
                               continuum_pixels=args.continuum_pixels, bad_pixels=args.pixel_mask)
    from ..models import load

    m = load(out)
    print(f"wrote {out}: {m.kind}, {m.n_labels} labels ({', '.join(m.label_names[:6])}"
          f"{', ...' if m.n_labels > 6 else ''}), {m.n_pix} pixels {m.wavelength.min():.1f}-{m.wavelength.max():.1f} A "
          f"({m.wavelength_medium}), id {m.model_id}")
    return 0


def cmd_models_info(args) -> int:
    from ..models import load

    m = load(args.model_dir)
    print(f"{args.model_dir}: kind {m.kind}, id {m.model_id}")
    print(f"  pixels: {m.n_pix}, {m.wavelength.min():.2f}-{m.wavelength.max():.2f} A ({m.wavelength_medium}), "
          f"R = {m.resolution or 'native'}")
    print(f"  training labels: {len(m.training_labels)}")
    for name, (lo, hi) in zip(m.label_names, m.label_bounds):
        print(f"  {name:>8}: {lo:10.4g} .. {hi:<10.4g}")
    return 0


def cmd_mock(args) -> int:
    from ..config import MockConfig
    from ..io.store import write_store
    from ..mock import make_mock
    from ..models import load

    if not args.model or not args.out:
        raise DistlabelsError("mock needs --model MODEL_DIR and --out STORE.")
    snr = args.snr_range or (20.0, 100.0)
    cfg = MockConfig(n=int(args.n or 2000), snr_min=snr[0], snr_max=snr[1], seed=int(args.seed or 42),
                     grid=args.grid or "lamost", noiseless=bool(args.noiseless),
                     labels_from=getattr(args, "labels_from", None) or "training",
                     max_rows_per_partition=int(args.max_rows_per_partition or 1000))
    model = load(args.model)
    table, meta = make_mock(model, cfg)
    store = write_store(args.out, table, meta, max_rows_per_partition=cfg.max_rows_per_partition,
                        overwrite=bool(args.overwrite))
    print(f"wrote {len(table)} mock spectra ({len(meta['wavelength_aa'])} px, grid {cfg.grid}) to {store.root} "
          f"in {len(store.fragments)} fragments")
    return 0


def cmd_demo(args) -> int:
    from ..pipeline.demo import run_demo

    snr = args.snr_range or (20.0, 100.0)
    run_demo(args.out_dir or "demo_output", n=int(args.n or 10000), workers=args.workers or 2,
             seed=int(args.seed or 42), snr_range=snr, task_rows=int(args.task_rows or 250),
             progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distlabels",
        description="Stellar labels (Teff, log g, [M/H], abundances, RV, with errors) for every star of a "
                    "spectroscopic survey: import an emulator, make or ingest spectra, fit them on Dask, query "
                    "the catalog.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"distlabels {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_, func, **kw):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG, **kw)
        sp.add_argument("--config", metavar="YAML", help="read options from a YAML file (see configs/)")
        sp.set_defaults(func=func, parser=sp)
        return sp

    # models
    pm = sub.add_parser("models", help="import and inspect emulators", description="Import and inspect emulators.")
    msub = pm.add_subparsers(dest="models_command", metavar="ACTION")
    pi = msub.add_parser("import", help="convert a trained emulator into a distlabels model directory",
                         description="Convert a trained emulator into MODEL_DIR (weights.safetensors + model.json). "
                                     "bossbrain's pickles are read through an allow-listed unpickler only.")
    pi.add_argument("source", choices=["bossbrain", "payne-npz"], help="what to import")
    pi.add_argument("file", nargs="?", help="payne-npz: the network .npz (w_array_0..2, b_array_0..2, x_min, x_max; "
                                           "or the 2018-19 per-pixel layout, 3-d w_array_0)")
    pi.add_argument("--teff-range", help="bossbrain network: 3500-4200, 4000-5000 (default) or 4900-6000")
    pi.add_argument("--wavelength", help="payne-npz: file with the model's wavelength grid in Angstrom (.npz/.npy/.txt)")
    pi.add_argument("--medium", choices=["vacuum", "air"], default="vacuum", help="payne-npz: wavelength medium")
    pi.add_argument("--labels", help="payne-npz: comma-separated label names in network order")
    pi.add_argument("--resolution", type=float, help="payne-npz: resolving power R of the model spectra")
    pi.add_argument("--continuum-pixels", metavar="NPZ", help="payne-npz per-pixel networks: bool mask of the "
                    "continuum pixels defining the output's pseudo-continuum normalisation (stored with the model)")
    pi.add_argument("--pixel-mask", metavar="NPZ", help="payne-npz per-pixel networks: bool mask, True = pixel the "
                    "network models poorly, left out of every fit (stored with the model)")
    pi.add_argument("--out", required=True, help="output model directory")
    pi.set_defaults(func=cmd_models_import, parser=pi)
    pinfo = msub.add_parser("info", help="print a model's labels, bounds and grid")
    pinfo.add_argument("model_dir")
    pinfo.set_defaults(func=cmd_models_info, parser=pinfo)

    pk = add("mock", "make a mock survey store from an emulator (truth kept as true_* columns)", cmd_mock)
    pk.add_argument("--model", help="model directory")
    pk.add_argument("--n", type=int, help="number of stars (default 2000)")
    pk.add_argument("--snr-range", type=_range, help="S/N per pixel range, e.g. 20,100 (default)")
    pk.add_argument("--seed", type=int, help="random seed (default 42)")
    pk.add_argument("--grid", choices=["lamost", "desi", "model"],
                    help="pixels: LAMOST-like (3,909 px log-lambda, R 1800; default), DESI-like, or the model's own")
    pk.add_argument("--noiseless", action="store_true", default=None, help="no noise, RV 0, flat continuum (grids)")
    pk.add_argument("--labels-from", choices=["training", "uniform"],
                    help="labels: drawn from the model's training labels (default) or uniform in its label box")
    pk.add_argument("--max-rows-per-partition", type=int, help="rows per store fragment (default 1000)")
    pk.add_argument("--out", help="output store directory")
    pk.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")

    # fit (and verify): distlabels/cli/production.py

    pd = add("demo", "the whole path on this machine: import bossbrain, mock, fit on a LocalCluster, query, plot",
             cmd_demo)
    pd.add_argument("--n", type=int, help="mock stars (default 10000)")
    pd.add_argument("--workers", type=int, help="LocalCluster workers (default 2)")
    pd.add_argument("--seed", type=int)
    pd.add_argument("--snr-range", type=_range)
    pd.add_argument("--task-rows", type=int, help="spectra per task (default 250)")
    pd.add_argument("--out-dir", help="where model, store, catalog and plots go (default demo_output/)")
    pd.add_argument("--no-progress", action="store_true")

    # Subcommands of other areas live in their own modules: each has register(sub, add), where
    # add(name, help, func) returns a subparser that already has --config.
    import importlib

    for mod in EXTRA_COMMAND_MODULES:
        importlib.import_module(mod).register(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        (getattr(args, "parser", None) or parser).print_help()
        if args.command == "models":
            print("\nactions: import, info (distlabels models import --help)")
        return 2
    try:
        args = _apply_yaml(args, args.parser)
        return int(args.func(args) or 0)
    except DistlabelsError as e:
        print(f"distlabels: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"distlabels: error: {e.filename or e} does not exist.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distlabels: interrupted; finished partitions are kept, re-run the same command to resume.",
              file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
