"""Row-count-adaptive sky partitioning for ``distlabels compact`` (the way HATS sizes partitions).

A fit run writes one directory per sky pixel of the spectra store (one HEALPix order, say 5),
whatever the pixel holds. For queries that scan the catalog, many small files cost more than
the rows they hold, so ``compact`` merges sibling pixels upward into a coarser pixel while the
merged rows stay under ``max_rows``: dense sky keeps fine pixels, sparse sky ends in coarse
ones. The result is a valid HATS partitioning of mixed orders (no two pixels overlap).

:func:`plan_partitions` is pure: it maps each existing pixel directory to the pixel it goes into.
Rule, from the coarsest order down: a pixel becomes one partition when it already exists as a
directory (a pixel compacted earlier is never split; finer pixels streamed in under it later join
it) or when all the rows under it fit in ``max_rows``; otherwise its four children are looked at.
A pixel holding more than ``max_rows`` on its own stays as it is (compact never splits a file).
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DEFAULT_MAX_ROWS", "plan_partitions"]

# 40,000 rows (about 6 MB of labels) per file: a catalog of 10 million stars spread over the sky
# ends at order 3 (768 files of ~13,000 rows; an order-2 pixel would hold ~52,000), where a
# 1-degree cone touches 1-4 files (<= 0.5 %). Larger values: fewer files, faster full scans,
# but each cone search reads more rows.
DEFAULT_MAX_ROWS = 40_000


def plan_partitions(pixel_rows: Mapping[tuple[int, int], int],
                    max_rows: int | None) -> dict[tuple[int, int], tuple[int, int]]:
    """Target pixel of every existing pixel: ``{(norder, npix): (norder', npix')}`` with
    norder' <= norder and npix' its ancestor (or itself).

    pixel_rows: rows of every existing pixel directory (nested HEALPix). max_rows: None or 0
    keeps every pixel (one file per pixel directory, no merging across pixels).
    """
    units = {(int(k), int(p)): int(n) for (k, p), n in pixel_rows.items()}
    if not max_rows or max_rows <= 0:
        return {u: u for u in units}
    target: dict[tuple[int, int], tuple[int, int]] = {}
    pending = list(units)
    for order in range(max((k for k, _ in units), default=-1) + 1):
        groups: dict[int, list[tuple[int, int]]] = {}
        for k, p in pending:
            groups.setdefault(p >> (2 * (k - order)), []).append((k, p))
        left = []
        for q, members in groups.items():
            exists = (order, q) in units
            if exists or sum(units[m] for m in members) <= max_rows:
                target.update((m, (order, q)) for m in members)
            else:
                left += members
        pending = left
    return target
