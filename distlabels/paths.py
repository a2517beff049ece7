"""Every path and file name in a spectra store, a label catalog and a model directory.

One module owns the layout so that the writer, the reader and the pipeline never disagree.
Stores and catalogs share one HATS-style layout::

    ROOT/
      store.json | catalog.json          description (grid, medium, counts, provenance)
      _run.json                          catalog only: model sha256, config hash, store manifest
      _quarantine/                       inputs that could not be used (one fragment per task)
      _ingest/                           store only: work files of an ingest run (map outputs,
                                         plan, done markers); removed when the run completes
      _failures.parquet                  partitions that kept failing
      _run.log.jsonl                     catalog only: structured log, one JSON record per partition
      _done/                             catalog on object storage only: one completion marker per fragment
      hats.properties, partition_info.csv  catalog only: HATS catalog-level files (end of each run)
      _staging/                          catalog only: ``distlabels compact`` work area
      dataset/_common_metadata, _metadata  catalog only: HATS/Parquet schema and footers
      dataset/Norder=K/Dir=D/Npix=N/     one directory per sky pixel (nested HEALPix, order K)
          part-XXXX.parquet              fragments; written as .part-XXXX.parquet.tmp then renamed
          Npix=N.parquet                 catalog only: the fragments merged by ``distlabels compact``
          _compaction.json               catalog only: which fragments that file holds

Dir = (Npix // 10000) * 10000, as in HATS. Hidden files (leading '.' or '_') are ignored by
pyarrow and pandas, and DuckDB's ``dataset/**/*.parquet`` glob skips names that do not end in
``.parquet``, so a fragment half written is never read. DuckDB does descend into hidden
directories, which is why work areas live outside ``dataset/``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

DATASET_DIR = "dataset"
STORE_META = "store.json"
CATALOG_META = "catalog.json"
RUN_FILE = "_run.json"
QUARANTINE_DIR = "_quarantine"
FAILURES_FILE = "_failures.parquet"
RUN_LOG = "_run.log.jsonl"
DONE_DIR = "_done"
MODEL_META = "model.json"
MODEL_WEIGHTS = "weights.safetensors"
INGEST_DIR = "_ingest"
HEALPIX_COLUMN = "_healpix_29"
HEALPIX_ORDER = 29
HATS_PROPERTIES = "hats.properties"
PARTITION_INFO = "partition_info.csv"
COMMON_METADATA = "_common_metadata"     # in dataset/
PARQUET_METADATA = "_metadata"           # in dataset/
COMPACTION_RECORD = "_compaction.json"   # in a pixel directory
STAGING_DIR = "_staging"                 # at the catalog root, outside dataset/
COMPACT_LOCK = "_compact.lock"


def pixel_dir(root: str | os.PathLike, norder: int, npix: int) -> Path:
    """Directory of sky pixel ``npix`` at HEALPix order ``norder`` under ``root/dataset``."""
    d = (int(npix) // 10000) * 10000
    return Path(root) / DATASET_DIR / f"Norder={int(norder)}" / f"Dir={d}" / f"Npix={int(npix)}"


def fragment_path(root: str | os.PathLike, norder: int, npix: int, name: str) -> Path:
    """Final path of fragment ``name`` (without extension) in a pixel directory."""
    return pixel_dir(root, norder, npix) / f"{name}.parquet"


def temp_path(final: Path, token: str | None = None) -> Path:
    """Temporary sibling of ``final``: hidden, so readers skip it until the atomic rename.

    token: a per-writer tag (pid, random) so that two writers of the same fragment (a retried task
    and a worker presumed dead) never write into one temporary file.
    """
    return final.with_name(f".{final.name}.{token}.tmp" if token else f".{final.name}.tmp")


def is_url(location: str | os.PathLike) -> bool:
    """True for an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``), False for a plain path."""
    return isinstance(location, str) and "://" in location


def parse_pixel_dir(path: str | os.PathLike) -> tuple[int, int]:
    """(Norder, Npix) of a fragment or pixel directory path."""
    norder = npix = None
    for part in Path(path).parts:
        if part.startswith("Norder="):
            norder = int(part.split("=", 1)[1])
        elif part.startswith("Npix="):
            npix = int(part.split("=", 1)[1].split(".")[0])
    if norder is None or npix is None:
        raise ValueError(f"{path} is not inside a Norder=K/Dir=D/Npix=N directory")
    return norder, npix


def quarantine_path(root: str | os.PathLike, task: str) -> Path:
    """Quarantine fragment of one task (path, HDU, row, reason of every input it could not use)."""
    return Path(root) / QUARANTINE_DIR / f"{task}.parquet"


def list_quarantine(root: str | os.PathLike) -> list[Path]:
    base = Path(root) / QUARANTINE_DIR
    return sorted(p for p in base.glob("*.parquet") if not p.name.startswith(".")) if base.is_dir() else []


def ingest_work_dir(root: str | os.PathLike) -> Path:
    """Work area of an ingest run: map outputs (``map/``), plan files, done markers."""
    return Path(root) / INGEST_DIR


def compacted_name(npix: int) -> str:
    """File name (without extension) of the merged file of pixel ``npix`` (HATS's default name)."""
    return f"Npix={int(npix)}"


def fragment_listing(root: str | os.PathLike) -> list[tuple[str, int]]:
    """(path string, inode) of every visible Parquet fragment under ``root/dataset``, in the
    order of :func:`fragment_entries`; strings, for callers that list on every query."""
    base = Path(root) / DATASET_DIR
    if not base.is_dir():
        return []
    out: list[tuple[str, int]] = []
    stack = [str(base)]
    while stack:  # os.scandir: one system call per directory, fast on catalogs of 1e4 files
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith((".", "_")):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif e.name.endswith(".parquet"):
                    out.append((e.path, e.inode()))
    # Path order, as before (store manifests hash this order): by components, like PurePosixPath,
    # but on strings (comparing Path objects cost ~15 ms per 1,000 files, per query)
    out.sort(key=lambda x: x[0].split(os.sep))
    return out


def fragment_entries(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """(path, inode) of every visible Parquet fragment under ``root/dataset``, sorted by path.

    Files and directories whose names start with '.' or '_' are skipped, as pyarrow does. The
    inode comes free with the directory listing; since fragments are only ever replaced by a
    rename (never rewritten in place), (path, inode) identifies a file's content.
    """
    return [(Path(p), ino) for p, ino in fragment_listing(root)]


def list_fragments(root: str | os.PathLike) -> list[Path]:
    """All visible Parquet fragments under ``root/dataset``, sorted (deterministic task order).

    Files and directories whose names start with '.' or '_' are skipped, as pyarrow does.
    """
    return [p for p, _ in fragment_entries(root)]


def _record_entries(record: Path) -> tuple[list[str], list[str]]:
    """(merged, merged_from) of a ``_compaction.json``: stems of fragments that were in the same
    pixel directory, and paths (relative to ``dataset/``) of fragments merged up from finer pixels."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return [], []
    if not isinstance(data, dict):
        return [], []
    out = []
    for key in ("merged", "merged_from"):
        names = data.get(key, [])
        out.append([str(n) for n in names] if isinstance(names, list) else [])
    return out[0], out[1]


def compacted_fragments(root: str | os.PathLike) -> set[str]:
    """Fragments merged by ``distlabels compact``, as paths relative to ``root``
    (``dataset/Norder=K/Dir=D/Npix=N/<name>.parquet``).

    They no longer exist under their own names, but their rows are in the catalog: in their
    pixel's ``Npix=N.parquet``, or in the file of a coarser pixel that contains it (compact merges
    sibling pixels upward while their rows stay under a threshold); the pixel's
    ``_compaction.json`` lists them, so a run counts them as written.
    """
    root = Path(root)
    out: set[str] = set()
    for rec in (root / DATASET_DIR).glob(f"Norder=*/Dir=*/Npix=*/{COMPACTION_RECORD}"):
        rel = rec.parent.relative_to(root).as_posix()
        merged, merged_from = _record_entries(rec)
        out.update(f"{rel}/{n}.parquet" for n in merged)
        out.update(f"{DATASET_DIR}/{r}" for r in merged_from)
    return out


def ancestors(norder: int, npix: int) -> list[tuple[int, int]]:
    """The (order, pixel) of every coarser nested HEALPix pixel containing (norder, npix), coarsest first."""
    return [(k, int(npix) >> (2 * (int(norder) - k))) for k in range(int(norder))]


def is_compacted(root: str | os.PathLike, rel: str) -> bool:
    """Whether fragment ``rel`` (relative to ``root``) was merged by ``distlabels compact``, into
    its own pixel's file or into a coarser pixel's."""
    full = Path(root) / rel
    if full.stem in _record_entries(full.parent / COMPACTION_RECORD)[0]:
        return True
    try:
        norder, npix = parse_pixel_dir(full.parent)
        in_dataset = full.relative_to(Path(root) / DATASET_DIR).as_posix()
    except ValueError:
        return False
    return any(in_dataset in _record_entries(pixel_dir(root, k, p) / COMPACTION_RECORD)[1]
               for k, p in ancestors(norder, npix))
