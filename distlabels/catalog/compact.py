"""``distlabels compact``: merge the fragments of each pixel directory into one file, safely.

A run streams one small fragment per finished task, so a pixel directory holds many files of a
few hundred rows; queries pay per file. Compaction rewrites each pixel that holds two or more
files as one ``Npix=N.parquet`` (rows sorted by ``_healpix_29``, zstd, row groups of
``row_group_rows``) and then rewrites the catalog-level files.

Safety, for readers and against a crash at any point:

1. The merged file and a ``_compaction.json`` record (the names of the fragments it holds) are
   written and fsync'ed in ``ROOT/_staging/Norder=K/Dir=D/Npix=N.new/``, outside ``dataset/``,
   so no reader (pyarrow, DuckDB's ``**`` glob, LSDB) ever sees them there.
2. The staged directory and the live ``Npix=N`` directory are swapped in one atomic
   ``renameat2(RENAME_EXCHANGE)`` (Linux): a reader listing the pixel sees either all the old
   fragments or the merged file, never both and never neither. Where the exchange is not
   available, the live directory is first renamed to ``Npix=N.old`` and the staged one into
   place; a crash between the two renames leaves the pixel missing until the next ``compact``
   (or any call of :func:`recover`) puts the merged (or, failing that, the old) directory back.
3. The old directory, now in ``_staging``, is deleted.

A reader that listed the old files just before the swap and opens them after it gets a
file-not-found error (never wrong rows); :meth:`distlabels.catalog.Catalog.query` lists again
and retries. A fit run writing into the catalog at the same time is refused (see ``_run.json``):
fragments written into a directory while it is swapped out would be lost. The pipeline's
re-run check (``Location.completed``) counts the fragments listed in ``_compaction.json``
(:func:`distlabels.paths.compacted_fragments`), so merged fragments are not fitted again.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..errors import DistlabelsError, StoreError
from .writer import write_catalog_meta

__all__ = ["CompactSummary", "compact_catalog", "recover"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class CompactSummary:
    catalog: str
    n_pixels: int = 0            # pixel directories in the catalog
    n_compacted: int = 0         # pixel directories rewritten as one file
    n_files_before: int = 0
    n_files_after: int = 0
    n_rows: int = 0
    wall_s: float = 0.0
    exchange: bool = True        # atomic swaps used (False: two renames)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel or a file system without exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging(root: Path, norder: int, npix: int, kind: str) -> Path:
    live = paths.pixel_dir(root, norder, npix)
    return root / paths.STAGING_DIR / live.parent.parent.name / live.parent.name / f"{live.name}.{kind}"


def _visible_parquet(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".parquet") and not p.name.startswith((".", "_")))


def _record(d: Path) -> dict[str, Any]:
    try:
        data = json.loads((d / paths.COMPACTION_RECORD).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def recover(root: str | os.PathLike) -> int:
    """Finish or undo what an interrupted ``compact`` left in ``ROOT/_staging``; returns the number
    of pixel directories put back. Every pixel ends with all its rows exactly once."""
    root = Path(root)
    staging = root / paths.STAGING_DIR
    if not staging.is_dir():
        return 0
    restored = 0
    for d in sorted(staging.glob("Norder=*/Dir=*/Npix=*.*")):
        stem, kind = d.name.rsplit(".", 1)
        norder, npix = paths.parse_pixel_dir(d.parent.parent / d.parent.name / stem)
        live = paths.pixel_dir(root, norder, npix)
        if not live.exists():
            # only the two-rename fallback leaves a pixel missing; the staged directory was
            # complete before the live one was moved aside, so prefer it, else restore the old one
            new, old = _staging(root, norder, npix, "new"), _staging(root, norder, npix, "old")
            src = new if new.is_dir() else old if old.is_dir() else None
            if src is not None:
                live.parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, live)
                restored += 1
        if d.exists() and kind in ("new", "old"):
            shutil.rmtree(d)
    for d in sorted(staging.glob("**/*"), reverse=True) + [staging]:  # empty folders, deepest first
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return restored


def _check_no_run(root: Path) -> None:
    run_file = root / paths.RUN_FILE
    if not run_file.is_file():
        return
    try:
        run = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(run, dict):
        return
    # "status" is "running" from start to end of a run; older records have only started/finished
    running = run.get("status") == "running" or ("status" not in run and run.get("started") and not run.get("finished"))
    if running:
        raise DistlabelsError(f"a fit run into {root} has started and not finished (see {paths.RUN_FILE}); "
                              "let it finish or re-run it to completion before compacting, or pass --force "
                              "if no run is writing.")


def _merge_pixel(root: Path, norder: int, npix: int, files: list[Path], row_group_rows: int, use_exchange: bool,
                 hook: Callable[[str], None] | None) -> bool:
    """Rewrite pixel (norder, npix), whose visible files are ``files``, as one file. Returns
    whether the atomic exchange was used."""
    live = paths.pixel_dir(root, norder, npix)
    name = paths.compacted_name(npix)
    tables, n_expected = [], 0
    for f in files:
        t = pq.ParquetFile(f).read()  # the file alone: no dataset discovery, no partition columns
        n_expected += t.num_rows
        tables.append(t)
    schema_md = tables[0].schema.metadata
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")
    if table.num_rows != n_expected:
        raise StoreError(f"merging {live} read {table.num_rows} rows instead of {n_expected}; nothing was changed.")
    if paths.HEALPIX_COLUMN in table.column_names:  # spatial order: tight row-group statistics
        table = table.sort_by([(paths.HEALPIX_COLUMN, "ascending")])
    table = table.replace_schema_metadata(schema_md)
    old_rec = _record(live)
    merged = set(old_rec.get("merged", [])) | {f.stem for f in files if f.stem != name}
    record = {"generation": int(old_rec.get("generation", 0)) + 1, "merged": sorted(merged),
              "n_rows": table.num_rows, "files_merged": [f.name for f in files],
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    stage = _staging(root, norder, npix, "new")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    out = stage / f"{name}.parquet"
    pq.write_table(table, out, compression="zstd", row_group_size=max(int(row_group_rows), 1))
    (stage / paths.COMPACTION_RECORD).write_text(json.dumps(record, indent=1))
    for f in (out, stage / paths.COMPACTION_RECORD):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(stage)
    if hook:
        hook("staged")

    exchanged = use_exchange and _exchange(stage, live)
    if exchanged:
        old = stage                   # the exchange left the old directory at the staging path
    else:
        old = _staging(root, norder, npix, "old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(live, old)
        if hook:
            hook("moved_aside")
        os.rename(stage, live)
    _fsync_dir(live.parent)
    if hook:
        hook("swapped")
    # fragments that arrived after the listing (a concurrent writer) are kept, not merged
    done = {f.name for f in files}
    for extra in _visible_parquet(old):
        if extra.name not in done:
            os.replace(extra, live / extra.name)
    shutil.rmtree(old)
    return exchanged


def compact_catalog(root: str | os.PathLike, *, row_group_rows: int = 131_072, min_files: int = 2,
                    force: bool = False, progress: bool = False, workers: int = 4, use_exchange: bool = True,
                    hook: Callable[[str], None] | None = None) -> CompactSummary:
    """Merge the fragments of every pixel directory of the catalog at ``root`` into one file each,
    then rewrite ``catalog.json`` and the HATS files. Idempotent: a compact catalog is left as is
    (apart from the catalog-level files).

    min_files: pixels with at least this many files are rewritten (1: every pixel, e.g. to sort
    its rows or change its row groups). workers: pixels merged at once (threads; the work is
    Parquet decoding/encoding and fsync, which release the GIL). force: compact even though ``_run.json`` shows a run
    that has not finished (only when no run is writing). use_exchange=False and ``hook`` (called with "staged", "moved_aside",
    "swapped") exist for tests of the fallback path and of crashes.
    """
    root = Path(root)
    t0 = time.perf_counter()
    if not (root / paths.DATASET_DIR).is_dir():
        raise StoreError(f"{str(root)!r} is not a label catalog: it has no {paths.DATASET_DIR}/ directory.")
    if not force:
        _check_no_run(root)
    with open(root / paths.COMPACT_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DistlabelsError(f"another 'distlabels compact' is running on {root}.") from None
        recover(root)
        by_pixel: dict[tuple[int, int], list[Path]] = {}
        for f in paths.list_fragments(root):
            by_pixel.setdefault(paths.parse_pixel_dir(f.relative_to(root)), []).append(f)
        summary = CompactSummary(str(root), n_pixels=len(by_pixel),
                                 n_files_before=sum(len(v) for v in by_pixel.values()))
        todo = [(k, v) for k, v in by_pixel.items() if len(v) >= max(int(min_files), 1)]
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max(int(workers), 1)) as pool, \
                tqdm(total=len(todo), desc="compact", unit="pixel", disable=not progress) as bar:
            futures = [pool.submit(_merge_pixel, root, norder, npix, files, row_group_rows, use_exchange, hook)
                       for (norder, npix), files in todo]
            try:
                for fut in futures:
                    summary.exchange &= fut.result()
                    summary.n_compacted += 1
                    bar.update(1)
            except BaseException:
                for fut in futures:  # stop at the first failure; pixels in flight finish or stop safely
                    fut.cancel()
                raise
        recover(root)  # removes the emptied staging folders
        meta_path = root / paths.CATALOG_META
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except (OSError, ValueError):
            meta = {}
        full = write_catalog_meta(root, meta if isinstance(meta, dict) else {})
        summary.n_rows = int(full.get("n_rows", 0))
        summary.n_files_after = int(full.get("n_fragments", 0))
    summary.wall_s = time.perf_counter() - t0
    return summary
