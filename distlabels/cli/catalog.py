"""Catalog subcommands: ``query``, ``plot``, ``compact`` and ``info``.

Registered by :func:`distlabels.cli.main.build_parser` through ``EXTRA_COMMAND_MODULES``. Each
builds its arguments and calls one function of :mod:`distlabels.catalog`; errors a user can cause
are :class:`~distlabels.errors.DistlabelsError` sentences that ``main`` prints on one line.
"""
from __future__ import annotations

import json
import sys

from ..errors import DistlabelsError, QueryError

PLOT_KINDS = ("kiel", "abundances", "recovery", "residuals")


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    return items or None


def _cone(values) -> tuple[str, str, str] | None:
    """--cone values stay strings here: the catalog validates them into one clear sentence."""
    if values is None:
        return None
    if isinstance(values, str):  # from YAML: "150.1 2.2 0.5"
        values = values.replace(",", " ").split()
    return tuple(values)


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in str(text).replace(":", ",").split(","))
    except ValueError:
        raise DistlabelsError(f"--wave-range expects two wavelengths in Angstrom like 5000,5600, not {text!r}.") from None
    return lo, hi


def cmd_query(args) -> int:
    from ..catalog.query import format_table, open_catalog

    cat = open_catalog(args.catalog, engine=args.engine or "auto")
    table = cat.query(where=args.where, columns=_csv(args.columns), cone=_cone(args.cone), limit=args.limit,
                      clean=bool(args.clean))
    text = format_table(table, args.format or "table", args.out,
                        provenance=cat.meta.get("provenance") or {"model_id": cat.meta.get("model_id")})
    if text:
        print(text, end="" if text.endswith("\n") else "\n")
    elif args.out:
        print(f"wrote {len(table)} rows to {args.out}", file=sys.stderr)
    return 0


def _labels(cat, text: str | None, kind: str) -> list[str] | None:
    names = _csv(text)
    if names is None:
        return None
    if names == ["all"]:
        if kind == "recovery":
            return [n for n in cat.label_names + ["rv"] if f"true_{n}" in cat.columns]
        return None
    unknown = [n for n in names if n not in cat.columns]
    if unknown:
        raise QueryError(f"--labels names unknown column '{unknown[0]}'; labels: {', '.join(cat.label_names)}.")
    return names


def cmd_plot(args) -> int:
    from ..catalog import plot
    from ..catalog.query import open_catalog

    cat = open_catalog(args.catalog)
    clean = bool(args.clean)
    if args.kind == "residuals":
        from ..catalog.spectrum import residuals_plot

        if not args.source_id:
            raise DistlabelsError("plot residuals needs --source-id ID (one star of the catalog).")
        if args.where or clean:
            raise DistlabelsError("plot residuals shows one star; --where and --clean do not apply.")
        out = residuals_plot(cat, args.source_id, args.out, spectra=args.spectra, model=args.model,
                             wave_range=_range(args.wave_range))
        print(f"wrote {out} (source_id {args.source_id})")
        return 0
    if args.source_id:
        raise DistlabelsError("--source-id is for plot residuals only.")
    labels = _labels(cat, args.labels, args.kind)
    if args.kind == "kiel":
        out, fig = plot.kiel_diagram(cat, args.out, where=args.where, clean=clean, return_fig=True)
    elif args.kind == "abundances":
        out, fig = plot.abundance_planes(cat, args.out, labels=labels, where=args.where, clean=clean, return_fig=True)
    else:
        missing = [c for c in ("true_teff",) if c not in cat.columns]
        if missing and not labels:
            raise DistlabelsError("plot recovery needs the true_* columns of a mock run; this catalog has none.")
        out, fig = plot.recovery_plot(cat, args.out, labels=labels or ("teff", "logg", "mh"), where=args.where,
                                      clean=clean, return_fig=True)
    title = fig.get_suptitle() or fig.axes[0].get_title()
    print(f"wrote {out}: {title}")
    return 0


def cmd_compact(args) -> int:
    from ..catalog.compact import compact_catalog

    from ..catalog.partitioning import DEFAULT_MAX_ROWS

    max_rows = DEFAULT_MAX_ROWS if args.max_rows is None else int(args.max_rows)
    if max_rows < 0:
        raise DistlabelsError(f"--max-rows must be 0 (one file per pixel) or a positive number of rows, not {max_rows}.")
    s = compact_catalog(args.catalog, max_rows=max_rows, force=bool(args.force), progress=not args.no_progress)
    print(f"{s.catalog}: {s.n_pixels:,} pixels -> {s.n_partitions:,} partitions ({s.n_compacted:,} written), "
          f"{s.n_files_before:,} -> {s.n_files_after:,} files, {s.n_rows:,} rows, {s.wall_s:.1f} s; "
          "catalog-level files rewritten")
    return 0


