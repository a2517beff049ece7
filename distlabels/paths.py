"""Every path and file name in a spectra store, a label catalog and a model directory.

One module owns the layout so that the writer, the reader and the pipeline never disagree.
Stores and catalogs share one HATS-style layout::

    ROOT/
      store.json | catalog.json          description (grid, medium, counts, provenance)
      _run.json                          catalog only: model sha256, config hash, store manifest
      _quarantine/                       inputs that could not be used (one fragment per task)
      _failures.parquet                  partitions that kept failing
      _run.log.jsonl                     catalog only: structured log, one JSON record per partition
      _done/                             catalog on object storage only: one completion marker per fragment
      dataset/Norder=K/Dir=D/Npix=N/     one directory per sky pixel (nested HEALPix, order K)
          part-XXXX.parquet              fragments; written as .part-XXXX.parquet.tmp then renamed

Dir = (Npix // 10000) * 10000, as in HATS. Hidden files (leading '.' or '_') are ignored by
pyarrow, DuckDB and pandas, so a fragment half written is never read.
"""
from __future__ import annotations

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
HEALPIX_COLUMN = "_healpix_29"
HEALPIX_ORDER = 29


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


def list_fragments(root: str | os.PathLike) -> list[Path]:
    """All visible Parquet fragments under ``root/dataset``, sorted (deterministic task order)."""
    base = Path(root) / DATASET_DIR
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*.parquet") if not p.name.startswith((".", "_")))
