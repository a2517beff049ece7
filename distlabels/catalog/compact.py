"""``distlabels compact``: fewer, larger files (row-count-adaptive HATS partitions), safely.

A run streams one small fragment per finished task into the store's sky pixels (one HEALPix
order), so a catalog holds many files of a few hundred rows; full scans pay per file.
Compaction (1) plans partitions by row count (:mod:`.partitioning`): sibling pixels are merged
upward into a coarser pixel while the merged rows stay under ``max_rows``, as HATS does, so the
catalog ends with mixed orders; (2) writes one ``Npix=N.parquet`` per partition (rows sorted by
``_healpix_29``, zstd, row groups of ``row_group_rows``) in its ``Norder=K/Dir=D/Npix=N/``
directory, with a ``_compaction.json`` naming the fragments it holds; (3) rewrites the
catalog-level files. Pixels that do not change are left as they are.

Safety, for readers and against a crash at any point. Merging pixels upward changes several
directories at once, so the unit of the swap is the whole ``dataset/`` tree:

1. A new tree is built in ``ROOT/_staging/dataset.new/``, outside ``dataset/`` so that no reader
   (pyarrow, DuckDB's ``**`` glob, LSDB) sees it: the merged files, written and fsync'ed, and a
   hard link to every file that does not change (no data copied). A marker file says it is
   complete.
2. The new tree and ``dataset/`` are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``
   (Linux): a reader sees the old tree or the new one, never both and never neither. Where the
   exchange is not available, ``dataset/`` is first renamed to ``_staging/dataset.old`` and the
   new tree into place; a crash between the two renames leaves ``dataset/`` missing until the
   next ``compact`` (or any call of :func:`recover`) puts the new (or, failing that, the old)
   tree back.
3. The old tree is deleted (files kept by hard links live on in the new tree).

A reader that listed the old tree just before the swap and opens its files after it may get a
file-not-found error or files of the new tree; :meth:`distlabels.catalog.Catalog.query` notices
(the ``dataset/`` directory it listed is no longer the one at that path), lists again and
retries, so it never returns duplicated or missing rows. A fit run writing into the catalog at
the same time is refused (see ``_run.json``). The pipeline's re-run check
(``Location.completed``) counts the fragments listed in the ``_compaction.json`` of their own
or of a coarser pixel (:func:`distlabels.paths.compacted_fragments`), so merged fragments are
not fitted again. A later run that streams new fragments into a pixel lying inside a coarser
compacted one writes them into the finer pixel's directory (the store's order); both pixels are
then listed in ``partition_info.csv`` until the next ``compact`` merges the new files into the
coarser pixel (a compacted pixel is never split again).
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
from .partitioning import DEFAULT_MAX_ROWS, plan_partitions
from .writer import write_catalog_meta

__all__ = ["CompactSummary", "compact_catalog", "recover"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class CompactSummary:
    catalog: str
    n_pixels: int = 0            # pixel directories in the catalog
    n_compacted: int = 0         # partitions (pixel directories) written anew
    n_partitions: int = 0        # pixel directories after compaction
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


def _visible_parquet(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".parquet") and not p.name.startswith((".", "_")))


def _record(d: Path) -> dict[str, Any]:
    try:
        data = json.loads((d / paths.COMPACTION_RECORD).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _staged(root: Path, kind: str) -> Path:
    return root / paths.STAGING_DIR / f"{paths.DATASET_DIR}.{kind}"


def _complete_marker(root: Path) -> Path:
    return root / paths.STAGING_DIR / f"{paths.DATASET_DIR}.new.complete"


def recover(root: str | os.PathLike) -> int:
    """Finish or undo what an interrupted ``compact`` left in ``ROOT/_staging``; returns the number
    of trees (or, from an older version's per-pixel swap, pixel directories) put back. Every row
    ends in the catalog exactly once."""
    root = Path(root)
    staging = root / paths.STAGING_DIR
    if not staging.is_dir():
        return 0
    live, restored = root / paths.DATASET_DIR, 0
    if not live.exists():
        # only the two-rename fallback leaves dataset/ missing: the new tree was complete (its
        # marker is written after every file was fsync'ed) before the old one was moved aside
        new, old = _staged(root, "new"), _staged(root, "old")
        src = new if new.is_dir() and _complete_marker(root).exists() else old if old.is_dir() else None
        if src is not None:
            os.rename(src, live)
            _fsync_dir(root)
            restored = 1
    # a per-pixel swap of an older distlabels (``_staging/Norder=K/Dir=D/Npix=N.new|.old``) cut
    # between its two renames: put the pixel back, the merged directory first
    for d in sorted(staging.glob("Norder=*/Dir=*/Npix=*.new")) + sorted(staging.glob("Norder=*/Dir=*/Npix=*.old")):
        norder, npix = paths.parse_pixel_dir(d)
        live_pixel = paths.pixel_dir(root, norder, npix)
        if live.is_dir() and not live_pixel.exists():
            live_pixel.parent.mkdir(parents=True, exist_ok=True)
            os.rename(d, live_pixel)
            restored += 1
    shutil.rmtree(staging)  # with dataset/ in place, whatever is staged is an old or unfinished tree
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


def _read_merge(files: list[Path]) -> pa.Table:
    """The rows of ``files`` in one table sorted by ``_healpix_29``, key-value metadata of the first."""
    tables, n_expected = [], 0
    for f in files:
        t = pq.ParquetFile(f).read()  # the file alone: no dataset discovery, no partition columns
        n_expected += t.num_rows
        tables.append(t)
    schema_md = tables[0].schema.metadata
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")
    if table.num_rows != n_expected:
        raise StoreError(f"merging {files[0].parent} read {table.num_rows} rows instead of {n_expected}; "
                         "nothing was changed.")
    if paths.HEALPIX_COLUMN in table.column_names:  # spatial order: tight row-group statistics
        table = table.sort_by([(paths.HEALPIX_COLUMN, "ascending")])
    return table.replace_schema_metadata(schema_md)


def _write_target(root: Path, new_tree: Path, target: tuple[int, int], sources: dict[tuple[int, int], list[Path]],
                  row_group_rows: int) -> int:
    """Write the merged file and ``_compaction.json`` of pixel ``target`` into ``new_tree``
    (fsync'ed); ``sources``: the files of every pixel that goes into it. Returns its rows."""
    dataset = root / paths.DATASET_DIR
    norder, npix = target
    files = [f for key in sorted(sources) for f in sources[key]]
    table = _read_merge(files)
    live = paths.pixel_dir(root, norder, npix)
    name = paths.compacted_name(npix)
    old_rec = _record(live)
    merged = set(old_rec.get("merged", [])) | {f.stem for f in sources.get(target, []) if f.stem != name}
    merged_from = set(old_rec.get("merged_from", []))
    for (k, p), fs in sources.items():
        if (k, p) == target:
            continue
        src_dir = paths.pixel_dir(root, k, p)
        rec = _record(src_dir)
        rel_dir = src_dir.relative_to(dataset).as_posix()
        merged_from |= {f"{rel_dir}/{n}.parquet" for n in rec.get("merged", [])} | set(rec.get("merged_from", []))
        merged_from |= {f.relative_to(dataset).as_posix() for f in fs if f.stem != paths.compacted_name(p)}
    record = {"generation": int(old_rec.get("generation", 0)) + 1, "merged": sorted(merged),
              "merged_from": sorted(merged_from), "n_rows": table.num_rows,
              "files_merged": [f.relative_to(dataset).as_posix() for f in files],
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_dir = new_tree / live.relative_to(dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.parquet"
    pq.write_table(table, out, compression="zstd", row_group_size=max(int(row_group_rows), 1))
    (out_dir / paths.COMPACTION_RECORD).write_text(json.dumps(record, indent=1))
    for f in (out, out_dir / paths.COMPACTION_RECORD):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return table.num_rows


def _link_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Hard-link every file under ``src`` into ``dst`` (same relative paths), except the files and
    directories in ``skip``, hidden temporaries and the dataset-level ``_metadata`` files (rewritten
    after the swap). Copies where hard links are not supported."""
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip and not n.startswith(".")]
        for n in filenames:
            f = d / n
            if f in skip or n.startswith(".") or (d == src and n in (paths.COMMON_METADATA, paths.PARQUET_METADATA)):
                continue
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, out)
            except OSError:
                shutil.copy2(f, out)


def _fsync_tree(tree: Path) -> None:
    for dirpath, _, _ in os.walk(tree, topdown=False):
        _fsync_dir(Path(dirpath))


def compact_catalog(root: str | os.PathLike, *, max_rows: int | None = DEFAULT_MAX_ROWS, row_group_rows: int = 131_072,
                    min_files: int = 2, force: bool = False, progress: bool = False, workers: int = 4,
                    use_exchange: bool = True, hook: Callable[[str], None] | None = None) -> CompactSummary:
    """Merge the fragments of the catalog at ``root`` into one file per partition, merging sibling
    pixels upward while their rows stay under ``max_rows`` (see :mod:`.partitioning`), then
    rewrite ``catalog.json`` and the HATS files. Idempotent: a compact catalog is left as is
    (apart from the catalog-level files).

    max_rows: rows per merged coarser pixel (None or 0: never merge across pixels, one file per
    pixel directory). min_files: a pixel that stays itself is rewritten when it holds at least
    this many files (1: every pixel, e.g. to sort its rows or change its row groups). workers:
    pixels merged at once (threads; Parquet decoding/encoding and fsync release the GIL). force:
    compact even though ``_run.json`` shows a run that has not finished (only when no run is
    writing). use_exchange=False and ``hook`` (called with "staged", "moved_aside", "swapped")
    exist for tests of the fallback path and of crashes.
    """
    root = Path(root)
    t0 = time.perf_counter()
    dataset = root / paths.DATASET_DIR
    if not dataset.is_dir() and not (root / paths.STAGING_DIR).is_dir():
        raise StoreError(f"{str(root)!r} is not a label catalog: it has no {paths.DATASET_DIR}/ directory.")
    if not force:
        _check_no_run(root)
    with open(root / paths.COMPACT_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DistlabelsError(f"another 'distlabels compact' is running on {root}.") from None
        recover(root)
        listing = paths.list_fragments(root)
        by_pixel: dict[tuple[int, int], list[Path]] = {}
        for f in listing:
            by_pixel.setdefault(paths.parse_pixel_dir(f.relative_to(root)), []).append(f)
        summary = CompactSummary(str(root), n_pixels=len(by_pixel), n_files_before=len(listing))
        rows = {key: sum(pq.read_metadata(f).num_rows for f in fs) for key, fs in by_pixel.items()}
        plan = plan_partitions(rows, max_rows)
        groups: dict[tuple[int, int], dict[tuple[int, int], list[Path]]] = {}
        for key, target in plan.items():
            groups.setdefault(target, {})[key] = by_pixel[key]
        todo = {t: srcs for t, srcs in groups.items()
                if set(srcs) != {t} or len(srcs[t]) >= max(int(min_files), 1)}
        if todo:
            summary.exchange = _rebuild(root, todo, row_group_rows, workers, progress, use_exchange, hook)
            summary.n_compacted = len(todo)
        recover(root)  # removes the emptied staging area
        meta_path = root / paths.CATALOG_META
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except (OSError, ValueError):
            meta = {}
        full = write_catalog_meta(root, meta if isinstance(meta, dict) else {})
        summary.n_rows = int(full.get("n_rows", 0))
        summary.n_files_after = int(full.get("n_fragments", 0))
        summary.n_partitions = int(full.get("n_pixels", 0))
    summary.wall_s = time.perf_counter() - t0
    return summary


def _rebuild(root: Path, todo: dict[tuple[int, int], dict[tuple[int, int], list[Path]]], row_group_rows: int,
             workers: int, progress: bool, use_exchange: bool, hook: Callable[[str], None] | None) -> bool:
    """Build the new dataset tree in ``_staging`` (merged files + hard links to the rest), swap it
    with ``dataset/`` and delete the old tree. Returns whether the atomic exchange was used."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    dataset = root / paths.DATASET_DIR
    new_tree = _staged(root, "new")
    new_tree.mkdir(parents=True)
    listed = {f for srcs in todo.values() for fs in srcs.values() for f in fs}
    rewritten = {paths.pixel_dir(root, *key) for srcs in todo.values() for key in srcs} | \
                {paths.pixel_dir(root, *t) for t in todo}
    _link_tree(dataset, new_tree, rewritten)
    with ThreadPoolExecutor(max(int(workers), 1)) as pool, \
            tqdm(total=len(todo), desc="compact", unit="pixel", disable=not progress) as bar:
        futures = [pool.submit(_write_target, root, new_tree, t, srcs, row_group_rows) for t, srcs in todo.items()]
        try:
            for fut in futures:
                fut.result()
                bar.update(1)
        except BaseException:
            for fut in futures:  # stop at the first failure; the live tree was not touched
                fut.cancel()
            raise
    _fsync_tree(new_tree)
    _complete_marker(root).write_bytes(b"")
    _fsync_dir(new_tree.parent)
    if hook:
        hook("staged")

    exchanged = use_exchange and _exchange(new_tree, dataset)
    if exchanged:
        old = new_tree                # the exchange left the old tree at the staging path
    else:
        old = _staged(root, "old")
        os.rename(dataset, old)
        if hook:
            hook("moved_aside")
        os.rename(new_tree, dataset)
    _fsync_dir(root)
    if hook:
        hook("swapped")
    # fragments a concurrent writer put into a rewritten pixel after the listing are kept, not merged
    for d in rewritten:
        old_dir = old / d.relative_to(dataset)
        if old_dir.is_dir():
            for extra in _visible_parquet(old_dir):
                if d / extra.name not in listed:
                    d.mkdir(parents=True, exist_ok=True)
                    os.replace(extra, d / extra.name)
    shutil.rmtree(old)
    return exchanged