def cmd_info(args) -> int:
    from ..catalog.query import open_catalog
    from ..catalog.summary import catalog_summary, format_summary

    summary = catalog_summary(open_catalog(args.catalog))
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary), end="")
    return 0


def register(sub, add) -> None:
    """Add the catalog subcommands to the ``distlabels`` parser (see cli/main.py)."""
    # literal defaults (importing distlabels.catalog here would slow every --help); a test keeps
    # them equal to CleanSelection's
    clean_help = ("only the clean sample: no quality flag, S/N >= 20, reduced chi^2 <= 3 "
                  "(see distlabels.catalog.CleanSelection)")
    q = add("query", "select rows of a catalog (Arrow; the files also open in DuckDB, pandas, LSDB)", cmd_query)
    q.add_argument("catalog")
    q.add_argument("--where", help="filter: columns, comparisons, and/or/not, flag bits, e.g. "
                                   "\"teff < 4500 and logg < 2 and flags & 1 == 0\"")
    q.add_argument("--columns", help="comma-separated columns (default all)")
    q.add_argument("--cone", nargs=3, metavar=("RA", "DEC", "RADIUS"),
                   help="cone search: centre and radius in degrees (reads only the sky pixels it touches)")
    q.add_argument("--limit", type=int, help="at most N rows")
    q.add_argument("--clean", action="store_true", default=None, help=clean_help)
    q.add_argument("--format", choices=["table", "csv", "json", "parquet", "fits"],
                   help="output format (default table; parquet and fits need --out; fits opens in TOPCAT)")
    q.add_argument("--out", help="write to this file instead of stdout")
    q.add_argument("--engine", choices=["auto", "duckdb", "arrow"], default=None,
                   help="who scans the whole catalog (no --cone, or a large one): duckdb evaluates the "
                        "filter before reading the other columns, then distlabels re-checks every row with "
                        "its own NaN-exact filter; arrow reads with pyarrow only. Default auto: duckdb when "
                        "installed. Cone searches and --limit always read the few files they need directly")

    p = add("plot", "plot a catalog: kiel, abundances ([X/M] vs [M/H]), recovery (fit - truth, mocks) or "
                    "residuals (one star's spectrum with its best-fit model)", cmd_plot)
    p.add_argument("catalog")
    p.add_argument("kind", choices=PLOT_KINDS)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--where", help="filter rows first (same syntax as query)")
    p.add_argument("--clean", action="store_true", default=None, help=clean_help)
    p.add_argument("--labels", help="abundances/recovery: comma-separated labels, or 'all' (default: every "
                                    "abundance label / teff,logg,mh)")
    p.add_argument("--source-id", help="residuals: the star to show")
    p.add_argument("--spectra", help="residuals: spectra store (default: the one recorded in the catalog)")
    p.add_argument("--model", help="residuals: model directory (default: the one recorded in the catalog)")
    p.add_argument("--wave-range", help="residuals: zoom to LO,HI Angstrom")

    c = add("compact", "merge the catalog's fragments into one file per sky partition, merging sibling "
                       "pixels into coarser ones while they hold at most --max-rows rows (safe while others "
                       "read), then rewrite the HATS catalog-level files", cmd_compact)
    c.add_argument("catalog")
    # literal default (see clean_help above); a test keeps it equal to partitioning.DEFAULT_MAX_ROWS
    c.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="largest number of rows of a partition made by merging sibling pixels (default "
                        "40000: 10 million stars end in ~770 files at order 3). Larger: fewer files and "
                        "faster full-catalog scans, but a cone search reads more rows; smaller: the reverse. "
                        "0: never merge pixels, one file per pixel directory. A compacted pixel is never "
                        "split; a pixel already above N rows stays as it is")
    c.add_argument("--force", action="store_true", default=None,
                   help="compact although _run.json shows an unfinished run (only if none is writing)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = add("info", "print a catalog's provenance, layout, row counts, flag counts and label ranges", cmd_info)
    i.add_argument("catalog")
    i.add_argument("--json", action="store_true", default=None, help="machine-readable output")
