"""``distlabels ingest``: survey FITS files -> a sky-partitioned Parquet spectra store."""
from __future__ import annotations

import sys

from ..errors import DistlabelsError

HELP = ("read survey FITS files (LAMOST, DESI, SDSS/BOSS, APOGEE) into a spectra store on a Dask cluster; "
        "unreadable files go to STORE/_quarantine")
EPILOG_EXTRA = """
PATH may be a FITS file, a directory (searched recursively), a glob, or a .txt/.lst/.list file listing
paths. The survey is detected from the HDU structure (--survey to insist). By default only stars are
kept (LAMOST and BOSS CLASS == STAR; DESI STD_*/MWS_ANY target bits or MWS_TARGET; APOGEE: all);
--select replaces that with an expression over: source_id, star_id, ra, dec, snr, mjd, survey_snr,
survey_rv_kms, survey_class, survey_subclass, survey_flags, resolution, ingest_flags, file_row,
is_star, desi_target, bgs_target, mws_target (e.g. "is_star and snr > 10").
Re-running with the same inputs does nothing; an interrupted run resumes.
Exit status 0 unless nothing was ingested.
"""


def cmd_ingest(args) -> int:
    from ..config import IngestConfig
    from ..pipeline.ingest import run_ingest

    if not args.paths or not args.out:
        raise DistlabelsError("ingest needs at least one PATH and --out STORE.")
    cfg = IngestConfig(survey=args.survey or "auto", grid=args.grid or "native", select=args.select,
                       visits=bool(args.visits), cluster=args.cluster or "local", workers=args.workers,
                       files_per_task=args.files_per_task, fragment_mb=float(args.fragment_mb or 128.0),
                       overwrite=bool(args.overwrite), progress=not args.no_progress)
    s = run_ingest(args.paths, args.out, cfg)
    print(s.line())
    for w in s.warnings:
        print(f"distlabels: warning: {w}", file=sys.stderr)
    if s.n_spectra_written == 0:
        print(f"distlabels: error: nothing was ingested from {s.n_files} files ({s.n_files_quarantined} quarantined, "
              f"{s.n_excluded} spectra not selected); see {s.store}/_quarantine.", file=sys.stderr)
        return 1
    return 0


def register(sub, add) -> None:
    import argparse

    p = add("ingest", HELP, cmd_ingest)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG_EXTRA + "\n" + (p.epilog or "")
    p.add_argument("paths", nargs="*", metavar="PATH", help="FITS files, directories, globs or list files")
    p.add_argument("--out", help="store directory to create")
    p.add_argument("--survey", choices=["auto", "lamost", "desi", "boss", "apogee"],
                   help="which survey's files to read (default auto: detected from the HDU structure)")
    p.add_argument("--grid", metavar="native|MODEL_DIR",
                   help="native (default: the survey's own pixels, aligned by index) or a model directory "
                        "(resample onto its grid, flux-conserving, air/vacuum converted)")
    p.add_argument("--select", metavar="EXPR", help="which spectra to keep (default: is_star); see below")
    p.add_argument("--visits", action="store_true", default=None,
                   help="also ingest single-visit spectra held in combined files (APOGEE apStar)")
    p.add_argument("--cluster", help="local (default, CPU LocalCluster), k8s, env or tcp://HOST:8786 (as for fit)")
    p.add_argument("--workers", type=int, help="LocalCluster workers (default: one per core)")
    p.add_argument("--files-per-task", type=int, help="files per Dask task (default: automatic)")
    p.add_argument("--fragment-mb", type=float, help="target store fragment size in MB (default 128)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
